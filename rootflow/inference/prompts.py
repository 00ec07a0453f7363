"""Point prompts for SAM2: the one prompt policy of training, validation and inference.

Coordinate convention. Points are continuous ``(x, y)`` in pixels of the array they were drawn
from: pixel ``(row, col)`` covers ``[col, col + 1) x [row, row + 1)``, so its centre is
``(col + 0.5, row + 0.5)`` (the click tables of :mod:`rootflow.inference.correct` use it too).
This is *not* SAM's own convention: SAM2's prompt encoder takes integer pixel indices and adds
0.5 itself (``PromptEncoder._embed_points``). :meth:`rootflow.models.rootsam.RootSAM.decode`
subtracts that 0.5 before the prompt encoder, so the coordinate SAM embeds is exactly the
pixel centre given here (``tests/inference/test_prompts.py::test_embedded_coordinate_on_1px_root``
checks the embedded coordinate after SAM's +0.5 and the resize to its input size).
Labels follow SAM: ``1`` positive (root), ``0`` negative (background), ``-1`` padding ("not a
point", ignored by SAM2's prompt encoder).

:class:`PromptPolicy` is the one object deciding prompts. Training (``PatchDataset`` and the
task's validation), inference (:class:`rootflow.inference.rootsam.RootSAMPredictor`) and the
evaluation command all call its :meth:`PromptPolicy.draw`; they differ only in the *label map*
they hand it: the ground-truth mask in training, the policy's rule at inference (a prior mask
from the forest/U-Net segmenter when present, else the model's own prompt-free first pass).

Why EDT weighting: roots are thin (a few pixels wide). A positive drawn uniformly from the mask
lands on an edge pixel about half the time, where the human mask and the image disagree most;
weighting by the Euclidean distance to the background puts most positives on the root's centre
line, the least ambiguous place to click (RootSAM's prompt recipe).

:func:`next_click` is the simulated clicker (training's interactive rounds, the NoC metric).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

Fill = Literal["swap", "pad"]
NegativeWeighting = Literal["uniform", "edt"]
PolicyMode = Literal["auto", "lattice", "edt"]


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


# --------------------------------------------------------------------------- the policy
@dataclasses.dataclass(frozen=True)
class PromptPolicy:
    """The prompt policy shared by training, validation and inference (one object, one draw).

    Every prediction is two decoder passes on a tile/patch: a prompt-free pass (one padding
    point), whose logits become the mask prompt of the second pass, prompted with the points
    of :meth:`draw`. The points come from a *label map*: the ground-truth mask in training, and
    at inference the policy's rule, i.e. a prior mask (forest/U-Net) when one is given, else
    the prompt-free pass's probability map. Training then adds simulated corrective clicks
    (:func:`next_click`), each round with the previous low-res logits as mask prompt.

    Modes (the seed's settings):

    * ``auto`` (default): fixed lattice points *and* EDT-weighted points, one prompt set;
    * ``lattice``: fixed-point prompts only (the seed's evaluation setting without a human);
      each lattice point is labelled by the label map at its pixel;
    * ``edt``: EDT-weighted points only (training from an annotation; a human placing points).

    Attributes:
        mode: see above.
        lattice_per_side: lattice is ``n x n`` points over the valid part of the tile.
        n_pos / n_neg: EDT-weighted positives / negatives.
        threshold: label-map value above which a pixel counts as root.
        negative_weighting: ``uniform`` or ``edt`` (see :func:`sample_edt_points`).
    """

    mode: PolicyMode = "auto"
    lattice_per_side: int = 4
    n_pos: int = 4
    n_neg: int = 4
    threshold: float = 0.5
    negative_weighting: NegativeWeighting = "uniform"

    def __post_init__(self) -> None:
        if self.mode not in ("auto", "lattice", "edt"):
            raise ValueError(f"prompt policy mode must be auto|lattice|edt, got {self.mode!r}")
        if self.lattice_per_side < 1 and self.mode != "edt":
            raise ValueError(f"lattice_per_side must be >= 1, got {self.lattice_per_side}")
        if self.mode != "lattice" and self.n_pos + self.n_neg < 1:
            raise ValueError("n_pos + n_neg must be >= 1 for EDT points")

    @property
    def n_points(self) -> int:
        """Points per prompt set (fixed, so batches stack)."""
        n = 0
        if self.mode in ("auto", "lattice"):
            n += self.lattice_per_side ** 2
        if self.mode in ("auto", "edt"):
            n += self.n_pos + self.n_neg
        return n

    def draw(self, label_map: Any, *, rng: np.random.Generator | int | None,
             valid_hw: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The prompts of this policy on ``label_map``: THE code path of training and inference.

        Args:
            label_map: ``(H, W)`` bool mask or probabilities (ground truth in training; prior
                mask or first-pass probabilities at inference).
            rng: generator or seed for the EDT draw.
            valid_hw: only the top-left ``(h, w)`` is image (a padded tile); points stay there.

        Returns:
            ``points`` float32 ``(n_points, 2)`` xy pixel centres and ``labels`` int32: lattice
            points first (labelled by the map at their pixel), then EDT positives, negatives.
        """
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        arr = _as_numpy(label_map)
        if arr.ndim != 2:
            raise ValueError(f"label_map must be (H, W), got shape {arr.shape}")
        h, w = valid_hw if valid_hw is not None else arr.shape
        fg = _foreground(arr[:h, :w], self.threshold)
        pts: list[np.ndarray] = []
        labs: list[np.ndarray] = []
        if self.mode in ("auto", "lattice"):
            lat = lattice_points(h, w, n_per_side=self.lattice_per_side)
            rows = np.clip(lat[:, 1].astype(np.int64), 0, h - 1)
            cols = np.clip(lat[:, 0].astype(np.int64), 0, w - 1)
            pts.append(lat)
            labs.append(fg[rows, cols].astype(np.int32))
        if self.mode in ("auto", "edt"):
            p, lab = sample_edt_points(fg, n_pos=self.n_pos, n_neg=self.n_neg, rng=gen,
                                       negative_weighting=self.negative_weighting)
            pts.append(p)
            labs.append(lab)
        return (np.concatenate(pts).astype(np.float32).reshape(-1, 2),
                np.concatenate(labs).astype(np.int32))

    def training_prompts(self, mask: Any, *, rng: np.random.Generator | int | None,
                         ) -> tuple[np.ndarray, np.ndarray]:
        """Prompts of a training/validation patch: :meth:`draw` labelled by the ground truth."""
        return self.draw(mask, rng=rng)

    def inference_prompts(self, rule_map: Any, *, rng: np.random.Generator | int | None,
                          valid_hw: tuple[int, int] | None = None,
                          ) -> tuple[np.ndarray, np.ndarray]:
        """Prompts of a tile at inference: :meth:`draw` labelled by the policy's rule (a prior
        mask, or the prompt-free pass's probabilities) instead of the ground truth."""
        return self.draw(rule_map, rng=rng, valid_hw=valid_hw)


def prompt_statistics(points: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Number of points, share of positives and spatial spread (RMS distance to the centroid,
    px) of a prompt set, padding excluded: what training and inference draws are compared on."""
    keep = np.asarray(labels) >= 0
    p = np.asarray(points, np.float64).reshape(-1, 2)[keep]
    lab = np.asarray(labels)[keep]
    if len(p) == 0:
        return {"n_points": 0.0, "positive_share": float("nan"), "spread": float("nan")}
    spread = float(np.sqrt(((p - p.mean(0)) ** 2).sum(1).mean()))
    return {"n_points": float(len(p)), "positive_share": float((lab == 1).mean()),
            "spread": spread}


# --------------------------------------------------------------------------- simulated clicks
def next_click(pred: Any, truth: Any) -> tuple[float, float, int] | None:
    """The simulated clicker: the next click on a prediction, as SAM2 trains and evaluates.

    SAM2's "center" clicker (``sam2.modeling.sam2_utils.sample_one_point_from_error_center``,
    RITM's): the click goes to the error pixel farthest from the border of its error region
    (Euclidean distance transform, the image border counting as border), over the missed-root
    map and the false-root map; positive (``1``) when that pixel is missed root, negative
    (``0``) when it is false root (a tie goes to the negative, as in SAM2). So the click lands
    in the centre of the *thickest* error, where it is unambiguous. (Picking the largest
    error region by area instead, as this function did before, sends most clicks to the 1-2 px
    slivers along a thin root's edge, where a click half covers the true root: measured to
    leave negative clicks untrainable, docs/rootsam.md "Corrective clicks".)

    Args:
        pred: bool ``(H, W)`` current prediction.
        truth: bool ``(H, W)`` ground truth.

    Returns:
        ``(x, y, label)`` with ``x, y`` the pixel centre, or None when there is no error.
    """
    p = _as_numpy(pred).astype(bool)
    t = _as_numpy(truth).astype(bool)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"pred {p.shape} and truth {t.shape} must be the same (H, W)")
    d_fn = edt(t & ~p)
    d_fp = edt(p & ~t)
    m_fn, m_fp = float(d_fn.max(initial=0.0)), float(d_fp.max(initial=0.0))
    if m_fn == 0.0 and m_fp == 0.0:
        return None
    label = int(m_fn > m_fp)
    d = d_fn if label else d_fp
    r, c = np.unravel_index(int(np.argmax(d)), d.shape)
    return float(c) + 0.5, float(r) + 0.5, label


def next_clicks_batch(pred: Any, truth: Any) -> tuple[np.ndarray, np.ndarray]:
    """:func:`next_click` over ``(B, H, W)``: ``(B, 2)`` xy and ``(B,)`` labels (``-1`` and
    ``(0, 0)`` where a prediction has no error: SAM's "not a point")."""
    p = _as_numpy(pred).astype(bool)
    t = _as_numpy(truth).astype(bool)
    pts = np.zeros((len(p), 2), np.float32)
    labs = np.full(len(p), -1, np.int32)
    for i in range(len(p)):
        c = next_click(p[i], t[i])
        if c is not None:
            pts[i] = c[:2]
            labs[i] = c[2]
    return pts, labs


# --------------------------------------------------------------------------- clicks in the mask prompt
CLICK_LOGIT = 32.0  # |logit| a click writes into the mask prompt (SAM2's low-res logit clamp)
CLICK_RADIUS = 1.5  # radius of a click's disk in low-res logit pixels (4 input px each)


def paint_clicks(mask_logits: Any, points: Any, labels: Any, *, image_size: int,
                 radius: float = CLICK_RADIUS, value: float = CLICK_LOGIT) -> Any:
    """The previous low-res logits with each click written in as a small disk: the mask prompt
    of a corrective round (training's click rounds and :meth:`RootSAMPredictor.refine` both
    call this).

    Why: a click reaches SAM's decoder as a sparse point token, and its effect stays local only
    once the decoder has learnt to match the token's positional encoding with the image's;
    SAM2.1's decoder has, a decoder trained from random initialisation does not within a
    fine-tuning budget (measured: docs/rootsam.md, "Corrective clicks"). The dense mask prompt
    is local by construction (a convolution added to the image embedding), so writing the
    click into it, ``+value`` (root) or ``-value`` (not root) on the low-res pixels within
    ``radius`` of the click, tells the decoder *where* the previous mask is wrong. Clicks are
    ground-truth consistent (a simulated click sits at the centre of an error region), so the
    written disk never contradicts the target.

    Args:
        mask_logits: ``(B, 1, s, s)`` torch logits (``s = image_size / 4``), not modified.
        points: ``(B, K, 2)`` xy clicks in model-input px (pixel centres); labels ``(B, K)``
            (``1`` root, ``0`` not root, ``-1`` padding: ignored).
        image_size: the model's input side (points' frame).

    Returns:
        A new ``(B, 1, s, s)`` tensor, clamped to ``[-value, value]`` (inference clamps its
        logits the same way before they become a mask prompt).
    """
    import torch

    out = mask_logits.detach().float().clamp(-value, value).clone()
    s = int(out.shape[-1])
    pts = torch.as_tensor(points, dtype=torch.float32, device=out.device).reshape(len(out), -1, 2)
    labs = torch.as_tensor(labels, device=out.device).reshape(len(out), -1)
    if pts.shape[1] == 0:
        return out
    centres = (torch.arange(s, device=out.device, dtype=torch.float32) + 0.5)
    lr = pts * (s / float(image_size))  # low-res px
    dy = centres[None, None, :, None] - lr[..., 1, None, None]  # (B, K, s, 1)
    dx = centres[None, None, None, :] - lr[..., 0, None, None]  # (B, K, 1, s)
    inside = (dx * dx + dy * dy) <= radius * radius  # (B, K, s, s)
    for k in range(pts.shape[1]):  # in click order: a later click wins where disks overlap
        hit = inside[:, k] & (labs[:, k] >= 0)[:, None, None]
        v = torch.where(labs[:, k] == 1, value, -value)[:, None, None]
        out[:, 0] = torch.where(hit, v, out[:, 0])
    return out
