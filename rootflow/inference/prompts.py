"""Point prompts for SAM2: a fixed lattice, and the EDT-weighted sampler shared with training.

Coordinate convention (the same as SAM's own point grids and ``SAM2ImagePredictor``): points
are continuous ``(x, y)`` in pixels of the array they were drawn from, pixel ``(row, col)``
covers ``[col, col + 1) x [row, row + 1)``, so a pixel's centre is ``(col + 0.5, row + 0.5)``.
Labels follow SAM: ``1`` positive (root), ``0`` negative (background), ``-1`` padding ("not a
point", ignored by SAM2's prompt encoder).

Why EDT weighting: roots are thin (a few pixels wide). A positive drawn uniformly from the mask
lands on an edge pixel about half the time, where the human mask and the image disagree most;
weighting by the Euclidean distance to the background puts most positives on the root's centre
line, the least ambiguous place to click (RootSAM's prompt recipe). Training and inference draw
from the same function so the decoder is never asked about prompts it was not trained on.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

Fill = Literal["swap", "pad"]
NegativeWeighting = Literal["uniform", "edt"]


def edt(mask: np.ndarray) -> np.ndarray:
    """Exact Euclidean distance (px) of each ``True`` pixel to the nearest ``False`` one.

    Pixels outside the array count as background, so a root touching the border is still
    centred by the weighting (its border pixels are one pixel from "outside").

    Args:
        mask: bool ``(H, W)``.

    Returns:
        float32 ``(H, W)``; 0 on background pixels.
    """
    import cv2

    m = np.ascontiguousarray(mask, dtype=np.uint8)
    if m.size == 0:
        return np.zeros(m.shape, np.float32)
    # Pad by one background pixel: cv2 treats the outside as foreground otherwise.
    padded = np.pad(m, 1)
    dist = cv2.distanceTransform(padded, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.ascontiguousarray(dist[1:-1, 1:-1], dtype=np.float32)


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().float().cpu().numpy()
    return np.asarray(x)


def _draw(flat_idx: np.ndarray, weights: np.ndarray | None, n: int,
          rng: np.random.Generator) -> np.ndarray:
    """``n`` indices from ``flat_idx`` (without replacement while there are enough)."""
    if n <= 0 or flat_idx.size == 0:
        return np.zeros(0, np.int64)
    p = None
    if weights is not None:
        total = float(weights.sum())
        p = weights / total if total > 0 else None
    replace = flat_idx.size < n
    if p is not None and not replace:
        replace = int(np.count_nonzero(p)) < n
    return np.asarray(rng.choice(flat_idx, size=n, replace=replace, p=p), dtype=np.int64)


def sample_edt_points(
    mask_or_prob: Any,
    *,
    n_pos: int,
    n_neg: int,
    rng: np.random.Generator | int | None,
    threshold: float = 0.5,
    fill: Fill = "swap",
    negative_weighting: NegativeWeighting = "uniform",
) -> tuple[np.ndarray, np.ndarray]:
    """Draw SAM point prompts from a mask or probability map.

    Positives are drawn inside the roots with probability proportional to the Euclidean
    distance transform (centre lines first); negatives uniformly outside (or, with
    ``negative_weighting="edt"``, proportional to the background's distance to the nearest
    root, which keeps them off root edges). Without replacement while enough pixels exist.

    Args:
        mask_or_prob: ``(H, W)`` bool mask, 0/1 or 0/255 ints, or float probabilities (numpy
            or torch). A pixel is root when its value (scaled to [0, 1] for uint8 0/255
            masks) is ``> threshold``; bools are used as they are.
        n_pos: positives wanted.
        n_neg: negatives wanted.
        rng: a ``np.random.Generator`` (or a seed) so training and QC are reproducible.
        threshold: probability above which a pixel counts as root.
        fill: what to do when a class has no pixels (an image without roots, or all root):
            ``"swap"`` draws the missing points from the other class with that class's label
            (an empty tile gets all-negative prompts, which teaches/asks "nothing here"),
            ``"pad"`` appends label ``-1`` points at ``(0, 0)`` (SAM2's "not a point").
            Either way exactly ``n_pos + n_neg`` points come back, so batches stack.
        negative_weighting: ``"uniform"`` or ``"edt"`` (see above).

    Returns:
        ``points`` float32 ``(N, 2)`` xy pixel centres and ``labels`` int32 ``(N,)``, with
        ``N = n_pos + n_neg``; positives first.

    Raises:
        ValueError: for a non-2-D input or negative counts.
    """
    if n_pos < 0 or n_neg < 0:
        raise ValueError(f"n_pos and n_neg must be >= 0, got {n_pos}, {n_neg}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    arr = _as_numpy(mask_or_prob)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"mask_or_prob must be (H, W), got shape {arr.shape}")
    fg = _foreground(arr, threshold)
    h, w = fg.shape
    n = n_pos + n_neg
    if fg.size == 0:
        if fill == "pad":
            return np.zeros((n, 2), np.float32), np.full(n, -1, np.int32)
        raise ValueError("cannot sample points from an empty (0-pixel) array")

    flat = fg.ravel()
    pos_idx = np.flatnonzero(flat)
    neg_idx = np.flatnonzero(~flat)
    pos_w = edt(fg).ravel()[pos_idx]
    neg_w = edt(~fg).ravel()[neg_idx] if negative_weighting == "edt" else None

    want_pos, want_neg = n_pos, n_neg
    if fill == "swap":
        if pos_idx.size == 0:
            want_pos, want_neg = 0, n
        elif neg_idx.size == 0:
            want_pos, want_neg = n, 0
    pos = _draw(pos_idx, pos_w, want_pos, gen)
    neg = _draw(neg_idx, neg_w, want_neg, gen)

    idx = np.concatenate([pos, neg])
    rows, cols = np.divmod(idx, w)
    points = np.stack([cols + 0.5, rows + 0.5], axis=1).astype(np.float32)
    labels = np.concatenate([np.ones(pos.size, np.int32), np.zeros(neg.size, np.int32)])
    short = n - idx.size
    if short > 0:  # fill == "pad" and a class was empty
        points = np.concatenate([points, np.zeros((short, 2), np.float32)])
        labels = np.concatenate([labels, np.full(short, -1, np.int32)])
    return points.reshape(n, 2), labels


def sample_edt_points_batch(
    masks: Any,
    *,
    n_pos: int,
    n_neg: int,
    rng: np.random.Generator | int | None,
    threshold: float = 0.5,
    fill: Fill = "swap",
    negative_weighting: NegativeWeighting = "uniform",
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`sample_edt_points` over a ``(B, H, W)`` stack -> ``(B, N, 2)`` and ``(B, N)``."""
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    arr = _as_numpy(masks)
    if arr.ndim == 4 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 3:
        raise ValueError(f"masks must be (B, H, W), got shape {arr.shape}")
    pts, labs = zip(*(sample_edt_points(m, n_pos=n_pos, n_neg=n_neg, rng=gen, threshold=threshold,
                                        fill=fill, negative_weighting=negative_weighting)
                      for m in arr), strict=True) if len(arr) else ((), ())
    n = n_pos + n_neg
    if not pts:
        return np.zeros((0, n, 2), np.float32), np.zeros((0, n), np.int32)
    return np.stack(pts), np.stack(labs)


def lattice_points(height: int, width: int, *, n_per_side: int) -> np.ndarray:
    """A regular ``n_per_side x n_per_side`` grid of xy points over an ``(height, width)`` tile.

    Points sit at the centres of equal cells (SAM's ``build_point_grid`` spacing), so none
    falls on the tile border where the decoder has half its context.

    Returns:
        float32 ``(n_per_side**2, 2)`` xy, row-major.
    """
    if n_per_side < 1:
        raise ValueError(f"n_per_side must be >= 1, got {n_per_side}")
    offs = (np.arange(n_per_side, dtype=np.float64) + 0.5) / n_per_side
    xs, ys = np.meshgrid(offs * width, offs * height)
    return np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float32)


def _foreground(arr: np.ndarray, threshold: float) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr
    if arr.dtype == np.uint8 and arr.size and int(arr.max()) > 1:
        return arr.astype(np.float32) / 255.0 > threshold
    return np.nan_to_num(arr.astype(np.float32)) > threshold
