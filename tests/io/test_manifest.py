"""Manifest building (local, S3, real folders), validation of user manifests, and the CLI."""

from __future__ import annotations

import datetime as dt
import json
import math
import os

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rootflow.cli import app
from rootflow.io import storage
from rootflow.io.manifest import (
    MANIFEST_SCHEMA,
    ManifestError,
    build_manifest,
    image_id_for,
    read_manifest,
    write_manifest,
)

YAML = """\
date_order: DMY
depth_band_cm: 10
experiments:
  SOY:
    dpi: 150
    frame_height_mm: 13.5
    insertion_angle_deg: 45
    surface_window: 1
    surface_offset_cm: 0.0
    species: soybean
  "DOE.*":
    dpi: 100
    frame_height_mm: 20
    insertion_angle_deg: 90
    surface_window: 0
    surface_offset_cm: 5.0
"""

NAMES = [
    "SOY_T001_L001_20.03.17_115856_001_AB",
    "SOY_T001_L004_20.03.17_120001_001_AB",
    "SOY_T002_L002_2017.04.11_084840_004_AB",
    "DOE.S300_T312_L2_09.08.17_114706_1_FRMI_01",
]


def _png(h: int = 40, w: int = 48, value: int = 90) -> bytes:
    img = np.full((h, w, 3), value, np.uint8)
    return bytes(cv2.imencode(".png", img)[1])


def _jpg() -> bytes:
    return bytes(cv2.imencode(".jpg", np.full((40, 48, 3), 120, np.uint8))[1])


def _archive(root: str, storage_options=None, *, yaml: str | None = YAML) -> str:
    for i, stem in enumerate(NAMES):
        ext = ".png" if stem.startswith("DOE") else ".jpg"
        folder = storage.join(root, "sub") if i == 2 else root
        storage.write_bytes(storage.join(folder, stem + ext),
                            _png() if ext == ".png" else _jpg(), storage_options)
    storage.write_bytes(storage.join(root, NAMES[0] + "_mask.png"), _png(value=255), storage_options)
    storage.write_bytes(storage.join(root, "sub", NAMES[2] + "_mask.png"), _png(), storage_options)
    # a mask whose image lives in another folder does not pair
    storage.write_bytes(storage.join(root, "sub", NAMES[1] + "_mask.png"), _png(), storage_options)
    storage.write_bytes(storage.join(root, "holiday_photo.jpg"), _jpg(), storage_options)
    storage.write_bytes(storage.join(root, "notes.txt"), b"not an image", storage_options)
    if yaml is not None:
        storage.write_bytes(storage.join(root, "experiment.yaml"), yaml.encode(), storage_options)
    return root


def _depth(window: int, frame: float, angle: float, surface: int, offset: float) -> float:
    return ((window - surface) * frame + frame / 2) / 10 * math.sin(math.radians(angle)) + offset


