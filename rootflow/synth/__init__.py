"""rootflow.synth."""
