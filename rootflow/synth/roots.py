"""Root system geometry: branching centre lines in millimetres, their growth, clipping and drawing.

A scene (one tube window over one season) holds a fixed set of roots. Each root is a smooth
polyline in frame millimetres (x to the right, y down the image) with a diameter at every vertex,
a birth day and an elongation speed. Growth is a prefix of the polyline: at day ``t`` a root
shows the first ``(t - birth_day) * speed_mm_per_day`` millimetres of its centre line, so a later
session always *extends* the roots of an earlier one, and laterals are born only once their
parent has grown past the branch point.

Why geometry in millimetres: the same scene rendered at 150 and 300 dpi has the same roots, and
ground truth is computed on the geometry (exact) rather than measured on pixels.

Ground-truth conventions (used by :mod:`rootflow.synth.render`):

* **length** of a root is the length of its grown centre line clipped to the visible soil box
  (Liang-Barsky per segment, so it is exact for the polyline that is drawn);
* **diameter** is the *drawn* diameter, i.e. the sampled diameter raised to at least
  ``min_width_px`` pixels at the render dpi (a 0.1 mm root is 0.6 px at 150 dpi and would not
  exist in a mask); the mean is weighted by visible length;
* the **mask** holds every pixel whose centre lies inside the tube of a visible root (see
  :func:`tube_pixels`), cut to the box.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np


@dataclasses.dataclass(frozen=True)
class RootGeom:
    """One root's full-season centre line (frame millimetres).

    Attributes:
        root_id: index in the scene (stable for a scene seed).
        parent_id: ``root_id`` of the parent, ``None`` for a primary (order 1) root.
        order: 1 for primaries, 2 for their laterals, 3 for laterals of laterals.
        points_mm: ``(N, 2)`` float64 vertices ``(x, y)``; the first vertex is the base.
        diameter_mm: ``(N,)`` float64 sampled diameter at each vertex (before the pixel floor).
        birth_day: day (since the start of the season) when the root starts to grow.
        speed_mm_per_day: elongation speed.
    """

    root_id: int
    parent_id: int | None
    order: int
    points_mm: np.ndarray
    diameter_mm: np.ndarray
    birth_day: float
    speed_mm_per_day: float

    @property
    def arc_mm(self) -> np.ndarray:
        """Cumulative centre-line length at each vertex, shape ``(N,)``."""
        seg = np.hypot(*np.diff(self.points_mm, axis=0).T)
        return np.concatenate([[0.0], np.cumsum(seg)])

    @property
    def total_length_mm(self) -> float:
        return float(self.arc_mm[-1])

    def grown(self, day: float | None) -> tuple[np.ndarray, np.ndarray]:
        """Vertices and diameters of the part grown by ``day`` (``None`` = fully grown).

        The last vertex is interpolated so the grown length is exactly ``(day - birth) * speed``.
        Returns empty arrays when the root has not started yet.
        """
        if day is None:
            return self.points_mm, self.diameter_mm
        grown = (day - self.birth_day) * self.speed_mm_per_day
        arc = self.arc_mm
        if grown <= 0:
            return np.zeros((0, 2)), np.zeros(0)
        if grown >= arc[-1]:
            return self.points_mm, self.diameter_mm
        k = int(np.searchsorted(arc, grown, side="right"))  # arc[k-1] <= grown < arc[k]
        t = (grown - arc[k - 1]) / max(arc[k] - arc[k - 1], 1e-12)
        tip = self.points_mm[k - 1] + t * (self.points_mm[k] - self.points_mm[k - 1])
        d_tip = self.diameter_mm[k - 1] + t * (self.diameter_mm[k] - self.diameter_mm[k - 1])
        return (np.vstack([self.points_mm[:k], tip[None]]),
                np.concatenate([self.diameter_mm[:k], [d_tip]]))


@dataclasses.dataclass(frozen=True)
class GrowthParams:
    """Knobs of the root architecture (defaults give maize-like fibrous systems)."""

    roots_per_dm2: float = 3.0        # primary roots per 100 cm2 of the (padded) frame
    branching: float = 1.0            # multiplier on lateral branching rates
    step_mm: float = 0.5              # centre-line vertex spacing
    arrival_day: float = 0.0          # first day a primary can start in this window
    max_roots: int = 600


def _walk(rng: np.random.Generator, start: np.ndarray, heading: float, length_mm: float,
          step_mm: float, curvature_sd: float, gravitropism: float) -> np.ndarray:
    """Smooth random centre line: heading driven by an Ornstein-Uhlenbeck curvature.

    A correlated curvature (rather than white-noise heading) gives the long smooth bends of
    real roots instead of a jittery random walk; ``gravitropism`` relaxes the heading towards
    +y (down the image, which is down the tube). Both are linear AR(1) recursions.
    """
    n = max(2, int(math.ceil(length_mm / step_mm)) + 1)
    a = 0.92  # OU memory per step
    noise = rng.standard_normal(n - 1) * (curvature_sd * math.sqrt(1 - a * a))
    kappa = _ar1(noise, a, 0.0)
    g = min(gravitropism * step_mm, 0.5)
    # h_i = (1 - g) h_{i-1} + g * pi/2 + kappa_i * step, starting from ``heading``.
    drive = kappa * step_mm + g * math.pi / 2
    theta = _ar1(drive, 1 - g, heading)
    ds = np.full(n - 1, step_mm)
    ds[-1] = length_mm - step_mm * (n - 2)
    steps = np.stack([np.cos(theta) * ds, np.sin(theta) * ds], axis=1)
    return np.vstack([start[None], start[None] + np.cumsum(steps, axis=0)])


def _ar1(x: np.ndarray, a: float, y0: float) -> np.ndarray:
    """``y[i] = a * y[i-1] + x[i]`` with ``y[-1] = y0``, vectorised in blocks.

    Closed form per block: ``y[i] = a^(i+1) * (y0 + sum_{j<=i} x[j] / a^(j+1))``; blocks of
    128 keep ``a^-128`` finite for any ``a`` used here (scipy.signal.lfilter would do, but
    importing it costs over a second).
    """
    out = np.empty(len(x))
    prev = y0
    for s in range(0, len(x), 128):
        blk = x[s:s + 128]
        pw = a ** np.arange(1, len(blk) + 1)
        out[s:s + len(blk)] = pw * (prev + np.cumsum(blk / pw))
        prev = out[s + len(blk) - 1]
    return out


def _diameters(rng: np.random.Generator, n: int, d_base: float, taper: float) -> np.ndarray:
    """Diameter along a root: linear taper to ``taper * d_base`` plus a slow +-8 % wobble."""
    t = np.linspace(0.0, 1.0, n)
    wobble = 1.0 + 0.08 * np.sin(2 * math.pi * (rng.uniform(0.5, 2.5) * t + rng.uniform()))
    return d_base * (1.0 - (1.0 - taper) * t) * wobble


def grow_scene(rng: np.random.Generator, *, width_mm: float, height_mm: float,
               params: GrowthParams) -> list[RootGeom]:
    """Sample one window's root system for a season.

    Primaries start in a box padded by 30 mm around the frame (so many enter from the edges),
    head mostly downwards, and carry Poisson-distributed laterals outside a basal and an
    apical unbranched zone; laterals carry shorter, thinner third-order roots.
    """
    pad = 30.0
    area_dm2 = (width_mm + 2 * pad) * (height_mm + 2 * pad) / 1e4
    n_primary = int(rng.poisson(params.roots_per_dm2 * area_dm2))
    roots: list[RootGeom] = []

    def add(parent: RootGeom | None, order: int, start: np.ndarray, heading: float,
            length: float, d_base: float, birth: float, speed: float) -> RootGeom | None:
        if len(roots) >= params.max_roots:
            return None
        curv = {1: 0.035, 2: 0.07, 3: 0.11}[order]
        grav = {1: 0.004, 2: 0.0015, 3: 0.0}[order]
        pts = _walk(rng, start, heading, length, params.step_mm, curv, grav)
        taper = {1: 0.75, 2: 0.7, 3: 0.8}[order]
        diam = _diameters(rng, len(pts), d_base, taper)
        root = RootGeom(root_id=len(roots), parent_id=None if parent is None else parent.root_id,
                        order=order, points_mm=pts, diameter_mm=diam, birth_day=birth,
                        speed_mm_per_day=speed)
        roots.append(root)
        return root

    def branch(parent: RootGeom, order: int) -> None:
        rate = {2: 0.07, 3: 0.04}[order] * params.branching  # laterals per mm of parent
        arc = parent.arc_mm
        total = arc[-1]
        basal, apical = (8.0, 15.0) if order == 2 else (3.0, 6.0)
        if total <= basal + apical:
            return
        n = int(rng.poisson(rate * (total - basal - apical)))
        for s in np.sort(rng.uniform(basal, total - apical, n)):
            k = int(np.searchsorted(arc, s)) - 1
            k = min(max(k, 0), len(arc) - 2)
            t = (s - arc[k]) / max(arc[k + 1] - arc[k], 1e-12)
            p = parent.points_mm[k] + t * (parent.points_mm[k + 1] - parent.points_mm[k])
            seg = parent.points_mm[k + 1] - parent.points_mm[k]
            h_parent = math.atan2(seg[1], seg[0])
            side = 1.0 if rng.random() < 0.5 else -1.0
            heading = h_parent + side * math.radians(rng.uniform(40, 85))
            d_parent = parent.diameter_mm[k]
            if order == 2:
                length = float(rng.lognormal(math.log(22.0), 0.6))
                d = min(float(rng.uniform(0.12, 0.5)), 0.6 * d_parent)
                speed = float(rng.uniform(1.5, 5.0))
            else:
                length = float(rng.lognormal(math.log(6.0), 0.5))
                d = min(float(rng.uniform(0.08, 0.22)), 0.7 * d_parent)
                speed = float(rng.uniform(0.5, 2.0))
            # A lateral emerges a few days after the parent tip has passed its branch point.
            birth = parent.birth_day + s / parent.speed_mm_per_day + float(rng.uniform(2.0, 10.0))
            child = add(parent, order, p, heading, length, d, birth, speed)
            if child is not None and order == 2:
                branch(child, 3)

    for _ in range(n_primary):
        start = np.array([rng.uniform(-pad, width_mm + pad), rng.uniform(-pad, height_mm + pad)])
        heading = math.pi / 2 + rng.normal(0.0, 0.9)
        length = float(rng.uniform(60.0, 260.0))
        d = float(min(rng.lognormal(math.log(0.8), 0.35), 2.0))
        # Nodal roots keep emerging for weeks, so a window fills up over the season.
        birth = params.arrival_day + float(rng.exponential(25.0))
        speed = float(rng.uniform(8.0, 25.0))
        root = add(None, 1, start, heading, length, d, birth, speed)
        if root is not None:
            branch(root, 2)
    return roots


def clip_lengths(points: np.ndarray, box: tuple[float, float, float, float]) -> np.ndarray:
    """Length of each segment of a polyline inside an axis-aligned box (Liang-Barsky).

    Args:
        points: ``(N, 2)`` vertices ``(x, y)``.
        box: ``(x0, y0, x1, y1)``.

    Returns:
        ``(N-1,)`` clipped segment lengths (0 for segments wholly outside).
    """
    if len(points) < 2:
        return np.zeros(0)
    p0, p1 = points[:-1], points[1:]
    d = p1 - p0
    t0 = np.zeros(len(d))
    t1 = np.ones(len(d))
    x0, y0, x1, y1 = box
    for dd, pp, lo, hi in ((d[:, 0], p0[:, 0], x0, x1), (d[:, 1], p0[:, 1], y0, y1)):
        with np.errstate(divide="ignore", invalid="ignore"):
            ta = (lo - pp) / dd
            tb = (hi - pp) / dd
        tmin = np.minimum(ta, tb)
        tmax = np.maximum(ta, tb)
        par = dd == 0
        inside = (pp >= lo) & (pp <= hi)
        tmin = np.where(par, np.where(inside, -np.inf, np.inf), tmin)
        tmax = np.where(par, np.where(inside, np.inf, -np.inf), tmax)
        t0 = np.maximum(t0, tmin)
        t1 = np.minimum(t1, tmax)
    frac = np.clip(t1 - t0, 0.0, 1.0)
    return np.hypot(d[:, 0], d[:, 1]) * frac


def tube_pixels(points_px: np.ndarray, diameter_px: np.ndarray, *,
                box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Rows and columns of the pixels whose *centre* lies inside a tube (exact, no library fill).

    The tube of a polyline with a diameter at each vertex is the union over segments of
    ``{q : |q - c(t*)| <= r(t*)}``, where ``c(t*)`` is the point of the segment nearest to
    ``q`` and ``r`` is interpolated linearly along the segment (so every vertex carries a disc).
    Pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)`` and is in the mask iff its centre
    ``(c + 0.5, r + 0.5)`` is in the tube. Centre sampling is unbiased: a band of width ``w``
    covers ``w`` pixels per unit length on average at any angle, which OpenCV's polygon
    fill does not (it adds about one pixel of width).

    Segments are subdivided to at most 8 px so a fixed candidate window per segment stays small;
    everything else is vectorised over segments.

    Args:
        points_px: ``(N, 2)`` centre line ``(x, y)`` in continuous pixel coordinates.
        diameter_px: ``(N,)`` diameter at each vertex.
        box: ``(x0, y0, x1, y1)`` integer pixel bounds; pixels outside are never returned.

    Returns:
        ``(rows, cols)`` int64 arrays, possibly with repeats.
    """
    pts = np.asarray(points_px, np.float64)
    rad = np.asarray(diameter_px, np.float64) / 2.0
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if len(pts) == 0:
        return empty
    if len(pts) == 1:
        pts = np.vstack([pts, pts])
        rad = np.concatenate([rad, rad])
    pts, rad = _subdivide(pts, rad, 8.0)
    a, b = pts[:-1], pts[1:]
    ra, rb = rad[:-1], rad[1:]
    rmax = np.maximum(ra, rb)
    lo = np.floor(np.minimum(a, b) - rmax[:, None] - 0.5).astype(np.int64)
    hi = np.floor(np.maximum(a, b) + rmax[:, None] - 0.5).astype(np.int64) + 1
    x0, y0, x1, y1 = box
    keep = (hi[:, 0] >= x0) & (lo[:, 0] < x1) & (hi[:, 1] >= y0) & (lo[:, 1] < y1)
    if not keep.any():
        return empty
    a, b, ra, rb, lo, hi = a[keep], b[keep], ra[keep], rb[keep], lo[keep], hi[keep]
    gw, gh = (hi - lo + 1).max(axis=0)
    oy, ox = np.mgrid[0:gh, 0:gw]
    ox, oy = ox.ravel(), oy.ravel()
    rows_out, cols_out = [], []
    chunk = max(1, 2_000_000 // (gw * gh))
    for s in range(0, len(a), chunk):
        sl = slice(s, s + chunk)
        cx = lo[sl, 0, None] + ox[None]  # (segments, window) candidate columns
        cy = lo[sl, 1, None] + oy[None]
        qx = cx + 0.5 - a[sl, 0, None]
        qy = cy + 0.5 - a[sl, 1, None]
        d = b[sl] - a[sl]
        dd = (d * d).sum(axis=1)
        t = (qx * d[:, 0, None] + qy * d[:, 1, None]) / np.where(dd > 0, dd, 1.0)[:, None]
        t = np.clip(t, 0.0, 1.0)
        ex = qx - t * d[:, 0, None]
        ey = qy - t * d[:, 1, None]
        r = ra[sl, None] + t * (rb[sl] - ra[sl])[:, None]
        inside = (ex * ex + ey * ey <= r * r) & (cx >= x0) & (cx < x1) & (cy >= y0) & (cy < y1)
        rows_out.append(cy[inside])
        cols_out.append(cx[inside])
    return np.concatenate(rows_out), np.concatenate(cols_out)


def _subdivide(pts: np.ndarray, rad: np.ndarray, max_len: float
               ) -> tuple[np.ndarray, np.ndarray]:
    """Insert vertices so no segment is longer than ``max_len`` (same line, same radii)."""
    seg = np.hypot(*np.diff(pts, axis=0).T)
    if seg.max(initial=0.0) <= max_len:
        return pts, rad
    parts = np.maximum(1, np.ceil(seg / max_len).astype(int))
    idx = np.repeat(np.arange(len(seg)), parts)
    frac = np.concatenate([np.arange(k) / k for k in parts])
    new_pts = pts[idx] + frac[:, None] * (pts[idx + 1] - pts[idx])
    new_rad = rad[idx] + frac * (rad[idx + 1] - rad[idx])
    return np.vstack([new_pts, pts[-1:]]), np.concatenate([new_rad, rad[-1:]])
