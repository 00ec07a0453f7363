"""Delta writes on local storage: idempotent MERGE, versions, schema, runs, rejects, pruning."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pyarrow as pa
import pytest

from rootflow.lake import Lake, LakeError
from rootflow.lake import query as q
from rootflow.lake.schema import SCHEMA_VERSION, traits_schema
from tests.lake._helpers import TRAIT_SCHEMA, manifest, traits_rows


@pytest.fixture()
def lake(tmp_path) -> Lake:
    return Lake(str(tmp_path / "lake"), trait_schema=TRAIT_SCHEMA)


def _keys(t: pa.Table) -> list[tuple[str, str, str]]:
    return sorted(zip(t["image_id"].to_pylist(), t["model_name"].to_pylist(),
                      t["model_version"].to_pylist(), strict=True))


def test_merge_is_idempotent_and_versions_add_rows(lake: Lake) -> None:
    m = manifest()
    rows = traits_rows(m)
    assert not lake.exists("traits")
    assert lake.commit_traits(rows) == m.num_rows
    assert lake.commit_traits(rows) == m.num_rows  # same rows again: updated, not appended
    t = lake.read("traits")
    assert t.num_rows == m.num_rows
    assert len(set(_keys(t))) == m.num_rows

    # Changed values for the same key replace the old ones.
    changed = [dict(r, length_mm=r["length_mm"] + 100.0) for r in rows]
    lake.commit_traits(changed)
    t = lake.read("traits")
    assert t.num_rows == m.num_rows
    assert sorted(t["length_mm"].to_pylist()) == sorted(r["length_mm"] for r in changed)

    # A new model version lands beside the old one.
    lake.commit_traits(traits_rows(m, version="v2"))
    t = lake.read("traits")
    assert t.num_rows == 2 * m.num_rows
    assert sorted(set(t["model_version"].to_pylist())) == ["v1", "v2"]
    assert lake.done_image_ids(model_name="mask", model_version="v2") == set(m["image_id"].to_pylist())
    assert lake.done_image_ids(model_name="rootsam", model_version="v2") == set()


def test_rows_are_cast_and_filled(lake: Lake) -> None:
    m = manifest(tubes=(1,), windows=(1,), sessions=(1,))
    row = traits_rows(m)[0]
    # numpy scalars, as the pipeline hands them over from Ray batches
    row.update(tube=np.int64(row["tube"]), length_mm=np.float32(2.5), tips=np.int64(3))
    for col in ("params", "confidence", "species", "projected_area_mm2"):
        row.pop(col, None)
    del row["processed_at"]  # defaults to now
    assert lake.commit_traits([row]) == 1
    got = lake.read("traits").to_pylist()[0]
    assert got["length_mm"] == 2.5 and got["tips"] == 3 and got["tube"] == 1
    assert got["confidence"] is None and got["params"] is None and got["species"] is None
    assert abs((got["processed_at"] - dt.datetime.now(dt.timezone.utc).replace(tzinfo=None))
               .total_seconds()) < 120
    assert lake.schema("traits").field("tube").type == pa.int32()


def test_bad_rows_are_refused_with_names(lake: Lake) -> None:
    m = manifest(tubes=(1,), windows=(1,), sessions=(1,))
    row = traits_rows(m)[0]
    with pytest.raises(LakeError, match="model_version"):
        lake.commit_traits([{k: v for k, v in row.items() if k != "model_version"}])
    with pytest.raises(LakeError, match="'length_mm' row 1"):
        lake.commit_traits([row, dict(row, image_id="x2", length_mm="long")])
    with pytest.raises(LakeError, match="unknown model_name"):
        lake.commit_traits([dict(row, model_name="sam3")])
    with pytest.raises(LakeError, match="'tube' is null in row 0"):
        lake.commit_traits([dict(row, tube=None)])
    assert not lake.exists("traits")  # nothing half-written
    assert lake.commit_traits([]) == 0


def test_duplicate_keys_in_one_commit_keep_the_last(lake: Lake) -> None:
    m = manifest(tubes=(1,), windows=(1,), sessions=(1, 2))
    rows = traits_rows(m)
    rows.append(dict(rows[0], length_mm=-1.0))
    assert lake.commit_traits(rows) == 2
    t = lake.read("traits").to_pylist()
    assert {r["image_id"]: r["length_mm"] for r in t}[rows[0]["image_id"]] == -1.0


def test_arrow_table_input(lake: Lake) -> None:
    m = manifest(tubes=(2,))
    table = pa.Table.from_pylist(traits_rows(m))
    assert lake.commit_traits(table) == m.num_rows
    assert lake.read("traits").num_rows == m.num_rows


def test_schema_evolution_adds_nullable_columns(tmp_path) -> None:
    uri = str(tmp_path / "lake")
    m = manifest(tubes=(1,))
    old = Lake(uri, trait_schema=TRAIT_SCHEMA)
    old.commit_traits(traits_rows(m))
    # A newer traits module measures one more trait: its writer adds the column.
    newer_schema = TRAIT_SCHEMA.append(pa.field("n_branch_points", pa.int64()))
    new = Lake(uri, trait_schema=newer_schema)
    new.commit_traits(traits_rows(m, version="v2", extra={"n_branch_points": 4}))
    t = new.read("traits")
    assert "n_branch_points" in t.column_names
    by_version = {v: set() for v in ("v1", "v2")}
    for r in t.to_pylist():
        by_version[r["model_version"]].add(r["n_branch_points"])
    assert by_version == {"v1": {None}, "v2": {4}}
    # ...and the older writer (which does not know the column) still commits fine.
    old.commit_traits(traits_rows(m, version="v1"))
    assert old.read("traits").num_rows == 2 * m.num_rows
    # A column nobody declared also evolves the schema (rows of a future producer).
    old.commit_traits(traits_rows(m, version="v3", extra={"root_age_days": 12.5}))
    t = old.read("traits")
    assert t.schema.field("root_age_days").type == pa.float64()
    assert t.num_rows == 3 * m.num_rows


def test_traits_schema_is_manifest_plus_traits_plus_producer() -> None:
    from rootflow.io.manifest import MANIFEST_SCHEMA

    s = traits_schema(TRAIT_SCHEMA)
    names = s.names
    assert names[: len(MANIFEST_SCHEMA)] == MANIFEST_SCHEMA.names
    for c in ("length_mm", "rootquant_length_mm", "rootquant_area_mm2", "rootquant_presence",
              "confidence", "model_name", "model_version", "run_id", "processed_at", "params"):
        assert c in names
    assert s.metadata[b"rootflow.schema_version"] == str(SCHEMA_VERSION).encode()
    with pytest.raises(ValueError, match="clash"):
        traits_schema(pa.schema([("depth", pa.float64())]))


def test_partition_layout_and_pruning(lake: Lake) -> None:
    m = manifest(tubes=(1, 2, 3))
    lake.commit_traits(traits_rows(m))
    dtab = lake.delta_table("traits")
    assert dtab.metadata().partition_columns == ["year", "tube", "depth"]
    all_files = dtab.file_uris()
    # 2 years x 3 tubes x 2 depth bands, one file each after one commit
    assert len(all_files) == 12
    sel = q.pruned_files(lake, [("year", "=", 2021), ("tube", "=", 2)])
    assert len(sel) == 2 and all("year=2021/tube=2/" in f for f in sel)
    ds = lake.dataset("traits", partitions=[("year", "=", 2021), ("tube", "=", 2)])
    assert len(ds.files) == 2
    t = ds.to_table()
    assert set(t["tube"].to_pylist()) == {2} and set(t["year"].to_pylist()) == {2021}
    assert t.num_rows == 8  # 4 windows x 2 sessions in 2021


def test_runs_lifecycle_lease_and_redaction(lake: Lake) -> None:
    secret_cfg = {"storage": {"endpoint_url": "http://x", "key": "AKIAEXAMPLE",
                              "secret": "hunter2-secret"},
                  "aws_secret_access_key": "also-secret", "nested": [{"password": "pw1"}],
                  "scope": "scope-a", "batch_size": 4}
    lake.start_run(run_id="r1", job_kind="infer", manifest_uri="/m.parquet", config=secret_cfg,
                   model_versions={"mask": "v1"}, code_version="abc123")
    lake.start_run(run_id="r1", job_kind="infer", manifest_uri="/m.parquet", config=secret_cfg,
                   model_versions={"mask": "v1"}, code_version="abc123")  # idempotent
    runs = lake.read("runs").to_pylist()
    assert len(runs) == 1
    text = json.dumps(runs, default=str)
    for s in ("AKIAEXAMPLE", "hunter2-secret", "also-secret", "pw1"):
        assert s not in text
    cfg = json.loads(runs[0]["config_json"])
    assert cfg["storage"]["endpoint_url"] == "http://x" and cfg["batch_size"] == 4
    assert runs[0]["status"] == "running" and runs[0]["scope"] == "scope-a"

    assert _holder(lake, scope="scope-a", ttl_s=600) == "r1"
    assert _holder(lake, scope="other", ttl_s=600) is None
    lake.start_run(run_id="r2", job_kind="infer", manifest_uri="/m.parquet",
                   config={"scope": "scope-a"}, model_versions={}, code_version=None)
    assert _holder(lake, scope="scope-a", ttl_s=600) == "r1"  # earliest live run wins
    before = lake.read("runs").to_pylist()
    lake.heartbeat("r2")
    after = {r["run_id"]: r for r in lake.read("runs").to_pylist()}
    assert after["r2"]["heartbeat_at"] > {r["run_id"]: r for r in before}["r2"]["heartbeat_at"]

    lake.finish_run("r1", n_ok=10, n_rejected=2, status="ok_with_rejects")
    assert _holder(lake, scope="scope-a", ttl_s=600) == "r2"
    r1 = next(r for r in lake.read("runs").to_pylist() if r["run_id"] == "r1")
    assert (r1["status"], r1["n_ok"], r1["n_rejected"]) == ("ok_with_rejects", 10, 2)
    assert r1["finished_at"] >= r1["started_at"]
    assert _holder(lake, scope="scope-a", ttl_s=0) is None  # r2's heartbeat has expired
    with pytest.raises(LakeError, match="not in the runs table"):
        lake.finish_run("nope", n_ok=0, n_rejected=0, status="ok")
    assert [r["run_id"] for r in lake.runs().to_pylist()] == ["r2", "r1"]


def test_rejects_merge_per_run(lake: Lake) -> None:
    m = manifest(tubes=(1,), windows=(1,), sessions=(1, 2))
    base = m.to_pylist()
    rej = [dict(r, run_id="r1", model_name="rootsam", stage="decode",
                reason="decode: ImageDecodeError: truncated") for r in base]
    assert lake.commit_rejects(rej) == 2
    assert lake.commit_rejects(rej) == 2  # a retried block does not double the rejects
    assert lake.read("rejects").num_rows == 2
    lake.commit_rejects([dict(rej[0], run_id="r2")])  # the next run's failure is its own row
    t = lake.read("rejects")
    assert t.num_rows == 3
    assert all(t["at"].to_pylist())
    # A row that failed before its manifest columns were known still lands.
    lake.commit_rejects([{"image_id": "zzz", "run_id": "r2", "model_name": "mask",
                          "stage": "read", "reason": "read: FileNotFoundError: gone"}])
    assert lake.read("rejects").num_rows == 4
    with pytest.raises(LakeError, match="reason"):
        lake.commit_rejects([{"image_id": "y", "run_id": "r2", "model_name": "mask",
                              "stage": "read"}])


def test_real_measure_output_round_trips(tmp_path) -> None:
    """Default trait columns come from rootflow.traits: measure() output commits as-is."""
    from rootflow.traits import measure, trait_schema

    lake = Lake(str(tmp_path / "lake"))
    ts = trait_schema()
    names = lake.schema("traits").names
    assert names[17: 17 + len(ts)] == ts.names
    mask = np.zeros((64, 64), bool)
    mask[10:54, 30:33] = True
    m = manifest(tubes=(1,), windows=(1,), sessions=(1,))
    traits = measure(mask, dpi=100.0)
    row = {**m.to_pylist()[0], **traits, "model_name": "mask", "model_version": "v1",
           "run_id": "r"}
    assert lake.commit_traits([row]) == 1
    got = lake.read("traits").to_pylist()[0]
    for k, v in traits.items():
        assert got[k] == pytest.approx(v) if isinstance(v, float) else got[k] == v, k


def _holder(lake: Lake, *, scope: str, ttl_s: float) -> str | None:
    """The run holding ``scope``, as an observer (a run id not in the table) sees it, through
    the pipeline's own lease rule."""
    from rootflow.lake.lease import RunLease

    ttl = max(ttl_s, 1e-6)
    return RunLease(lake, "observer", scope, ttl_s=ttl, heartbeat_s=ttl / 2).holder()
