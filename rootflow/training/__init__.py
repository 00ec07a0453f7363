"""rootflow.training."""
