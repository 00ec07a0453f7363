"""The one metric module of rootflow: how a segmenter and a regressor are judged.

Used by ``rootflow evaluate``, by RootSAM / U-Net / RootQuant validation and by the benchmarks,
so a number in the docs and a number in a validation log mean the same thing.

Three families, all small pure functions or additive meters:

* **Pixel overlap** (numpy, any mask size): Dice, IoU, precision, recall from pooled counts
  (Dice = 2·ΣTP / (ΣP + ΣT) over all pixels of all images, so a scan with many roots weighs
  what its pixels weigh), plus **clDice** (Shit et al. 2021, CVPR): the harmonic mean of
  *topology precision* (share of the predicted skeleton inside the true mask) and *topology
  sensitivity* (share of the true skeleton inside the predicted mask). Pixel Dice over-rewards
  thick roots and forgives a thin root broken into pieces; clDice follows the skeleton, which
  is what root length is measured on. Pooled clDice sums the four skeleton counts over images.
  :class:`PixelMeter` keeps only sums, so data-parallel validation is exact: all-reduce
  ``meter.sums()`` and call :func:`summarize_pixels`.
* **Per-patch means** (torch, RootSAM's published setting): :func:`iou_dice`,
  :class:`SegmentationMeter`, :func:`summarize` (mIoU = mean over patches of the root IoU).
* **Trait agreement / regression** (numpy): R² as the coefficient of determination
  ``1 - SS_res/SS_tot`` (how well predictions *equal* the truth), Pearson r² (how well they
  *correlate*; SegRoot's 0.979 is likely this one), bias in percent of the true total,
  MAE/RMSE, presence accuracy, and additive sums for exact distributed R².

Conventions: masks are bool (anything ``!= 0`` is root); empty-vs-empty scores 1.0 for Dice,
IoU and clDice (perfect "nothing here"), a ratio with a zero denominator otherwise is NaN for
precision/recall-type quantities; regression functions ignore rows with a NaN on either side
and return NaN (never raise) when a metric is undefined.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

ArrayLike = Any

# =============================================================================================
# pixel overlap and clDice (numpy)
# =============================================================================================
PIXEL_SUM_KEYS = ("tp", "fp", "fn", "tn", "n_images", "skel_pred", "skel_pred_in_true",
                  "skel_true", "skel_true_in_pred")


def _binary(mask: ArrayLike, name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[-1] in (3, 4):
        m = m[..., 0]
    if m.ndim != 2:
        raise ValueError(f"{name} must be a 2-D mask, got shape {m.shape}")
    return m.astype(bool, copy=False) if m.dtype == bool else m != 0


def skeleton(mask: np.ndarray) -> np.ndarray:
    """1-px skeleton of a bool mask (scikit-image's Zhang-Suen ``skeletonize``)."""
    from skimage.morphology import skeletonize

    if not mask.any():
        return np.zeros_like(mask, dtype=bool)
    return skeletonize(mask)


def pixel_counts(pred: ArrayLike, truth: ArrayLike, *, cldice: bool = True) -> dict[str, float]:
    """Additive counts of one image pair (keys :data:`PIXEL_SUM_KEYS`).

    Args:
        pred, truth: ``(H, W)`` masks of the same shape (bool, 0/1 or 0/255).
        cldice: also skeletonise both masks for clDice (costs ~0.5 s on a 2550 x 2273 scan).

    Raises:
        ValueError: shapes differ (the message gives both).
    """
    p, t = _binary(pred, "pred"), _binary(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"pred is {p.shape}, truth is {t.shape}")
    tp = int(np.count_nonzero(p & t))
    n_p, n_t = int(np.count_nonzero(p)), int(np.count_nonzero(t))
    out = {"tp": float(tp), "fp": float(n_p - tp), "fn": float(n_t - tp),
           "tn": float(p.size - n_p - n_t + tp), "n_images": 1.0,
           "skel_pred": 0.0, "skel_pred_in_true": 0.0, "skel_true": 0.0, "skel_true_in_pred": 0.0}
    if cldice:
        sp, st = skeleton(p), skeleton(t)
        out.update(skel_pred=float(np.count_nonzero(sp)),
                   skel_pred_in_true=float(np.count_nonzero(sp & t)),
                   skel_true=float(np.count_nonzero(st)),
                   skel_true_in_pred=float(np.count_nonzero(st & p)))
    return out


def _ratio(num: float, den: float, empty: float) -> float:
    return num / den if den > 0 else empty


def summarize_pixels(sums: dict[str, float]) -> dict[str, float]:
    """Pooled scores from (summed, possibly all-reduced) :func:`pixel_counts`.

    Returns:
        ``dice, iou, precision, recall, cldice, topology_precision, topology_sensitivity,
        root_fraction_true, root_fraction_pred, n_images``. Dice/IoU are 1.0 when neither side
        has a root pixel; precision is NaN with no predicted root, recall NaN with no true root.
    """
    tp, fp, fn, tn = (float(sums.get(k, 0.0)) for k in ("tp", "fp", "fn", "tn"))
    nan = float("nan")
    total = tp + fp + fn + tn
    dice = _ratio(2 * tp, 2 * tp + fp + fn, 1.0)
    iou = _ratio(tp, tp + fp + fn, 1.0)
    tprec = _ratio(sums.get("skel_pred_in_true", 0.0), sums.get("skel_pred", 0.0), nan)
    tsens = _ratio(sums.get("skel_true_in_pred", 0.0), sums.get("skel_true", 0.0), nan)
    if sums.get("skel_pred", 0.0) == 0 and sums.get("skel_true", 0.0) == 0:
        cl = 1.0 if (tp + fp + fn) == 0 else nan  # no skeleton counted (cldice=False) or empty
    elif np.isnan(tprec) or np.isnan(tsens) or tprec + tsens == 0:
        cl = 0.0
    else:
        cl = 2 * tprec * tsens / (tprec + tsens)
    return {"dice": dice, "iou": iou, "precision": _ratio(tp, tp + fp, nan),
            "recall": _ratio(tp, tp + fn, nan), "cldice": cl, "topology_precision": tprec,
            "topology_sensitivity": tsens,
            "root_fraction_true": _ratio(tp + fn, total, nan),
            "root_fraction_pred": _ratio(tp + fp, total, nan),
            "n_images": float(sums.get("n_images", 0.0))}


def add_sums(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Key-wise sum of two count dicts (missing keys count 0)."""
    return {k: float(a.get(k, 0.0)) + float(b.get(k, 0.0)) for k in set(a) | set(b)}


@dataclasses.dataclass
class PixelMeter:
    """Running pooled counts for Dice / IoU / precision / recall / clDice.

    ``update`` takes one ``(H, W)`` pair or a batch ``(B, H, W)`` (numpy or CPU/GPU tensors).
    ``sums()`` is additive over images and workers (all-reduce it), ``summary()`` pools.
    """

    cldice: bool = True
    counts: dict[str, float] = dataclasses.field(
        default_factory=lambda: dict.fromkeys(PIXEL_SUM_KEYS, 0.0))

    def update(self, pred: ArrayLike, truth: ArrayLike) -> None:
        p, t = _to_numpy(pred), _to_numpy(truth)
        if p.ndim == 2:
            p, t = p[None], t[None]
        if p.shape != t.shape:
            raise ValueError(f"pred is {p.shape}, truth is {t.shape}")
        for pi, ti in zip(p, t, strict=True):
            self.counts = add_sums(self.counts, pixel_counts(pi, ti, cldice=self.cldice))

    def sums(self) -> dict[str, float]:
        return dict(self.counts)

    def summary(self) -> dict[str, float]:
        return summarize_pixels(self.counts)


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim == 4 and a.shape[1] == 1:  # (B, 1, H, W) tensors
        a = a[:, 0]
    return a


def best_threshold(prob: np.ndarray, truth: np.ndarray, *,
                   candidates: Iterable[float] = tuple(np.round(np.arange(0.05, 0.96, 0.05), 2)),
                   ) -> tuple[float, float]:
    """The probability threshold with the highest pooled Dice on ``(prob, truth)`` pixels.

    For choosing a segmenter's saved threshold on its *training/validation* pixels (never on a
    test fold). Ties go to the threshold nearest 0.5.

    Returns:
        ``(threshold, dice)``.
    """
    p = np.asarray(prob, dtype=np.float32).reshape(-1)
    t = _binary(np.asarray(truth).reshape(1, -1), "truth").reshape(-1)
    n_t = float(np.count_nonzero(t))
    best = (0.5, -1.0)
    for c in candidates:
        pr = p >= c
        tp = float(np.count_nonzero(pr & t))
        d = _ratio(2 * tp, float(np.count_nonzero(pr)) + n_t, 1.0)
        if d > best[1] + 1e-12 or (abs(d - best[1]) <= 1e-12 and abs(c - 0.5) < abs(best[0] - 0.5)):
            best = (float(c), d)
    return best


# =============================================================================================
# per-patch means (torch; RootSAM's validation)
# =============================================================================================
def iou_dice(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample IoU and Dice of two binary masks.

    Args:
        pred: ``(B, ...)`` bool (or {0, 1}) predicted masks.
        target: same shape, ground truth.

    Returns:
        ``iou (B,)`` and ``dice (B,)`` in ``[0, 1]``; both 1.0 where pred and target are empty.
    """
    import torch

    p = pred.bool().flatten(1)
    t = target.bool().flatten(1)
    inter = (p & t).sum(1).double()
    union = (p | t).sum(1).double()
    total = p.sum(1).double() + t.sum(1).double()
    iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))
    dice = torch.where(total > 0, 2 * inter / total.clamp_min(1), torch.ones_like(total))
    return iou, dice


