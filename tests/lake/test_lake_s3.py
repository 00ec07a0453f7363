"""The lake on the loopback S3 server: writes, reads, and concurrent writers."""

from __future__ import annotations

import json
import multiprocessing as mp

import pytest

from rootflow.lake import Lake
from rootflow.lake import query as q
from tests.lake._helpers import TRAIT_SCHEMA, concurrent_writer, manifest, traits_rows

pytestmark = pytest.mark.s3


def test_conditional_put_key_is_set(s3) -> None:
    opts = Lake(s3.uri("x"), storage_options=s3.storage).delta_storage_options()
    assert opts is not None and opts["conditional_put"] == "etag"


def test_merge_and_read_on_s3(s3) -> None:
    lake = Lake(s3.fresh_prefix("lake"), storage_options=s3.storage, trait_schema=TRAIT_SCHEMA)
    m = manifest()
    lake.commit_traits(traits_rows(m))
    lake.commit_traits(traits_rows(m))
    lake.commit_traits(traits_rows(m, version="v2"))
    assert lake.read("traits").num_rows == 2 * m.num_rows
    assert len(lake.done_image_ids(model_name="mask", model_version="v1")) == m.num_rows
    sel = q.pruned_files(lake, [("year", "=", 2022), ("tube", "=", 1)])
    assert sel and all(f.startswith("s3://") and "year=2022/tube=1/" in f for f in sel)
    pdf = q.traits(lake, engine="pandas")
    assert len(pdf) == m.num_rows and set(pdf["model_version"]) == {"v2"}
    lf = q.traits(lake, engine="polars", filters=[("tube", "=", 2)])
    assert lf.collect().height == m.num_rows // 2


def test_credentials_never_reach_the_runs_table(s3) -> None:
    lake = Lake(s3.fresh_prefix("lake"), storage_options=s3.storage, trait_schema=TRAIT_SCHEMA)
    lake.start_run(run_id="r1", job_kind="infer", manifest_uri=s3.uri("m.parquet"),
                   config={"storage": s3.storage, "also": s3.storage.to_dict()},
                   model_versions={"mask": "v1"}, code_version="x")
    lake.finish_run("r1", n_ok=1, n_rejected=0, status="ok")
    text = json.dumps(lake.read("runs").to_pylist(), default=str)
    assert s3.storage.secret not in text.replace('"***"', "")
    cfg = json.loads(lake.read("runs")["config_json"][0].as_py())
    assert cfg["storage"]["secret"] == "***" and cfg["also"]["key"] == "***"
    assert cfg["storage"]["endpoint_url"] == s3.endpoint_url


def test_concurrent_writers_on_s3_all_land(s3) -> None:
    """Three processes commit to one table at once, three times each (n_commits x 16 rows).

    Each commit MERGEs 12 rows every writer writes (so the writers rewrite the same files and
    delta-rs meets real conflicts on the conditional put of ``_delta_log``; the lake retries
    them with backoff) and 4 rows only it writes (new data in its own partitions). At the end
    every commit has landed (one table version per commit), the table is readable and holds
    one row per key: the shared 12 once, every writer's own rows.
    """
    uri = s3.fresh_prefix("concurrent")
    so = s3.storage.to_dict()
    n_writers, n_commits = 3, 3
    ctx = mp.get_context("spawn")
    with ctx.Pool(n_writers) as pool:
        results = pool.map(concurrent_writer,
                           [(uri, so, i, n_commits) for i in range(n_writers)])
    lake = Lake(uri, storage_options=s3.storage, trait_schema=TRAIT_SCHEMA)
    t = lake.read("traits")
    own_per_writer = n_commits * 4  # sessions 1..3, 4 windows each
    assert t.num_rows == 12 + n_writers * own_per_writer
    assert sorted(set(t["tube"].to_pylist())) == [1, 10, 11, 12]
    assert sum(r[0] for r in results) == n_writers * n_commits * 16
    # version 0 created the table; each merge is exactly one later version
    assert lake.delta_table("traits").version() == n_writers * n_commits
    ops = [h["operation"] for h in lake.delta_table("traits").history()]
    assert ops.count("MERGE") == n_writers * n_commits
    print(f"conflicts retried per writer: {[r[1] for r in results]}")
