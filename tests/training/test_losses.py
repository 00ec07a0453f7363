"""Losses and metrics: shapes, empty masks, the direction of every term."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rootflow.evaluation.metrics import SegmentationMeter, iou_dice, summarize
from rootflow.training.losses import (
    LossConfig,
    boundary_loss,
    focal_tversky_loss,
    iou_head_loss,
    mask_iou,
    rootsam_loss,
    signed_distance_map,
)


def _disk(h: int = 32, w: int = 32, r: float = 6.0) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= r**2


def _logits(mask: np.ndarray, scale: float = 10.0) -> torch.Tensor:
    return torch.as_tensor(np.where(mask, scale, -scale), dtype=torch.float32)[None, None]


def test_focal_tversky_perfect_empty_and_wrong() -> None:
    m = _disk()
    t = torch.as_tensor(m)[None, None]
    assert focal_tversky_loss(_logits(m, 30), t).item() < 1e-3
    empty = torch.zeros_like(t)
    assert focal_tversky_loss(_logits(np.zeros_like(m), 30), empty).item() < 1e-6
    assert focal_tversky_loss(_logits(m, 30), empty).item() > 0.9  # false positives on empty
    assert focal_tversky_loss(_logits(np.zeros_like(m), 30), t).item() > 0.9  # all missed
    assert focal_tversky_loss(torch.zeros(3, 1, 8, 8), torch.zeros(3, 1, 8, 8)).shape == (3,)


def test_tversky_penalises_misses_more_than_false_alarms() -> None:
    m = _disk(r=8)
    t = torch.as_tensor(m)[None, None]
    thinner, fatter = _disk(r=6), _disk(r=10)
    miss = focal_tversky_loss(_logits(thinner), t, alpha=0.7, beta=0.3)
    extra = focal_tversky_loss(_logits(fatter), t, alpha=0.7, beta=0.3)
    assert miss > extra


def test_signed_distance_map_signs_and_empty() -> None:
    m = _disk()
    phi = signed_distance_map(m)
    assert phi.shape == m.shape and phi.dtype == np.float32
    assert (phi[m] < 0).all() and (phi[~m] > 0).all()
    assert np.abs(phi).max() <= 1.0
    assert (signed_distance_map(np.zeros((8, 8), bool)) == 1).all()
    assert (signed_distance_map(np.ones((8, 8), bool)) == -1).all()


def test_boundary_loss_prefers_the_right_mask() -> None:
    m = _disk()
    sdm = torch.as_tensor(signed_distance_map(m))[None, None]
    good = boundary_loss(_logits(m), sdm)
    shifted = boundary_loss(_logits(np.roll(m, 8, axis=1)), sdm)
    nothing = boundary_loss(_logits(np.zeros_like(m)), sdm)
    assert good < nothing and good < shifted
    assert good.item() < 0 and good.shape == (1,)


def test_iou_head_loss_targets_actual_iou() -> None:
    m = _disk()
    t = torch.as_tensor(m)[None, None]
    assert mask_iou(_logits(m), t).item() == 1.0
    assert mask_iou(_logits(np.zeros_like(m)), torch.zeros_like(t)).item() == 1.0  # empty/empty
    assert iou_head_loss(torch.tensor([[1.0]]), _logits(m), t).item() == 0.0
    assert iou_head_loss(torch.tensor([[0.0]]), _logits(m), t).item() == 1.0


def test_rootsam_loss_backprops_and_reports_parts() -> None:
    m = torch.as_tensor(_disk())[None, None].repeat(2, 1, 1, 1)
    sdm = torch.as_tensor(signed_distance_map(_disk()))[None, None].repeat(2, 1, 1, 1)
    logits = torch.zeros(2, 1, 8, 8, requires_grad=True)  # low-res: upsampled to the target
    iou = torch.full((2, 1), 0.5, requires_grad=True)
    loss, parts = rootsam_loss(logits, iou, m, sdm, LossConfig())
    loss.backward()
    assert logits.grad is not None and iou.grad is not None
    assert set(parts) == {"loss", "tversky", "boundary", "iou_mse", "bce", "logit_range"}
    assert parts["loss"] == pytest.approx(loss.item())


def test_rootsam_loss_keeps_gradient_on_confidently_wrong_pixels() -> None:
    """Guards the cause of untrainable corrective clicks: focal Tversky and the boundary term
    act through sigmoid(logits), so a pixel predicted wrong with a large logit (a decoder
    trained from scratch reaches |logit| ~ 100) gets almost no gradient from them, and a
    click round can never correct it. The BCE term's gradient on such a pixel stays ~1/N."""
    m = torch.as_tensor(_disk())[None, None]
    sdm = torch.as_tensor(signed_distance_map(_disk()))[None, None]
    n = m.numel()
    wrong = (~m.bool()).nonzero()[0].tolist()  # a background pixel
    grads = {}
    for w in (0.0, 1.0):
        logits = torch.where(m.bool(), 40.0, -40.0)
        logits[tuple(wrong)] = 40.0  # confidently wrong
        logits.requires_grad_(True)
        loss, _ = rootsam_loss(logits, torch.ones(1, 1), m, sdm, LossConfig(w_bce=w, w_range=0))
        loss.backward()
        grads[w] = float(logits.grad[tuple(wrong)])
    assert abs(grads[0.0]) < 1e-9
    assert grads[1.0] == pytest.approx(1.0 / n, rel=1e-3)


def test_metrics_iou_dice_and_meter() -> None:
    a = torch.zeros(2, 4, 4, dtype=torch.bool)
    b = a.clone()
    a[0, :2] = True  # 8 px
    b[0, :1] = True  # 4 px inside a
    iou, dice = iou_dice(a, b)
    assert iou.tolist() == [0.5, 1.0]  # second pair: both empty
    assert dice[0].item() == pytest.approx(2 * 4 / 12)
    meter = SegmentationMeter()
    meter.update(a, b, torch.tensor([0.5, 1.0]))
    out = summarize(meter.sums())
    assert out["miou"] == pytest.approx(0.75) and out["n_patches"] == 2
    assert out["pooled_iou"] == pytest.approx(0.5) and out["iou_pred_mae"] == pytest.approx(0.0)
    assert np.isnan(summarize(SegmentationMeter().sums())["miou"])
