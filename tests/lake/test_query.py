"""Analyst queries: engines, latest-version selection, filters, and every example in docs/lake.md."""

from __future__ import annotations

import datetime as dt
import math
import re
from pathlib import Path

import polars as pl
import pyarrow as pa
import pytest

from rootflow.lake import Lake
from rootflow.lake import query as q
from tests.lake._helpers import (
    IMAGE_AREA_MM2,
    SESSIONS,
    TRAIT_SCHEMA,
    length_of,
    manifest,
    traits_rows,
)

DOCS = Path(__file__).resolve().parents[2] / "docs" / "lake.md"
DOF_CM = 0.2


@pytest.fixture(scope="module")
def lake_uri(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("q") / "lake")
    lake = Lake(uri, trait_schema=TRAIT_SCHEMA)
    m = manifest()
    lake.commit_traits(traits_rows(m, version="v1", processed_at=dt.datetime(2023, 1, 1)))
    lake.commit_traits(traits_rows(m, version="v2", processed_at=dt.datetime(2023, 2, 1)))
    # another producer, whose only version is older than mask v2: still "latest" for itself
    lake.commit_traits(traits_rows(m, model_name="rootquant", version="rq1",
                                   processed_at=dt.datetime(2022, 12, 1),
                                   extra={"rootquant_length_mm": 1.0}))
    return uri


def _examples() -> dict[str, str]:
    text = DOCS.read_text()
    blocks = re.findall(r"<!-- example: (\w+) -->\s*```python\n(.*?)```", text, re.S)
    return dict(blocks)


def _run(name: str, lake_uri: str):
    ns: dict = {"lake_uri": lake_uri}
    exec(compile(_examples()[name], f"docs/lake.md:{name}", "exec"), ns)
    res = ns["result"]
    return res.to_pandas() if isinstance(res, pl.DataFrame) else res


def test_docs_have_the_examples() -> None:
    assert set(_examples()) == {"rld_duckdb", "rld_polars", "growth_duckdb", "growth_polars",
                                "versions_duckdb", "versions_polars"}


def _expected_rld() -> dict[tuple[int, dt.date], float]:
    out = {}
    for s, when in SESSIONS.items():
        for band, windows in ((0, (1, 2)), (4, (3, 4))):
            length = sum(length_of(1, w, s, "v2") for w in windows)
            area = IMAGE_AREA_MM2 * len(windows)
            out[(band, when.date())] = (length / 10) / (area / 100 * DOF_CM)
    return out


@pytest.mark.parametrize("name", ["rld_duckdb", "rld_polars"])
def test_rld_example(lake_uri, name) -> None:
    df = _run(name, lake_uri)
    got = {(int(r.depth_band_cm), _date(r.date)): (r.rld_cm_per_cm3, r.n_images)
           for r in df.itertuples()}
    exp = _expected_rld()
    assert set(got) == set(exp)
    for k, v in exp.items():
        assert got[k][0] == pytest.approx(v) and got[k][1] == 2
    assert [(_date(r.date), int(r.depth_band_cm)) for r in df.itertuples()] == \
        sorted((d, b) for b, d in exp)


def _date(v) -> dt.date:
    return v.date() if hasattr(v, "date") and callable(v.date) else v


@pytest.mark.parametrize("name", ["growth_duckdb", "growth_polars"])
def test_growth_example(lake_uri, name) -> None:
    df = _run(name, lake_uri)
    assert list(zip(df["tube"], df["session"], strict=True)) == \
        [(t, s) for t in (1, 2) for s in (1, 2, 3)]
    for r in df.itertuples():
        total = sum(length_of(r.tube, w, r.session, "v2") for w in (1, 2, 3, 4))
        assert r.length_mm == pytest.approx(total) and r.n_images == 4
        if r.session == 1:
            assert r.growth_mm is None or math.isnan(r.growth_mm)
        else:
            prev = sum(length_of(r.tube, w, r.session - 1, "v2") for w in (1, 2, 3, 4))
            days = (SESSIONS[r.session] - SESSIONS[r.session - 1]).days
            assert r.growth_mm == pytest.approx(total - prev)
            assert r.days == days
            assert r.growth_mm_per_day == pytest.approx((total - prev) / days)