def _check_build(result, root: str) -> None:
    t = result.table
    assert t.schema == MANIFEST_SCHEMA
    rows = {r["file_name"].rsplit(".", 1)[0]: r for r in t.to_pylist()}
    assert sorted(rows) == sorted(NAMES)
    r0 = rows[NAMES[0]]
    assert (r0["experiment"], r0["tube"], r0["window"], r0["session"], r0["operator"]) == \
        ("SOY", 1, 1, 1, "AB")
    assert r0["captured_at"] == dt.datetime(2017, 3, 20, 11, 58, 56) and r0["year"] == 2017
    assert r0["dpi"] == 150.0 and r0["species"] == "soybean" and r0["treatment"] is None
    assert r0["depth_cm"] == pytest.approx(_depth(1, 13.5, 45, 1, 0.0))
    assert r0["depth"] == 0
    r1 = rows[NAMES[1]]
    assert r1["depth_cm"] == pytest.approx(_depth(4, 13.5, 45, 1, 0.0))
    assert r1["depth"] == int(r1["depth_cm"] // 10 * 10)
    doe = rows[NAMES[3]]
    assert doe["dpi"] == 100.0 and doe["tile"] == "FRMI_01" and doe["species"] is None
    assert doe["depth_cm"] == pytest.approx(2 * 2.0 + 1.0 + 5.0) and doe["depth"] == 10
    # masks pair by stem within the same folder only
    assert r0["mask_uri"] == storage.join(root, NAMES[0] + "_mask.png")
    assert rows[NAMES[2]]["mask_uri"] == storage.join(root, "sub", NAMES[2] + "_mask.png")
    assert r1["mask_uri"] is None
    # ids: stable and derived from the URI
    assert all(r["image_id"] == image_id_for(r["image_uri"]) for r in rows.values())
    assert len(set(t["image_id"].to_pylist())) == t.num_rows
    # every image file is a row or a reject; nothing silently dropped
    rej = {r["file_name"]: r["reason"] for r in result.rejects.to_pylist()}
    assert set(rej) == {"holiday_photo.jpg", NAMES[1] + "_mask.png"}
    assert rej["holiday_photo.jpg"].startswith("filename:")
    assert "mask without an image" in rej[NAMES[1] + "_mask.png"]


def test_build_local(tmp_path) -> None:
    root = _archive(str(tmp_path / "arch"))
    result = build_manifest(root)  # experiment.yaml found next to the images
    _check_build(result, root)
    again = build_manifest(str(tmp_path / "arch") + "/")
    assert again.table["image_id"].to_pylist() == result.table["image_id"].to_pylist()
    by_name = build_manifest(root, id_from="name")
    by_content = build_manifest(root, id_from="content")
    assert by_name.table["image_id"].to_pylist() != result.table["image_id"].to_pylist()
    # the three SOY jpgs have identical bytes: one content id; the first file keeps it and
    # the others are rejected rather than sharing an id
    assert by_content.table.num_rows == 2
    dups = [r for r in by_content.rejects.to_pylist() if "duplicate image_id" in r["reason"]]
    assert len(dups) == 2 and all("id_from=content" in r["reason"] for r in dups)
    with pytest.raises(ManifestError, match=r"duplicate image_id 'x' \(rows 0 and 1\)"):
        write_manifest(pa.concat_tables([result.table.slice(0, 1)] * 2).set_column(
            1, "image_id", pa.array(["x", "x"])), str(tmp_path / "m.parquet"))


@pytest.mark.s3
def test_build_on_s3(s3) -> None:
    root = _archive(s3.fresh_prefix("archive"), s3.storage)
    result = build_manifest(root, storage_options=s3.storage)
    _check_build(result, root)
    assert all(u.startswith("s3://") for u in result.table["image_uri"].to_pylist())
    out = storage.join(root, "manifest.parquet")
    write_manifest(result.table, out, storage_options=s3.storage)
    back = read_manifest(out, storage_options=s3.storage)
    assert back.equals(result.table)


def test_ambiguous_dates_without_date_order_are_rejected_with_the_reason(tmp_path) -> None:
    root = _archive(str(tmp_path / "arch"), yaml=YAML.replace("date_order: DMY\n", ""))
    result = build_manifest(root)
    assert result.table.num_rows == 1  # only the 4-digit-year name is unambiguous
    rej = {r["file_name"]: r["reason"] for r in result.rejects.to_pylist()}
    assert "ambiguous" in rej[NAMES[0] + ".jpg"] and "date_order" in rej[NAMES[0] + ".jpg"]
    # the CLI flag settles it
    assert build_manifest(root, date_order="DMY").table.num_rows == 4


def test_missing_geometry_or_config_refuses(tmp_path) -> None:
    root = _archive(str(tmp_path / "arch"), yaml=None)
    with pytest.raises(ManifestError, match="no experiment config"):
        build_manifest(root)
    cfg = {"date_order": "DMY", "experiments": {"SOY": {"dpi": 150, "frame_height_mm": 13.5}}}
    with pytest.raises(ManifestError, match=r"'DOE.S300': dpi, frame_height_mm.*'SOY': "
                                            r"insertion_angle_deg, surface_window"):
        build_manifest(root, experiment_config=cfg)
    with pytest.raises(ManifestError, match="unknown key.*'dpii'"):
        build_manifest(root, experiment_config={"experiments": {"*": {"dpii": 3}}})
    # a '*' default covers every experiment
    star = {"date_order": "DMY", "experiments": {"*": {"dpi": 96, "frame_height_mm": 10,
                                                       "insertion_angle_deg": 90,
                                                       "surface_window": 1}}}
    assert set(build_manifest(root, experiment_config=star).table["dpi"].to_pylist()) == {96.0}


def _write_csv(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_read_user_csv_fills_derivable_columns(tmp_path) -> None:
    uri = _write_csv(tmp_path / "m.csv",
                     "image_uri,dpi,depth_cm\n"
                     f"/x/{NAMES[0]}.jpg,150,12.5\n"
                     f"/x/{NAMES[2]}.jpg,150,31\n")
    t = read_manifest(uri, experiment_config={"date_order": "DMY"})
    assert t.schema == MANIFEST_SCHEMA
    assert t["depth"].to_pylist() == [10, 30]
    assert t["tube"].to_pylist() == [1, 2] and t["year"].to_pylist() == [2017, 2017]
    assert t["image_id"][0].as_py() == image_id_for(f"/x/{NAMES[0]}.jpg")
    # without depth_cm the geometry must come from the config
    uri2 = _write_csv(tmp_path / "m2.csv", f"image_uri\n/x/{NAMES[0]}.jpg\n")
    uri3 = _write_csv(tmp_path / "m3.csv", f"image_uri\n/x/{NAMES[2]}.jpg\n")
    with pytest.raises(ManifestError, match="missing required column 'dpi'"):
        read_manifest(uri3)
    with pytest.raises(ManifestError, match="no dpi for experiment 'SOY' \\(row 0\\)"):
        read_manifest(uri2, experiment_config={"date_order": "DMY"})
    t2 = read_manifest(uri2, experiment_config=YAML_DICT)
    assert t2["depth_cm"][0].as_py() == pytest.approx(_depth(1, 13.5, 45, 1, 0))


YAML_DICT = __import__("yaml").safe_load(YAML)

FULL_HEADER = ",".join(MANIFEST_SCHEMA.names)


def _full_row(**over) -> str:
    base = {"image_uri": "/x/a.jpg", "image_id": "id-a", "file_name": "a.jpg",
            "experiment": "E", "tube": "1", "window": "2", "session": "3",
            "captured_at": "2020-05-01T10:00:00", "year": "2020", "operator": "OP",
            "dpi": "150", "depth_cm": "12.5", "depth": "10", "mask_uri": "",
            "species": "", "treatment": "", "tile": ""}
    base.update(over)
    return ",".join(base[c] for c in MANIFEST_SCHEMA.names)


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([_full_row(tube="three")], r"column 'tube' row 0: value 'three' is not int32"),
        ([_full_row(), _full_row(image_id="id-b", dpi="high")],
         r"column 'dpi' row 1: value 'high' is not double"),
        ([_full_row(), _full_row()], r"duplicate image_id 'id-a' \(rows 0 and 1\)"),
        ([_full_row(), _full_row(image_id="id-b", experiment="")], r"'experiment' row 1 is empty"),
        ([_full_row(dpi="-3")], r"'dpi' row 0: -3.0 is not > 0"),
        ([_full_row(captured_at="yesterday")], r"'captured_at' row 0: value 'yesterday'"),
    ],
)
def test_read_user_csv_errors_name_column_and_row(tmp_path, rows, match) -> None:
    uri = _write_csv(tmp_path / "m.csv", FULL_HEADER + "\n" + "\n".join(rows) + "\n")
    with pytest.raises(ManifestError, match=match):
        read_manifest(uri)


