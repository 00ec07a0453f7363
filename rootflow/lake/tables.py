"""The lake: every Delta write of rootflow goes through :class:`Lake`.

Three tables live under one root URI: ``traits`` (one row per image x producer x model
version, partitioned by ``year``/``tube``/``depth``), ``runs`` (one row per run) and
``rejects`` (one row per manifest row that failed in a run, with the reason).

Why MERGE and not append: a run that dies half-way and is re-run, or a Ray block retried
after a worker loss, commits the same rows again. MERGE on the row key (``image_id``,
``model_name``, ``model_version``) makes that harmless: the second commit updates, the table
still holds one row per key; a new model version has a different key and lands beside the old.
Ray Data's ``write_delta`` (alpha, append-only) cannot do this, so the pipeline hands rows to
:meth:`Lake.commit_traits` in large batches instead.

Why retries: several jobs may write the same table at once. delta-rs commits by writing the
next ``_delta_log/NNN.json`` with put-if-absent (on S3 that needs ``conditional_put=etag``,
which :meth:`StorageOptions.deltalake` sets; object_store 0.13 in deltalake 1.6 reads the
key ``conditional_put``/``aws_conditional_put``). A writer that loses the race re-checks for
logical conflicts and retries itself a few times; when it still gives up it raises
``CommitFailedError``, and we retry the whole operation on a fresh snapshot with jittered
exponential backoff so that contending writers spread out instead of colliding again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal, TypeAlias, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from rootflow.io import storage as _storage
from rootflow.io.storage import StorageLike, StorageOptions
from rootflow.lake import schema as _schema

log = logging.getLogger(__name__)

T = TypeVar("T")
Rows: TypeAlias = "pa.Table | Sequence[Mapping[str, Any]]"
Engine = Literal["pandas", "polars", "duckdb", "arrow"]

_SECRET_WORDS = ("secret", "password", "token", "access_key", "credential", "private_key")
_SECRET_KEYS = {"key", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"}


class LakeError(RuntimeError):
    """A write the lake refuses (bad rows, missing columns); the message names the problem."""


def utcnow() -> dt.datetime:
    """Naive UTC now at microsecond precision (the tables' timestamp convention)."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def redact(obj: Any) -> Any:
    """Copy of a config structure with credentials replaced by ``***`` (recursively).

    Keys that name a secret (``secret``, ``token``, ``password``, ``key``...) are masked
    whatever their value; :class:`StorageOptions` objects become their ``redacted()`` dict.
    """
    if isinstance(obj, StorageOptions):
        return obj.redacted()
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            ks = str(k).lower()
            secret = ks in _SECRET_KEYS or any(w in ks for w in _SECRET_WORDS)
            out[str(k)] = "***" if secret and v not in (None, "", False) else redact(v)
        return out
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    return obj


class Lake:
    """The ``traits``, ``runs`` and ``rejects`` Delta tables under one root.

    Args:
        uri: root (local path or ``s3://bucket/prefix``); tables at ``<uri>/traits`` etc.
        storage_options: :class:`StorageOptions`, a dict of its fields, or None (environment).
        trait_schema: the trait columns; default :func:`rootflow.traits.trait_schema`.
        max_retries: attempts after a commit conflict before giving up.

    Creating a Lake touches no storage; tables are created by their first write.
    """

    def __init__(
        self,
        uri: str,
        storage_options: StorageLike = None,
        *,
        trait_schema: pa.Schema | None = None,
        max_retries: int = 10,
        backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
    ) -> None:
        self.uri = _storage.normalize(uri).rstrip("/")
        self.storage = StorageOptions.from_mapping(storage_options)
        self._trait_schema = trait_schema
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.n_conflicts = 0
        """Commit conflicts met (and retried) by this object; tests and benchmarks read it."""

    # -- locations --------------------------------------------------------------------------
    def table_uri(self, name: Literal["traits", "runs", "rejects"]) -> str:
        return _storage.join(self.uri, name)

    @property
    def traits_uri(self) -> str:
        return self.table_uri("traits")

    @property
    def runs_uri(self) -> str:
        return self.table_uri("runs")

    @property
    def rejects_uri(self) -> str:
        return self.table_uri("rejects")

    def delta_storage_options(self) -> dict[str, str] | None:
        """``storage_options`` for deltalake (None for local tables)."""
        return self.storage.deltalake() if _storage.is_remote(self.uri) else None

    # -- schemas ----------------------------------------------------------------------------
    def schema(self, name: Literal["traits", "runs", "rejects"] | str) -> pa.Schema:
        if name == "traits":
            return _schema.traits_schema(self._trait_schema)
        if name == "runs":
            return _schema.RUNS_SCHEMA
        if name in _schema.EXTRA_TABLES:
            return _schema.EXTRA_TABLES[name][0]
        return _schema.rejects_schema()

    # -- public writes ----------------------------------------------------------------------
    def commit_traits(self, rows: Rows) -> int:
        """MERGE traits rows on (image_id, model_name, model_version); returns rows written.

        Rows may be a ``pa.Table`` or a list of dicts (numpy scalars are fine). They are cast
        to the traits schema; missing nullable columns are filled with nulls, missing required
        columns are an error naming them, unknown columns are added to the table as new
        nullable columns (schema evolution). Duplicate keys inside one call keep the last row.
        """
        now = utcnow()
        table = self._prepare(rows, self.schema("traits"), defaults={"processed_at": now},
                              what="traits")
        if table.num_rows == 0:
            return 0
        _check_model_names(table)
        table = _dedupe(table, _schema.TRAITS_KEY)
        key = (*_schema.TRAITS_KEY, "year", "tube")  # year/tube come from the file name: stable
        self._merge("traits", table, key=key, partition_by=_schema.TRAITS_PARTITION_BY)
        return table.num_rows

    def commit_rows(self, name: str, rows: Rows) -> int:
        """MERGE rows into one of :data:`rootflow.lake.schema.EXTRA_TABLES` on its key.

        The same contract as :meth:`commit_traits` (cast to the table's schema, required
        columns checked, duplicate keys in one call keep the last row, ``processed_at``
        defaults to now): re-committing the same keys updates rows and never duplicates them.

        Raises:
            LakeError: an unknown table name (the message lists the valid ones) or bad rows.
        """
        if name not in _schema.EXTRA_TABLES:
            raise LakeError(f"unknown table {name!r} for commit_rows; valid: "
                            f"{sorted(_schema.EXTRA_TABLES)}")
        schema, key, partition_by = _schema.EXTRA_TABLES[name]
        table = self._prepare(rows, schema, defaults={"processed_at": utcnow()}, what=name)
        if table.num_rows == 0:
            return 0
        table = _dedupe(table, key)
        merge_key = (*key, *[p for p in partition_by if p not in key and p != "depth"])
        self._merge(name, table, key=merge_key, partition_by=partition_by)  # type: ignore[arg-type]
        return table.num_rows

    def commit_rejects(self, rows: Rows) -> int:
        """MERGE reject rows on (run_id, image_id, model_name); returns rows written.

        Rows carry the manifest columns they have plus ``run_id``, ``model_name``, ``stage``,
        ``reason`` (``at`` defaults to now).
        """
        table = self._prepare(rows, self.schema("rejects"), defaults={"at": utcnow()},
                              what="rejects")
        if table.num_rows == 0:
            return 0
        table = _dedupe(table, _schema.REJECTS_KEY)
        self._merge("rejects", table, key=_schema.REJECTS_KEY, partition_by=())
        return table.num_rows

    def start_run(
        self,
        *,
        run_id: str,
        job_kind: str,
        manifest_uri: str | None,
        config: Mapping[str, Any] | None,
        model_versions: Mapping[str, str] | None,
        code_version: str | None,
        scope: str | None = None,
    ) -> None:
        """Record a run as ``running`` (idempotent on ``run_id``). Credentials are redacted.

        ``scope`` (or ``config["scope"]``) names what the run covers; :meth:`lease_holder`
        uses it so that two runs over the same scope do not work at once.
        """
        cfg = redact(dict(config or {}))
        now = utcnow()
        row = {
            "run_id": run_id,
            "job_kind": job_kind,
            "status": "running",
            "started_at": now,
            "heartbeat_at": now,
            "finished_at": None,
            "manifest_uri": manifest_uri,
            "scope": scope if scope is not None else (str(cfg["scope"]) if "scope" in cfg else None),
            "config_json": json.dumps(cfg, sort_keys=True, default=str),
            "model_versions_json": json.dumps(dict(model_versions or {}), sort_keys=True),
            "code_version": code_version,
            "n_ok": None,
            "n_rejected": None,
            "schema_version": _schema.SCHEMA_VERSION,
        }
        table = self._prepare([row], _schema.RUNS_SCHEMA, defaults={}, what="runs")
        self._merge("runs", table, key=_schema.RUNS_KEY, partition_by=(), update=False)

    def heartbeat(self, run_id: str) -> None:
        """Mark a running run alive (its lease in :meth:`lease_holder` stays valid)."""
        self._update_run(run_id, {"heartbeat_at": utcnow()})

    def finish_run(self, run_id: str, *, n_ok: int, n_rejected: int, status: str) -> None:
        """Close a run: status (``ok``, ``ok_with_rejects``, ``failed``...), counts, end time."""
        now = utcnow()
        self._update_run(run_id, {"status": status, "n_ok": int(n_ok),
                                  "n_rejected": int(n_rejected), "finished_at": now,
                                  "heartbeat_at": now})

    # -- public reads -----------------------------------------------------------------------
    def exists(self, name: Literal["traits", "runs", "rejects"] = "traits") -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(self.table_uri(name), self.delta_storage_options())

    def delta_table(self, name: Literal["traits", "runs", "rejects"] = "traits",
                    *, version: int | None = None) -> Any:
        """The ``deltalake.DeltaTable`` (raises ``TableNotFoundError`` if not written yet)."""
        from deltalake import DeltaTable

        return DeltaTable(self.table_uri(name), version=version,
                          storage_options=self.delta_storage_options())

    def dataset(self, name: Literal["traits", "runs", "rejects"] = "traits", *,
                version: int | None = None, partitions: Any = None) -> Any:
        """A ``pyarrow.dataset.Dataset`` over the table's current files (partition-pruned)."""
        return _to_dataset(self.delta_table(name, version=version), self.storage,
                           partitions=partitions)

    def read(self, name: Literal["traits", "runs", "rejects"] = "traits", *,
             columns: list[str] | None = None, filter: Any = None) -> pa.Table:
        """Whole table (or ``columns``, rows matching a ``pyarrow.compute`` ``filter``)."""
        if not self.exists(name):
            return self.schema(name).empty_table() if columns is None else \
                self.schema(name).empty_table().select(columns)
        return self.dataset(name).to_table(columns=columns, filter=filter)

    def done_image_ids(self, *, model_name: str, model_version: str) -> set[str]:
        """Ids of images that already have a traits row for this producer and version."""
        if not self.exists("traits"):
            return set()
        # DataFusion (delta-rs's own engine) scans the files in parallel in Rust: on a table of
        # hundreds of partitions it is several times faster than building a pyarrow dataset.
        ids = self.sql("traits", "SELECT DISTINCT image_id FROM traits WHERE model_name = "
                       f"{sql_literal(model_name)} AND model_version = {sql_literal(model_version)}")
        return set(ids.column("image_id").to_pylist())

    def sql(self, name: Literal["traits", "runs", "rejects"], query: str) -> pa.Table:
        """Run a SQL query over one table with delta-rs's DataFusion engine (table name =
        ``name``); strings come back as plain ``string``."""
        from deltalake import QueryBuilder

        reader = QueryBuilder().register(name, self.delta_table(name)).execute(query)
        t = pa.table(reader.read_all())
        return t.cast(pa.schema([f.with_type(pa.string()) if pa.types.is_string_view(f.type)
                                 else f for f in t.schema]))

    def runs(self) -> pa.Table:
        """The runs table, newest first."""
        t = self.read("runs")
        return t.sort_by([("started_at", "descending")]) if t.num_rows else t

    def lease_holder(self, *, scope: str, ttl_s: float) -> str | None:
        """The live run holding ``scope``: earliest-started ``running`` run with a heartbeat
        younger than ``ttl_s`` (ties: smallest run id); None when no run is live.

        The runs table is the lock: runs killed mid-way stop heart-beating and lose the lease
        after ``ttl_s``, so a re-run can take over their work.
        """
        if not self.exists("runs"):
            return None
        expr = (string_field("scope") == scope) & (string_field("status") == "running")
        t = self.dataset("runs").to_table(columns=["run_id", "started_at", "heartbeat_at"],
                                          filter=expr)
        cutoff = utcnow() - dt.timedelta(seconds=ttl_s)
        live = [r for r in t.to_pylist()
                if (r["heartbeat_at"] or r["started_at"]) >= cutoff]
        if not live:
            return None
        live.sort(key=lambda r: (r["started_at"], r["run_id"]))
        return str(live[0]["run_id"])

    def traits(self, *, engine: Engine = "pandas", latest: bool = True,
               filters: Any = None, columns: list[str] | None = None) -> Any:
        """The traits table for analysis (see :mod:`rootflow.lake.query`)."""
        from rootflow.lake import query

        return query.traits(self, engine=engine, latest=latest, filters=filters, columns=columns)

    # -- internals --------------------------------------------------------------------------
    def _update_run(self, run_id: str, values: Mapping[str, Any]) -> None:
        cols = ["run_id", *values]
        fields = [_schema.RUNS_SCHEMA.field(c) for c in cols]
        src = pa.Table.from_pylist([{"run_id": run_id, **values}],
                                   schema=pa.schema([f.with_nullable(True) for f in fields]))
        updates = {c: f"s.{c}" for c in values}

        def op() -> None:
            if not self.exists("runs"):
                raise LakeError(f"run {run_id!r} was never started (no runs table at "
                                f"{self.runs_uri})")
            dtable = self.delta_table("runs")
            res = (dtable.merge(src, predicate="t.run_id = s.run_id", source_alias="s",
                                target_alias="t", streamed_exec=False)
                   .when_matched_update(updates=updates).execute())
            if not res.get("num_target_rows_updated"):
                raise LakeError(f"run {run_id!r} is not in the runs table at {self.runs_uri}")

        self._retry(op, what=f"runs update of {run_id}")

    def _ensure(self, name: Literal["traits", "runs", "rejects"], schema: pa.Schema,
                partition_by: Sequence[str]) -> None:
        from deltalake import CommitProperties, DeltaTable

        if self.exists(name):
            return
        # Writers that start together all see "no table". With retries, delta-rs rebases a
        # losing CREATE onto the winner's as a second CREATE TABLE version (seen with three
        # concurrent writers); without retries the loser fails, and a table that exists now is
        # all it wanted.
        try:
            DeltaTable.create(
                self.table_uri(name), schema=schema, mode="error",
                partition_by=list(partition_by) or None,
                name=f"rootflow_{name}",
                description=f"rootflow {name} table (schema version {_schema.SCHEMA_VERSION})",
                storage_options=self.delta_storage_options(),
                commit_properties=CommitProperties(max_commit_retries=0),
            )
        except Exception:
            if not self.exists(name):
                raise

    def _merge(self, name: Literal["traits", "runs", "rejects"], table: pa.Table, *,
               key: Sequence[str], partition_by: Sequence[str], update: bool = True) -> None:
        predicate = " AND ".join(f"t.{k} = s.{k}" for k in key)

        def op() -> None:
            self._ensure(name, self.schema(name), partition_by)
            dtable = self.delta_table(name)
            src = _align_to_table(table, dtable)
            new_cols = sorted(set(src.column_names) - set(pa.schema(dtable.schema().to_arrow()).names))
            if new_cols:
                log.warning("adding column(s) %s to %s (schema evolution)", new_cols, name)
            merger = dtable.merge(src, predicate=predicate, source_alias="s", target_alias="t",
                                  merge_schema=True, streamed_exec=False)
            if update:
                merger = merger.when_matched_update_all()
            merger.when_not_matched_insert_all().execute()

        self._retry(op, what=f"{name} merge of {table.num_rows} rows")

    def _retry(self, op: Callable[[], T], *, what: str) -> T:
        from deltalake.exceptions import CommitFailedError, DeltaError

        attempt = 0
        while True:
            try:
                return op()
            except (CommitFailedError, DeltaError) as e:
                if not _is_conflict(e) or attempt >= self.max_retries:
                    raise
                self.n_conflicts += 1
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                delay *= random.uniform(0.5, 1.5)
                log.info("commit conflict on %s (attempt %d): %s; retrying in %.2fs",
                         what, attempt + 1, str(e).splitlines()[0], delay)
                time.sleep(delay)
                attempt += 1

    def _prepare(self, rows: Rows, schema: pa.Schema, *, defaults: Mapping[str, Any],
                 what: str) -> pa.Table:
        return conform(rows, schema, defaults=defaults, what=what)


# -- helpers ---------------------------------------------------------------------------------
def sql_literal(v: Any) -> str:
    """A SQL literal (strings quoted with ``'`` doubled; numbers as is)."""
    if isinstance(v, str):
        return "'" + v.replace("'", "''") + "'"
    if isinstance(v, bool):
        return "TRUE" if v else "FALSE"
    if isinstance(v, int | float):
        return repr(v)
    raise ValueError(f"cannot use {v!r} as a SQL literal")


def _is_conflict(e: Exception) -> bool:
    from deltalake.exceptions import CommitFailedError

    if isinstance(e, CommitFailedError):
        return True
    msg = str(e).lower()
    return any(s in msg for s in ("version already exists", "already exists", "conflict",
                                  "concurrent", "precondition failed"))


def string_field(name: str) -> pc.Expression:
    """``pc.field(name)`` for a string column, safe to compare with a Python ``str``.

    delta-rs's MERGE (DataFusion) writes strings as Arrow ``string_view`` in the Parquet files
    while the table schema says ``string``; pyarrow then fails to evaluate ``field == "x"``
    against those files ("no kernel matching (string, string_view)"). The cast is a no-op for
    files written with plain strings.
    """
    return pc.field(name).cast(pa.string())


def _to_dataset(dtable: Any, storage: StorageOptions, *, partitions: Any = None) -> Any:
    kw: dict[str, Any] = {}
    if _storage.is_remote(dtable.table_uri):
        import pyarrow.fs as pafs

        root = _storage.strip_protocol(dtable.table_uri).rstrip("/")
        kw["filesystem"] = pafs.SubTreeFileSystem(root, storage.pyarrow())
    if partitions is not None:
        kw["file_pruning_predicate"] = partitions
    return dtable.to_pyarrow_dataset(**kw)


def _check_model_names(table: pa.Table) -> None:
    names = set(pc.unique(table.column("model_name")).to_pylist())
    bad = sorted(n for n in names if n not in _schema.MODEL_NAMES)
    if bad:
        raise LakeError(f"traits rows with unknown model_name {bad}; valid: "
                        f"{list(_schema.MODEL_NAMES)}")


def _dedupe(table: pa.Table, key: Sequence[str]) -> pa.Table:
    """Keep the last row of each key (MERGE refuses several source rows per target row)."""
    idx = pa.array(range(table.num_rows), pa.int64())
    t = table.select(list(key)).append_column("__i", idx)
    last = t.group_by(list(key), use_threads=False).aggregate([("__i", "max")])
    keep = pc.sort_indices(last.column("__i_max"))
    take = pc.take(last.column("__i_max"), keep)
    return table if len(take) == table.num_rows else table.take(take)


def _align_to_table(table: pa.Table, dtable: Any) -> pa.Table:
    """Add null columns the table has but the rows lack (written by newer code) so that
    ``update_all`` never meets a missing source column."""
    target = pa.schema(dtable.schema().to_arrow())
    have = set(table.column_names)
    for f in target:
        if f.name not in have:
            table = table.append_column(f.with_nullable(True),
                                        pa.nulls(table.num_rows, f.type))
    return table


def conform(rows: Rows, schema: pa.Schema, *, defaults: Mapping[str, Any] | None = None,
            what: str = "rows") -> pa.Table:
    """Cast rows (table or dicts) to ``schema``; extra columns kept at the end.

    Missing nullable columns become nulls; a missing required column takes ``defaults`` or is
    an error naming it; a value that does not fit its column's type is an error naming the
    column and row.
    """
    defaults = dict(defaults or {})
    if isinstance(rows, pa.Table):
        table = rows
    else:
        rows = list(rows)
        r: Mapping[str, Any]
        names: dict[str, None] = {}
        for r in rows:
            names.update(dict.fromkeys(r))
        cols = {}
        for n in names:
            values = [_plain(r.get(n)) for r in rows]
            field_type = schema.field(n).type if n in schema.names else None
            cols[n] = _to_array(values, field_type, n, what)
        if not cols:
            return schema.empty_table()
        table = pa.table(cols)
    n = table.num_rows
    if n == 0 and not table.column_names:
        return schema.empty_table()
    arrays = []
    missing = []
    for f in schema:
        if f.name in table.column_names:
            col = table.column(f.name)
            if col.type != f.type:
                try:
                    col = col.cast(f.type)
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                    raise LakeError(f"{what}: column {f.name!r} of type {col.type} cannot be "
                                    f"cast to {f.type}: {e}") from None
        elif f.name in defaults:
            col = pa.chunked_array([pa.array([defaults[f.name]] * n, f.type)])
        elif f.nullable:
            col = pa.chunked_array([pa.nulls(n, f.type)], f.type)
        else:
            missing.append(f.name)
            continue
        if not f.nullable and col.null_count:
            if f.name in defaults:
                col = pc.fill_null(col, pa.scalar(defaults[f.name], f.type))
            else:
                i = next(i for i, v in enumerate(col.to_pylist()) if v is None)
                raise LakeError(f"{what}: required column {f.name!r} is null in row {i}")
        arrays.append(col)
    if missing:
        raise LakeError(f"{what}: missing required column(s) {missing}")
    out = pa.Table.from_arrays(arrays, schema=schema)
    extra = [c for c in table.column_names if c not in schema.names]
    for c in extra:
        if not c.isidentifier():
            raise LakeError(f"{what}: column name {c!r} is not an identifier")
        col = table.column(c)
        if pa.types.is_null(col.type):
            continue  # all-null column of unknown type: nothing to evolve the schema with
        out = out.append_column(pa.field(c, col.type, nullable=True), col)
    return out


def _plain(v: Any) -> Any:
    """numpy scalars -> Python; aware datetimes -> naive UTC."""
    if hasattr(v, "item") and not isinstance(v, bytes | str) and getattr(v, "shape", None) == ():
        v = v.item()
    if isinstance(v, dt.datetime) and v.tzinfo is not None:
        v = v.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return v


def _to_array(values: list[Any], field_type: pa.DataType | None, name: str, what: str) -> pa.Array:
    try:
        return pa.array(values, field_type) if field_type is not None else pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        pass
    for i, v in enumerate(values):
        try:
            pa.array([v], field_type) if field_type is not None else pa.array([v])
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            raise LakeError(f"{what}: column {name!r} row {i}: value {v!r} does not fit "
                            f"{field_type}") from None
    raise LakeError(f"{what}: column {name!r} has mixed types that do not fit {field_type}")


def iter_batches(rows: Iterable[Mapping[str, Any]], size: int) -> Iterable[list[Mapping[str, Any]]]:
    """Group dict rows into lists of ``size`` (for callers that stream rows to the lake)."""
    buf: list[Mapping[str, Any]] = []
    for r in rows:
        buf.append(r)
        if len(buf) >= size:
            yield buf
            buf = []
    if buf:
        yield buf
