"""Helpers for the synth tests: a skeleton length estimate independent of the generator."""

from __future__ import annotations

import numpy as np


def skeleton_length_px(mask: np.ndarray) -> float:
    """Length of a mask's skeleton: 1 per 4-connected link, sqrt(2) per diagonal-only link.

    Deliberately simple (not the TRAITS engineer's estimator): it only has to show that the
    generator's analytic length describes what was drawn.
    """
    from skimage.morphology import skeletonize

    sk = skeletonize(mask)
    n4 = (sk[:, :-1] & sk[:, 1:]).sum() + (sk[:-1, :] & sk[1:, :]).sum()
    d1 = sk[:-1, :-1] & sk[1:, 1:]
    d2 = sk[:-1, 1:] & sk[1:, :-1]
    # A diagonal link already covered by two 4-links (an L corner) is not counted again.
    corner1 = d1 & ~(sk[:-1, 1:] | sk[1:, :-1])
    corner2 = d2 & ~(sk[:-1, :-1] | sk[1:, 1:])
    return float(n4 + np.sqrt(2) * (corner1.sum() + corner2.sum()))
