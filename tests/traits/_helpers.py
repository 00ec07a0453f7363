"""Exact test geometry: roots as unions of capsules around a polyline, rasterised by pixel centre.

A pixel is root when its centre lies within ``width / 2`` of the centre line (a capsule
union: round caps, round joints). The centre-line length of such a root, tip to tip, is the
polyline length plus ``width / 2`` at each free end; a closed ring has no ends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Shape:
    mask: np.ndarray
    length_px: float
    width_px: float


def polyline_mask(points: np.ndarray, width: float, shape: tuple[int, int], *,
                  closed: bool = False) -> np.ndarray:
    """Bool mask of all pixels whose centre is within ``width / 2`` of the polyline."""
    pts = np.asarray(points, float)
    if closed:
        pts = np.vstack([pts, pts[:1]])
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(float)
    best = np.full(shape, np.inf)
    pad = width / 2 + 2
    for (y0, x0), (y1, x1) in zip(pts[:-1], pts[1:], strict=True):
        ya, yb = int(max(0, math.floor(min(y0, y1) - pad))), int(min(h, math.ceil(max(y0, y1) + pad) + 1))
        xa, xb = int(max(0, math.floor(min(x0, x1) - pad))), int(min(w, math.ceil(max(x0, x1) + pad) + 1))
        if ya >= yb or xa >= xb:
            continue
        py, px = yy[ya:yb, xa:xb], xx[ya:yb, xa:xb]
        dy, dx = y1 - y0, x1 - x0
        seg2 = dy * dy + dx * dx
        t = np.zeros_like(py) if seg2 == 0 else np.clip(((py - y0) * dy + (px - x0) * dx) / seg2, 0, 1)
        d = np.hypot(py - (y0 + t * dy), px - (x0 + t * dx))
        np.minimum(best[ya:yb, xa:xb], d, out=best[ya:yb, xa:xb])
    return best < width / 2


def _polyline_length(points: np.ndarray, closed: bool = False) -> float:
    pts = np.asarray(points, float)
    if closed:
        pts = np.vstack([pts, pts[:1]])
    return float(np.hypot(*np.diff(pts, axis=0).T).sum())


def capsule(angle_deg: float, length: float, width: float) -> Shape:
    """A straight root with round tips; ``length`` is tip to tip.

    The centre is nudged by a sub-pixel offset (deterministically) until the raster's area is
    within 2.5 % of the analytic area (at 45 degrees rows of pixel centres are sqrt(2)/2 apart, so not every width can do better), so the tests measure the estimator, not the raster.
    """
    core = length - width
    size = int(length + 2 * width + 10)
    a = math.radians(angle_deg)
    uy, ux = -math.sin(a), math.cos(a)
    analytic = core * width + math.pi * width * width / 4
    offsets = [(0.25, 0.1)] + [(oy / 8, ox / 8) for oy in range(4) for ox in range(8)]
    for oy, ox in offsets:
        cy, cx = size / 2 + oy, size / 2 + ox
        pts = np.array([[cy - uy * core / 2, cx - ux * core / 2],
                        [cy + uy * core / 2, cx + ux * core / 2]])
        m = polyline_mask(pts, width, (size, size))
        if abs(m.sum() / analytic - 1) < 0.025 or width < 5:
            return Shape(m, length, width)
    raise AssertionError("no faithful raster for this bar")


def cut_bar(angle_deg: float, width: float, size: int = 260) -> Shape:
    """A straight root crossing the whole frame through its centre (square ends at the edges)."""
    a = math.radians(angle_deg)
    uy, ux = -math.sin(a), math.cos(a)
    c = size / 2 + 0.25
    far = 2.0 * size
    pts = np.array([[c - uy * far, c - ux * far], [c + uy * far, c + ux * far]])
    m = polyline_mask(pts, width, (size, size))
    # the part of the centre line inside the frame [-0.5, size - 0.5]^2
    ts = []
    for comp, u in ((c, uy), (c, ux)):
        if abs(u) > 1e-12:
            ts += [(-0.5 - comp) / u, (size - 0.5 - comp) / u]
    ts = sorted(ts)
    inside = [t for t in ts if all(-0.5 - 1e-9 <= v <= size - 0.5 + 1e-9 for v in (c + t * uy, c + t * ux))]
    return Shape(m, max(inside) - min(inside), width)


def arc(radius: float, span_deg: float, width: float) -> Shape:
    """A circular arc with round tips; length = arc length + width (two half caps)."""
    size = int(2 * radius + 2 * width + 10)
    c = size / 2 + 0.25
    th = np.radians(np.linspace(0, span_deg, int(span_deg * 2) + 1))
    pts = np.stack([c - radius * np.sin(th), c + radius * np.cos(th)], axis=1)
    return Shape(polyline_mask(pts, width, (size, size)), _polyline_length(pts) + width, width)


def ring(radius: float, width: float) -> Shape:
    """A closed ring: no tips, no branch points; length = circumference."""
    size = int(2 * radius + 2 * width + 10)
    c = size / 2 + 0.25
    th = np.radians(np.arange(0, 360, 0.5))
    pts = np.stack([c - radius * np.sin(th), c + radius * np.cos(th)], axis=1)
    return Shape(polyline_mask(pts, width, (size, size), closed=True),
                 _polyline_length(pts, closed=True), width)


def star(arm_angles_deg: list[float], arm_length: float, width: float) -> Shape:
    """Arms from one centre point (a Y with three arms); length = sum of arms + half caps."""
    size = int(2 * arm_length + 2 * width + 10)
    c = size / 2 + 0.25
    m = np.zeros((size, size), bool)
    for a in np.radians(arm_angles_deg):
        pts = np.array([[c, c], [c - arm_length * math.sin(a), c + arm_length * math.cos(a)]])
        m |= polyline_mask(pts, width, (size, size))
    return Shape(m, len(arm_angles_deg) * (arm_length + width / 2), width)
