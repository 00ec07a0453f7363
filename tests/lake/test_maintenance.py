"""compact / vacuum / show, as functions and as `rootflow lake ...` commands."""

from __future__ import annotations

import json
import os
import re

import pytest
from typer.testing import CliRunner

from rootflow.cli import app
from rootflow.lake import Lake
from rootflow.lake import maintenance as mt
from tests.lake._helpers import TRAIT_SCHEMA, manifest, traits_rows


def _fragmented(uri: str, storage_options=None) -> Lake:
    lake = Lake(uri, storage_options=storage_options, trait_schema=TRAIT_SCHEMA)
    m = manifest(tubes=(1,), sessions=(1, 2))  # one year, two depth bands
    rows = traits_rows(m)
    for i in range(0, len(rows), 2):  # 4 commits -> several small files per partition
        lake.commit_traits(rows[i:i + 2])
    lake.start_run(run_id="r1", job_kind="infer", manifest_uri="m", config={},
                   model_versions={"mask": "v1"}, code_version="c")
    lake.finish_run("r1", n_ok=8, n_rejected=0, status="ok")
    return lake


def test_compact_then_vacuum(tmp_path) -> None:
    lake = _fragmented(str(tmp_path / "lake"))
    before = lake.read("traits").sort_by("image_id")
    n_files = len(lake.delta_table("traits").file_uris())
    assert n_files == 4
    metrics = mt.compact(lake.uri)
    assert metrics["traits"]["numFilesRemoved"] == 4 and metrics["traits"]["numFilesAdded"] == 2
    assert len(lake.delta_table("traits").file_uris()) == 2  # one per partition
    assert lake.read("traits").sort_by("image_id").equals(before)
    assert mt.compact(lake.uri)["traits"]["numFilesAdded"] == 0  # idempotent

    with pytest.raises(mt.VacuumRefused, match="168"):
        mt.vacuum(lake.uri, retain_hours=1)
    dry = {r.table: r for r in mt.vacuum(lake.uri, retain_hours=0, force=True)}
    assert dry["traits"].dry_run and len(dry["traits"].files) == 4
    on_disk = [f for f in dry["traits"].files if os.path.exists(os.path.join(lake.traits_uri, f))
               or os.path.exists(f)]
    assert len(on_disk) == 4  # dry run deleted nothing
    done = {r.table: r for r in mt.vacuum(lake.uri, retain_hours=0, force=True, dry_run=False)}
    assert len(done["traits"].files) == 4
    parquet = [os.path.join(d, f) for d, _, fs in os.walk(lake.traits_uri) for f in fs
               if f.endswith(".parquet")]
    assert len(parquet) == 2
    assert lake.read("traits").sort_by("image_id").equals(before)
    assert mt.vacuum(lake.uri)[0].files == []  # default 168 h: nothing that young to delete


def test_show(tmp_path) -> None:
    lake = _fragmented(str(tmp_path / "lake"))
    lake.commit_traits(traits_rows(manifest(tubes=(1,), sessions=(1,)), version="v2"))
    info = mt.show(lake.uri)
    t = info["tables"]["traits"]
    assert t["rows"] == 12 and t["partitions"] == 2 and t["version"] == 5
    assert [(v["model_name"], v["model_version"], v["rows"], v["first_run_id"])
            for v in t["versions"]] == [("mask", "v1", 8, "run-1"), ("mask", "v2", 4, "run-1")]
    assert t["versions"][0]["first_committed_at"] < t["versions"][1]["first_committed_at"]
    assert t["latest"] == {"mask": "v2"}
    assert info["tables"]["rejects"]["rows"] == 0  # created empty by the first write
    assert info["latest_runs"][0]["run_id"] == "r1" and info["latest_runs"][0]["status"] == "ok"
    text = mt.format_show(info)
    assert "traits: 12 rows" in text and "rejects: 0 rows" in text
    assert re.search(r"mask v2: 4 rows, first committed \d{4}-\d\d-\d\d [\d:]+ \(latest\)", text)