@dataclasses.dataclass
class SegmentationMeter:
    """Running sums for mIoU, mean Dice, pooled IoU and the IoU head's calibration error."""

    iou_sum: float = 0.0
    dice_sum: float = 0.0
    iou_pred_abs_err_sum: float = 0.0
    inter_px: float = 0.0
    union_px: float = 0.0
    n: float = 0.0

    def update(self, pred: torch.Tensor, target: torch.Tensor,
               iou_pred: torch.Tensor | None = None) -> None:
        """Add a batch: ``pred``/``target`` ``(B, ...)`` binary; ``iou_pred`` ``(B,)`` or (B, 1)."""
        iou, dice = iou_dice(pred, target)
        p, t = pred.bool().flatten(1), target.bool().flatten(1)
        self.iou_sum += float(iou.sum())
        self.dice_sum += float(dice.sum())
        self.inter_px += float((p & t).sum())
        self.union_px += float((p | t).sum())
        self.n += float(iou.numel())
        if iou_pred is not None:
            err = (iou_pred.detach().double().reshape(-1).cpu() - iou.cpu()).abs()
            self.iou_pred_abs_err_sum += float(err.sum())

    def sums(self) -> dict[str, float]:
        return dataclasses.asdict(self)


def summarize(sums: dict[str, float]) -> dict[str, float]:
    """Metrics from (possibly all-reduced) :meth:`SegmentationMeter.sums`.

    Returns:
        ``miou``, ``dice``, ``pooled_iou``, ``iou_pred_mae`` (mean |predicted - actual IoU|) and
        ``n_patches``; NaN for the means when there were no patches.
    """
    n = sums["n"]
    nan = float("nan")
    return {
        "miou": sums["iou_sum"] / n if n else nan,
        "dice": sums["dice_sum"] / n if n else nan,
        "pooled_iou": sums["inter_px"] / sums["union_px"] if sums["union_px"] else 1.0,
        "iou_pred_mae": sums["iou_pred_abs_err_sum"] / n if n else nan,
        "n_patches": n,
    }


