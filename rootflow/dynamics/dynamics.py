"""Root production and mortality between two aligned sessions of one window.

Given the earlier mask A, the later mask B and the :class:`~rootflow.dynamics.align.Alignment`
that maps the later image onto the earlier one, everything is measured **on the overlap of both
frames only** (a root outside either frame was not seen, so it can be neither produced nor lost):

* ``persisting``: root pixels of B within ``k`` px of A (the root was there and still is);
* ``produced``: the rest of B (new roots and extensions of old ones);
* ``lost``: pixels of A farther than ``k`` px from B (roots that died, decayed or vanished).

Lengths are measured by :func:`rootflow.traits.measure` on the *whole* mask with the class as
its region of interest: every root is skeletonised once, in one piece, and each skeleton step is
counted in the class where it lies. So ``persisting + produced`` of B is exactly B's length on
the overlap, and the bookkeeping ``length_to - length_from = produced - lost`` is off only by
how much the persisting part of a root changed length between the two masks
(``bookkeeping_residual_mm``: tracing noise, thickening, alignment residual).

Why ``k`` (:data:`DEFAULT_K_MM`, 0.5 mm; 5 px at the peanut frames' 254 dpi): after alignment a
persisting root's two masks still differ by the residual misregistration (median 1-2 px on the
peanut pairs, docs/dynamics.md), by lens distortion that a rigid transform cannot absorb toward
the frame edges, and by the hand-drawn width (the peanut masks are drawn from boxes, blocky by
several px). ``k`` must exceed those, yet stay below the spacing at which a new lateral beside
an old root would be counted as persisting; 0.5 mm is about two diameters of a fine root.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from rootflow.dynamics.align import Alignment, warp

DEFAULT_K_MM = 0.5
DYNAMICS_VERSION = "1"


def overlap_masks(earlier: np.ndarray, later: np.ndarray, alignment: Alignment | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(A, B, valid): both masks in the earlier frame, restricted to the shared pixels."""
    a = np.asarray(earlier) > 0
    b = np.asarray(later) > 0
    if a.shape != b.shape:
        raise ValueError(f"masks of different sizes: {a.shape[::-1]} and {b.shape[::-1]}")
    if alignment is None:
        valid = np.ones(a.shape, bool)
    else:
        b, valid = warp(b, alignment, nearest=True)
    return a & valid, b & valid, valid


def mask_iou(earlier: np.ndarray, later: np.ndarray, alignment: Alignment | None) -> float:
    """IoU of the earlier mask and the (aligned) later one on the shared pixels (nan if empty)."""
    a, b, _ = overlap_masks(earlier, later, alignment)
    union = int((a | b).sum())
    return float((a & b).sum()) / union if union else math.nan


def oracle_shift(earlier: np.ndarray, later: np.ndarray) -> tuple[int, int, float]:
    """Integer translation (dx, dy) of the later mask maximising its IoU with the earlier one.

    Brute force over every shift with FFT correlation: a ceiling for what a translation could
    achieve, measured on the masks themselves (so not usable as a method: benchmarks only).
    """
    from scipy.signal import fftconvolve

    a = (np.asarray(earlier) > 0).astype(np.float32)
    b = (np.asarray(later) > 0).astype(np.float32)
    if not a.any() or not b.any():
        return 0, 0, math.nan
    inter = fftconvolve(a, b[::-1, ::-1], mode="full")
    union = a.sum() + b.sum() - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0)
    iy, ix = np.unravel_index(int(np.argmax(iou)), iou.shape)
    return int(ix - (b.shape[1] - 1)), int(iy - (b.shape[0] - 1)), float(iou[iy, ix])


