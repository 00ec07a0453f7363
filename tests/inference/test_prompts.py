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


# ------------------------------------------------------------------ the one prompt policy
def test_policy_modes_count_and_label_by_the_map():
    """Guards against the policy's point count depending on the map (batches would not
    stack) and against lattice labels not following the label map at the point's pixel."""
    from rootflow.inference.prompts import PromptPolicy

    m = _bar_mask()
    for mode, n in (("auto", 9 + 5), ("lattice", 9), ("edt", 5)):
        pol = PromptPolicy(mode=mode, lattice_per_side=3, n_pos=3, n_neg=2)
        for label_map in (m, np.zeros_like(m), m.astype(np.float32) * 0.9):
            pts, labs = pol.draw(label_map, rng=0)
            assert pol.n_points == n and pts.shape == (n, 2) and labs.shape == (n,)
            assert (_at(label_map > 0.5, pts) == (labs == 1)).all()
    with pytest.raises(ValueError, match="mode"):
        PromptPolicy(mode="grid")  # type: ignore[arg-type]


def test_training_and_inference_draw_through_the_same_code(tmp_path):
    """Guards against training and inference drawing prompts by different code: the patch
    dataset's prompts are exactly ``policy.training_prompts`` of the patch's ground truth,
    and the predictor's tile prompts are exactly ``policy.inference_prompts`` of its rule map
    (here a prior mask); both are ``policy.draw``."""
    from rootflow.inference.prompts import PromptPolicy
    from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor
    from rootflow.training.data import AnnotatedImage, PatchConfig, PatchDataset
    from tests.training._rootsam_helpers import toy_pair

    pol = PromptPolicy(lattice_per_side=2, n_pos=2, n_neg=2)
    ds = PatchDataset([AnnotatedImage(str(i), *toy_pair(i)) for i in range(2)],
                      PatchConfig(patch_size=64, patches_per_image=2), seed=5, policy=pol)
    for i in range(len(ds)):
        it = ds.item(i, epoch=3)
        want = pol.training_prompts(it["mask"], rng=np.random.default_rng([5, 3, i, 1]))
        assert np.array_equal(it["points"], want[0]) and np.array_equal(it["labels"], want[1])
        again = pol.draw(it["mask"], rng=np.random.default_rng([5, 3, i, 1]))
        assert np.array_equal(again[0], want[0])

    cfg = RootSAMInferenceConfig(variant="test", device="cpu", lattice_points_per_side=2,
                                 auto_n_pos=2, auto_n_neg=2, seed=4)
    pred = RootSAMPredictor(cfg)
    assert pred.policy == pol
    image, mask = toy_pair(9, height=100, width=300)
    res = pred.predict([image], priors=[mask], return_logits=True)[0]
    from rootflow.inference.tiling import extract_tiles, make_grid

    g = make_grid(100, 300, tile=pred.tile, overlap=pred.overlap)
    tiles = extract_tiles(mask.astype(np.float32), g, pad_value=0.0)
    for k, (y0, x0) in enumerate(g.origins()):
        valid = (min(g.tile, 100 - y0), min(g.tile, 300 - x0))
        want = pol.inference_prompts(tiles[k], rng=np.random.default_rng([4, 100, 300, k]),
                                     valid_hw=valid)
        got = res.tile_prompts[k]
        assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_training_and_inference_draws_match_in_statistics():
    """Guards against training showing the decoder prompts unlike those of production: on the
    same masks, the training draw (labels from the ground truth) and the inference draw
    (labels from the policy's rule: here a segmenter-like prior, the truth dilated by 1 px
    with its thinnest parts lost) agree in number of points, share of positive points and
    spatial spread."""
    import cv2

    from rootflow.inference.prompts import PromptPolicy, prompt_statistics
    from tests.training._rootsam_helpers import toy_pair

    pol = PromptPolicy()
    train, infer = [], []
    for seed in range(24):
        _, mask = toy_pair(seed, height=256, width=256)
        prior = cv2.dilate(cv2.erode(mask.astype(np.uint8), np.ones((2, 2), np.uint8)),
                           np.ones((4, 4), np.uint8)) > 0
        train.append(prompt_statistics(*pol.training_prompts(mask, rng=seed)))
        infer.append(prompt_statistics(*pol.inference_prompts(prior, rng=seed + 100)))
    for key in ("n_points", "positive_share", "spread"):
        a = np.array([t[key] for t in train])
        b = np.array([t[key] for t in infer])
        if key == "n_points":
            assert (a == pol.n_points).all() and (b == pol.n_points).all()
        elif key == "positive_share":
            assert abs(a.mean() - b.mean()) < 0.05, (a.mean(), b.mean())
        else:
            assert 0.85 < b.mean() / a.mean() < 1.15, (a.mean(), b.mean())


