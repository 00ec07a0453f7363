""""Latest" per image and producer, pins, time travel, lineage, tables from the first write,
and conflicts by type: the same answers from pandas, Polars, DuckDB and Arrow."""

from __future__ import annotations

import datetime as dt

import pyarrow as pa
import pytest

from rootflow.lake import Lake
from rootflow.lake import query as q
from rootflow.lake.schema import ALL_TABLES
from rootflow.lake.tables import _is_conflict
from tests.lake._helpers import TRAIT_SCHEMA, length_of, manifest, traits_rows

ENGINES = ("pandas", "polars", "duckdb", "arrow")
COLS = ["image_id", "model_name", "model_version", "length_mm"]


def _rows(res, engine: str) -> list[tuple]:
    """Sorted (image_id, model_name, model_version, length_mm) of any engine's result."""
    if engine == "polars":
        t = res.collect().to_arrow()
    elif engine == "duckdb":
        t = res.to_arrow_table()
    elif engine == "pandas":
        t = pa.Table.from_pandas(res, preserve_index=False)
    else:
        t = res
    t = t.select(COLS)
    return sorted(zip(*[t[c].to_pylist() for c in COLS], strict=True))


def _all_engines(lake, **kw) -> list[tuple]:
    """The rows every engine returns; asserts they are identical."""
    got = {e: _rows(q.traits(lake, engine=e, **kw), e) for e in ENGINES}
    for e in ENGINES[1:]:
        assert got[e] == got["pandas"], f"{e} differs from pandas"
    return got["pandas"]


@pytest.fixture(scope="module")
def history(tmp_path_factory):
    """A lake whose versions arrived in a known order:

    1. mask v1 for every image (2 tubes x 4 windows x sessions 1-3: years 2021 and 2022);
    2. mask v2 re-processes 2022 only (a partly re-processed archive);
    3. a forced re-run of mask v1 over everything (must not make v1 "newer");
    4. rootquant rq1 for every image, then rq2 for tube 1 only (a second producer at another
       version).
    """
    uri = str(tmp_path_factory.mktemp("latest") / "lake")
    lake = Lake(uri, trait_schema=TRAIT_SCHEMA)
    m = manifest()
    lake.commit_traits(traits_rows(m, version="v1", run_id="r-v1"))
    v_after_v1 = lake.delta_table("traits").version()
    m2022 = m.filter(pa.compute.equal(m["year"], 2022))
    lake.commit_traits(traits_rows(m2022, version="v2", run_id="r-v2"))
    lake.commit_traits(traits_rows(m, version="v1", run_id="r-v1-forced",
                                   processed_at=dt.datetime(2030, 1, 1)))
    lake.commit_traits(traits_rows(m, model_name="rootquant", version="rq1", run_id="r-rq1"))
    lake.commit_traits(traits_rows(m.filter(pa.compute.equal(m["tube"], 1)),
                                   model_name="rootquant", version="rq2", run_id="r-rq2"))
    return {"uri": uri, "manifest": m, "v_after_v1": v_after_v1}


def _expected(m: pa.Table, *, pin: dict | None = None) -> list[tuple]:
    """Per image: mask v2 where 2022 was re-processed, else v1; rootquant rq2 on tube 1."""
    out = []
    for r in m.to_pylist():
        mask_v = "v2" if r["year"] == 2022 else "v1"
        rq_v = "rq2" if r["tube"] == 1 else "rq1"
        if pin and "mask" in pin:
            mask_v = pin["mask"]
            if mask_v == "v2" and r["year"] != 2022:
                mask_v = None
        for name, v in (("mask", mask_v), ("rootquant", rq_v)):
            if v is not None:
                out.append((r["image_id"], name, v,
                            length_of(r["tube"], r["window"], r["session"], v)))
    return sorted(out)


def test_latest_is_per_image_and_survives_forced_reruns(history) -> None:
    """Guards the old rule (one "latest" version per producer, by the most recent write): it
    hid every 2021 row once v2 re-processed 2022, and the forced re-run of v1 flipped "latest"
    back to v1 for the 2022 images. Every engine must give the per-image answer."""
    got = _all_engines(history["uri"])
    assert got == _expected(history["manifest"])
    assert q.latest_versions(history["uri"]) == {"mask": "v2", "rootquant": "rq2"}


def test_pins_and_filters_agree_across_engines(history) -> None:
    """Guards pins and filters being applied differently by one engine (e.g. a pin ignored by
    the DuckDB view, or a tube filter pruning away rows another engine keeps)."""
    m = history["manifest"]
    assert _all_engines(history["uri"], pin={"mask": "v1"}) == _expected(m, pin={"mask": "v1"})
    assert _all_engines(history["uri"], pin={"mask": "v2"}) == _expected(m, pin={"mask": "v2"})
    tube2 = [r for r in _expected(m) if r[0] in set(
        m.filter(pa.compute.equal(m["tube"], 2))["image_id"].to_pylist())]
    assert _all_engines(history["uri"], filters=[("tube", "=", 2)]) == tube2
    every = _all_engines(history["uri"], latest=False)
    assert len(every) == 24 + 8 + 24 + 12
    # the DuckDB view answers the same when the analyst filters in SQL instead
    con = q.duckdb_connection(history["uri"])
    sql = con.sql(f"SELECT {', '.join(COLS)} FROM traits WHERE tube = 2").fetchall()
    assert sorted(sql) == tube2


