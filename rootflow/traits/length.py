"""Length estimators: our smoothed centre-line length, and the two classic step counts.

* :func:`smooth_path` / :func:`smooth_loop`: the estimator behind ``length_mm``. Each skeleton
  branch is a chain of pixel centres; a digital straight line at 30 degrees is a staircase of
  1 and sqrt(2) steps whose length is ~5-8 % too long. Averaging the chain's coordinates over
  a short moving window (ends pinned) recovers the underlying direction, and the polyline
  through the averaged points is within ~1 % of the true length at every angle; unlike
  Douglas-Peucker simplification (RhizoVision Explorer 2.6) it does not cut the chord of
  curved roots, and unlike corner-count estimators (Vossepoel-Smeulders: 0.980 per orthogonal
  step) it is exact for axis-aligned and diagonal roots.
* :func:`rve_length_px`: 1 per orthogonal and sqrt(2) per diagonal neighbour pair, the rule of
  RhizoVision Explorer up to 2.0.3 (over-estimates oblique roots by up to ~8 %).
* :func:`kimura_length_px`: Kimura et al. (1999), ``sqrt(Nd^2 + (Nd + No/2)^2) + No/2``,
  counted exactly as RootDetector does (a pixel with an orthogonal neighbour below or to the
  right counts once in ``No``; a 2x2 block with either diagonal pair counts once in ``Nd``).
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

SQRT2 = math.sqrt(2.0)


def rve_length_px(skeleton: np.ndarray) -> float:
    """1 per orthogonal + sqrt(2) per diagonal 8-neighbour pair of a bool skeleton."""
    s = np.asarray(skeleton, dtype=bool)
    n_orth = int((s[1:, :] & s[:-1, :]).sum() + (s[:, 1:] & s[:, :-1]).sum())
    n_diag = int((s[1:, 1:] & s[:-1, :-1]).sum() + (s[1:, :-1] & s[:-1, 1:]).sum())
    return n_orth + SQRT2 * n_diag


def kimura_length_px(skeleton: np.ndarray) -> float:
    """Kimura et al. (1999) length of a bool skeleton, counted as RootDetector counts it."""
    s = np.asarray(skeleton, dtype=bool)
    p = np.zeros((s.shape[0] + 1, s.shape[1] + 1), bool)
    p[:-1, :-1] = s
    here, right, down, down_right = p[:-1, :-1], p[:-1, 1:], p[1:, :-1], p[1:, 1:]
    n_orth = int((here & (right | down)).sum())
    n_diag = int(((here & down_right) | (right & down)).sum())
    return kimura_formula(n_orth, n_diag)


def kimura_formula(n_orth: float, n_diag: float) -> float:
    """``sqrt(Nd^2 + (Nd + No/2)^2) + No/2``."""
    return math.sqrt(n_diag**2 + (n_diag + n_orth / 2.0) ** 2) + n_orth / 2.0


@nb.njit(cache=True, nogil=True)
def step_counts(img, w, pix):  # pragma: no cover - compiled
    """``(rve_orth_pairs, rve_diag_pairs, kimura_no, kimura_nd)`` of a padded flat skeleton."""
    n_orth = 0
    n_diag = 0
    k_orth = 0
    k_diag = 0
    for i in range(pix.size):
        p = pix[i]
        right = img[p + 1] != 0
        down = img[p + w] != 0
        dr = img[p + w + 1] != 0
        dl = img[p + w - 1] != 0
        n_orth += int(right) + int(down)
        n_diag += int(dr) + int(dl)
        if right or down:
            k_orth += 1
        # RootDetector anchors a 2x2 block at its top-left pixel and counts it once if either
        # diagonal pair is present: main diagonal anchored here, anti-diagonal at p - 1.
        if dr:
            k_diag += 1
        # anti-diagonal (p, p + w - 1) belongs to the block anchored at p - 1, which was
        # already counted from pixel p - 1 if its main diagonal (p - 1, p + w) is present.
        if dl and not (img[p - 1] != 0 and down):
            k_diag += 1
    return n_orth, n_diag, k_orth, k_diag


@nb.njit(cache=True, nogil=True)
def smooth_path(ys, xs, half, out_y, out_x):  # pragma: no cover - compiled
    """Moving average with a window that shrinks symmetrically at the ends (ends stay put)."""
    n = ys.size
    cy = np.empty(n + 1)
    cx = np.empty(n + 1)
    cy[0] = 0.0
    cx[0] = 0.0
    for i in range(n):
        cy[i + 1] = cy[i] + ys[i]
        cx[i + 1] = cx[i] + xs[i]
    for i in range(n):
        h = min(half, i, n - 1 - i)
        a = i - h
        b = i + h + 1
        out_y[i] = (cy[b] - cy[a]) / (b - a)
        out_x[i] = (cx[b] - cx[a]) / (b - a)


@nb.njit(cache=True, nogil=True)
def smooth_loop(ys, xs, half, out_y, out_x):  # pragma: no cover - compiled
    """Circular moving average for closed loops (no ends to pin)."""
    n = ys.size
    h = min(half, (n - 1) // 2)
    for i in range(n):
        sy = 0.0
        sx = 0.0
        for j in range(i - h, i + h + 1):
            k = j % n
            sy += ys[k]
            sx += xs[k]
        out_y[i] = sy / (2 * h + 1)
        out_x[i] = sx / (2 * h + 1)
