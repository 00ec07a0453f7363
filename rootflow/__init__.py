"""rootflow: minirhizotron images to calibrated root traits."""
__version__ = "0.1.0"
