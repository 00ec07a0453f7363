"""Shared helpers for inference tests: a tiny, fast RootSAM predictor config."""

from __future__ import annotations

import numpy as np

from rootflow.inference.rootsam import RootSAMInferenceConfig

TINY = RootSAMInferenceConfig(variant="test", device="cpu", lattice_points_per_side=2,
                              point_batch_size=4, auto_n_pos=2, auto_n_neg=2,
                              tile_batch_size=2, iou_threshold=0.0)


def root_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A dark soil-like background with a few bright diagonal 'roots' (uint8 RGB)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(40, 90, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for k in range(3):
        band = np.abs((yy - xx * (0.5 + k * 0.3)) - k * h / 3) < 3
        img[band] = (220, 210, 190)
    return img
