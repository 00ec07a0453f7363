"""rootflow.lake."""
