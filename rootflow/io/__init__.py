"""Storage, manifests and image decoding: everything between a URI and a numpy array."""
