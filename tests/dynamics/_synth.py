"""Seeded synthetic windows for the dynamics tests: soil texture crops and line roots."""

from __future__ import annotations

import numpy as np


def texture(h: int = 600, w: int = 800, seed: int = 0) -> np.ndarray:
    """A soil-like RGB texture (blurred noise at two scales), larger than any crop."""
    import cv2

    rng = np.random.default_rng(seed)
    a = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 2.0)
    b = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 8.0)
    g = 0.6 * a / a.std() + 0.4 * b / b.std()
    g = np.clip(128 + 35 * g, 0, 255).astype(np.uint8)
    return np.repeat(g[..., None], 3, axis=2)


def crop(big: np.ndarray, x0: int, y0: int, h: int = 240, w: int = 320) -> np.ndarray:
    return np.ascontiguousarray(big[y0:y0 + h, x0:x0 + w])


def lines(shape: tuple[int, int], segs: list[tuple[int, int, int, int]], *,
          thickness: int = 5) -> np.ndarray:
    """Bool mask with thick straight roots from (x0, y0) to (x1, y1)."""
    import cv2

    m = np.zeros(shape, np.uint8)
    for x0, y0, x1, y1 in segs:
        cv2.line(m, (x0, y0), (x1, y1), 255, thickness)
    return m > 0