# =============================================================================================
# trait agreement and regression (numpy)
# =============================================================================================
def _pair(pred: ArrayLike, true: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(true, dtype=np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"pred and true differ in length: {p.shape[0]} vs {t.shape[0]}")
    ok = np.isfinite(p) & np.isfinite(t)
    return p[ok], t[ok]


def r2(pred: ArrayLike, true: ArrayLike) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (NaN if < 2 rows or constant truth)."""
    p, t = _pair(pred, true)
    if p.size < 2:
        return float("nan")
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    if ss_tot == 0.0:
        return float("nan")
    return 1.0 - float(np.sum((t - p) ** 2)) / ss_tot


def mae(pred: ArrayLike, true: ArrayLike) -> float:
    """Mean absolute error, in the unit of the inputs."""
    p, t = _pair(pred, true)
    return float(np.mean(np.abs(p - t))) if p.size else float("nan")


def rmse(pred: ArrayLike, true: ArrayLike) -> float:
    """Root mean squared error, in the unit of the inputs."""
    p, t = _pair(pred, true)
    return float(np.sqrt(np.mean((p - t) ** 2))) if p.size else float("nan")


def bias(pred: ArrayLike, true: ArrayLike) -> float:
    """Mean signed error ``mean(pred - true)``: > 0 means the model over-estimates."""
    p, t = _pair(pred, true)
    return float(np.mean(p - t)) if p.size else float("nan")


def presence_accuracy(presence: ArrayLike, true: ArrayLike, *, threshold: float = 0.5,
                      min_value: float = 0.0) -> float:
    """Accuracy of the zero / non-zero call.

    Args:
        presence: predicted probability (or 0/1) that the image shows roots, ``(N,)``.
        true: the true amount (length in mm), ``(N,)``; "present" means ``true > min_value``.
        threshold: probability at or above which the prediction says "present".
    """
    p, t = _pair(presence, true)
    if not p.size:
        return float("nan")
    return float(np.mean((p >= threshold) == (t > min_value)))


def regression_report(*, pred_length_mm: ArrayLike, true_length_mm: ArrayLike,
                      pred_area_mm2: ArrayLike, true_area_mm2: ArrayLike,
                      presence: ArrayLike | None = None, threshold: float = 0.5,
                      min_length_mm: float = 0.0) -> dict[str, float]:
    """All metrics for length and area (and presence when given) as one flat dict.

    Keys: ``length_r2, length_mae_mm, length_rmse_mm, length_bias_mm, area_r2, area_mae_mm2,
    area_rmse_mm2, area_bias_mm2, presence_accuracy, n``.
    """
    out: dict[str, float] = {}
    for name, unit, pred, true in (("length", "mm", pred_length_mm, true_length_mm),
                                   ("area", "mm2", pred_area_mm2, true_area_mm2)):
        out[f"{name}_r2"] = r2(pred, true)
        out[f"{name}_mae_{unit}"] = mae(pred, true)
        out[f"{name}_rmse_{unit}"] = rmse(pred, true)
        out[f"{name}_bias_{unit}"] = bias(pred, true)
    if presence is not None:
        out["presence_accuracy"] = presence_accuracy(presence, true_length_mm,
                                                     threshold=threshold, min_value=min_length_mm)
    out["n"] = float(np.asarray(true_length_mm).reshape(-1).shape[0])
    return out


def regression_sums(pred: ArrayLike, true: ArrayLike, *, prefix: str) -> dict[str, float]:
    """Additive sufficient statistics of :func:`r2`/:func:`mae`/:func:`rmse`/:func:`bias`.

    Summing these over data-parallel workers and passing the totals to
    :func:`metrics_from_sums` gives the exact metrics over all workers' rows (averaging
    per-worker R2 values would not).
    """
    p, t = _pair(pred, true)
    return {f"{prefix}n": float(p.size), f"{prefix}sum_t": float(t.sum()),
            f"{prefix}sum_t2": float((t ** 2).sum()), f"{prefix}sse": float(((p - t) ** 2).sum()),
            f"{prefix}sae": float(np.abs(p - t).sum()), f"{prefix}se": float((p - t).sum())}


def metrics_from_sums(sums: dict[str, float], *, prefix: str, unit: str) -> dict[str, float]:
    """R2, MAE, RMSE and bias from (summed) :func:`regression_sums` output."""
    n = sums[f"{prefix}n"]
    name = prefix.rstrip("_")
    if n <= 0:
        nan = float("nan")
        return {f"{name}_r2": nan, f"{name}_mae_{unit}": nan, f"{name}_rmse_{unit}": nan,
                f"{name}_bias_{unit}": nan}
    ss_tot = sums[f"{prefix}sum_t2"] - sums[f"{prefix}sum_t"] ** 2 / n
    r2_val = 1.0 - sums[f"{prefix}sse"] / ss_tot if n >= 2 and ss_tot > 1e-12 else float("nan")
    return {f"{name}_r2": r2_val, f"{name}_mae_{unit}": sums[f"{prefix}sae"] / n,
            f"{name}_rmse_{unit}": float(np.sqrt(sums[f"{prefix}sse"] / n)),
            f"{name}_bias_{unit}": sums[f"{prefix}se"] / n}


def pearson_r2(pred: ArrayLike, true: ArrayLike) -> float:
    """Squared Pearson correlation (NaN if < 2 rows or either side constant).

    Unlike :func:`r2` it forgives a constant scale or offset error: a segmenter that misses
    half of every root scores r² = 1 and R² well below 1.
    """
    p, t = _pair(pred, true)
    if p.size < 2 or np.std(p) == 0 or np.std(t) == 0:
        return float("nan")
    return float(np.corrcoef(p, t)[0, 1] ** 2)


def bias_pct(pred: ArrayLike, true: ArrayLike) -> float:
    """``100 * (sum(pred) - sum(true)) / sum(true)``: the error of the archive total, in %."""
    p, t = _pair(pred, true)
    s = float(t.sum())
    return 100.0 * (float(p.sum()) - s) / s if p.size and s != 0 else float("nan")


def trait_agreement(*, pred_length: ArrayLike, true_length: ArrayLike, pred_area: ArrayLike,
                    true_area: ArrayLike) -> dict[str, float]:
    """How per-image traits of predicted masks agree with those of the true masks.

    Keys: ``length_r2, length_pearson_r2, length_bias_pct, length_mae, area_r2,
    area_pearson_r2, area_bias_pct, area_mae`` (MAE in the unit of the inputs).
    """
    out: dict[str, float] = {}
    for name, pred, true in (("length", pred_length, true_length), ("area", pred_area, true_area)):
        out[f"{name}_r2"] = r2(pred, true)
        out[f"{name}_pearson_r2"] = pearson_r2(pred, true)
        out[f"{name}_bias_pct"] = bias_pct(pred, true)
        out[f"{name}_mae"] = mae(pred, true)
    return out
