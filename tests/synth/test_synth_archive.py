"""generate_archive and ``rootflow synth``: layout, naming, ground truth, determinism, S3."""

from __future__ import annotations

import hashlib
import io
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from rootflow.io import storage
from rootflow.io.images import decode, decode_mask
from rootflow.synth import SynthConfig, archive_entries, generate_archive, generate_image

NAME = re.compile(r"^SYNTH_T(\d{3})_L(\d{3})_(\d{4})\.(\d{2})\.(\d{2})_(\d{6})_(\d{3})_RF\.jpg$")
CFG = SynthConfig.preset("tiny", n_tubes=2, n_windows=2, n_sessions=2, empty_fraction=0.3,
                         seed=3)


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.iterdir()) if p.suffix in (".jpg", ".png")}


def test_archive_layout_names_and_ground_truth(tmp_path: Path) -> None:
    out = tmp_path / "arch"
    arch = generate_archive(str(out), config=CFG)
    assert arch.n_images == 8
    jpgs = sorted(p.name for p in out.glob("*.jpg"))
    assert len(jpgs) == 8
    for name in jpgs:
        m = NAME.match(name)
        assert m, name
        assert (out / name.replace(".jpg", "_mask.png")).exists()
    assert {"ground_truth.parquet", "roots.parquet", "experiment.yaml",
            "synth_config.yaml"} <= {p.name for p in out.iterdir()}

    gt = pq.read_table(out / "ground_truth.parquet")
    assert gt.num_rows == 8 and gt.equals(arch.ground_truth)
    rows = gt.to_pylist()
    for row in rows:
        img, bits = decode((out / row["file_name"]).read_bytes())
        mask = decode_mask(Path(row["mask_uri"]).read_bytes())
        assert img.shape == (CFG.height, CFG.width, 3) and bits == 8
        assert row["image_uri"] == storage.join(str(out), row["file_name"])
        # The written mask is exactly what generate_image gives for the recorded seeds.
        again = generate_image(row["seed"], CFG, scene_seed=row["scene_seed"], day=row["day"],
                               depth_cm=row["depth_cm"])
        assert np.array_equal(mask, again.mask)
        assert row["root_px"] == int(mask.sum())
        assert row["length_mm"] == pytest.approx(again.length_mm)
        assert row["projected_area_mm2"] == pytest.approx(mask.sum() * (25.4 / CFG.dpi) ** 2)
        assert (row["mean_diameter_mm"] is None) == (row["n_roots"] == 0)
        assert row["captured_at"].strftime("%Y.%m.%d_%H%M%S") in row["file_name"]
        assert row["dpi"] == CFG.dpi and row["experiment"] == "SYNTH"
    roots = pq.read_table(out / "roots.parquet").to_pylist()
    for row in rows:
        mine = [r for r in roots if r["file_name"] == row["file_name"]]
        assert len(mine) == row["n_roots"]
        assert sum(r["length_mm"] for r in mine) == pytest.approx(row["length_mm"])

    exp = yaml.safe_load((out / "experiment.yaml").read_text())
    s = exp["experiments"]["SYNTH"]
    assert exp["date_order"] == "YMD" and exp["depth_band_cm"] == 10
    assert s["dpi"] == CFG.dpi
    assert s["frame_height_mm"] == pytest.approx(CFG.height * 25.4 / CFG.dpi, abs=1e-3)
    assert {"insertion_angle_deg", "surface_window", "surface_offset_cm", "species",
            "treatment"} <= set(s)


