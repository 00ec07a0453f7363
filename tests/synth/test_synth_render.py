"""generate_image: determinism, exact ground truth, growth, looks, empty frames."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from rootflow.synth import SynthConfig, generate_image, rasterize
from rootflow.synth.roots import clip_lengths
from tests.synth._helpers import skeleton_length_px

TINY = SynthConfig.preset("tiny", empty_fraction=0.0, roots_per_dm2=6.0)


def _with_roots(cfg: SynthConfig, start: int = 0):
    for seed in range(start, start + 50):
        img = generate_image(seed, cfg)
        if img.n_roots >= 3:
            return img
    raise AssertionError("no seed produced roots")


def test_same_seed_same_arrays_and_different_seeds_differ() -> None:
    a = generate_image(7, TINY)
    b = generate_image(7, TINY)
    c = generate_image(8, TINY)
    assert a.image.dtype == np.uint8 and a.image.shape == (TINY.height, TINY.width, 3)
    assert a.mask.dtype == bool and a.mask.shape == (TINY.height, TINY.width)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.length_mm == b.length_mm and len(a.roots) == len(b.roots)
    assert not np.array_equal(a.image, c.image)


def test_ground_truth_matches_the_drawing() -> None:
    img = _with_roots(TINY)
    mm = 25.4 / TINY.dpi
    assert img.root_px == int(img.mask.sum()) > 0
    assert img.projected_area_mm2 == pytest.approx(img.root_px * mm * mm)
    assert img.length_mm == pytest.approx(sum(r.length_mm for r in img.roots))
    # Per-root length is the centre line clipped to the soil box, recomputed independently.
    x0, y0, x1, y1 = img.soil_box_px
    union = np.zeros_like(img.mask)
    weighted_d = 0.0
    for r in img.roots:
        seg = clip_lengths(r.points_px, (x0, y0, x1, y1))
        assert r.length_mm == pytest.approx(seg.sum() * mm, rel=1e-9)
        assert r.length_mm > 0
        assert np.all(r.diameter_px >= TINY.min_width_px - 1e-9)
        assert TINY.min_width_px * mm - 1e-9 <= r.mean_diameter_mm <= 2.0 * 1.1
        single = img.root_mask(r.root_id)
        assert single.any()
        union |= single
        weighted_d += r.length_mm * r.mean_diameter_mm
    # The mask is exactly the union of the roots' tubes, nothing more, nothing less.
    assert np.array_equal(union, img.mask)
    assert img.mean_diameter_mm == pytest.approx(weighted_d / img.length_mm)
    # Area of overlapping tubes is at most the sum of length x diameter (+ end caps).
    caps = sum(math.pi * (r.diameter_px.max() * mm / 2) ** 2 * 2 for r in img.roots)
    assert img.projected_area_mm2 <= weighted_d + caps + 1e-6
    assert img.projected_area_mm2 > 0.5 * weighted_d


def test_per_root_length_agrees_with_skeleton_of_its_own_mask() -> None:
    cfg = SynthConfig.preset("small", empty_fraction=0.0)
    img = _with_roots(cfg)
    errors = []
    for r in img.roots:
        px = r.length_mm / img.mm_per_px
        if px < 60:  # short stubs are dominated by end effects
            continue
        est = skeleton_length_px(img.root_mask(r.root_id))
        errors.append(abs(est - px) / px)
    assert len(errors) >= 3
    assert float(np.median(errors)) < 0.08, errors


def test_thin_roots_are_floored_to_min_width() -> None:
    cfg = SynthConfig.preset("tiny", empty_fraction=0.0, roots_per_dm2=6.0, min_width_px=3.0)
    img = _with_roots(cfg)
    assert min(float(r.diameter_px.min()) for r in img.roots) >= 3.0
    # A lone 3-px-wide horizontal tube covers exactly 3 rows.
    m = rasterize(np.array([[10.0, 20.5], [50.0, 20.5]]), np.array([3.0, 3.0]), shape=(40, 64))
    assert m[:, 30].sum() == 3


def test_roots_grow_between_sessions() -> None:
    cfg = SynthConfig.preset("tiny", empty_fraction=0.0, roots_per_dm2=6.0)
    days = [10.0, 30.0, 50.0, None]
    imgs = [generate_image(100 + i, cfg, scene_seed=42, day=d) for i, d in enumerate(days)]
    lengths = [im.length_mm for im in imgs]
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0]
    for early, late in zip(imgs, imgs[1:], strict=False):
        assert not (early.mask & ~late.mask).any()  # growth only adds root pixels
        late_by_id = {r.root_id: r.length_mm for r in late.roots}
        for r in early.roots:
            assert late_by_id[r.root_id] >= r.length_mm - 1e-9
    # Same window, different sessions: the soil is the same picture, lighting differs.
    assert np.array_equal(imgs[0].soil_box_px, imgs[1].soil_box_px)


def test_empty_frames() -> None:
    img = generate_image(3, dataclasses.replace(TINY, empty_fraction=1.0))
    assert img.n_roots == 0 and img.root_px == 0 and not img.mask.any()
    assert img.length_mm == 0.0 and math.isnan(img.mean_diameter_mm)
    # Before any root has arrived a window is empty too.
    assert generate_image(3, TINY, day=-100.0).n_roots == 0


def test_looks_share_geometry_but_not_appearance() -> None:
    a = generate_image(5, SynthConfig.preset("tiny", look="loam", empty_fraction=0.0))
    b = generate_image(5, SynthConfig.preset("tiny", look="sand", empty_fraction=0.0))
    # The scene's roots do not depend on the look (only the wall margins may hide some).
    pts_b = {r.root_id: r.points_px for r in b.roots}
    shared = [r for r in a.roots if r.root_id in pts_b]
    assert shared
    assert all(np.array_equal(r.points_px, pts_b[r.root_id]) for r in shared)
    # Sand is much brighter than loam, as in the peanut vs soybean frames.
    assert b.image.mean() > a.image.mean() + 30


def test_roots_are_brighter_than_their_surroundings() -> None:
    for look in ("loam", "sand", "clay"):
        cfg = SynthConfig.preset("small", look=look, empty_fraction=0.0)
        img = _with_roots(cfg)
        grey = img.image.astype(float).mean(axis=2)
        wide = [r for r in img.roots if r.diameter_px.mean() >= 4]
        core = np.zeros_like(img.mask)
        for r in wide:
            core |= rasterize(r.points_px, np.maximum(r.diameter_px - 2, 1), shape=img.mask.shape,
                              box=img.soil_box_px)
        x0, _, x1, _ = img.soil_box_px
        soil = ~img.mask
        soil[:, :x0] = False
        soil[:, x1:] = False
        assert core.sum() > 50
        assert grey[core].mean() > grey[soil].mean() + 8, look


def test_geometry_is_resolution_independent() -> None:
    lo = generate_image(9, SynthConfig(height=280, width=320, dpi=75.0, empty_fraction=0.0))
    hi = generate_image(9, SynthConfig(height=560, width=640, dpi=150.0, empty_fraction=0.0))
    assert hi.length_mm > 0
    assert lo.length_mm == pytest.approx(hi.length_mm, rel=0.02)


def test_bad_config_names_the_valid_values() -> None:
    with pytest.raises(ValueError, match="valid: \\['clay', 'loam', 'sand'\\]"):
        SynthConfig(look="peat")
    with pytest.raises(ValueError, match="unknown preset"):
        SynthConfig.preset("huge")
    with pytest.raises(ValueError, match="empty_fraction"):
        SynthConfig(empty_fraction=1.5)


def test_presets_match_their_cameras() -> None:
    ci = SynthConfig.preset("ci600")
    assert (ci.width, ci.height, ci.dpi) == (2550, 2273, 300.0)
    bartz = SynthConfig.preset("bartz", look="sand")
    assert bartz.frame_height_mm == pytest.approx(13.5, abs=0.05)  # BTC-100: 18 x 13.5 mm
    img = generate_image(2, dataclasses.replace(bartz, roots_per_dm2=40.0, empty_fraction=0.0))
    assert img.image.shape == (480, 640, 3) and img.n_roots > 0
