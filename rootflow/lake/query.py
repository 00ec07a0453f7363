"""Reading the lake for analysis: DuckDB relations, Polars lazy frames, pandas or Arrow.

Builds on :class:`rootflow.lake.Lake` (never the reverse). Every engine scans the same lazy
``pyarrow`` dataset of the Delta table (:meth:`Lake.dataset`): DuckDB registers it as a view
(its ``delta`` extension would be a download), Polars wraps it with ``pl.scan_pyarrow_dataset``,
pandas/Arrow read it with a filter. Nothing is read before a query runs; filters on partition
columns (``year``, ``tube``, ``depth``) skip whole files, other filters skip files and Parquet
row groups by their min/max statistics (``tests/lake/test_lazy_scan.py`` counts the files each
engine actually opens).

**Latest** (the default): for each image and producer (``model_name``), the newest model
version that has a row for that image. Versions are content hashes with no order of their own,
so "newest" is the time the version first committed traits to the lake (the ``versions`` table,
written insert-only: a forced re-run of an old version does not make it newer). Images that the
newest version has not re-processed yet keep their older version's row. ``pin={"rootsam":
"abc"}`` shows only that version's rows for that producer; ``latest=False`` shows every version
side by side. ``as_of`` (a table version number or a time) reads the table as it was then.

Filters are delta-rs tuple filters (``[("year", "=", 2016), ("tube", "=", 64)]``, a list of
lists for OR).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from rootflow.io.storage import StorageLike
from rootflow.lake.schema import ALL_TABLES
from rootflow.lake.tables import Lake, sql_literal, string_field

Engine = Literal["pandas", "polars", "duckdb", "arrow"]
Filter = Sequence[tuple[str, str, Any]] | Sequence[Sequence[tuple[str, str, Any]]]
AsOf = int | dt.datetime | str | None

_PARTITIONS = ("year", "tube", "depth")
_GROUP = ("year", "tube", "depth", "image_id", "model_name")
"""Latest is chosen per (image_id, model_name); year/tube/depth are fixed by the image (they come
from its file name), so adding them changes nothing but lets DuckDB push partition filters below
the window that picks the latest row."""


def _lake(lake: Lake | str, storage_options: StorageLike = None) -> Lake:
    return lake if isinstance(lake, Lake) else Lake(lake, storage_options=storage_options)


# -- versions -----------------------------------------------------------------------------------
def versions(lake: Lake | str, *, counts: bool = True,
             storage_options: StorageLike = None) -> pa.Table:
    """Producer/model versions in the lake, oldest first per producer: ``first_committed_at``,
    ``first_run_id``, ``rows`` (with ``counts``: a scan of ``traits``) and ``rank`` (0 =
    oldest), see :meth:`Lake.versions`."""
    return _lake(lake, storage_options).versions(counts=counts)


def latest_versions(lake: Lake | str, *, storage_options: StorageLike = None) -> dict[str, str]:
    """``{model_name: model_version}`` of each producer's newest version (by first commit).

    Not a row filter: an image the newest version has not processed keeps an older row in
    :func:`traits`."""
    out: dict[str, str] = {}
    for r in versions(lake, storage_options=storage_options).to_pylist():
        if r["rows"]:
            out[r["model_name"]] = r["model_version"]
    return dict(sorted(out.items()))


def _ranks(lk: Lake) -> pa.Table:
    v = lk.versions()
    return pa.table({"model_name": v["model_name"], "model_version": v["model_version"],
                     "__rank": v["rank"]})


# -- filters ------------------------------------------------------------------------------------
def _is_dnf(filters: Filter) -> bool:
    return bool(filters) and isinstance(filters[0], list | tuple) and bool(filters[0]) and \
        isinstance(filters[0][0], list | tuple)


def _conjunctions(filters: Filter | None) -> list[list[tuple[str, str, Any]]]:
    if not filters:
        return []
    if _is_dnf(filters):
        return [list(c) for c in filters]  # type: ignore[arg-type]
    return [list(filters)]  # type: ignore[arg-type]


def _partition_part(filters: Filter | None) -> Any:
    """The part of ``filters`` on partition columns, for file pruning (None if any OR-branch
    has no partition term: then nothing can be pruned safely)."""
    conj = _conjunctions(filters)
    if not conj:
        return None
    parts = [[f for f in c if f[0] in _PARTITIONS] for c in conj]
    if any(not p for p in parts):
        return None
    return parts[0] if len(parts) == 1 else parts


def _fold_dnf(filters: Filter | None, term: Any) -> Any:
    """OR of ANDs of ``term(col, op, value)`` over the DNF ``filters`` (None when empty);
    works for pyarrow and Polars expressions alike, both overloading ``&`` and ``|``."""
    out = None
    for conj in _conjunctions(filters):
        e = None
        for col, op, value in conj:
            t = term(col, op, value)
            e = t if e is None else (e & t)
        if e is not None:
            out = e if out is None else (out | e)
    return out


def _pin_filters(pin: Mapping[str, str] | None) -> list[tuple[str, str, Any]]:
    """Pins as row conditions: for a pinned producer keep only the pinned version."""
    return [("__pin__", name, version) for name, version in sorted((pin or {}).items())]


def _row_filter(filters: Filter | None, pin: Mapping[str, str] | None = None) -> pc.Expression | None:
    expr = _fold_dnf(filters, _term)
    for _, name, version in _pin_filters(pin):
        e = (string_field("model_name") != name) | (string_field("model_version") == version)
        expr = e if expr is None else (expr & e)
    return expr


_OPS = ("=", "==", "!=", "<", "<=", ">", ">=", "in", "not in")


def _compare(c: Any, op: str, value: Any, isin: Callable[[list[Any]], Any]) -> Any:
    """``c op value`` for an Arrow or a Polars column expression (same operators, same rules)."""
    ops = {"=": c.__eq__, "==": c.__eq__, "!=": c.__ne__, "<": c.__lt__, "<=": c.__le__,
           ">": c.__gt__, ">=": c.__ge__}
    if op in ops:
        return ops[op](value)
    if op == "in":
        return isin(list(value))
    if op == "not in":
        return ~isin(list(value))
    raise ValueError(f"unsupported filter op {op!r}; use one of {list(_OPS)}")


def _term(col: str, op: str, value: Any) -> pc.Expression:
    values = value if isinstance(value, list | tuple | set) else [value]
    f = string_field(col) if any(isinstance(v, str) for v in values) else pc.field(col)
    return _compare(f, op, value, f.isin)


def _polars_term(col: str, op: str, value: Any) -> Any:
    import polars as pl

    c = pl.col(col)
    return _compare(c, op, value, c.is_in)


def _sql_filter(filters: Filter | None, pin: Mapping[str, str] | None = None) -> str:
    ors = []
    for conj in _conjunctions(filters):
        ands = []
        for col, op, value in conj:
            if not col.isidentifier():
                raise ValueError(f"bad column name {col!r}")
            if op in ("in", "not in"):
                vals = ", ".join(sql_literal(v) for v in value)
                ands.append(f'"{col}" {op.upper()} ({vals})')
            else:
                sql_op = "=" if op == "==" else op
                if sql_op not in ("=", "!=", "<", "<=", ">", ">="):
                    raise ValueError(f"unsupported filter op {op!r}; use one of {list(_OPS)}")
                ands.append(f'"{col}" {sql_op} {sql_literal(value)}')
        if ands:
            ors.append("(" + " AND ".join(ands) + ")")
    where = [" OR ".join(ors)] if ors else []
    for _, name, version in _pin_filters(pin):
        where.append(f"(model_name != {sql_literal(name)} OR model_version = "
                     f"{sql_literal(version)})")
    return (" WHERE " + " AND ".join(f"({w})" for w in where)) if where else ""


# -- the dataset ----------------------------------------------------------------------------------
def traits_dataset(lake: Lake | str, *, filters: Filter | None = None,
                   pin: Mapping[str, str] | None = None, as_of: AsOf = None,
                   storage_options: StorageLike = None) -> tuple[pads.Dataset, pc.Expression | None]:
    """The lazy, partition-pruned traits dataset and the row filter still to apply (filters
    and pins; "latest" is applied by :func:`traits`)."""
    lk = _lake(lake, storage_options)
    ds = lk.dataset("traits", version=as_of, partitions=_partition_part(filters))
    return ds, _row_filter(filters, pin)


def _keep_latest_arrow(t: pa.Table, ranks: pa.Table) -> pa.Table:
    """Rows whose version is the newest (highest rank) of their (image, producer)."""
    if t.num_rows == 0:
        return t
    sep = "\x1f"

    def key(a: Any, b: Any) -> Any:
        return pc.binary_join_element_wise(pc.cast(a, pa.string()), pc.cast(b, pa.string()), sep)

    rank_keys = key(ranks["model_name"], ranks["model_version"])
    rank = pc.take(ranks["__rank"], pc.index_in(key(t["model_name"], t["model_version"]),
                                                value_set=rank_keys))
    rank = pc.fill_null(rank, -1)
    group = key(t["image_id"], t["model_name"])
    best = pa.table({"g": group, "r": rank}).group_by("g", use_threads=False).aggregate(
        [("r", "max")])
    best_for_row = pc.take(best["r_max"], pc.index_in(group, value_set=best["g"]))
    return t.filter(pc.equal(rank, best_for_row))


def traits(lake: Lake | str, *, engine: Engine = "pandas", latest: bool = True,
           pin: Mapping[str, str] | None = None, filters: Filter | None = None,
           columns: list[str] | None = None, as_of: AsOf = None,
           storage_options: StorageLike = None) -> Any:
    """The traits table as ``engine`` wants it (same rows for every engine).

    Args:
        latest: per image and producer, only the newest version's row (see module docs).
        pin: ``{model_name: model_version}``: only that version for that producer.
        filters: delta-rs tuple filters; partition columns prune files.
        columns: the columns to return (projection push-down).
        as_of: read the table as of a version number or a time (``datetime``/ISO string).

    Returns:
        pandas ``DataFrame`` / ``pa.Table`` (materialized), a Polars ``LazyFrame`` or a DuckDB
        relation (both lazy; the relation's connection has the views of
        :func:`duckdb_connection`).
    """
    if engine not in ("pandas", "polars", "duckdb", "arrow"):
        raise ValueError(f"engine must be pandas, polars, duckdb or arrow, got {engine!r}")
    lk = _lake(lake, storage_options)
    if not lk.exists("traits"):
        empty = lk.schema("traits").empty_table()
        return _from_arrow(empty.select(columns) if columns else empty, engine)
    if engine == "polars":
        return polars_traits(lk, latest=latest, pin=pin, filters=filters, columns=columns,
                             as_of=as_of)
    if engine == "duckdb":
        con = duckdb_connection(lk, latest=latest, pin=pin, filters=filters, as_of=as_of)
        rel = con.table("traits")
        return rel.select(*columns) if columns else rel
    ds, expr = traits_dataset(lk, filters=filters, pin=pin, as_of=as_of)
    need = None
    if columns is not None:
        need = list(dict.fromkeys([*columns, *(("image_id", "model_name", "model_version")
                                                if latest else ())]))
    t = ds.to_table(columns=need, filter=expr)
    if latest:
        t = _keep_latest_arrow(t, _ranks(lk))
    if columns is not None:
        t = t.select(columns)
    return _from_arrow(t, engine)


def _from_arrow(t: pa.Table, engine: Engine) -> Any:
    if engine == "arrow":
        return t
    if engine == "pandas":
        return t.to_pandas()
    if engine == "polars":
        import polars as pl

        return pl.from_arrow(t).lazy()  # type: ignore[union-attr]
    if engine == "duckdb":
        import duckdb

        con = duckdb.connect()
        con.register("traits", t)
        return con.table("traits")
    raise ValueError(f"engine must be pandas, polars, duckdb or arrow, got {engine!r}")


def polars_traits(lake: Lake | str, *, latest: bool = True, pin: Mapping[str, str] | None = None,
                  filters: Filter | None = None, columns: list[str] | None = None,
                  as_of: AsOf = None, storage_options: StorageLike = None) -> Any:
    """A Polars ``LazyFrame`` over the traits dataset (``pl.scan_pyarrow_dataset``: filters and
    projections are pushed into the scan), latest-version selection and pins applied."""
    import polars as pl

    lk = _lake(lake, storage_options)
    if not lk.exists("traits"):
        empty = lk.schema("traits").empty_table()
        return pl.from_arrow(empty.select(columns) if columns else empty).lazy()  # type: ignore[union-attr]
    ds = lk.dataset("traits", version=as_of, partitions=_partition_part(filters))
    lf = pl.scan_pyarrow_dataset(ds)
    expr = _fold_dnf(filters, _polars_term)
    for _, name, version in _pin_filters(pin):
        e = (pl.col("model_name") != name) | (pl.col("model_version") == version)
        expr = e if expr is None else (expr & e)
    if expr is not None:
        lf = lf.filter(expr)
    if latest:
        ranks = pl.from_arrow(_ranks(lk)).lazy()  # type: ignore[union-attr]
        lf = (lf.join(ranks, on=["model_name", "model_version"], how="left",
                      maintain_order="left")
              .with_columns(pl.col("__rank").fill_null(-1))
              .filter(pl.col("__rank") == pl.col("__rank").max().over(list(_GROUP)))
              .drop("__rank"))
    return lf.select(columns) if columns else lf


# -- DuckDB ---------------------------------------------------------------------------------------
def duckdb_connection(lake: Lake | str, *, latest: bool = True,
                      pin: Mapping[str, str] | None = None, filters: Filter | None = None,
                      as_of: AsOf = None, storage_options: StorageLike = None,
                      con: Any = None) -> Any:
    """A DuckDB connection with lazy views over the lake's tables.

    ``traits`` (per image and producer the newest version, or the pinned one; every version if
    ``latest=False``), ``traits_all`` (every version), ``runs``, ``rejects``, ``versions``
    (with ``rank``, 0 = oldest per producer; ``rows`` null: see :func:`versions`) and the other tables of
    :data:`rootflow.lake.schema.ALL_TABLES`. Each is a view over the table's Arrow dataset:
    DuckDB pushes projections and filters into the scan, so ``WHERE tube = 1`` opens only
    that tube's files. ``filters`` and ``as_of`` apply to ``traits``/``traits_all``.
    """
    import duckdb

    lk = _lake(lake, storage_options)
    con = con or duckdb.connect()
    for name in ALL_TABLES:
        if name == "versions":
            continue
        if not lk.exists(name):
            src: Any = lk.schema(name).empty_table()
        elif name == "traits":
            src = lk.dataset("traits", version=as_of, partitions=_partition_part(filters))
        else:
            src = lk.dataset(name)
        con.register(f"__{name}_ds", src)
    con.register("__versions_tbl", lk.versions())
    con.execute(f"CREATE OR REPLACE VIEW traits_all AS SELECT * FROM __traits_ds"
                f"{_sql_filter(filters, pin)}")
    if latest:
        con.execute(f"""CREATE OR REPLACE VIEW traits AS
            SELECT * EXCLUDE (__rank) FROM (
                SELECT a.*, COALESCE(v.rank, -1) AS __rank FROM traits_all a
                LEFT JOIN __versions_tbl v
                  ON a.model_name = v.model_name AND a.model_version = v.model_version)
            QUALIFY __rank = max(__rank) OVER (PARTITION BY {", ".join(_GROUP)})""")
    else:
        con.execute("CREATE OR REPLACE VIEW traits AS SELECT * FROM traits_all")
    con.execute("CREATE OR REPLACE VIEW versions AS SELECT * FROM __versions_tbl")
    for name in ALL_TABLES:
        if name not in ("traits", "versions"):
            con.execute(f"CREATE OR REPLACE VIEW {name} AS SELECT * FROM __{name}_ds")
    return con


# -- lineage, pruning -----------------------------------------------------------------------------
def lineage(lake: Lake | str, *, latest: bool = True, filters: Filter | None = None,
            as_of: AsOf = None, storage_options: StorageLike = None) -> pa.Table:
    """Which run wrote each traits row: the row key, ``processed_at`` and the run's kind,
    status, times, code version and model versions (null where the run is not recorded)."""
    con = duckdb_connection(lake, latest=latest, filters=filters, as_of=as_of,
                            storage_options=storage_options)
    return con.sql("""
        SELECT t.image_id, t.file_name, t.model_name, t.model_version, t.run_id,
               t.processed_at, r.job_kind, r.status AS run_status, r.started_at AS run_started_at,
               r.finished_at AS run_finished_at, r.code_version, r.model_versions_json
        FROM traits t LEFT JOIN runs r USING (run_id)
        ORDER BY t.image_id, t.model_name, t.model_version""").to_arrow_table()


def pruned_files(lake: Lake | str, filters: Filter, *,
                 storage_options: StorageLike = None) -> list[str]:
    """The data files a query with ``filters`` plans to read (partition pruning made visible);
    ``tests/lake/test_lazy_scan.py`` checks the files actually opened."""
    lk = _lake(lake, storage_options)
    part = _partition_part(filters)
    return list(lk.delta_table("traits").file_uris(file_pruning_predicate=part)
                if part is not None else lk.delta_table("traits").file_uris())
