"""The one metric module: pooled pixel scores, clDice, trait agreement."""

from __future__ import annotations

import numpy as np
import pytest

from rootflow.evaluation import metrics as M


def _line(h: int = 64, w: int = 64, *, row: int = 32, width: int = 3, cols=(5, 59)) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[row - width // 2: row + width // 2 + 1, cols[0]:cols[1]] = True
    return m


def test_pooled_dice_weighs_pixels_not_images() -> None:
    """Pooled Dice = 2·ΣTP/(ΣP+ΣT): a mean of per-image Dice would let one tiny image with a
    perfect score outweigh a large scan that is half wrong."""
    big_t = np.zeros((100, 100), bool)
    big_t[:, :50] = True
    big_p = np.zeros_like(big_t)
    big_p[:, :25] = True  # half the roots: dice 2*2500/(2500+5000) = 0.667
    small = np.zeros((10, 10), bool)
    small[0, 0] = True
    meter = M.PixelMeter(cldice=False)
    meter.update(big_p, big_t)
    meter.update(small, small)
    s = meter.summary()
    assert s["dice"] == pytest.approx(2 * 2501 / (2501 + 5001))
    assert s["iou"] == pytest.approx(2501 / 5001)
    assert s["precision"] == pytest.approx(1.0) and s["recall"] == pytest.approx(2501 / 5001)
    assert s["n_images"] == 2


def test_empty_masks_score_perfect_and_undefined_ratios_are_nan() -> None:
    """Nothing predicted where nothing is: Dice/IoU/clDice 1.0, precision/recall undefined."""
    z = np.zeros((20, 20), bool)
    s = M.summarize_pixels(M.pixel_counts(z, z))
    assert s["dice"] == 1.0 and s["iou"] == 1.0 and s["cldice"] == 1.0
    assert np.isnan(s["precision"]) and np.isnan(s["recall"])
    one = z.copy()
    one[5, 5:15] = True
    s = M.summarize_pixels(M.pixel_counts(one, z))
    assert s["dice"] == 0.0 and s["cldice"] == 0.0


def test_cldice_punishes_a_broken_thin_root_more_than_dice() -> None:
    """The reason clDice is reported: a thin root cut into pieces keeps a high pixel Dice
    when a thick root dominates, but loses skeleton coverage."""
    truth = _line(width=9) | _line(row=10, width=1)
    pred = _line(width=9) | _line(row=10, width=1)
    pred[10, 10:54:4] = False
    pred[10, 11:54:4] = False
    pred[10, 12:54:4] = False  # 3 of every 4 pixels of the thin root gone
    s = M.summarize_pixels(M.pixel_counts(pred, truth))
    assert s["dice"] > 0.9
    assert s["topology_sensitivity"] < 0.9 and s["cldice"] < s["dice"]
    perfect = M.summarize_pixels(M.pixel_counts(truth, truth))
    assert perfect["cldice"] == pytest.approx(1.0) and perfect["dice"] == 1.0


def test_cldice_forgives_boundary_width_errors() -> None:
    """A root predicted one pixel too wide on each side has a lower Dice but the same
    skeleton inside the truth: clDice stays 1 for its sensitivity."""
    truth, pred = _line(width=3), _line(width=5)
    s = M.summarize_pixels(M.pixel_counts(pred, truth))
    assert s["dice"] < 0.8 and s["topology_sensitivity"] == pytest.approx(1.0)


def test_meter_sums_are_additive_for_distributed_validation() -> None:
    """All-reduced sums of two workers must equal one meter over all images (exact metrics)."""
    rng = np.random.default_rng(0)
    masks = [(rng.random((32, 32)) > 0.7, rng.random((32, 32)) > 0.6) for _ in range(6)]
    one, a, b = M.PixelMeter(), M.PixelMeter(), M.PixelMeter()
    for i, (p, t) in enumerate(masks):
        one.update(p, t)
        (a if i % 2 else b).update(p, t)
    assert M.summarize_pixels(M.add_sums(a.sums(), b.sums())) == pytest.approx(one.summary(),
                                                                                nan_ok=True)


def test_meter_accepts_torch_batches() -> None:
    """U-Net validation passes (B, 1, H, W) tensors."""
    torch = pytest.importorskip("torch")
    p = torch.zeros(2, 1, 8, 8, dtype=torch.bool)
    p[:, :, 2:4] = True
    m = M.PixelMeter()
    m.update(p, p.clone())
    assert m.summary()["dice"] == 1.0 and m.summary()["n_images"] == 2


def test_shape_mismatch_is_an_error() -> None:
    """A mask of the wrong size must never be scored by broadcasting or cropping."""
    with pytest.raises(ValueError, match="pred is"):
        M.pixel_counts(np.zeros((4, 5)), np.zeros((5, 4)))


def test_r2_is_not_pearson() -> None:
    """A segmenter that finds half of every root correlates perfectly (r² = 1) but does not
    equal the truth (R² < 1, bias -50 %): both are reported, and they must differ."""
    true = np.array([10.0, 20.0, 30.0, 40.0])
    pred = true / 2
    agree = M.trait_agreement(pred_length=pred, true_length=true, pred_area=pred, true_area=true)
    assert agree["length_pearson_r2"] == pytest.approx(1.0)
    assert agree["length_r2"] == pytest.approx(1 - np.sum((true / 2) ** 2) / np.sum((true - 25) ** 2))
    assert agree["length_bias_pct"] == pytest.approx(-50.0)
    assert M.trait_agreement(pred_length=true, true_length=true, pred_area=true,
                             true_area=true)["length_r2"] == 1.0


def test_best_threshold_picks_the_dice_maximum() -> None:
    """Class-balanced training inflates root probabilities; the saved threshold must be the
    one that maximises Dice on the training pixels, not a fixed 0.5."""
    truth = np.zeros(1000, bool)
    truth[:50] = True
    prob = np.where(truth, 0.9, 0.0)
    prob[50:150] = 0.6  # soil that a balanced model calls root at 0.5
    t, d = M.best_threshold(prob, truth)
    assert 0.6 < t <= 0.9 and d == pytest.approx(1.0)