def test_read_user_manifest_missing_columns_named(tmp_path) -> None:
    t = pa.table({"file_name": ["a.jpg"], "dpi": [1.0]})
    pq.write_table(t, tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="missing required column 'image_uri'"):
        read_manifest(str(tmp_path / "m.parquet"))
    t = pa.table({"image_uri": ["/x/holiday.jpg"], "dpi": [1.0], "depth_cm": [3.0]})
    pq.write_table(t, tmp_path / "m2.parquet")
    with pytest.raises(ManifestError, match=r"missing column\(s\) \['experiment', 'tube', "
                                            r"'window', 'session', 'captured_at'\]"):
        read_manifest(str(tmp_path / "m2.parquet"))
    with pytest.raises(ManifestError, match="does not exist"):
        read_manifest(str(tmp_path / "nope.parquet"))


def test_full_csv_round_trip_and_extra_columns(tmp_path) -> None:
    uri = _write_csv(tmp_path / "m.csv", FULL_HEADER + ",plot\n" + _full_row() + ",P7\n")
    t = read_manifest(uri)
    assert t.column_names == [*MANIFEST_SCHEMA.names, "plot"]
    assert t["mask_uri"][0].as_py() is None and t["depth"][0].as_py() == 10
    write_manifest(t.drop_columns(["plot"]), str(tmp_path / "m.parquet"))
    assert read_manifest(str(tmp_path / "m.parquet")).equals(t.drop_columns(["plot"]))


