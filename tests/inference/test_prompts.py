"""EDT point sampler (shared with training) and the prompt lattice."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rootflow.inference.prompts import (
    edt,
    lattice_points,
    sample_edt_points,
    sample_edt_points_batch,
)


def _bar_mask(h: int = 64, w: int = 80) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[20:31, 10:w - 10] = True  # an 11-px-wide horizontal "root"; centre line is row 25
    return m


def _at(mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    cols = np.floor(points[:, 0]).astype(int)
    rows = np.floor(points[:, 1]).astype(int)
    return mask[rows, cols]


def test_shapes_labels_and_classes():
    m = _bar_mask()
    pts, labels = sample_edt_points(m, n_pos=7, n_neg=5, rng=np.random.default_rng(0))
    assert pts.shape == (12, 2) and pts.dtype == np.float32
    assert labels.shape == (12,) and labels.dtype == np.int32
    assert labels.tolist() == [1] * 7 + [0] * 5
    inside = _at(m, pts)
    assert inside[:7].all() and not inside[7:].any()
    # pixel centres: x = col + 0.5
    assert np.allclose(pts % 1.0, 0.5)


def test_positives_concentrate_on_centre_line():
    m = _bar_mask(64, 600)
    pts, _ = sample_edt_points(m, n_pos=200, n_neg=0, rng=np.random.default_rng(1))
    rows = np.floor(pts[:, 1]).astype(int)
    # uniform sampling over rows 20..30 gives mean |row-25| = 30/11 ~ 2.73; EDT weights
    # (1..6..1 across the root) give 70/36 ~ 1.94 (sd of the mean here ~0.1).
    assert np.abs(rows - 25).mean() < 2.3
    # edge rows: 2/36 ~ 0.056 of the draws with EDT weights, 2/11 ~ 0.18 uniformly
    assert np.mean((rows == 20) | (rows == 30)) < 0.11


def test_edt_is_exact_and_treats_outside_as_background():
    m = np.ones((5, 5), bool)
    d = edt(m)
    assert d[2, 2] == pytest.approx(3.0)  # 3 px to the outside ring
    assert d[0, 0] == pytest.approx(1.0)
    assert edt(~m).max() == 0


def test_reproducible_with_seed_and_differs_between_seeds():
    m = _bar_mask()
    a = sample_edt_points(m, n_pos=5, n_neg=5, rng=3)
    b = sample_edt_points(m, n_pos=5, n_neg=5, rng=np.random.default_rng(3))
    c = sample_edt_points(m, n_pos=5, n_neg=5, rng=4)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_without_replacement_when_possible():
    m = _bar_mask()
    pts, _ = sample_edt_points(m, n_pos=50, n_neg=50, rng=0)
    assert len({tuple(p) for p in pts}) == 100


def test_probability_map_threshold_and_torch_input():
    prob = np.full((32, 32), 0.2, np.float32)
    prob[5:10, 5:10] = 0.9
    pts, labels = sample_edt_points(torch.from_numpy(prob), n_pos=4, n_neg=4, rng=0,
                                    threshold=0.5)
    fg = prob > 0.5
    assert _at(fg, pts[labels == 1]).all() and not _at(fg, pts[labels == 0]).any()
    # a stricter threshold than any value: no foreground -> all negatives (swap)
    _, labels = sample_edt_points(prob, n_pos=4, n_neg=4, rng=0, threshold=0.95)
    assert (labels == 0).all()


def test_uint8_0_255_mask():
    m = _bar_mask().astype(np.uint8) * 255
    pts, labels = sample_edt_points(m, n_pos=3, n_neg=3, rng=0)
    assert _at(m > 0, pts)[:3].all() and labels.tolist() == [1, 1, 1, 0, 0, 0]


@pytest.mark.parametrize("fill", ["swap", "pad"])
def test_empty_and_full_masks_keep_point_count(fill):
    empty = np.zeros((16, 16), bool)
    pts, labels = sample_edt_points(empty, n_pos=3, n_neg=2, rng=0, fill=fill)
    assert pts.shape == (5, 2)
    if fill == "swap":
        assert (labels == 0).all()
    else:
        assert labels.tolist() == [0, 0, -1, -1, -1]
    full = np.ones((16, 16), bool)
    pts, labels = sample_edt_points(full, n_pos=3, n_neg=2, rng=0, fill=fill)
    assert pts.shape == (5, 2)
    assert (labels == 1).all() if fill == "swap" else labels.tolist() == [1, 1, 1, -1, -1]


def test_more_points_than_pixels_uses_replacement():
    m = np.zeros((8, 8), bool)
    m[3, 3] = True
    pts, labels = sample_edt_points(m, n_pos=4, n_neg=0, rng=0)
    assert (labels == 1).all() and np.allclose(pts, [[3.5, 3.5]] * 4)


def test_edt_negatives_stay_off_root_edges():
    m = _bar_mask()
    pts, _ = sample_edt_points(m, n_pos=0, n_neg=300, rng=0, negative_weighting="edt")
    d = edt(m)  # distance inside roots; for negatives use distance to the root
    dist_bg = edt(~m)
    got = dist_bg[np.floor(pts[:, 1]).astype(int), np.floor(pts[:, 0]).astype(int)]
    assert got.min() >= 1 and got.mean() > dist_bg[~m].mean()
    assert d.max() == pytest.approx(6.0)


def test_batch_and_errors():
    masks = np.stack([_bar_mask(), np.zeros((64, 80), bool)])
    pts, labels = sample_edt_points_batch(masks, n_pos=2, n_neg=2, rng=0)
    assert pts.shape == (2, 4, 2) and labels.shape == (2, 4)
    assert labels[1].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        sample_edt_points(np.zeros((2, 3, 4)), n_pos=1, n_neg=1, rng=0)
    with pytest.raises(ValueError, match=">= 0"):
        sample_edt_points(_bar_mask(), n_pos=-1, n_neg=1, rng=0)


def test_lattice_points_cell_centres():
    pts = lattice_points(100, 200, n_per_side=4)
    assert pts.shape == (16, 2)
    assert np.allclose(sorted(set(pts[:, 0].tolist())), [25, 75, 125, 175])
    assert np.allclose(sorted(set(pts[:, 1].tolist())), [12.5, 37.5, 62.5, 87.5])
    with pytest.raises(ValueError):
        lattice_points(10, 10, n_per_side=0)