def test_archive_is_byte_identical_and_independent_of_workers(tmp_path: Path) -> None:
    cfg = SynthConfig.preset("tiny", n_tubes=1, n_windows=2, n_sessions=2, seed=11)
    a = generate_archive(str(tmp_path / "a"), config=cfg)
    b = generate_archive(str(tmp_path / "b"), config=cfg, workers=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    cols = ["file_name", "length_mm", "root_px", "seed"]
    assert a.ground_truth.select(cols).equals(b.ground_truth.select(cols))
    c = generate_archive(str(tmp_path / "c"), config=SynthConfig.preset(
        "tiny", n_tubes=1, n_windows=2, n_sessions=2, seed=12))
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    assert c.n_images == 4


def test_archive_has_empty_images_and_growth_series(tmp_path: Path) -> None:
    cfg = SynthConfig.preset("tiny", n_tubes=3, n_windows=2, n_sessions=3, empty_fraction=0.3,
                             seed=5)
    gt = generate_archive(str(tmp_path), config=cfg).ground_truth.to_pandas()
    assert (gt["n_roots"] == 0).any() and (gt["n_roots"] > 0).any()
    assert gt.loc[gt["n_roots"] == 0, "mean_diameter_mm"].isna().all()
    grew = 0
    for _, g in gt.groupby(["year", "tube", "window"]):
        g = g.sort_values("session")
        assert g["captured_at"].is_monotonic_increasing
        assert g["length_mm"].is_monotonic_increasing  # roots only grow within a season
        grew += int(g["length_mm"].iloc[-1] > g["length_mm"].iloc[0])
    assert grew >= 1


def test_archive_entries_grid_and_cap() -> None:
    cfg = SynthConfig.preset("tiny", n_years=2, n_tubes=2, n_windows=3, n_sessions=4)
    entries = archive_entries(cfg)
    assert len(entries) == 2 * 2 * 3 * 4
    assert len({e.file_name for e in entries}) == len(entries)
    assert {e.year for e in entries} == {2021, 2022}
    assert len({e.seed for e in entries}) == len(entries)
    capped = archive_entries(SynthConfig.preset("tiny", n_tubes=2, n_windows=3, n_sessions=4,
                                                n_images=5))
    assert [e.file_name for e in capped] == [e.file_name for e in archive_entries(
        SynthConfig.preset("tiny", n_tubes=2, n_windows=3, n_sessions=4))][:5]
    # Deeper windows sit deeper (the contract's depth formula).
    assert cfg.depth_cm(1) < cfg.depth_cm(2) < cfg.depth_cm(3)


@pytest.mark.s3
def test_archive_to_s3(s3) -> None:
    prefix = s3.fresh_prefix("synth")
    cfg = SynthConfig.preset("tiny", n_tubes=1, n_windows=2, n_sessions=1, seed=1)
    arch = generate_archive(prefix, config=cfg, storage_options=s3.storage)
    assert arch.n_images == 2
    fs = storage.filesystem(prefix, s3.storage)
    names = sorted(p.rsplit("/", 1)[1] for p in fs.ls(storage.strip_protocol(prefix)))
    assert sum(n.endswith(".jpg") for n in names) == 2
    assert sum(n.endswith("_mask.png") for n in names) == 2
    assert "ground_truth.parquet" in names and "experiment.yaml" in names
    gt = pq.read_table(io.BytesIO(storage.read_bytes(arch.ground_truth_uri, s3.storage)))
    assert gt.num_rows == 2
    for uri in gt.column("image_uri").to_pylist():
        assert uri.startswith(prefix + "/")
        img, _ = decode(storage.read_bytes(uri, s3.storage))
        assert img.shape == (cfg.height, cfg.width, 3)


def test_cli_writes_archive_and_reports(tmp_path: Path) -> None:
    from rootflow.cli import app

    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["synth", str(out), "--preset", "tiny", "--n-images", "3",
                                   "--look", "sand", "--set", "roots_per_dm2=5"])
    assert res.exit_code == 0, res.output
    assert "wrote 3 images" in res.output and str(out) in res.output
    assert len(list(out.glob("*.jpg"))) == 3
    saved = yaml.safe_load((out / "synth_config.yaml").read_text())
    assert saved["look"] == "sand" and saved["roots_per_dm2"] == 5 and saved["height"] == 224

    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--look", "peat"])
    assert bad.exit_code != 0 and "valid" in bad.output
    bad = CliRunner().invoke(app, ["synth", str(tmp_path / "x"), "--storage-option", "nope"])
    assert bad.exit_code != 0 and "key=value" in bad.output
