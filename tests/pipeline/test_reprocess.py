"""Scheduled re-processing: only what is missing, new images found, overlapping runs safe."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rootflow.cli import app
from rootflow.inference.pipeline import InferConfig, resolve_model_versions, run, scope_key
from rootflow.lake import Lake
from tests.pipeline._helpers import small_archive

pytestmark = pytest.mark.ray


def test_overlapping_run_on_same_scope_does_no_work(ray_local, tmp_path) -> None:
    arch = small_archive(str(tmp_path), n_images=2, bad=False)
    lake_uri = str(tmp_path / "lake")
    cfg = InferConfig(producers=("mask",))
    lake = Lake(lake_uri)
    scope = scope_key(arch.manifest_uri, cfg, resolve_model_versions(cfg))
    # Another scheduler's run is in progress on the same scope (fresh heartbeat).
    lake.start_run(run_id="0-other", job_kind="reprocess", manifest_uri=arch.manifest_uri,
                   config={"scope": scope}, model_versions={}, code_version="x")
    s = run(arch.manifest_uri, lake_uri, cfg, progress=False)
    assert s.status.startswith("skipped") and "0-other" in s.status
    assert s.n_traits_rows == 0 and lake.read("traits").num_rows == 0
    # Once that run has finished, the next run does the work.
    lake.finish_run("0-other", n_ok=0, n_rejected=0, status="ok")
    s = run(arch.manifest_uri, lake_uri, cfg, progress=False)
    assert s.status == "ok" and s.n_images == 2


def test_reprocess_cli_lists_archive_again_and_respects_dates(ray_local, tmp_path) -> None:
    arch = small_archive(str(tmp_path), n_images=4, bad=False)
    lake_uri = str(tmp_path / "lake")
    archive = f"{arch.root}/archive"
    runner = CliRunner()
    gt = pq.read_table(f"{archive}/ground_truth.parquet").to_pylist()
    dates = sorted(r["captured_at"] for r in gt)
    until = dates[1].date().isoformat()

    args = ["reprocess", archive, lake_uri, "--producers", "mask",
            "--experiment-config", f"{archive}/experiment.yaml",
            "--summary-json", str(tmp_path / "s.json")]
    res = runner.invoke(app, [*args, "--until", until])
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "s.json").read_text())
    n_first = s["n_images"]
    assert 1 <= n_first < 4 and s["n_images"] + s["n_skipped"] == 4

    # The nightly run without dates picks up the rest and nothing twice.
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["n_images"] == 4 - n_first and s["n_skipped"] == n_first

    # Images added to the archive since the last run are found by re-listing.
    more = small_archive(str(tmp_path / "more"), n_images=1, seed=99, bad=False)
    import shutil
    from pathlib import Path

    for f in Path(more.root, "archive").glob("*_T*"):
        shutil.copy(f, archive)
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["n_images"] == 1 and s["n_skipped"] == 4
    assert Lake(lake_uri).read("traits").num_rows == 5


def test_infer_cli_exit_code_and_overrides(ray_local, tmp_path) -> None:
    """`rootflow infer`: exit code 3 when rows were rejected; --set reaches nested settings."""
    arch = small_archive(str(tmp_path), n_images=2)
    lake_uri = str(tmp_path / "lake")
    res = CliRunner().invoke(app, [
        "infer", arch.manifest_uri, lake_uri, "--producers", "mask",
        "--set", "commit_every=2", "--set", "rootsam.lattice_points_per_side=4",
        "--set", "trait_options.prune_px=2.0", "--summary-json", str(tmp_path / "s.json")])
    assert res.exit_code == 3, res.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["n_images_rejected"] == len(arch.bad_ids) and s["commits"] >= 2
    assert "rejected" in res.output and "reject reasons" in res.output
    traits = Lake(lake_uri).read("traits").to_pylist()
    assert {r["prune_px"] for r in traits} == {2.0}
    assert all(r["model_version"].startswith("traits-") for r in traits)
