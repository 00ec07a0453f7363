"""``measure(mask) -> dict``: a binary root mask to RhizoVision-style traits in mm.

The flow, one function each: validate + binarise (:mod:`~rootflow.traits.binary`) -> drop
noise components -> thin (:mod:`~rootflow.traits.skeleton`) -> graph, prune, per-step length
and width (:mod:`~rootflow.traits.graph`) -> sum steps inside the region of interest, per
diameter class -> convert px to mm with the calibration, which the row records.

Everything is numpy + numba + OpenCV (contours only): no torch, no Ray, so it is cheap to
call inside a Ray Data CPU task.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numba as nb
import numpy as np
import pyarrow as pa

from rootflow.traits.binary import MaskError, as_binary
from rootflow.traits.graph import analyse
from rootflow.traits.length import kimura_formula, smooth_loop, step_counts
from rootflow.traits.skeleton import pad, skeleton_image

MM_PER_INCH = 25.4
DEFAULT_DIAMETER_EDGES_MM: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0)
"""Fine-root diameter classes (mm): <0.2, 0.2-0.5, 0.5-1, 1-2, >2 (WinRHIZO-style)."""
DEFAULT_MIN_COMPONENT_PX = 10
DEFAULT_PRUNE_PX = 3.0
SMOOTH_HALF_WINDOW = 3
"""Centre lines are averaged over 2 * 3 + 1 = 7 skeleton points (see :mod:`.length`)."""

Roi = np.ndarray | tuple[int, int, int, int]

_CLASS_TRAITS = ("length_mm", "projected_area_mm2", "surface_area_mm2", "volume_mm3")


def measure(
    mask: np.ndarray,
    *,
    dpi: float | None = None,
    px_per_mm: float | None = None,
    roi: Roi | None = None,
    min_component_px: int = DEFAULT_MIN_COMPONENT_PX,
    prune_px: float = DEFAULT_PRUNE_PX,
    diameter_edges_mm: Sequence[float] = DEFAULT_DIAMETER_EDGES_MM,
    threshold: float | None = None,
) -> dict[str, Any]:
    """Root traits of one binary mask, in mm, as plain Python numbers.

    Args:
        mask: ``(H, W)`` root mask (bool, 0/1, 0/255, 16-bit, grey/RGB/RGBA; see
            :func:`~rootflow.traits.binary.as_binary`).
        dpi: image resolution in dots per inch. Give exactly one of ``dpi``/``px_per_mm``.
        px_per_mm: image resolution in pixels per mm.
        roi: optional region of interest: a bool ``(H, W)`` array or a pixel box
            ``(top, left, bottom, right)`` (half-open). The whole mask is skeletonised (so a
            root crossing the ROI edge keeps its true width and no false tips appear there);
            only steps, tips, branch points and pixels inside the ROI are counted.
        min_component_px: connected root components (8-connected) smaller than this many
            pixels are dropped as noise before measuring; 0 keeps everything.
        prune_px: remove skeleton spurs that reach less than this many pixels beyond the
            root they branch from (see :mod:`~rootflow.traits.graph`); 0 disables pruning.
        diameter_edges_mm: increasing class edges for the per-diameter-class columns.
        threshold: root = value > threshold, for non-binary masks (probability maps).

    Returns:
        Keys as in :func:`trait_schema` (same order). Diameters and branching frequency are
        ``None`` when there is no root to measure.

    Raises:
        MaskError: the mask is not a usable binary mask.
        ValueError: bad calibration, ROI or class edges.
    """
    scale, calibration = _calibration(dpi=dpi, px_per_mm=px_per_mm)
    edges = _check_edges(diameter_edges_mm)
    if min_component_px < 0 or prune_px < 0:
        raise ValueError("min_component_px and prune_px must be >= 0")
    m = as_binary(mask, threshold=threshold)
    h, w = m.shape
    roi_mask = _roi_mask(roi, (h, w))

    padded = pad(m)
    width = padded.shape[1]
    flat = padded.ravel()
    pixels, n_components = _drop_small_components(flat, width, np.flatnonzero(flat),
                                                  int(min_component_px))
    skel = skeleton_image(flat.reshape(h + 2, w + 2)[1:-1, 1:-1] > 0, edge="root").ravel()
    skel_pix = np.flatnonzero(skel)
    (st_len, st_d, st_y, st_x, st_cap, tip_y, tip_x, bp_y, bp_x, final_pix) = analyse(
        skel, flat, width, h, w, skel_pix, float(prune_px), SMOOTH_HALF_WINDOW
    )
    per_len, per_y, per_x = _perimeter_steps(padded)

    if roi_mask is None:
        sel = slice(None)
        n_tips = tip_y.size
        n_bp = bp_y.size
        root_px = pixels.size
        area_px = h * w
        per_sel = slice(None)
        rve_no, rve_nd, k_no, k_nd = step_counts(skel, width, final_pix)
    else:
        sel = roi_mask[st_y, st_x]
        n_tips = int(_inside(roi_mask, tip_y, tip_x).sum())
        n_bp = int(_inside(roi_mask, bp_y, bp_x).sum())
        ry, rx = np.divmod(pixels, width)
        root_px = int(roi_mask[ry - 1, rx - 1].sum())
        area_px = int(roi_mask.sum())
        per_sel = roi_mask[per_y, per_x]
        fy, fx = np.divmod(final_pix, width)
        rve_no, rve_nd, k_no, k_nd = step_counts(skel, width, final_pix[roi_mask[fy - 1, fx - 1]])

    mm = 1.0 / scale
    lengths = st_len[sel] * mm
    diams = st_d[sel] * mm
    length_mm = float(lengths.sum())
    body = ~st_cap[sel]
    out: dict[str, Any] = {
        "calibration": calibration,
        "px_per_mm": float(scale),
        "min_component_px": int(min_component_px),
        "prune_px": float(prune_px),
        "analysed_area_mm2": float(area_px * mm * mm),
        "length_mm": length_mm,
        "rve_length_mm": float((rve_no + math.sqrt(2.0) * rve_nd) * mm),
        "kimura_length_mm": float(kimura_formula(k_no, k_nd) * mm),
        "network_area_mm2": float(root_px * mm * mm),
        "projected_area_mm2": float((diams * lengths).sum()),
        "surface_area_mm2": float(math.pi * (diams * lengths).sum()),
        "volume_mm3": float(math.pi / 4.0 * (diams * diams * lengths).sum()),
        # WinRHIZO's definition (area / length): unbiased at every angle, unlike a mean of
        # local widths (see docs/traits.md for the numbers)
        "avg_diameter_mm": float(root_px * mm * mm / length_mm) if length_mm > 0 else None,
        "median_diameter_mm": _weighted_median(diams, lengths),
        "max_diameter_mm": _max_or_none(diams[body] if body.any() else diams),
        "perimeter_mm": float(per_len[per_sel].sum() * mm),
        "tips": int(n_tips),
        "branch_points": int(n_bp),
        "branching_frequency_per_mm": (n_bp / length_mm) if length_mm > 0 else None,
        "components": int(n_components) if roi_mask is None else _components_in(flat, width, roi_mask),
    }
    klass = np.digitize(diams, edges)
    n_classes = len(edges) + 1
    per_class = {
        "length_mm": np.bincount(klass, weights=lengths, minlength=n_classes),
        "projected_area_mm2": np.bincount(klass, weights=diams * lengths, minlength=n_classes),
        "surface_area_mm2": math.pi * np.bincount(klass, weights=diams * lengths,
                                                  minlength=n_classes),
        "volume_mm3": math.pi / 4.0 * np.bincount(klass, weights=diams * diams * lengths,
                                                  minlength=n_classes),
    }
    names = class_suffixes(edges)
    for trait in _CLASS_TRAITS:
        for c, suffix in enumerate(names):
            out[f"{trait}_{suffix}"] = float(per_class[trait][c])
    return out


def trait_schema(
    *, diameter_edges_mm: Sequence[float] = DEFAULT_DIAMETER_EDGES_MM
) -> pa.Schema:
    """Arrow schema of :func:`measure`'s dict (same keys, same order) for these class edges."""
    edges = _check_edges(diameter_edges_mm)
    f64, i64 = pa.float64(), pa.int64()
    fields = [
        pa.field("calibration", pa.string(), nullable=False),
        pa.field("px_per_mm", f64, nullable=False),
        pa.field("min_component_px", i64, nullable=False),
        pa.field("prune_px", f64, nullable=False),
        pa.field("analysed_area_mm2", f64, nullable=False),
        pa.field("length_mm", f64, nullable=False),
        pa.field("rve_length_mm", f64, nullable=False),
        pa.field("kimura_length_mm", f64, nullable=False),
        pa.field("network_area_mm2", f64, nullable=False),
        pa.field("projected_area_mm2", f64, nullable=False),
        pa.field("surface_area_mm2", f64, nullable=False),
        pa.field("volume_mm3", f64, nullable=False),
        pa.field("avg_diameter_mm", f64),
        pa.field("median_diameter_mm", f64),
        pa.field("max_diameter_mm", f64),
        pa.field("perimeter_mm", f64, nullable=False),
        pa.field("tips", i64, nullable=False),
        pa.field("branch_points", i64, nullable=False),
        pa.field("branching_frequency_per_mm", f64),
        pa.field("components", i64, nullable=False),
    ]
    for trait in _CLASS_TRAITS:
        for suffix in class_suffixes(edges):
            fields.append(pa.field(f"{trait}_{suffix}", f64, nullable=False))
    return pa.schema(fields)


