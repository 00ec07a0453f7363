"""Queries scan lazily: a one-tube query opens only that tube's data files, in every engine.

The count is of files actually opened, through a file system wrapper around the real local
file system (``tests/lake/_counting.py``), not of the files the code plans to read.
"""

from __future__ import annotations

import polars as pl
import pytest

from rootflow.lake import Lake
from rootflow.lake import query as q
from tests.lake._counting import counting_fs
from tests.lake._helpers import TRAIT_SCHEMA, manifest, traits_rows

TUBES = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def lake(tmp_path_factory):
    """4 tubes x 2 years x 2 depth bands = 16 partitions, two versions: 32 data files."""
    uri = str(tmp_path_factory.mktemp("lazy") / "lake")
    writer = Lake(uri, trait_schema=TRAIT_SCHEMA)
    m = manifest(tubes=TUBES)
    writer.commit_traits(traits_rows(m, version="v1"))
    writer.commit_traits(traits_rows(m, version="v2"))
    fs, counter = counting_fs(uri)
    reader = Lake(uri, trait_schema=TRAIT_SCHEMA, filesystem=fs)
    files = [f for f in writer.delta_table("traits").file_uris()]
    tube1 = {f.split("/traits/", 1)[1] for f in files if "/tube=1/" in f}
    return reader, counter, len(files), tube1


QUERIES = {
    "pandas": lambda lk: len(q.traits(lk, filters=[("tube", "=", 1)])),
    "arrow": lambda lk: q.traits(lk, engine="arrow", filters=[("tube", "=", 1)]).num_rows,
    "polars_filters": lambda lk: q.polars_traits(lk, filters=[("tube", "=", 1)]).collect().height,
    "polars_expr": lambda lk: q.polars_traits(lk).filter(pl.col("tube") == 1).collect().height,
    "duckdb_sql": lambda lk: q.duckdb_connection(lk).sql(
        "SELECT COUNT(*) FROM traits WHERE tube = 1").fetchall()[0][0],
    "duckdb_all_sql": lambda lk: q.duckdb_connection(lk).sql(
        "SELECT COUNT(*) FROM traits_all WHERE tube = 1").fetchall()[0][0] // 2,
}


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_one_tube_query_opens_only_that_tubes_files(lake, name) -> None:
    """Guards reading the whole table before filtering (the old DuckDB path called
    ``to_table()`` on everything; a Polars filter after a window would also defeat push-down):
    the traits files opened are exactly tube 1's 8 (2 years x 2 depth bands x 2 commits) of
    32, and the answer is the tube's 12 images (latest version only, except traits_all)."""
    reader, counter, n_files, tube1 = lake
    counter.reset()
    n = QUERIES[name](reader)
    opened = {p.split("traits/", 1)[1] for p in counter.parquet_opened()
              if p.startswith("traits/") or "/traits/" in p}
    assert n == 12
    assert opened == tube1, f"{name} opened {len(opened)} traits files of {n_files}"
    assert len(opened) < n_files