def test_cli(tmp_path) -> None:
    runner = CliRunner()
    lake = _fragmented(str(tmp_path / "lake"))
    res = runner.invoke(app, ["lake", "show", lake.uri])
    assert res.exit_code == 0 and "traits: 8 rows, 4 files" in res.output, res.output
    res = runner.invoke(app, ["lake", "show", lake.uri, "--json"])
    assert json.loads(res.output)["tables"]["traits"]["files"] == 4
    res = runner.invoke(app, ["lake", "compact", lake.uri])
    assert res.exit_code == 0 and "traits: 4 files -> 2" in res.output, res.output
    res = runner.invoke(app, ["lake", "vacuum", lake.uri, "--retain-hours", "0"])
    assert res.exit_code == 2 and "refusing" in res.output
    res = runner.invoke(app, ["lake", "vacuum", lake.uri, "--retain-hours", "0", "--force"])
    assert res.exit_code == 0 and "traits: would delete 4 files" in res.output
    assert "dry run" in res.output
    res = runner.invoke(app, ["lake", "vacuum", lake.uri, "--retain-hours", "0", "--force",
                              "--execute"])
    assert res.exit_code == 0 and "traits: deleted 4 files" in res.output
    assert lake.read("traits").num_rows == 8


@pytest.mark.s3
def test_maintenance_on_s3(s3) -> None:
    lake = _fragmented(s3.fresh_prefix("maint"), s3.storage)
    assert mt.compact(lake.uri, storage_options=s3.storage)["traits"]["numFilesAdded"] == 2
    rep = mt.vacuum(lake.uri, retain_hours=0, force=True, dry_run=False,
                    storage_options=s3.storage)
    assert {r.table: len(r.files) for r in rep}["traits"] == 4
    assert lake.read("traits").num_rows == 8
    assert mt.show(lake.uri, storage_options=s3.storage)["tables"]["traits"]["files"] == 2


def _files_per_partition(lake: Lake) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in lake.delta_table("traits").file_uris():
        part = f.split("/traits/", 1)[1].rsplit("/", 1)[0]
        out[part] = out.get(part, 0) + 1
    return out


def test_compact_touched_compacts_only_what_the_run_wrote(tmp_path) -> None:
    """Guards the post-run compaction rewriting the whole lake (or nothing): after a writer
    committed small batches to tube 1, its partitions hold one file each, tube 2's partitions
    (written by another writer) keep their files, and no row changes."""
    uri = str(tmp_path / "lake")
    other = Lake(uri, trait_schema=TRAIT_SCHEMA)
    rows2 = traits_rows(manifest(tubes=(2,), sessions=(1, 2)))
    for i in range(0, len(rows2), 2):
        other.commit_traits(rows2[i:i + 2])
    run = Lake(uri, trait_schema=TRAIT_SCHEMA)
    rows1 = traits_rows(manifest(tubes=(1,), sessions=(1, 2)))
    for i in range(0, len(rows1), 2):
        run.commit_traits(rows1[i:i + 2])
    before = run.read("traits").sort_by("image_id")
    assert run.touched == {(2021, 1, 0), (2021, 1, 4)}
    metrics = mt.compact_touched(run)
    assert metrics["traits"]["numFilesRemoved"] == 4 and metrics["traits"]["numFilesAdded"] == 2
    per = _files_per_partition(run)
    assert {p: n for p, n in per.items() if "tube=1/" in p} == \
        {"year=2021/tube=1/depth=0": 1, "year=2021/tube=1/depth=4": 1}
    assert sum(n for p, n in per.items() if "tube=2/" in p) == 4
    assert run.read("traits").sort_by("image_id").equals(before)
    assert run.touched == set()


def test_maintain_job(tmp_path) -> None:
    """Guards the scheduled job: a vacuum under 168 h is refused with one line and exit 2 (no
    traceback) after compacting; with --force --apply it Z-orders, deletes the replaced files
    and leaves every row readable."""
    import subprocess
    import sys
    from pathlib import Path

    job = Path(__file__).resolve().parents[2] / "jobs" / "maintain.py"
    lake = _fragmented(str(tmp_path / "lake"))
    before = lake.read("traits").sort_by("image_id")
    res = subprocess.run([sys.executable, str(job), lake.uri, "--retain-hours", "1"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stderr
    assert "vacuum refused" in res.stderr and "Traceback" not in res.stderr
    assert "compact traits" in res.stdout and len(lake.delta_table("traits").file_uris()) == 2
    res = subprocess.run([sys.executable, str(job), lake.uri, "--retain-hours", "0", "--force",
                          "--apply", "--zorder"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "vacuum traits: deleted" in res.stdout
    assert lake.read("traits").sort_by("image_id").equals(before)