def class_suffixes(edges_mm: Sequence[float]) -> list[str]:
    """Stable identifier suffixes for diameter classes: ``d0to0p2``, ..., ``d2toinf``."""
    bounds = [0.0, *edges_mm, math.inf]
    return [f"d{_fmt(lo)}to{_fmt(hi)}" for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def _fmt(x: float) -> str:
    if math.isinf(x):
        return "inf"
    return f"{x:.6f}".rstrip("0").rstrip(".").replace(".", "p")


def _check_edges(edges: Sequence[float]) -> tuple[float, ...]:
    out = tuple(float(e) for e in edges)
    if not all(math.isfinite(e) and 0 < e < 1e6 for e in out):
        raise ValueError(f"diameter_edges_mm must be positive finite numbers, got {out}")
    if any(b <= a for a, b in zip(out[:-1], out[1:], strict=True)):
        raise ValueError(f"diameter_edges_mm must be strictly increasing, got {out}")
    if len({_fmt(e) for e in out}) != len(out):
        raise ValueError(f"diameter_edges_mm must differ in the first 6 decimals, got {out}")
    return out


def _calibration(*, dpi: float | None, px_per_mm: float | None) -> tuple[float, str]:
    if (dpi is None) == (px_per_mm is None):
        raise ValueError("give exactly one of dpi= or px_per_mm= (the image's resolution)")
    value = dpi if dpi is not None else px_per_mm
    assert value is not None
    if not (isinstance(value, int | float | np.number) and math.isfinite(value) and value > 0):
        raise ValueError(f"resolution must be a positive finite number, got {value!r}")
    if dpi is not None:
        return float(dpi) / MM_PER_INCH, "dpi"
    return float(value), "px_per_mm"


def _roi_mask(roi: Roi | None, shape: tuple[int, int]) -> np.ndarray | None:
    if roi is None:
        return None
    if isinstance(roi, tuple | list) and len(roi) == 4:
        top, left, bottom, right = (int(v) for v in roi)
        if not (0 <= top < bottom <= shape[0] and 0 <= left < right <= shape[1]):
            raise ValueError(
                f"roi box (top, left, bottom, right)={tuple(roi)} is empty or outside the "
                f"{shape[1]}x{shape[0]} mask"
            )
        out = np.zeros(shape, bool)
        out[top:bottom, left:right] = True
        return out
    arr = np.asarray(roi)
    if arr.shape != shape:
        raise ValueError(f"roi mask shape {arr.shape} differs from the mask's {shape}")
    try:
        return as_binary(arr)
    except MaskError as e:
        raise ValueError(f"roi: {e}") from e


def _inside(roi: np.ndarray, ys: np.ndarray, xs: np.ndarray) -> np.ndarray:
    return roi[np.floor(ys + 0.5).astype(np.int64), np.floor(xs + 0.5).astype(np.int64)]


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float | None:
    if values.size == 0 or weights.sum() <= 0:
        return None
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def _max_or_none(values: np.ndarray) -> float | None:
    return float(values.max()) if values.size else None


def _perimeter_steps(padded: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-step perimeter (px) and step positions, from the mask's contours.

    Contours run through boundary pixel *centres*, half a pixel inside the true boundary.
    Offsetting a closed curve outward by ``d`` adds ``2 pi d`` to its length (and a hole's
    boundary loses as much), so each outer contour gets ``+pi`` px and each hole ``-pi`` px,
    spread over its steps. Contour lengths use the same smoothing as root length.
    """
    import cv2

    contours, hierarchy = cv2.findContours(padded, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    if not contours:
        e = np.empty(0)
        return e, np.empty(0, np.int64), np.empty(0, np.int64)
    sizes = np.array([len(c) for c in contours], np.int64)
    pts = np.concatenate(contours).reshape(-1, 2)
    is_hole = hierarchy[0][:, 3] >= 0
    return _contour_steps(pts[:, 1].astype(np.float64) - 1.0, pts[:, 0].astype(np.float64) - 1.0,
                          sizes, is_hole, SMOOTH_HALF_WINDOW)


@nb.njit(cache=True, nogil=True)
def _contour_steps(ys, xs, sizes, is_hole, half):  # pragma: no cover - compiled
    n = ys.size
    out = np.empty(n)
    py = np.empty(n, np.int64)
    px = np.empty(n, np.int64)
    sy = np.empty(n)
    sx = np.empty(n)
    a = 0
    for c in range(sizes.size):
        m = sizes[c]
        smooth_loop(ys[a:a + m], xs[a:a + m], half, sy[a:a + m], sx[a:a + m])
        corr = (-math.pi if is_hole[c] else math.pi) / m
        for k in range(m):
            k1 = a + (k + 1) % m
            out[a + k] = math.hypot(sy[k1] - sy[a + k], sx[k1] - sx[a + k]) + corr
            py[a + k] = int(ys[a + k])
            px[a + k] = int(xs[a + k])
        a += m
    return out, py, px


@nb.njit(cache=True, nogil=True)
def _drop_small_components(img, w, pix, min_px):  # pragma: no cover - compiled
    """Zero 8-connected components smaller than ``min_px``; return kept pixels and count."""
    n = pix.size
    offs = np.array([-w - 1, -w, -w + 1, -1, 1, w - 1, w, w + 1], np.int64)
    stack = np.empty(n + 1, np.int64)
    comp = np.empty(n + 1, np.int64)
    kept = np.empty(n, np.int64)
    nk = 0
    ncomp = 0
    for i in range(n):
        p = pix[i]
        if img[p] != 1:
            continue
        img[p] = 2
        stack[0] = p
        top = 1
        m = 0
        while top > 0:
            top -= 1
            q = stack[top]
            comp[m] = q
            m += 1
            for o in offs:
                r = q + o
                if img[r] == 1:
                    img[r] = 2
                    stack[top] = r
                    top += 1
        keep = m >= min_px
        for k in range(m):
            img[comp[k]] = 3 if keep else 0  # 3: done and kept (1 would be visited again)
            if keep:
                kept[nk] = comp[k]
                nk += 1
        if keep:
            ncomp += 1
    for k in range(nk):
        img[kept[k]] = 1
    return np.sort(kept[:nk]), ncomp


def _components_in(flat: np.ndarray, width: int, roi: np.ndarray) -> int:
    """Components (8-connected) of the filtered mask that have a pixel inside the ROI."""
    import cv2

    m = flat.reshape(-1, width)[1:-1, 1:-1]
    _, labels = cv2.connectedComponents(m, connectivity=8)
    return int(np.unique(labels[roi & (m > 0)]).size)
