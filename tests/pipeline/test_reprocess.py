"""Scheduled re-processing: only what is missing, new images found, overlapping runs safe."""

from __future__ import annotations

import json
import time

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rootflow.cli import app
from rootflow.inference.pipeline import InferConfig, run, scope_key
from rootflow.lake import Lake
from tests.pipeline._helpers import check_commit_lines, small_archive

pytestmark = pytest.mark.ray


def test_overlapping_run_on_same_lake_does_no_work(ray_local, tmp_path) -> None:
    """Guards against a second run working while another live run holds the lake: it must do
    nothing, say who holds the lease, and exit 4 from the CLI; once the holder is done, the
    next run works. The scope is the lake, not the manifest (a nightly re-listing writes a new
    manifest each night, which must not make a new scope)."""
    arch = small_archive(str(tmp_path), n_images=2, bad=False)
    lake_uri = str(tmp_path / "lake")
    cfg = InferConfig(producers=("mask",))
    lake = Lake(lake_uri)
    # Another scheduler's run is in progress on the same lake (fresh heartbeat), with another
    # manifest.
    lake.start_run(run_id="0-other", job_kind="reprocess", manifest_uri="s3://x/other.parquet",
                   config={"scope": scope_key(lake_uri, cfg)}, model_versions={},
                   code_version="x")
    s = run(arch.manifest_uri, lake_uri, cfg, progress=False)
    assert s.status.startswith("lease_held") and "0-other" in s.status
    assert s.exit_code == 4
    assert s.n_traits_rows == 0 and lake.read("traits").num_rows == 0
    res = CliRunner().invoke(app, ["infer", arch.manifest_uri, lake_uri, "--producers", "mask"])
    assert res.exit_code == 4, res.output
    assert "0-other" in res.output and "holds the lease" in res.output
    # Once that run has finished, the next run does the work.
    lake.finish_run("0-other", n_ok=0, n_rejected=0, status="ok")
    s = run(arch.manifest_uri, lake_uri, cfg, progress=False)
    assert s.status == "ok" and s.n_images == 2 and s.exit_code == 0


def test_dead_run_is_marked_and_its_lease_taken_over(ray_local, tmp_path) -> None:
    """Guards against a killed run blocking the lake forever, or being left as "running" in
    the runs table: once its heartbeat is older than the TTL, the next run takes the lease over
    and marks the dead run's row."""
    arch = small_archive(str(tmp_path), n_images=2, bad=False)
    lake_uri = str(tmp_path / "lake")
    cfg = InferConfig(producers=("mask",), lease_ttl_s=1.0, lease_heartbeat_s=0.5)
    lake = Lake(lake_uri)
    lake.start_run(run_id="0-dead", job_kind="reprocess", manifest_uri=arch.manifest_uri,
                   config={"scope": scope_key(lake_uri, cfg)}, model_versions={},
                   code_version="x")
    time.sleep(1.5)  # no heartbeat: its lease expires
    s = run(arch.manifest_uri, lake_uri, cfg, progress=False)
    assert s.status == "ok" and s.n_images == 2 and s.taken_over == ["0-dead"]
    rows = {r["run_id"]: r for r in lake.read("runs").to_pylist()}
    assert rows["0-dead"]["status"].startswith("dead: no heartbeat")
    assert s.run_id in rows["0-dead"]["status"] and rows["0-dead"]["finished_at"] is not None


def test_two_runs_started_together_one_works_no_duplicates(ray_local, tmp_path) -> None:
    """Guards against two overlapping nightly runs of the same archive both processing it
    (duplicated work, racing commits): started at once, with heartbeats faster than the run,
    the runs table must show that they overlapped in time, exactly one did the work, the other
    gave way with the holder's id, and no traits row is duplicated."""
    import threading

    arch = small_archive(str(tmp_path), n_images=4, bad=False)
    lake_uri = str(tmp_path / "lake")
    cfg = InferConfig(producers=("mask",), lease_ttl_s=6.0, lease_heartbeat_s=1.0,
                      lease_settle_s=1.5, commit_every=1)
    results: dict[str, object] = {}
    barrier = threading.Barrier(2)

    def one(name: str) -> None:
        barrier.wait()
        try:
            results[name] = run(arch.manifest_uri, lake_uri, cfg, progress=False,
                                run_id=f"night-{name}", job_kind="reprocess")
        except Exception as e:  # surfaced below
            results[name] = e

    threads = [threading.Thread(target=one, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    summaries = list(results.values())
    assert all(not isinstance(s, Exception) for s in summaries), summaries
    worked = [s for s in summaries if s.status == "ok"]
    gave_way = [s for s in summaries if s.status.startswith("lease_held")]
    assert len(worked) == 1 and len(gave_way) == 1, [s.status for s in summaries]
    assert worked[0].run_id in gave_way[0].status and gave_way[0].exit_code == 4
    assert worked[0].n_images == 4 and gave_way[0].n_traits_rows == 0
    runs = {r["run_id"]: r for r in Lake(lake_uri).read("runs").to_pylist()}
    w, g = runs[worked[0].run_id], runs[gave_way[0].run_id]
    assert w["started_at"] < g["finished_at"] and g["started_at"] < w["finished_at"], \
        "the two runs did not overlap in time"
    assert w["scope"] == g["scope"]
    traits = Lake(lake_uri).read("traits")
    assert traits.num_rows == 4
    assert set(traits["run_id"].to_pylist()) == {worked[0].run_id}
    assert len(set(traits["image_id"].to_pylist())) == 4


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

    # The nightly run without dates picks up the rest and nothing twice (one commit a row:
    # its progress lines count the images of this run only, up to what it committed).
    res = runner.invoke(app, [*args, "--set", "commit_every=1",
                              "--set", "resources.block_rows=1"])
    assert res.exit_code == 0, res.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["n_images"] == 4 - n_first and s["n_skipped"] == n_first
    mine = [r for r in Lake(lake_uri).read("traits").to_pylist() if r["run_id"] == s["run_id"]]
    check_commit_lines(res.stderr, images=4 - n_first, rows=len(mine), commits=s["commits"],
                       min_lines=min(2, 4 - n_first))

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
    """`rootflow infer`: exit code 3 when rows were rejected; --set reaches nested settings.
    Guards too against the per-commit progress line (what a job's logs show) disappearing or
    lying: one line per commit whose rows and images done grow to what the lake holds."""
    arch = small_archive(str(tmp_path), n_images=2)
    lake_uri = str(tmp_path / "lake")
    res = CliRunner().invoke(app, [
        "infer", arch.manifest_uri, lake_uri, "--producers", "mask",
        "--set", "commit_every=2", "--set", "rootsam.lattice_points_per_side=4",
        "--set", "trait_options.prune_px=2.0", "--set", "resources.block_rows=1",
        "--summary-json", str(tmp_path / "s.json")])
    assert res.exit_code == 3, res.output
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["n_images_rejected"] == len(arch.bad_ids) and s["commits"] >= 2
    assert "rejected" in res.output and "reject reasons" in res.output
    traits = Lake(lake_uri).read("traits").to_pylist()
    assert {r["prune_px"] for r in traits} == {2.0}
    assert all(r["model_version"].startswith("traits-") for r in traits)
    rejects = Lake(lake_uri).read("rejects")
    check_commit_lines(res.stderr, images=arch.n_rows, rows=len(traits) + rejects.num_rows,
                       commits=s["commits"])
