"""Thinning root masks to one-pixel-wide, 8-connected centre lines (Guo-Hall, in numba).

Why Guo-Hall and why our own: it is the thinning OpenCV's ``ximgproc`` offers (not in
``opencv-python-headless``); unlike Zhang-Suen it keeps two-pixel-thick diagonal roots, and it
does not fork at square ends (a root cut by the frame edge keeps one centre line rather than
two false tips). scikit-image's ``skeletonize`` sweeps the *whole* image once per erosion
step; minirhizotron masks are 97-99 % background, so we sweep only the root pixels, which
is several times faster on 2550x2273 tube scans (see ``docs/traits.md``).

After thinning, staircase corners (a pixel whose two neighbours also touch each other) are
removed so every interior skeleton pixel has exactly two neighbours; otherwise each corner
would read as a branch point and count a triangle of steps twice.

All functions work on a zero-padded, flattened ``uint8`` image so neighbour lookups need no
bounds checks: the flat index ``p`` has neighbours ``p +- 1``, ``p +- W``, ``p +- W +- 1``.
"""

from __future__ import annotations

from typing import Literal

import numba as nb
import numpy as np

from rootflow.traits.binary import as_binary


def skeletonize(mask: np.ndarray, *, edge: Literal["root", "background"] = "root") -> np.ndarray:
    """Bool ``(H, W)`` skeleton of a binary mask (Guo-Hall thinning + staircase clean-up).

    Args:
        mask: anything :func:`rootflow.traits.binary.as_binary` accepts.
        edge: see :func:`skeleton_image`.
    """
    return skeleton_image(as_binary(mask), edge=edge)[1:-1, 1:-1].astype(bool)


def pad(mask: np.ndarray) -> np.ndarray:
    """Bool ``(H, W)`` -> ``uint8 (H + 2, W + 2)`` with a zero border (the layout used here)."""
    h, w = mask.shape
    out = np.zeros((h + 2, w + 2), np.uint8)
    out[1:-1, 1:-1] = mask
    return out


def skeleton_image(
    mask: np.ndarray, *, edge: Literal["root", "background"] = "root"
) -> np.ndarray:
    """Skeleton of a bool ``(H, W)`` mask in the padded layout: ``uint8 (H + 2, W + 2)``.

    Args:
        mask: bool root mask.
        edge: what lies beyond the frame. ``"root"`` (default): a root cut by the frame edge
            continues beyond it, so its centre line runs out to the edge, instead of stopping
            about one radius short or forking towards the two corners of the cut (which adds
            false tips and several % of length to wide oblique roots). Implemented by
            replicating the edge pixels outward by a margin wider than any root's half-width
            at the edge, thinning, and cropping. ``"background"``: the classic treatment.
    """
    h, w = mask.shape
    if edge == "background" or not mask.any() or mask.all():
        padded = pad(mask)
        flat = padded.ravel()
        thin(flat, padded.shape[1], np.flatnonzero(flat))
        return padded
    margin = _edge_margin(mask)
    big = pad(np.pad(mask, margin, mode="edge"))
    flat = big.ravel()
    thin(flat, big.shape[1], np.flatnonzero(flat))
    out = np.zeros((h + 2, w + 2), np.uint8)
    out[1:-1, 1:-1] = big[margin + 1:margin + 1 + h, margin + 1:margin + 1 + w]
    # A small root touching the edge can have its whole centre line outside the frame: thin
    # those components the classic way so that no root loses its skeleton.
    padded = pad(mask)
    orphans = _orphan_pixels(padded.ravel(), out.ravel(), w + 2, np.flatnonzero(padded))
    if orphans.size:
        lone = np.zeros_like(padded).ravel()
        lone[orphans] = 1
        out.ravel()[thin(lone, w + 2, orphans)] = 1
    return out


