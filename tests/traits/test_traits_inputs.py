"""Edge cases, input forms, the schema contract, ROIs, diameter classes, skeleton properties."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
import scipy.ndimage as ndi

from rootflow.traits import (
    MaskError,
    as_binary,
    class_suffixes,
    kimura_length_px,
    measure,
    rve_length_px,
    skeletonize,
    trait_schema,
)
from rootflow.traits.length import step_counts
from rootflow.traits.skeleton import pad
from tests.traits._helpers import capsule, star


def _check_row(row: dict) -> None:
    schema = trait_schema()
    assert list(row) == schema.names
    pa.Table.from_pylist([row], schema=schema)  # types and nullability agree
    for k, v in row.items():
        assert v is None or type(v) in (int, float, str), (k, type(v))
        if isinstance(v, float):
            assert math.isfinite(v), k


def test_schema_keys_match_measure_and_are_identifiers() -> None:
    row = measure(capsule(30, 100, 5).mask, dpi=300)
    _check_row(row)
    assert all(name.isidentifier() for name in trait_schema().names)


def test_empty_mask() -> None:
    row = measure(np.zeros((40, 50), bool), dpi=150)
    _check_row(row)
    assert row["length_mm"] == 0 and row["tips"] == 0 and row["network_area_mm2"] == 0
    assert row["avg_diameter_mm"] is None and row["branching_frequency_per_mm"] is None


def test_all_root_mask() -> None:
    row = measure(np.ones((40, 60), bool), px_per_mm=1)
    _check_row(row)
    assert row["network_area_mm2"] == 2400
    assert row["length_mm"] > 0 and row["avg_diameter_mm"] > 0


def test_one_pixel_root() -> None:
    m = np.zeros((20, 20), bool)
    m[7, 9] = True
    row = measure(m, px_per_mm=1, min_component_px=0)
    _check_row(row)
    assert row["length_mm"] == pytest.approx(1.0)
    assert row["network_area_mm2"] == 1 and row["tips"] == 2 and row["branch_points"] == 0
    # ... and the default noise filter drops it
    assert measure(m, px_per_mm=1)["network_area_mm2"] == 0


def test_roots_touching_the_border_keep_their_width_and_length() -> None:
    m = np.zeros((60, 80), bool)
    m[0:60, 30:37] = True  # a vertical root crossing the whole frame, 7 px wide
    m[20:27, 0:30] = True  # a lateral leaving through the left edge
    row = measure(m, px_per_mm=1, min_component_px=0)
    _check_row(row)
    assert row["length_mm"] == pytest.approx(60 + 33.5, rel=0.02)
    assert row["median_diameter_mm"] == pytest.approx(7, rel=0.05)
    assert (row["tips"], row["branch_points"]) == (3, 1)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: m,
        lambda m: m.astype(np.uint8),
        lambda m: m.astype(np.uint8) * 255,
        lambda m: m.astype(np.uint16) * 65535,
        lambda m: m.astype(np.float32),
        lambda m: np.repeat(m[..., None].astype(np.uint8) * 255, 3, axis=2),
        lambda m: np.dstack([m * 255, m * 0, m * 0, m * 255]).astype(np.uint8),  # RootPainter
        lambda m: np.dstack([np.repeat(m[..., None] * 255, 3, 2), np.full(m.shape, 255)]).astype(np.uint8),
    ],
    ids=["bool", "0-1", "0-255", "16bit", "float", "rgb", "rgba-transparent", "rgba-opaque"],
)
def test_mask_forms_give_the_same_traits(make) -> None:
    m = capsule(30, 100, 5).mask
    assert measure(make(m), dpi=300) == measure(m, dpi=300)


def test_non_binary_masks_are_refused_with_a_clear_message_or_thresholded() -> None:
    m = capsule(30, 100, 5).mask
    grey = (ndi.gaussian_filter(m.astype(float), 1.0) * 255).astype(np.uint8)
    with pytest.raises(MaskError, match="not binary.*threshold="):
        measure(grey, dpi=300)
    row = measure(grey, dpi=300, threshold=127)
    assert row["length_mm"] == pytest.approx(measure(m, dpi=300)["length_mm"], rel=0.03)
    with pytest.raises(MaskError, match="2-D"):
        as_binary(np.zeros((4, 4, 2)))
    with pytest.raises(MaskError, match="NaN"):
        as_binary(np.full((4, 4), np.nan))


def test_calibration_must_be_given_once_and_positive() -> None:
    m = np.zeros((10, 10), bool)
    with pytest.raises(ValueError, match="exactly one"):
        measure(m)
    with pytest.raises(ValueError, match="exactly one"):
        measure(m, dpi=300, px_per_mm=10)
    with pytest.raises(ValueError, match="positive"):
        measure(m, dpi=-1)


def test_roi_box_and_mask() -> None:
    m = np.zeros((100, 200), bool)
    m[47:54, 0:200] = True  # horizontal root, 7 px wide, across the frame
    full = measure(m, px_per_mm=1)
    left = measure(m, px_per_mm=1, roi=(0, 0, 100, 100))
    right_mask = np.zeros_like(m)
    right_mask[:, 100:] = True
    right = measure(m, px_per_mm=1, roi=right_mask)
    assert left["length_mm"] == pytest.approx(100, rel=0.02)
    assert left["length_mm"] + right["length_mm"] == pytest.approx(full["length_mm"], rel=1e-9)
    assert left["network_area_mm2"] == 700 and left["analysed_area_mm2"] == 10000
    # the ROI edge is not a root tip: the root is measured whole, then clipped
    assert left["tips"] == 1 and left["median_diameter_mm"] == pytest.approx(7, rel=0.05)
    with pytest.raises(ValueError, match="roi"):
        measure(m, px_per_mm=1, roi=(0, 0, 300, 10))


def test_diameter_classes_partition_the_totals() -> None:
    thick = star([90, 210, 330], 60, 9).mask
    thin = capsule(0, 120, 3).mask
    m = np.zeros((thick.shape[0] + thin.shape[0], thick.shape[1]), bool)
    m[: thick.shape[0]] = thick
    m[thick.shape[0]:, : thin.shape[1]] = thin[:, : thick.shape[1]]
    edges = (2.0, 5.0, 8.0)
    row = measure(m, px_per_mm=1, diameter_edges_mm=edges)
    names = class_suffixes(edges)
    assert names == ["d0to2", "d2to5", "d5to8", "d8toinf"]
    assert list(row) == trait_schema(diameter_edges_mm=edges).names
    for trait in ("length_mm", "projected_area_mm2", "surface_area_mm2", "volume_mm3"):
        assert sum(row[f"{trait}_{n}"] for n in names) == pytest.approx(row[trait])
    assert row["length_mm_d2to5"] > 0 and row["length_mm_d8toinf"] > 0
    assert class_suffixes((0.25, 1.5)) == ["d0to0p25", "d0p25to1p5", "d1p5toinf"]
    with pytest.raises(ValueError, match="increasing"):
        trait_schema(diameter_edges_mm=(1.0, 0.5))


def test_areas_volumes_of_a_cylinder() -> None:
    w, length = 9, 200
    row = measure(capsule(0, length, w).mask, px_per_mm=1, min_component_px=0)
    assert row["projected_area_mm2"] == pytest.approx(row["network_area_mm2"], rel=0.03)
    # a capsule is a cylinder (length - w) plus a sphere (two hemispherical tips)
    cyl = length - w
    assert row["surface_area_mm2"] == pytest.approx(math.pi * w * cyl + math.pi * w * w, rel=0.06)
    assert row["volume_mm3"] == pytest.approx(math.pi * w * w / 4 * cyl + math.pi * w**3 / 6, rel=0.06)
    assert row["perimeter_mm"] == pytest.approx(2 * cyl + math.pi * w, rel=0.02)


def test_skeleton_is_thin_and_keeps_topology() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = ndi.gaussian_filter(rng.random((60, 80)), 2.5) > 0.52
        # at the frame edge roots continue outward: every component keeps a centre line
        lab, n = ndi.label(m, np.ones((3, 3)))
        s = skeletonize(m)
        assert not (s & ~m).any()
        assert np.unique(lab[s]).size == n
        s = skeletonize(m, edge="background")
        # same number of 8-connected components
        assert ndi.label(s, np.ones((3, 3)))[1] == ndi.label(m, np.ones((3, 3)))[1]
        # same number of holes (4-connected background components not touching the border)
        def holes(x: np.ndarray) -> int:
            lab, n = ndi.label(~np.pad(x, 1))
            return n - 1
        assert holes(s) == holes(m)
        # no 2x2 blocks: one pixel wide
        assert not (s[1:, 1:] & s[:-1, 1:] & s[1:, :-1] & s[:-1, :-1]).any()


def test_step_counts_match_the_numpy_estimators() -> None:
    rng = np.random.default_rng(1)
    s = rng.random((50, 70)) < 0.3
    p = pad(s)
    flat = p.ravel()
    no, nd, k_no, k_nd = step_counts(flat, p.shape[1], np.flatnonzero(flat))
    assert no + math.sqrt(2) * nd == pytest.approx(rve_length_px(s))
    assert math.sqrt(k_nd**2 + (k_nd + k_no / 2) ** 2) + k_no / 2 == pytest.approx(kimura_length_px(s))


def test_rve_and_kimura_on_simple_lines() -> None:
    line = np.zeros((10, 10), bool)
    line[5, 1:9] = True
    assert rve_length_px(line) == 7 and kimura_length_px(line) == 7
    diag = np.eye(8, dtype=bool)
    assert rve_length_px(diag) == pytest.approx(7 * math.sqrt(2))
    assert kimura_length_px(diag) == pytest.approx(7 * math.sqrt(2))
