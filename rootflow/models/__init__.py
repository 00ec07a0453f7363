"""Models: registry, weight specs, checkpoint I/O, RootSAM, RootQuant."""
