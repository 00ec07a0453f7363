"""Reading the lake for analysis: DuckDB relations, Polars lazy frames, pandas or Arrow.

Everything is offline: DuckDB's ``delta_scan`` would download an extension, so DuckDB scans
the table's Arrow dataset (``DeltaTable.to_pyarrow_dataset()``, with filter and projection
push-down); Polars uses ``pl.scan_delta`` (lazy, reads through delta-rs's log).

"Latest" (the default) keeps, for each ``model_name``, only the model version that produced
rows most recently (largest ``max(processed_at)``). Version strings are free text (a sha, a
tag), so "most recently used" is the one order that always exists; pass ``latest=False`` to
see every version side by side, e.g. to compare two versions.

Filters are delta-rs tuple filters (``[("year", "=", 2016), ("tube", "=", 64)]``, a list of
lists for OR). Filters on partition columns (``year``, ``tube``, ``depth``) prune whole files
before anything is read; other columns are filtered row by row.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from rootflow.io.storage import StorageLike
from rootflow.lake.tables import Lake, sql_literal, string_field

Engine = Literal["pandas", "polars", "duckdb", "arrow"]
Filter = Sequence[tuple[str, str, Any]] | Sequence[Sequence[tuple[str, str, Any]]]


def _lake(lake: Lake | str, storage_options: StorageLike = None) -> Lake:
    return lake if isinstance(lake, Lake) else Lake(lake, storage_options=storage_options)


def latest_versions(lake: Lake | str, *, storage_options: StorageLike = None,
                    filters: Filter | None = None) -> dict[str, str]:
    """``{model_name: model_version}`` of the version that wrote rows most recently."""
    lk = _lake(lake, storage_options)
    if not lk.exists("traits"):
        return {}
    g = lk.sql("traits", "SELECT model_name, model_version, MAX(processed_at) AS processed_at_max "
               f"FROM traits{_sql_filter(filters)} GROUP BY model_name, model_version")
    best: dict[str, tuple[Any, str]] = {}
    for r in g.to_pylist():
        cand = (r["processed_at_max"], r["model_version"])
        if r["model_name"] not in best or cand > best[r["model_name"]]:
            best[r["model_name"]] = cand
    return {k: v[1] for k, v in sorted(best.items())}


def _versions_expr(versions: dict[str, str]) -> pc.Expression | None:
    expr = None
    for name, version in versions.items():
        e = (string_field("model_name") == name) & (string_field("model_version") == version)
        expr = e if expr is None else (expr | e)
    return expr


def _is_dnf(filters: Filter) -> bool:
    return bool(filters) and isinstance(filters[0], list | tuple) and bool(filters[0]) and \
        isinstance(filters[0][0], list | tuple)


def _conjunctions(filters: Filter | None) -> list[list[tuple[str, str, Any]]]:
    if not filters:
        return []
    if _is_dnf(filters):
        return [list(c) for c in filters]  # type: ignore[arg-type]
    return [list(filters)]  # type: ignore[arg-type]


_PARTITIONS = ("year", "tube", "depth")


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


def _row_filter(filters: Filter | None) -> pc.Expression | None:
    return _fold_dnf(filters, _term)


def _term(col: str, op: str, value: Any) -> pc.Expression:
    values = value if isinstance(value, list | tuple | set) else [value]
    f = string_field(col) if any(isinstance(v, str) for v in values) else pc.field(col)
    ops = {"=": f.__eq__, "==": f.__eq__, "!=": f.__ne__, "<": f.__lt__, "<=": f.__le__,
           ">": f.__gt__, ">=": f.__ge__}
    if op in ops:
        return ops[op](value)
    if op == "in":
        return f.isin(list(value))
    if op == "not in":
        return ~f.isin(list(value))
    raise ValueError(f"unsupported filter op {op!r}; use one of {sorted([*ops, 'in', 'not in'])}")


def traits_dataset(lake: Lake | str, *, latest: bool = True, filters: Filter | None = None,
                   storage_options: StorageLike = None) -> tuple[pads.Dataset, pc.Expression | None]:
    """The partition-pruned traits dataset and the row filter still to apply (latest + filters)."""
    lk = _lake(lake, storage_options)
    ds = lk.dataset("traits", partitions=_partition_part(filters))
    expr = _row_filter(filters)
    if latest:
        vexpr = _versions_expr(latest_versions(lk, filters=filters))
        if vexpr is not None:
            expr = vexpr if expr is None else (expr & vexpr)
    return ds, expr


def traits(lake: Lake | str, *, engine: Engine = "pandas", latest: bool = True,
           filters: Filter | None = None, columns: list[str] | None = None,
           storage_options: StorageLike = None) -> Any:
    """The traits table as ``engine`` wants it.

    Returns:
        pandas ``DataFrame`` / ``pa.Table`` (materialized), a Polars ``LazyFrame``
        (``pl.scan_delta``) or a DuckDB relation (lazy; its connection has the view
        ``traits``).
    """
    lk = _lake(lake, storage_options)
    if not lk.exists("traits"):
        empty = lk.schema("traits").empty_table()
        if columns:
            empty = empty.select(columns)
        return _from_arrow(empty, engine)
    if engine == "polars":
        return polars_traits(lk, latest=latest, filters=filters, columns=columns)
    if engine == "duckdb":
        con = duckdb_connection(lk, latest=latest, filters=filters)
        rel = con.table("traits")
        return rel.select(*columns) if columns else rel
    ds, expr = traits_dataset(lk, latest=latest, filters=filters)
    return _from_arrow(ds.to_table(columns=columns, filter=expr), engine)


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


def polars_traits(lake: Lake | str, *, latest: bool = True, filters: Filter | None = None,
                  columns: list[str] | None = None, storage_options: StorageLike = None) -> Any:
    """``pl.scan_delta`` of the traits table with the latest-version and row filters applied."""
    import polars as pl

    lk = _lake(lake, storage_options)
    lf = pl.scan_delta(lk.traits_uri, storage_options=lk.delta_storage_options())
    expr = _polars_expr(filters)
    if latest:
        vs = latest_versions(lk, filters=filters)
        vexpr = None
        for name, version in vs.items():
            e = (pl.col("model_name") == name) & (pl.col("model_version") == version)
            vexpr = e if vexpr is None else (vexpr | e)
        if vexpr is not None:
            expr = vexpr if expr is None else (expr & vexpr)
    if expr is not None:
        lf = lf.filter(expr)
    return lf.select(columns) if columns else lf


def _polars_expr(filters: Filter | None) -> Any:
    return _fold_dnf(filters, _polars_term)


def _polars_term(col: str, op: str, value: Any) -> Any:
    import polars as pl

    c = pl.col(col)
    if op in ("=", "=="):
        return c == value
    if op == "!=":
        return c != value
    if op == "<":
        return c < value
    if op == "<=":
        return c <= value
    if op == ">":
        return c > value
    if op == ">=":
        return c >= value
    if op == "in":
        return c.is_in(list(value))
    if op == "not in":
        return ~c.is_in(list(value))
    raise ValueError(f"unsupported filter op {op!r}")


def duckdb_connection(lake: Lake | str, *, latest: bool = True, filters: Filter | None = None,
                      storage_options: StorageLike = None, con: Any = None) -> Any:
    """A DuckDB connection with views ``traits`` (latest versions unless ``latest=False``),
    ``traits_all`` (every version), ``runs`` and ``rejects`` over the tables' Arrow datasets.

    ``filters`` on partition columns (``year``, ``tube``, ``depth``) prune files before anything
    is read; the selected data is then handed to DuckDB as Arrow tables (see the comment inside
    on why not as a lazily scanned dataset).
    """
    import duckdb

    lk = _lake(lake, storage_options)
    con = con or duckdb.connect()
    names: tuple[Literal["traits", "runs", "rejects"], ...] = ("traits", "runs", "rejects")
    for name in names:
        if not lk.exists(name):
            con.register(f"__{name}_ds", lk.schema(name).empty_table())
        elif name == "traits":
            # Registered as an Arrow table read through pyarrow, not as a dataset: DuckDB would
            # push its filters into the dataset scan, and pyarrow cannot evaluate them against
            # the string_view columns that delta-rs's MERGE writes. Partition filters still prune
            # files before anything is read.
            con.register("__traits_ds", lk.dataset(
                "traits", partitions=_partition_part(filters)).to_table())
        else:
            con.register(f"__{name}_ds", lk.dataset(name).to_table())
    where = _sql_filter(filters)
    con.execute(f"CREATE OR REPLACE VIEW traits_all AS SELECT * FROM __traits_ds{where}")
    pairs = latest_versions(lk, filters=filters) if latest and lk.exists("traits") else {}
    if pairs:
        values = ", ".join(f"({sql_literal(n)}, {sql_literal(v)})" for n, v in pairs.items())
        con.execute("CREATE OR REPLACE VIEW traits AS SELECT * FROM traits_all "
                    f"WHERE (model_name, model_version) IN (VALUES {values})")
    else:
        con.execute("CREATE OR REPLACE VIEW traits AS SELECT * FROM traits_all")
    con.execute("CREATE OR REPLACE VIEW runs AS SELECT * FROM __runs_ds")
    con.execute("CREATE OR REPLACE VIEW rejects AS SELECT * FROM __rejects_ds")
    return con


def _sql_filter(filters: Filter | None) -> str:
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
                    raise ValueError(f"unsupported filter op {op!r}")
                ands.append(f'"{col}" {sql_op} {sql_literal(value)}')
        if ands:
            ors.append("(" + " AND ".join(ands) + ")")
    return (" WHERE " + " OR ".join(ors)) if ors else ""


def pruned_files(lake: Lake | str, filters: Filter, *,
                 storage_options: StorageLike = None) -> list[str]:
    """The data files a query with ``filters`` reads (partition pruning made visible)."""
    lk = _lake(lake, storage_options)
    part = _partition_part(filters)
    return list(lk.delta_table("traits").file_uris(file_pruning_predicate=part)
                if part is not None else lk.delta_table("traits").file_uris())
