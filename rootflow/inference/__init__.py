"""rootflow.inference."""
