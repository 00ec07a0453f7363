"""Turning whatever a user calls a "mask" into one boolean root/background array.

Masks reach us from RootPainter (RGBA, transparent background), RootDetector (RGB), hand
tracing (0/255 greyscale), our own models (bool) and 16-bit TIFF exports. Silently
thresholding a probability map or a JPEG-compressed mask would change the measured length
without anyone noticing, so anything that is not clearly two-valued is refused unless the
caller names a ``threshold``.
"""

from __future__ import annotations

import numpy as np


class MaskError(ValueError):
    """The array cannot be read as a binary root mask; the message says why and what to do."""


def as_binary(mask: np.ndarray, *, threshold: float | None = None) -> np.ndarray:
    """Any 2-D mask-like array -> bool ``(H, W)`` (True = root).

    Accepted without a threshold: bool; integer or float arrays whose values are ``{0, v}``
    for a single ``v > 0`` (0/1, 0/255, 0/65535, 0.0/1.0); RGB arrays whose pixels are
    grey or coloured-on-black (any non-zero channel is root); RGBA arrays (root = non-zero
    alpha *and* non-zero colour, which reads RootPainter's transparent-background exports and
    opaque 0/255 exports alike).

    Args:
        mask: ``(H, W)``, ``(H, W, 1)``, ``(H, W, 3)`` or ``(H, W, 4)`` array.
        threshold: if given, root = value ``> threshold`` (after collapsing colour channels
            with ``max``); use it for probability maps or JPEG-compressed masks.

    Raises:
        MaskError: wrong shape or dtype, NaNs, or more than two distinct values without a
            ``threshold``.
    """
    arr = np.asarray(mask)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = _collapse_channels(arr)
    if arr.ndim != 2:
        raise MaskError(
            f"mask must be 2-D (H, W) or (H, W, 1|3|4); got shape {np.shape(mask)}"
        )
    if arr.dtype == np.bool_:
        return arr
    if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise MaskError(f"mask dtype {arr.dtype} is not bool, integer or float")
    if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
        raise MaskError("mask contains NaN or infinite values")
    if threshold is not None:
        return arr > threshold
    if arr.size and arr.min() < 0:
        raise MaskError(
            "mask has negative values; pass threshold= to say which values are root"
        )
    values = _few_unique(arr, limit=3)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = ", ".join(f"{v:g}" for v in values[:3])
        raise MaskError(
            f"mask is not binary (values include {shown}{', ...' if len(values) > 2 else ''}); "
            "expected 0 and one positive value (0/1, 0/255, bool). For a probability map or a "
            "JPEG-compressed mask pass threshold= (e.g. 0.5 or 127)"
        )
    return arr > 0


def _collapse_channels(arr: np.ndarray) -> np.ndarray:
    colour = arr[..., :3].max(axis=2)
    if arr.shape[2] == 4:
        alpha = arr[..., 3]
        return np.where(alpha > 0, colour, np.zeros_like(colour))
    return colour


def _few_unique(arr: np.ndarray, *, limit: int) -> list[float]:
    """Sorted distinct values, stopping early: masks are big and ``np.unique`` sorts them all."""
    if arr.size == 0:
        return []
    lo = arr.min()
    hi = arr.max()
    if lo == hi:
        return [float(lo)]
    inner = arr[(arr != lo) & (arr != hi)]
    mid = [float(v) for v in np.unique(inner[: 10 * limit])[: limit - 2]] if inner.size else []
    return [float(lo), *mid, float(hi)]