@pytest.mark.realdata
def test_build_on_real_folders(real_data, tmp_path) -> None:
    cfg = {"date_order": "DMY", "experiments": {"*": {"dpi": 150, "frame_height_mm": 13.5,
                                                      "insertion_angle_deg": 45,
                                                      "surface_window": 1}}}
    for folder, n in (("segroot_soybean", 19), ("prmi_peanut", 65), ("prmi_switchgrass", 23)):
        result = build_manifest(str(real_data / folder), experiment_config=cfg)
        assert result.table.num_rows == n and result.rejects.num_rows == 0, folder
        assert all(u and os.path.exists(u) for u in result.table["mask_uri"].to_pylist())


def test_cli_build_parse_validate(tmp_path) -> None:
    runner = CliRunner()
    root = _archive(str(tmp_path / "arch"))
    out = str(tmp_path / "manifest.parquet")
    res = runner.invoke(app, ["manifest", "build", root, "--out", out])
    assert res.exit_code == 0, res.output
    assert "4 images" in res.output and "rejected: 2 files" in res.output
    assert read_manifest(out).num_rows == 4
    rej = pq.read_table(str(tmp_path / "manifest.rejects.parquet"))
    assert rej.num_rows == 2

    res = runner.invoke(app, ["manifest", "parse", NAMES[0], NAMES[3] + ".png",
                              "--date-order", "DMY"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.output.strip().splitlines()]
    assert lines[0]["captured_at"] == "2017-03-20T11:58:56" and "tile" not in lines[0]
    assert lines[1]["tile"] == "FRMI_01" and lines[1]["tube"] == 312
    res = runner.invoke(app, ["manifest", "parse", "nonsense.jpg", NAMES[0]])
    assert res.exit_code == 1
    errs = [json.loads(x) for x in res.output.strip().splitlines()]
    assert "does not match" in errs[0]["error"] and "ambiguous" in errs[1]["error"]

    res = runner.invoke(app, ["manifest", "validate", out])
    assert res.exit_code == 0 and "valid: 4 rows" in res.output
    bad = _write_csv(tmp_path / "bad.csv", FULL_HEADER + "\n" + _full_row(tube="x") + "\n")
    res = runner.invoke(app, ["manifest", "validate", bad])
    assert res.exit_code == 2 and "'tube' row 0" in res.output

    res = runner.invoke(app, ["manifest", "build", str(tmp_path / "empty"), "--out", out])
    assert res.exit_code == 2
