"""RootQuant labels (tables, Delta traits, masks) and regression metrics."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from rootflow.evaluation import metrics as rm
from rootflow.training import labels
from tests.training._rootquant_helpers import root_image


# -- metrics ------------------------------------------------------------------------------------
def test_metrics_values() -> None:
    t = np.array([0.0, 10.0, 20.0, 30.0])
    assert rm.r2(t, t) == 1.0
    assert rm.r2(np.full(4, t.mean()), t) == pytest.approx(0.0)
    assert math.isnan(rm.r2([1.0, 2.0], [3.0, 3.0]))  # constant truth
    assert math.isnan(rm.mae([], []))
    p = t + np.array([1.0, -1.0, 3.0, 1.0])
    assert rm.mae(p, t) == 1.5
    assert rm.rmse(p, t) == pytest.approx(math.sqrt(3.0))
    assert rm.bias(p, t) == 1.0
    assert rm.r2([np.nan, 1.0, 2.0], [5.0, 1.0, 2.0]) == 1.0  # NaN rows ignored
    assert rm.presence_accuracy([0.9, 0.2, 0.6, 0.4], [3.0, 0.0, 0.0, 1.0]) == 0.5
    with pytest.raises(ValueError, match="differ in length"):
        rm.mae([1.0], [1.0, 2.0])


def test_sums_merge_to_exact_metrics() -> None:
    rng = np.random.default_rng(0)
    t = rng.gamma(1.0, 30.0, 50)
    p = t + rng.normal(0, 5, 50)
    a = rm.regression_sums(p[:17], t[:17], prefix="length_")
    b = rm.regression_sums(p[17:], t[17:], prefix="length_")
    merged = rm.metrics_from_sums({k: a[k] + b[k] for k in a}, prefix="length_", unit="mm")
    report = rm.regression_report(pred_length_mm=p, true_length_mm=t, pred_area_mm2=p,
                                  true_area_mm2=t)
    for key in ("length_r2", "length_mae_mm", "length_rmse_mm", "length_bias_mm"):
        assert merged[key] == pytest.approx(report[key], rel=1e-9), key


# -- label tables -------------------------------------------------------------------------------
def test_read_labels_maps_columns_units_and_paths(tmp_path) -> None:
    pacsv.write_csv(pa.table({"File": ["a.jpg", "sub/b.jpg"], "TotLength(cm)": [1.5, 0.0],
                              "ProjArea(cm2)": [0.02, 0.0], "DPI": [300, 300]}),
                    tmp_path / "export.csv")
    cols = labels.LabelColumns(image="File", length="TotLength(cm)", area="ProjArea(cm2)",
                               dpi="DPI", length_unit="cm", area_unit="cm2")
    t = labels.read_labels(str(tmp_path / "export.csv"), columns=cols)
    assert t.schema == labels.LABEL_SCHEMA
    assert t["image_uri"].to_pylist() == [str(tmp_path / "a.jpg"), str(tmp_path / "sub/b.jpg")]
    assert t["length_mm"].to_pylist() == [15.0, 0.0]
    assert t["area_mm2"].to_pylist() == pytest.approx([2.0, 0.0])
    assert t["dpi"].to_pylist() == [300.0, 300.0]

    pq.write_table(pa.table({"image_uri": ["s3://b/x.png"], "length_mm": [3.0],
                             "area_mm2": [1.0]}), tmp_path / "l.parquet")
    t2 = labels.read_labels(str(tmp_path / "l.parquet"))
    assert t2["image_uri"].to_pylist() == ["s3://b/x.png"] and t2["dpi"].null_count == 1
    with pytest.raises(labels.LabelError, match="no dpi"):
        labels.require_dpi(t2)
    assert labels.fill_dpi(t2, 150.0)["dpi"].to_pylist() == [150.0]


def test_label_errors_name_columns_and_rows(tmp_path) -> None:
    raw = pa.table({"image_uri": ["a", "b", "c"], "length_mm": [1.0, -2.0, 3.0],
                    "area": [1.0, 1.0, 1.0]})
    with pytest.raises(labels.LabelError, match=r"missing column\(s\) \['area_mm2'\].*'area'"):
        labels.from_table(raw)
    with pytest.raises(labels.LabelError, match=r"'length_mm'.*row\(s\) \[1\]"):
        labels.from_table(raw, columns=labels.LabelColumns(area="area"))
    with pytest.raises(labels.LabelError, match="not numeric"):
        labels.from_table(pa.table({"image_uri": ["a"], "length_mm": ["x"], "area_mm2": [1.0]}))


def test_attach_manifest_by_uri_or_file_name() -> None:
    manifest = pa.table({"image_uri": ["/d/T1/a.jpg", "/d/T2/b.jpg"], "dpi": [150.0, 300.0]})
    lab = labels.from_table(pa.table({"image_uri": ["a.jpg", "/d/T2/b.jpg"],
                                      "length_mm": [1.0, 2.0], "area_mm2": [0.1, 0.2]}))
    out = labels.attach_manifest(lab, manifest)
    assert out["image_uri"].to_pylist() == ["/d/T1/a.jpg", "/d/T2/b.jpg"]
    assert out["dpi"].to_pylist() == [150.0, 300.0]
    with pytest.raises(labels.LabelError, match="not in the manifest"):
        labels.attach_manifest(labels.from_table(pa.table(
            {"image_uri": ["zz.jpg"], "length_mm": [1.0], "area_mm2": [1.0]})), manifest)
    dup = pa.table({"image_uri": ["/d/T1/a.jpg", "/d/T3/a.jpg"], "dpi": [1.0, 1.0]})
    with pytest.raises(labels.LabelError, match="ambiguous"):
        labels.attach_manifest(lab.slice(0, 1), dup)


def test_labels_from_traits_delta_table(tmp_path) -> None:
    import datetime as dt

    from deltalake import write_deltalake

    t0 = dt.datetime(2024, 1, 1)
    rows = pa.table({
        "image_uri": ["/x/a.jpg", "/x/a.jpg", "/x/b.jpg", "/x/c.jpg"],
        "model_name": ["mask", "mask", "mask", "rootsam"],
        "model_version": ["v1", "v2", "v2", "r1"],
        "length_mm": [1.0, 2.0, 3.0, 99.0], "projected_area_mm2": [0.1, 0.2, 0.3, 9.9],
        "dpi": [150.0, 150.0, 150.0, 150.0],
        "processed_at": [t0, t0 + dt.timedelta(days=1), t0, t0],
    })
    write_deltalake(str(tmp_path / "traits"), rows)
    out = labels.from_traits_table(str(tmp_path / "traits"))
    got = dict(zip(out["image_uri"].to_pylist(), out["length_mm"].to_pylist(), strict=True))
    assert got == {"/x/a.jpg": 2.0, "/x/b.jpg": 3.0}  # latest mask row per image; no rootsam
    v1 = labels.from_traits_table(str(tmp_path / "traits"), model_version="v1")
    assert v1["length_mm"].to_pylist() == [1.0]


def test_labels_from_masks_use_traits_measure(tmp_path) -> None:
    pytest.importorskip("rootflow.traits.measure")
    import cv2

    from rootflow.traits import measure

    uris, masks = [], []
    for i in range(2):
        img, mask, _, _ = root_image(10 + i, empty=False)
        cv2.imwrite(str(tmp_path / f"m{i}.png"), mask.astype(np.uint8) * 255)
        uris.append(str(tmp_path / f"i{i}.png"))
        masks.append(mask)
    rows = pa.table({"image_uri": uris + ["/nomask.png"],
                     "mask_uri": [str(tmp_path / "m0.png"), str(tmp_path / "m1.png"), None],
                     "dpi": [100.0, 100.0, 100.0]})
    out = labels.from_masks(rows)
    assert out.num_rows == 2
    want = measure(masks[1], dpi=100.0)
    assert out["length_mm"][1].as_py() == pytest.approx(want["length_mm"])
    assert out["area_mm2"][1].as_py() == pytest.approx(want["projected_area_mm2"])
    with pytest.raises(labels.LabelError, match="has no key 'nope'"):
        labels.from_masks(rows, length_key="nope")


# -- per-tile and per-cell labels from masks (dense supervision) ---------------------------------------------
def test_tile_labels_from_mask_sum_to_image_labels_and_sit_in_their_tiles() -> None:
    from rootflow.models.rootquant import tile_image, to_model_scale

    mask = np.zeros((100, 120), bool)
    mask[10:12, 5:45] = True    # a 40 px horizontal root, all inside tile (0, 0) at 50 px tiles
    mask[70:90, 100:103] = True  # a blob in tile (1, 2)
    dens = labels.density_maps(mask, dpi=254.0, mm_per_px=0.1, length_mm=7.0, area_mm2=3.0)
    assert dens is not None and dens.shape == (100, 120, 2)
    assert dens[..., 0].sum() == pytest.approx(7.0, rel=1e-5)
    assert dens[..., 1].sum() == pytest.approx(3.0, rel=1e-5)
    sums = labels.cell_sums(dens, tile_px=50, cell_px=50)[:, :, 0, 0]  # one cell per tile
    img = np.zeros((100, 120, 3), np.uint8)
    assert len(sums) == len(tile_image(img, tile_px=50)) == 6  # same grid as the image tiles
    assert sums.sum(axis=0) == pytest.approx([7.0, 3.0], rel=1e-5)
    assert sums[0, 0] + sums[5, 0] == pytest.approx(7.0, rel=1e-5)  # only these two tiles
    assert sums[0, 0] > sums[5, 0] > 0 and sums[0, 1] > 0 and sums[5, 1] > 0
    assert np.all(sums[[1, 2, 3, 4]] == 0)
    # an offset grid moves the sums but keeps their total and the tile count of tile_image
    shifted = labels.cell_sums(dens, tile_px=50, cell_px=50, offset=(30, 20))[:, :, 0, 0]
    assert len(shifted) == len(tile_image(img, tile_px=50, offset=(30, 20)))
    assert shifted.sum(axis=0) == pytest.approx([7.0, 3.0], rel=1e-5)
    # resampled to a coarser model scale: aligned with to_model_scale, sums still exact
    coarse = labels.density_maps(mask, dpi=254.0, mm_per_px=0.25, length_mm=7.0, area_mm2=3.0)
    assert coarse is not None
    assert coarse.shape[:2] == to_model_scale(img, dpi=254.0, mm_per_px=0.25).shape[:2]
    assert coarse.reshape(-1, 2).sum(axis=0) == pytest.approx([7.0, 3.0], rel=1e-4)


def test_tile_labels_empty_mask() -> None:
    empty = np.zeros((40, 40), bool)
    zeros = labels.density_maps(empty, dpi=254.0, mm_per_px=0.1, length_mm=0.0, area_mm2=0.0)
    assert zeros is not None and not zeros.any()  # an empty image: every tile is 0
    # a positive label the mask cannot place: no tile labels (image loss only)
    assert labels.density_maps(empty, dpi=254.0, mm_per_px=0.1, length_mm=5.0,
                               area_mm2=1.0) is None


def test_cell_sums_follow_the_tile_grid() -> None:
    from rootflow.models.rootquant import tile_image

    rng = np.random.default_rng(0)
    dens = rng.random((70, 100, 2)).astype(np.float32)
    for offset in ((0, 0), (5, 13)):
        cells = labels.cell_sums(dens, tile_px=32, cell_px=8, offset=offset)
        tiles = labels.cell_sums(dens, tile_px=32, cell_px=32, offset=offset)[:, :, 0, 0]
        assert cells.shape == (len(tiles), 2, 4, 4)
        assert len(tiles) == len(tile_image(np.zeros((70, 100, 3), np.uint8), tile_px=32,
                                            offset=offset))
        np.testing.assert_allclose(cells.sum(axis=(2, 3)), tiles, rtol=1e-5)
        np.testing.assert_allclose(cells.sum(axis=(0, 2, 3)), dens.sum(axis=(0, 1)), rtol=1e-5)
    # cell (r, c) of tile 0 at offset (0, 0) is exactly that 8 x 8 block
    cells = labels.cell_sums(dens, tile_px=32, cell_px=8)
    assert cells[0, 1, 2, 3] == pytest.approx(dens[16:24, 24:32, 1].sum(), rel=1e-5)
    assert cells[1, 0, 0, 0] == pytest.approx(dens[0:8, 32:40, 0].sum(), rel=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        labels.cell_sums(dens, tile_px=30, cell_px=8)


def test_cell_loss_uses_known_tiles_only() -> None:
    import torch

    from rootflow.models.rootquant import cell_amounts, cell_loss

    units = (0.8, 0.5)
    # tile 0: cells predicted (almost) exactly; tile 1: unknown (NaN), wildly wrong prediction
    raw = torch.zeros(2, 3, 2, 2)
    raw[0, 0] = torch.tensor([[30.0, -30.0], [-30.0, -30.0]])  # one present cell
    raw[0, 1:, 0, 0] = 10.0
    raw[1] = 30.0
    raw.requires_grad_(True)
    y = torch.full((2, 2, 2, 2), float("nan"))
    y[0] = cell_amounts(raw.detach()[:1], units)[0]
    loss, parts = cell_loss(raw, y, units)
    assert set(parts) == {"cell_loss_amount", "cell_loss_tile", "cell_loss_presence"}
    assert float(loss) == pytest.approx(0.0, abs=1e-5)
    loss.backward()
    assert raw.grad is not None and torch.all(raw.grad[1] == 0)
    wrong = torch.zeros(2, 2, 2, 2)
    wrong[:, :, 1, 1] = 3.0  # root in another cell
    assert float(cell_loss(raw.detach(), wrong, units)[0]) > 1.0
    none, _ = cell_loss(raw, torch.full((2, 2, 2, 2), float("nan")), units)
    assert float(none) == 0.0 and none.requires_grad
    with pytest.raises(ValueError, match="do not fit"):
        cell_loss(raw, torch.zeros(2, 2, 3, 3), units)
