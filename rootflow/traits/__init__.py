"""rootflow.traits."""
