"""The lake: every Delta write of rootflow goes through :class:`Lake`.

Tables live under one root URI: ``traits`` (one row per image x producer x model version,
partitioned by ``year``/``tube``/``depth``), ``runs`` (one row per run), ``rejects`` (one row
per manifest row that failed in a run, with the reason), ``versions`` (when each model version
first wrote traits: the order "latest" uses) and the :data:`~rootflow.lake.schema.EXTRA_TABLES`.
The first write creates all of them (empty where nothing is written yet), so an analyst's
first query never meets a missing table.

Writing sits below querying: :mod:`rootflow.lake.query` builds on :class:`Lake`; this module
never imports it.

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
``CommitFailedError`` (delta-rs maps every transaction error, conflicts included, to that
type; other failures are ``DeltaError``/``OSError`` and are not retried), and we retry the whole operation on a fresh snapshot with jittered
exponential backoff so that contending writers spread out instead of colliding again.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias, TypeVar

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from rootflow.io import storage as _storage
from rootflow.io.storage import StorageLike, StorageOptions
from rootflow.lake import schema as _schema

log = logging.getLogger(__name__)

T = TypeVar("T")
Rows: TypeAlias = "pa.Table | Sequence[Mapping[str, Any]]"

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
        filesystem: pyarrow file system rooted at the lake root for reading data files (default:
            from ``storage_options``); tests pass a wrapper that counts the files opened.

    Creating a Lake touches no storage; the first write creates every table.
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
        filesystem: Any = None,
    ) -> None:
        self.uri = _storage.normalize(uri).rstrip("/")
        self.storage = StorageOptions.from_mapping(storage_options)
        self._trait_schema = trait_schema
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.filesystem = filesystem
        self.n_conflicts = 0
        """Commit conflicts met (and retried) by this object; tests and benchmarks read it."""
        self.n_storage_retries = 0
        """Operations retried after a transient storage error (5xx, timeout, dropped
        connection) that outlasted delta-rs's own HTTP retries. Safe: every write is a MERGE
        on a key (or an idempotent update), so redoing one whose commit did land adds no rows."""
        self.touched: set[tuple[int, int, int]] = set()
        """(year, tube, depth) partitions of ``traits`` this object committed to (for
        :func:`rootflow.lake.maintenance.compact_touched` after a run)."""
        self._known_versions: set[tuple[str, str]] | None = None

    # -- locations --------------------------------------------------------------------------
    def table_uri(self, name: str) -> str:
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
    def schema(self, name: str) -> pa.Schema:
        if name == "traits":
            return _schema.traits_schema(self._trait_schema)
        if name == "runs":
            return _schema.RUNS_SCHEMA
        if name == "versions":
            return _schema.VERSIONS_SCHEMA
        if name in _schema.EXTRA_TABLES:
            return _schema.EXTRA_TABLES[name][0]
        if name == "rejects":
            return _schema.rejects_schema()
        raise LakeError(f"unknown table {name!r}; valid: {list(_schema.ALL_TABLES)}")

    @staticmethod
    def partition_by(name: str) -> tuple[str, ...]:
        if name == "traits":
            return _schema.TRAITS_PARTITION_BY
        if name in _schema.EXTRA_TABLES:
            return _schema.EXTRA_TABLES[name][2]
        return ()

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
        self._register_versions(table, now)
        key = (*_schema.TRAITS_KEY, "year", "tube")  # year/tube come from the file name: stable
        self._merge("traits", table, key=key, partition_by=_schema.TRAITS_PARTITION_BY)
        parts = table.select(list(_schema.TRAITS_PARTITION_BY)).group_by(
            list(_schema.TRAITS_PARTITION_BY), use_threads=False).aggregate([])
        self.touched.update((r["year"], r["tube"], r["depth"]) for r in parts.to_pylist())
        return table.num_rows

    def _register_versions(self, table: pa.Table, now: dt.datetime) -> None:
        """Insert (never update) a ``versions`` row for each producer/version new to the lake,
        before its first traits rows land: its first commit time orders "latest"."""
        pairs = table.select(["model_name", "model_version", "run_id"]).group_by(
            ["model_name", "model_version"], use_threads=False).aggregate([("run_id", "min")])
        backfill: list[dict[str, Any]] = []
        if self._known_versions is None:
            if not self.exists("versions") and self.exists("traits"):
                # A lake written before the versions table: record its versions first, in the
                # order of their oldest rows (the best order its history still holds).
                backfill = self._scan_versions(counts=False)
            known = self.read("versions", columns=["model_name", "model_version"])
            self._known_versions = set(zip(known["model_name"].to_pylist(),
                                           known["model_version"].to_pylist(), strict=True))
        new = [r for r in pairs.to_pylist()
               if (r["model_name"], r["model_version"]) not in self._known_versions]
        rows = [{"model_name": r["model_name"], "model_version": r["model_version"],
                 "first_committed_at": r["first_committed_at"], "first_run_id": r["first_run_id"]}
                for r in backfill]
        rows += [{"model_name": r["model_name"], "model_version": r["model_version"],
                  "first_committed_at": now, "first_run_id": r["run_id_min"]} for r in new
                 if (r["model_name"], r["model_version"]) not in
                 {(b["model_name"], b["model_version"]) for b in backfill}]
        if not rows:
            return
        src = self._prepare(rows, _schema.VERSIONS_SCHEMA, defaults={}, what="versions")
        self._merge("versions", src, key=_schema.VERSIONS_KEY, partition_by=(), update=False)
        self._known_versions.update((r["model_name"], r["model_version"]) for r in rows)

    def _scan_versions(self, *, counts: bool) -> list[dict[str, Any]]:
        """Versions found by scanning ``traits``: oldest ``processed_at``, first run id, rows."""
        g = self.sql("traits", "SELECT model_name, model_version, COUNT(*) AS n, "
                     "MIN(processed_at) AS t0, MIN(run_id) AS run FROM traits "
                     "GROUP BY model_name, model_version")
        return [{"model_name": r["model_name"], "model_version": r["model_version"],
                 "first_committed_at": r["t0"], "first_run_id": r["run"],
                 **({"rows": r["n"]} if counts else {})} for r in g.to_pylist()]

    def versions(self, *, counts: bool = False) -> pa.Table:
        """Every producer/model version that wrote traits, oldest first, with ``rank`` (0 =
        oldest per producer); ``rows`` per version when ``counts`` (a scan of ``traits``).

        Reads the ``versions`` table (small); a lake written before it existed is scanned
        instead, its versions ordered by their oldest ``processed_at``."""
        first = {}
        if self.exists("versions"):
            first = {(r["model_name"], r["model_version"]): r
                     for r in self.read("versions").to_pylist()}
        scanned: dict[tuple[str, str], dict[str, Any]] = {}
        if (counts or not first) and self.exists("traits"):
            scanned = {(r["model_name"], r["model_version"]): r
                       for r in self._scan_versions(counts=True)}
        out = []
        for k in sorted(set(first) | set(scanned)):
            r = first.get(k) or scanned[k]
            out.append({"model_name": k[0], "model_version": k[1],
                        "first_committed_at": r["first_committed_at"],
                        "first_run_id": r["first_run_id"],
                        "rows": scanned[k]["rows"] if k in scanned else None})
        out.sort(key=lambda r: (r["model_name"], r["first_committed_at"] or dt.datetime.min,
                                r["model_version"]))
        rank: dict[str, int] = {}
        for r in out:
            r["rank"] = rank[r["model_name"]] = rank.get(r["model_name"], -1) + 1
        schema = pa.schema([*_schema.VERSIONS_SCHEMA, pa.field("rows", pa.int64()),
                            pa.field("rank", pa.int64())])
        return pa.Table.from_pylist(out, schema=schema)

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
        self._merge(name, table, key=merge_key, partition_by=partition_by)
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

        ``scope`` (or ``config["scope"]``) names what the run covers;
        :class:`rootflow.lake.lease.RunLease` uses it so that two runs over the same scope do
        not work at once.
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
        """Mark a running run alive (its :class:`~rootflow.lake.lease.RunLease` stays valid)."""
        self._update_run(run_id, {"heartbeat_at": utcnow()})

    def finish_run(self, run_id: str, *, n_ok: int, n_rejected: int, status: str) -> None:
        """Close a run: status (``ok``, ``ok_with_rejects``, ``failed``...), counts, end time."""
        now = utcnow()
        self._update_run(run_id, {"status": status, "n_ok": int(n_ok),
                                  "n_rejected": int(n_rejected), "finished_at": now,
                                  "heartbeat_at": now})

    # -- public reads -----------------------------------------------------------------------
    def exists(self, name: str = "traits") -> bool:
        from deltalake import DeltaTable

        return DeltaTable.is_deltatable(self.table_uri(name), self.delta_storage_options())

    def delta_table(self, name: str = "traits", *,
                    version: int | dt.datetime | str | None = None) -> Any:
        """The ``deltalake.DeltaTable`` (raises ``TableNotFoundError`` if not written yet).

        ``version``: a table version number, or a time (``datetime``, naive = UTC, or an ISO
        string) for the table as it was then (time travel)."""
        from deltalake import DeltaTable

        if version is None or isinstance(version, int):
            return DeltaTable(self.table_uri(name), version=version,
                              storage_options=self.delta_storage_options())
        when = dt.datetime.fromisoformat(version) if isinstance(version, str) else version
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.timezone.utc)
        table = DeltaTable(self.table_uri(name), storage_options=self.delta_storage_options())
        try:
            table.load_as_version(when)
        except Exception as e:  # delta-rs: no version at or before that time
            raise LakeError(f"{name} has no version at or before {when.isoformat()}: "
                            f"{str(e).splitlines()[0]}") from None
        return table

    def dataset(self, name: str = "traits", *, version: int | dt.datetime | str | None = None,
                partitions: Any = None) -> Any:
        """A lazy ``pyarrow.dataset.Dataset`` over the table's files (none read yet).

        ``partitions`` (delta-rs tuple filters on partition columns) drop files before any is
        opened; a scan's filter then skips files and Parquet row groups by their statistics.
        String columns read as ``string`` (delta-rs's MERGE writes ``string_view``, which
        pyarrow's filter kernels and DuckDB's push-down do not compare with ``string``).
        """
        return _to_dataset(self.delta_table(name, version=version), self.storage,
                           partitions=partitions, filesystem=self.filesystem, name=name)

    def read(self, name: str = "traits", *,
             columns: list[str] | None = None, filter: Any = None) -> pa.Table:
        """Whole table (or ``columns``, rows matching a ``pyarrow.compute`` ``filter``)."""
        if not self.exists(name):
            return self.schema(name).empty_table() if columns is None else \
                self.schema(name).empty_table().select(columns)
        return self.dataset(name).to_table(columns=columns, filter=filter)

    def create_tables(self) -> list[str]:
        """Create every missing table (:data:`~rootflow.lake.schema.ALL_TABLES`) empty, with its
        schema and partitioning; returns the names created. Idempotent, safe to race."""
        created = []
        for name in _schema.ALL_TABLES:
            if self._create(name):
                created.append(name)
        return created

    def done_image_ids(self, *, model_name: str, model_version: str) -> set[str]:
        """Ids of images that already have a traits row for this producer and version."""
        if not self.exists("traits"):
            return set()
        # DataFusion (delta-rs's own engine) scans the files in parallel in Rust: on a table of
        # hundreds of partitions it is several times faster than building a pyarrow dataset.
        ids = self.sql("traits", "SELECT DISTINCT image_id FROM traits WHERE model_name = "
                       f"{sql_literal(model_name)} AND model_version = {sql_literal(model_version)}")
        return set(ids.column("image_id").to_pylist())

    def sql(self, name: str, query: str) -> pa.Table:
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

    def _ensure(self, name: str, schema: pa.Schema, partition_by: Sequence[str]) -> None:
        if self.exists(name):
            return
        # The lake's first write: create every table, so that readers find them all.
        self.create_tables()

    def _create(self, name: str) -> bool:
        from deltalake import CommitProperties, DeltaTable

        if self.exists(name):
            return False
        schema, partition_by = self.schema(name), self.partition_by(name)
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
            return False
        return True

    def _merge(self, name: str, table: pa.Table, *,
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
            except (CommitFailedError, DeltaError, OSError) as e:
                conflict = _is_conflict(e)
                if not (conflict or _is_transient_storage_error(e)) or attempt >= self.max_retries:
                    raise
                if conflict:
                    self.n_conflicts += 1
                else:
                    self.n_storage_retries += 1
                delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
                delay *= random.uniform(0.5, 1.5)
                log.info("commit %s on %s (attempt %d): %s; retrying in %.2fs",
                         "conflict" if conflict else "storage error", what, attempt + 1,
                         (str(e).splitlines() or [type(e).__name__])[0], delay)
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


_TRANSIENT_MARKERS = ("timed out", "timeout", "connection", "reset by peer", "broken pipe",
                      "slowdown", "slow down", "service unavailable", "internal error",
                      "internalerror", "503", "500", "502", "504", "error sending request",
                      "incomplete", "unexpected eof", "temporarily")


def _is_transient_storage_error(e: Exception) -> bool:
    """A storage failure a later attempt may not meet (server 5xx, timeout, dropped
    connection), as delta-rs/object_store or the OS words it; not a missing table or a
    refused credential."""
    from deltalake.exceptions import TableNotFoundError

    if isinstance(e, TableNotFoundError | FileNotFoundError | PermissionError):
        return False
    text = str(e).lower()
    return any(m in text for m in _TRANSIENT_MARKERS)


def _is_conflict(e: Exception) -> bool:
    """A commit conflict, by type: delta-rs (python/src/error.rs) raises ``CommitFailedError``
    for every ``TransactionError`` (lost put-if-absent race after its own retries, logical
    conflicts such as concurrent append/delete); anything else is not retried."""
    from deltalake.exceptions import CommitFailedError

    return isinstance(e, CommitFailedError)


def string_field(name: str) -> pc.Expression:
    """``pc.field(name)`` for a string column, safe to compare with a Python ``str``.

    delta-rs's MERGE (DataFusion) writes strings as Arrow ``string_view`` in the Parquet files
    while the table schema says ``string``; pyarrow then fails to evaluate ``field == "x"``
    against those files ("no kernel matching (string, string_view)"). The cast is a no-op for
    files written with plain strings.
    """
    return pc.field(name).cast(pa.string())


def _to_dataset(dtable: Any, storage: StorageOptions, *, partitions: Any = None,
                filesystem: Any = None, name: str = "traits") -> Any:
    import pyarrow.fs as pafs

    kw: dict[str, Any] = {}
    if filesystem is not None:
        kw["filesystem"] = pafs.SubTreeFileSystem(name, filesystem)
    elif _storage.is_remote(dtable.table_uri):
        root = _storage.strip_protocol(dtable.table_uri).rstrip("/")
        kw["filesystem"] = pafs.SubTreeFileSystem(root, storage.pyarrow())
    if partitions is not None:
        kw["file_pruning_predicate"] = partitions
    ds = dtable.to_pyarrow_dataset(**kw)
    schema = pa.schema([f.with_type(pa.string()) if pa.types.is_string_view(f.type) else
                        f.with_type(pa.binary()) if pa.types.is_binary_view(f.type) else f
                        for f in ds.schema], metadata=ds.schema.metadata)
    return LakeDataset(list(ds.get_fragments()), schema=schema, format=ds.format,
                       filesystem=ds.filesystem)


class LakeDataset(pads.FileSystemDataset):
    """A ``FileSystemDataset`` whose filtered scans work on the files delta-rs writes.

    delta-rs's MERGE writes strings as ``string_view`` and its OPTIMIZE as ``string``, in
    the same table; pyarrow evaluates a scan's filter on the file's own types before
    casting to the dataset schema, so ``model_name == "x"`` fails on one kind of file or
    the other. Scans with a filter therefore (1) keep only the files, then the Parquet row
    groups, whose partition values and statistics can match (nothing else is opened),
    (2) read the needed columns cast to the dataset schema, (3) filter. DuckDB
    (``scanner``), Polars (``to_table``/``head``) and pyarrow callers all land here.
    """

    def scanner(self, columns: Any = None, filter: Any = None, **kw: Any) -> Any:
        if filter is None:
            return pads.FileSystemDataset.scanner(self, columns=columns, **kw)
        schema = self.schema
        text = str(filter)
        out_cols = list(columns) if isinstance(columns, list | tuple) else None
        if isinstance(columns, dict):  # projections: evaluate on the filtered table
            return pads.dataset(self._filtered(filter, None, kw)).scanner(columns=columns)
        need = [n for n in schema.names if re.search(rf"\b{re.escape(n)}\b", text)]
        read = None if out_cols is None else list(dict.fromkeys([*out_cols, *need]))
        out_schema = schema if out_cols is None else pa.schema(
            [schema.field(c) for c in out_cols])

        def batches() -> Any:
            for t in self._pieces(filter, read, kw):
                t = t.filter(filter)
                if out_cols is not None:
                    t = t.select(out_cols)
                yield from t.to_batches()

        return pads.Scanner.from_batches(batches(), schema=out_schema)

    def _pieces(self, filter: Any, read: Any, kw: dict[str, Any]) -> Any:
        schema = self.schema
        kw = {k: v for k, v in kw.items() if k in ("batch_size", "use_threads")}
        for frag in self.get_fragments(filter=filter):
            try:
                parts = frag.split_by_row_group(filter, schema=schema)
            except (pa.ArrowNotImplementedError, pa.ArrowInvalid, pa.ArrowTypeError):
                parts = [frag]
            for part in parts:
                t = pa.Table.from_batches(list(part.to_batches(schema=schema, columns=read,
                                                               **kw)),
                                          schema=schema if read is None else
                                          pa.schema([schema.field(c) for c in read]))
                yield t

    def _filtered(self, filter: Any, read: Any, kw: dict[str, Any]) -> pa.Table:
        parts = [t.filter(filter) for t in self._pieces(filter, read, kw)]
        return pa.concat_tables(parts) if parts else self.schema.empty_table()

    def to_table(self, columns: Any = None, filter: Any = None, **kw: Any) -> Any:
        return self.scanner(columns=columns, filter=filter, **kw).to_table()

    def to_batches(self, columns: Any = None, filter: Any = None, **kw: Any) -> Any:
        return self.scanner(columns=columns, filter=filter, **kw).to_batches()

    def head(self, num_rows: int, columns: Any = None, filter: Any = None, **kw: Any) -> Any:
        return self.scanner(columns=columns, filter=filter, **kw).head(num_rows)

    def count_rows(self, filter: Any = None, **kw: Any) -> int:
        if filter is None:
            return pads.FileSystemDataset.count_rows(self, **kw)
        return self.scanner(columns=[self.schema.names[0]], filter=filter).count_rows()



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