def _edge_margin(mask: np.ndarray) -> int:
    """Half the longest run of root pixels along the frame edge, plus a little (max 256)."""
    longest = 0
    for line in (mask[0], mask[-1], mask[:, 0], mask[:, -1]):
        if line.any():
            d = np.diff(np.concatenate([[0], line.astype(np.int8), [0]]))
            starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
            longest = max(longest, int((ends - starts).max()))
    return int(min(longest // 2 + 3, 256))


def thin(flat: np.ndarray, width: int, pixels: np.ndarray) -> np.ndarray:
    """Thin ``flat`` (padded, flattened ``uint8``) in place; returns the skeleton's flat indices.

    Args:
        flat: zero-padded image, raveled; modified in place (non-skeleton pixels -> 0).
        width: padded width (row stride).
        pixels: flat indices of the root pixels (``np.flatnonzero(flat)``).
    """
    pixels = np.ascontiguousarray(pixels, dtype=np.int64)
    if pixels.size == 0:
        return pixels
    skel = _guo_hall(flat, width, pixels)
    return _remove_staircases(flat, width, skel)


@nb.njit(cache=True, nogil=True)
def _guo_hall(img, w, pix):  # pragma: no cover - compiled
    n = pix.size
    alive = pix.copy()
    dels = np.empty(n, np.int64)
    changed = True
    while changed:
        changed = False
        for it in range(2):
            nd = 0
            for k in range(n):
                p = alive[k]
                p2 = img[p - w] != 0
                p3 = img[p - w + 1] != 0
                p4 = img[p + 1] != 0
                p5 = img[p + w + 1] != 0
                p6 = img[p + w] != 0
                p7 = img[p + w - 1] != 0
                p8 = img[p - 1] != 0
                p9 = img[p - w - 1] != 0
                c = (
                    int((not p2) and (p3 or p4))
                    + int((not p4) and (p5 or p6))
                    + int((not p6) and (p7 or p8))
                    + int((not p8) and (p9 or p2))
                )
                if c != 1:
                    continue
                n1 = int(p9 or p2) + int(p3 or p4) + int(p5 or p6) + int(p7 or p8)
                n2 = int(p2 or p3) + int(p4 or p5) + int(p6 or p7) + int(p8 or p9)
                nn = min(n1, n2)
                if nn < 2 or nn > 3:
                    continue
                m = ((p6 or p7 or not p9) and p8) if it == 0 else ((p2 or p3 or not p5) and p4)
                if m:
                    continue
                dels[nd] = p
                nd += 1
            for k in range(nd):
                img[dels[k]] = 0
            if nd > 0:
                changed = True
                j = 0
                for k in range(n):
                    if img[alive[k]] != 0:
                        alive[j] = alive[k]
                        j += 1
                n = j
    return alive[:n].copy()


@nb.njit(cache=True, nogil=True)
def _yokoi8(img, w, p):  # pragma: no cover - compiled
    """Yokoi's 8-connectivity number: 1 means removing ``p`` keeps the topology."""
    # neighbours in the order E, NE, N, NW, W, SW, S, SE (x = 1 - value, "background")
    x0 = img[p + 1] == 0
    x1 = img[p - w + 1] == 0
    x2 = img[p - w] == 0
    x3 = img[p - w - 1] == 0
    x4 = img[p - 1] == 0
    x5 = img[p + w - 1] == 0
    x6 = img[p + w] == 0
    x7 = img[p + w + 1] == 0
    return (
        (int(x0) - int(x0 and x1 and x2))
        + (int(x2) - int(x2 and x3 and x4))
        + (int(x4) - int(x4 and x5 and x6))
        + (int(x6) - int(x6 and x7 and x0))
    )


@nb.njit(cache=True, nogil=True)
def _count8(img, w, p):  # pragma: no cover - compiled
    return (
        int(img[p - w - 1] != 0) + int(img[p - w] != 0) + int(img[p - w + 1] != 0)
        + int(img[p - 1] != 0) + int(img[p + 1] != 0)
        + int(img[p + w - 1] != 0) + int(img[p + w] != 0) + int(img[p + w + 1] != 0)
    )


@nb.njit(cache=True, nogil=True)
def _remove_staircases(img, w, pix):  # pragma: no cover - compiled
    n = pix.size
    changed = True
    while changed:
        changed = False
        for k in range(n):
            p = pix[k]
            if img[p] == 0:
                continue
            if _count8(img, w, p) >= 2 and _yokoi8(img, w, p) == 1:
                img[p] = 0
                changed = True
        j = 0
        for k in range(n):
            if img[pix[k]] != 0:
                pix[j] = pix[k]
                j += 1
        n = j
    return pix[:n].copy()


@nb.njit(cache=True, nogil=True)
def _orphan_pixels(img, skel, w, pix):  # pragma: no cover - compiled
    """Pixels of the 8-connected components of ``img`` that contain no ``skel`` pixel."""
    n = pix.size
    seen = np.zeros(img.size, np.bool_)
    stack = np.empty(n + 1, np.int64)
    comp = np.empty(n + 1, np.int64)
    out = np.empty(n, np.int64)
    no = 0
    for i in range(n):
        p = pix[i]
        if seen[p]:
            continue
        seen[p] = True
        stack[0] = p
        top = 1
        m = 0
        has = False
        while top > 0:
            top -= 1
            q = stack[top]
            comp[m] = q
            m += 1
            if skel[q] != 0:
                has = True
            for o in (-w - 1, -w, -w + 1, -1, 1, w - 1, w, w + 1):
                r = q + o
                if img[r] != 0 and not seen[r]:
                    seen[r] = True
                    stack[top] = r
                    top += 1
        if not has:
            for k in range(m):
                out[no] = comp[k]
                no += 1
    return np.sort(out[:no])