def test_versions_are_ordered_by_first_commit(history) -> None:
    """Guards ordering by the latest write: the forced re-run (processed_at in 2030) must leave
    v1 older than v2, with the run that first wrote each version recorded."""
    v = q.versions(history["uri"]).to_pylist()
    mask = [r for r in v if r["model_name"] == "mask"]
    assert [(r["model_version"], r["rank"], r["first_run_id"]) for r in mask] == \
        [("v1", 0, "r-v1"), ("v2", 1, "r-v2")]
    assert mask[0]["first_committed_at"] < mask[1]["first_committed_at"]
    assert {r["model_version"]: r["rows"] for r in v} == {"v1": 24, "v2": 8, "rq1": 24, "rq2": 12}


def test_time_travel_by_version_and_time(history) -> None:
    """Guards ``as_of`` being ignored by an engine: the table as it was after the first commit
    holds v1 only, by version number and by the commit's time."""
    m = history["manifest"]
    v1_only = sorted((r["image_id"], "mask", "v1",
                      length_of(r["tube"], r["window"], r["session"], "v1"))
                     for r in m.to_pylist())
    assert _all_engines(history["uri"], as_of=history["v_after_v1"]) == v1_only
    lake = Lake(history["uri"])
    hist = {h["version"]: h["timestamp"] for h in lake.delta_table("traits").history()}
    when = dt.datetime.fromtimestamp(hist[history["v_after_v1"]] / 1000, dt.timezone.utc)
    assert _all_engines(history["uri"], as_of=when) == v1_only
    assert _all_engines(history["uri"], as_of=when.isoformat()) == v1_only


def test_lineage_names_the_run_of_each_row(history) -> None:
    """Guards losing which run wrote a row: the forced re-run rewrote v1's rows, so the 2021
    mask rows come from it, the 2022 ones from v2's run."""
    lin = q.lineage(history["uri"]).to_pylist()
    years = {r["image_id"]: r["year"] for r in history["manifest"].to_pylist()}
    mask = {r["image_id"]: r["run_id"] for r in lin if r["model_name"] == "mask"}
    assert mask == {i: ("r-v2" if y == 2022 else "r-v1-forced") for i, y in years.items()}
    assert all(r["job_kind"] is None for r in lin)  # these runs were never recorded


def test_every_table_exists_after_the_first_write(tmp_path) -> None:
    """Guards a lake whose first run had no rejects having no ``rejects`` table (the analyst's
    first query of it failed): any first write creates every table, empty, with its schema."""
    lake = Lake(str(tmp_path / "lake"), trait_schema=TRAIT_SCHEMA)
    lake.start_run(run_id="r1", job_kind="infer", manifest_uri=None, config={},
                   model_versions={}, code_version=None)
    for name in ALL_TABLES:
        assert lake.exists(name), name
        t = lake.read(name)
        assert t.schema.names[:len(lake.schema(name).names)] == lake.schema(name).names
    assert lake.read("traits").num_rows == 0 and lake.read("runs").num_rows == 1
    assert lake.delta_table("traits").metadata().partition_columns == ["year", "tube", "depth"]
    con = q.duckdb_connection(lake)
    for name in (*ALL_TABLES, "traits_all"):
        assert con.sql(f"SELECT COUNT(*) FROM {name}").fetchall()[0][0] == (1 if name == "runs"
                                                                         else 0)


def test_conflicts_are_recognised_by_type() -> None:
    """Guards matching error text: a non-conflict error whose message says "conflict" or
    "already exists" must not be retried; delta-rs's CommitFailedError must be."""
    from deltalake.exceptions import CommitFailedError, DeltaError, TableNotFoundError

    assert _is_conflict(CommitFailedError("Transaction failed: version 3 exists"))
    assert not _is_conflict(DeltaError("Generic error: file already exists, conflict"))
    assert not _is_conflict(TableNotFoundError("no log files"))
    assert not _is_conflict(OSError("precondition failed"))


def test_lake_written_before_the_versions_table(tmp_path) -> None:
    """Guards lakes written by older code (no ``versions`` table): "latest" falls back to the
    versions' oldest rows, and the next write records those versions before its own, so a
    new version still ranks newest and old ones keep their order."""
    import shutil

    uri = str(tmp_path / "lake")
    m = manifest(tubes=(1,))
    old = Lake(uri, trait_schema=TRAIT_SCHEMA)
    old.commit_traits(traits_rows(m, version="v1", processed_at=dt.datetime(2022, 1, 1)))
    old.commit_traits(traits_rows(m.slice(0, 4), version="v2",
                                  processed_at=dt.datetime(2022, 2, 1)))
    shutil.rmtree(tmp_path / "lake" / "versions")  # as the lake looked before this code
    lake = Lake(uri, trait_schema=TRAIT_SCHEMA)
    assert not lake.exists("versions")
    got = _all_engines(lake)
    assert [r[2] for r in got] == ["v2" if r[0] in set(m.slice(0, 4)["image_id"].to_pylist())
                                   else "v1" for r in got]
    lake.commit_traits(traits_rows(m.slice(4, 2), version="v3"))
    v = q.versions(lake).to_pylist()
    assert [(r["model_version"], r["rank"]) for r in v] == [("v1", 0), ("v2", 1), ("v3", 2)]
    assert v[0]["first_committed_at"] == dt.datetime(2022, 1, 1)
