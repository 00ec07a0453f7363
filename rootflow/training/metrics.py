"""Validation metrics of RootSAM: per-patch IoU and Dice, averaged over patches (mIoU, mDice).

RootSAM reports mIoU and Dice on 512x512 held-out patches; here the patch size is a config
value (tiny models validate at 128-256 px). Per-patch scores are averaged (each patch counts
once, whatever its root density), and pooled IoU (all intersections over all unions) is kept
too because it is what dense-root patches dominate. A patch with no root and no predicted root
scores 1.0 (perfect "nothing here"); no root but some predicted scores 0.0.

The accumulator holds plain sums so distributed validation is exact: all-reduce the sums
(``LoopContext.all_reduce(meter.sums())``), then :func:`summarize`.
"""

from __future__ import annotations

import dataclasses

import torch


def iou_dice(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample IoU and Dice of two binary masks.

    Args:
        pred: ``(B, ...)`` bool (or {0, 1}) predicted masks.
        target: same shape, ground truth.

    Returns:
        ``iou (B,)`` and ``dice (B,)`` in ``[0, 1]``; both 1.0 where pred and target are empty.
    """
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