def pair_dynamics(earlier: np.ndarray, later: np.ndarray, alignment: Alignment | None, *,
                  dpi: float, days: float, k_mm: float = DEFAULT_K_MM,
                  trait_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """Production and loss between two masks of one window (earlier frame, overlap only).

    Args:
        earlier, later: binary masks of the two sessions, same size.
        alignment: maps the later image onto the earlier one; None = no alignment (identity).
        dpi: resolution (the traits' calibration).
        days: days between the sessions (> 0).
        k_mm: persistence tolerance (see the module docstring).
        trait_options: extra keyword arguments for :func:`rootflow.traits.measure`.

    Returns:
        lengths in mm, areas in mm², rates per day, root length density in mm per cm² of the
        overlap, the bookkeeping residual; keys as in :data:`rootflow.lake.schema`'s
        ``dynamics`` table.
    """
    import cv2

    from rootflow.traits import measure

    if not days > 0:
        raise ValueError(f"sessions must be at least a moment apart (days = {days})")
    opts = dict(trait_options or {})
    px_per_mm = dpi / 25.4
    k_px = max(1, int(round(k_mm * px_per_mm)))
    a, b, valid = overlap_masks(earlier, later, alignment)
    # Distance (px) from every pixel to the nearest root pixel of the other mask.
    dist_a = cv2.distanceTransform((~a).astype(np.uint8), cv2.DIST_L2, 5) if a.any() \
        else np.full(a.shape, np.inf, np.float32)
    dist_b = cv2.distanceTransform((~b).astype(np.uint8), cv2.DIST_L2, 5) if b.any() \
        else np.full(b.shape, np.inf, np.float32)
    near_a = valid & (dist_a <= k_px)
    near_b = valid & (dist_b <= k_px)

    def m(mask: np.ndarray, roi: np.ndarray) -> dict[str, Any]:
        return measure(mask, dpi=dpi, roi=roi, **opts)

    full_a, full_b = m(a, valid), m(b, valid)
    pers_b = m(b, near_a)
    prod = m(b, valid & ~near_a)
    pers_a = m(a, near_b)
    lost = m(a, valid & ~near_b)
    area_cm2 = float(valid.sum()) / px_per_mm**2 / 100.0
    out = {
        "k_px": k_px,
        "k_mm": float(k_px / px_per_mm),
        "days": float(days),
        "overlap_fraction": float(valid.mean()),
        "overlap_area_cm2": area_cm2,
        "length_from_mm": full_a["length_mm"],
        "length_to_mm": full_b["length_mm"],
        "area_from_mm2": full_a["network_area_mm2"],
        "area_to_mm2": full_b["network_area_mm2"],
        "persisting_mm": pers_b["length_mm"],
        "persisting_from_mm": pers_a["length_mm"],
        "produced_mm": prod["length_mm"],
        "lost_mm": lost["length_mm"],
        "produced_area_mm2": prod["network_area_mm2"],
        "lost_area_mm2": lost["network_area_mm2"],
    }
    out["bookkeeping_residual_mm"] = ((out["length_to_mm"] - out["length_from_mm"])
                                      - (out["produced_mm"] - out["lost_mm"]))
    out["produced_mm_per_day"] = out["produced_mm"] / days
    out["lost_mm_per_day"] = out["lost_mm"] / days
    out["rld_from_mm_per_cm2"] = out["length_from_mm"] / area_cm2 if area_cm2 > 0 else None
    out["rld_to_mm_per_cm2"] = out["length_to_mm"] / area_cm2 if area_cm2 > 0 else None
    return out


def cumulate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Fill ``cum_produced_mm`` / ``cum_lost_mm`` through a season, in place.

    ``rows`` are one window's pairs for one producer and version. Ordered by the later
    session's capture time; a pair without numbers (flagged) adds nothing, so a cumulative
    value after a flagged pair is a lower bound (the row's ``reason`` says it is not complete).
    """
    rows.sort(key=lambda r: r["captured_to"])
    cp = cl = 0.0
    for r in rows:
        cp += r.get("produced_mm") or 0.0
        cl += r.get("lost_mm") or 0.0
        r["cum_produced_mm"] = cp
        r["cum_lost_mm"] = cl
    return rows