@pytest.mark.parametrize("name", ["versions_duckdb", "versions_polars"])
def test_versions_example(lake_uri, name) -> None:
    df = _run(name, lake_uri)
    assert list(df["tube"]) == [1, 2] and list(df["n_images"]) == [12, 12]
    for r in df.itertuples():
        v1 = [length_of(r.tube, w, s, "v1") for w in (1, 2, 3, 4) for s in (1, 2, 3)]
        assert r.mean_diff_mm == pytest.approx(sum(x * 0.1 for x in v1) / len(v1))
        assert r.mean_rel_diff == pytest.approx(0.1)
        assert r.r == pytest.approx(1.0)


def test_latest_versions_and_engines(lake_uri) -> None:
    assert q.latest_versions(lake_uri) == {"mask": "v2", "rootquant": "rq1"}
    n = 24
    pdf = q.traits(lake_uri, engine="pandas")
    assert len(pdf) == 2 * n
    assert set(zip(pdf["model_name"], pdf["model_version"], strict=True)) == \
        {("mask", "v2"), ("rootquant", "rq1")}
    assert q.traits(lake_uri, engine="arrow", latest=False).num_rows == 3 * n
    lf = q.traits(lake_uri, engine="polars")
    assert isinstance(lf, pl.LazyFrame) and lf.collect().height == 2 * n
    rel = q.traits(lake_uri, engine="duckdb", columns=["image_id", "length_mm"])
    assert len(rel.fetchall()) == 2 * n
    lake = Lake(lake_uri, trait_schema=TRAIT_SCHEMA)
    assert len(q.traits(lake, engine="pandas", latest=False)) == 3 * n


def test_filters_prune_and_filter_rows(lake_uri) -> None:
    f = [("year", "=", 2021), ("tube", "=", 2)]
    files = q.pruned_files(lake_uri, f)
    all_files = Lake(lake_uri).delta_table("traits").file_uris()
    assert 0 < len(files) < len(all_files)
    assert all("year=2021/tube=2/" in x for x in files)
    for engine in ("pandas", "polars", "duckdb"):
        res = q.traits(lake_uri, engine=engine, filters=f)
        df = res.collect().to_pandas() if engine == "polars" else \
            res.df() if engine == "duckdb" else res
        assert len(df) == 16 and set(df["tube"]) == {2} and set(df["year"]) == {2021}
    # OR of two conjunctions; a non-partition filter (window) filters rows
    dnf = [[("tube", "=", 1), ("window", "=", 1)], [("tube", "=", 2), ("window", "in", [2, 3])]]
    for engine in ("arrow", "polars", "duckdb"):
        res = q.traits(lake_uri, engine=engine, filters=dnf, latest=False)
        t = res.collect().to_arrow() if engine == "polars" else \
            pa.Table.from_pandas(res.df()) if engine == "duckdb" else res
        pairs = set(zip(t["tube"].to_pylist(), t["window"].to_pylist(), strict=True))
        assert pairs == {(1, 1), (2, 2), (2, 3)} and t.num_rows == 9 * 3
    con = q.duckdb_connection(lake_uri, filters=f)
    assert con.execute("SELECT COUNT(*) FROM traits").fetchone()[0] == 16
    assert con.execute("SELECT COUNT(*) FROM runs").fetchone()[0] == 0


def test_empty_lake_queries(tmp_path) -> None:
    uri = str(tmp_path / "empty")
    assert q.latest_versions(uri) == {}
    assert len(q.traits(uri, engine="pandas")) == 0
    con = q.duckdb_connection(uri)
    assert con.execute("SELECT COUNT(*) FROM traits").fetchone()[0] == 0