def test_embedded_coordinate_on_1px_root():
    """Guards against the half-pixel shift: a point drawn on a one-pixel-wide root must be
    embedded by SAM2's prompt encoder (after its own +0.5 and the resize to its input size)
    inside that root's pixel, in training (512 px patch resized to the model) and inference
    (a tile at the model's size). The old convention landed one pixel (training) or half a
    pixel (inference) to the right."""
    from rootflow.inference.prompts import PromptPolicy
    from rootflow.models.rootsam import build_rootsam
    from rootflow.training.rootsam_task import interactive_rounds

    model = build_rootsam("test").eval()
    s = model.image_size
    pe = model.sam.sam_prompt_encoder
    seen: list[torch.Tensor] = []
    real = pe.pe_layer.forward_with_coords

    def spy(coords, image_size):  # records what SAM embeds, then runs SAM's own code
        seen.append(coords.detach().clone() / torch.tensor([image_size[1], image_size[0]]))
        return real(coords, image_size)

    pe.pe_layer.forward_with_coords = spy
    pol = PromptPolicy(mode="edt", n_pos=4, n_neg=0)
    try:
        for patch, col in ((512, 301), (s, 101)):
            mask = np.zeros((patch, patch), bool)
            mask[:, col] = True  # a vertical root one pixel wide
            pts, labs = pol.training_prompts(mask, rng=0)
            with torch.no_grad():
                emb = model.encode(model.preprocess(np.zeros((1, s, s, 3), np.uint8)))
                seen.clear()
                interactive_rounds(model, emb, torch.from_numpy(pts[None]),
                                   torch.from_numpy(labs[None]), torch.from_numpy(mask[None]),
                                   patch=patch, click_rounds=0)
            xy = seen[-1][0, :4].numpy() * patch  # in patch pixels; the policy round
            assert (np.floor(xy[:, 0]) == col).all(), (patch, xy[:, 0])
            np.testing.assert_allclose(xy[:, 0], col + 0.5, atol=1e-4)
    finally:
        del pe.pe_layer.forward_with_coords


def test_next_click_goes_to_centre_of_thickest_error():
    """Guards against the simulated clicker clicking on an edge, on the thinner error, or
    with the wrong label: missed root -> positive at its centre; false root -> negative; and
    (SAM2's rule) a long 1-px sliver along a root's edge loses to a smaller but thicker error,
    where a click is unambiguous."""
    from rootflow.inference.prompts import next_click, next_clicks_batch

    truth = np.zeros((60, 80), bool)
    truth[10:21, 5:75] = True  # 11-px root, centre row 15
    pred = truth.copy()
    pred[10:21, 40:75] = False  # missed: 11 x 35 px
    pred[40:45, 10:20] = True  # false root: 5 x 10 px (smaller)
    x, y, lab = next_click(pred, truth)
    assert lab == 1 and y == 15.5 and 40 <= x < 75
    pred[10:21, 40:75] = True  # now only the false root is wrong
    x, y, lab = next_click(pred, truth)
    assert lab == 0 and y == 42.5 and 10 <= x < 20
    assert next_click(truth, truth) is None
    pts, labs = next_clicks_batch(np.stack([pred, truth]), np.stack([truth, truth]))
    assert labs.tolist() == [0, -1] and pts[0].tolist() == [x, y]
    sliver = truth.copy()
    sliver[21, 5:75] = True  # 70-px false sliver along the root's edge (largest by area)
    sliver[50:55, 60:66] = True  # 30-px false blob, 5 px thick
    x, y, lab = next_click(sliver, truth)
    assert lab == 0 and (x, y) == (62.5, 52.5)


def test_paint_clicks_writes_each_click_at_its_low_res_pixel():
    """Guards the dense path of a click (training's click rounds and ``refine`` both use it):
    a click must land on the low-res pixel that contains it (x = column, in model-input px),
    with the click's sign, later clicks winning, padding ignored, the input left untouched and
    the result clamped to SAM2's logit range."""
    import torch

    from rootflow.inference.prompts import CLICK_LOGIT, paint_clicks

    prev = torch.full((1, 1, 32, 32), 50.0)  # 128 px input -> 32 low-res, 4 px each
    pts = np.array([[[41.0, 9.0], [41.0, 9.0], [100.0, 100.0]]], np.float32)
    out = paint_clicks(prev, pts, np.array([[1, 0, -1]]), image_size=128)
    assert float(prev.max()) == 50.0  # not modified
    assert out[0, 0, 9 // 4, 41 // 4] == -CLICK_LOGIT  # the later (negative) click wins
    assert out[0, 0, 25, 25] == CLICK_LOGIT  # padding at (100, 100): only clamped
    changed = (out[0, 0] < 0).nonzero().tolist()
    assert all(abs(r - 2) <= 2 and abs(c - 10) <= 2 for r, c in changed)  # stays local
