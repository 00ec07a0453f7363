"""Keeping the lake healthy: compaction, vacuum, and a summary of what is in it.

Every pipeline commit writes at least one small Parquet file per touched partition and a log
entry; after many runs a partition holds hundreds of small files and readers pay per file.
:func:`compact` rewrites them into few large files (delta-rs ``optimize.compact``, per
partition; idempotent). Replaced files stay on storage, referenced by old table versions for
time travel, until :func:`vacuum` deletes those older than the retention window.

After each processing run the job calls :func:`compact_touched`: it compacts only the traits
partitions that run committed to (one commit, partitions already holding one file are left
alone), so files stay sized for queries without a lake-wide rewrite. :func:`compact` with
``zorder`` additionally sorts rows inside each partition along a Z-order curve of the columns
analysts filter by (``captured_at``, ``image_id``), so row-group statistics skip more; it
rewrites every file of a partition, so the maintenance job (``jobs/maintain.py``) runs it, not
the processing job.

Vacuum is the one destructive operation here, so it is guarded twice: it is a dry run unless
asked otherwise, and a retention under 168 h (7 days, Delta's default) is refused without
``force``: a shorter window can delete files that a long-running reader or a concurrent
writer's snapshot still needs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from rootflow.io.storage import StorageLike
from rootflow.lake.schema import ALL_TABLES
from rootflow.lake.tables import Lake

log = logging.getLogger(__name__)

TableName = str
TABLES: tuple[TableName, ...] = ALL_TABLES
MIN_RETAIN_HOURS = 168
ZORDER_COLUMNS: tuple[str, ...] = ("captured_at", "image_id")


class VacuumRefused(ValueError):
    """Retention shorter than :data:`MIN_RETAIN_HOURS` without ``force``."""


def compact(uri: str | Lake, *, storage_options: StorageLike = None,
            tables: tuple[TableName, ...] = TABLES, target_size: int | None = None,
            partition_filters: list[tuple[str, str, Any]] | None = None,
            zorder: bool = False) -> dict[str, dict[str, Any]]:
    """Compact small files of each table (per partition); returns delta-rs metrics per table.

    ``partition_filters`` (delta-rs tuples on ``year``/``tube``/``depth``) restrict it to some
    traits partitions. ``zorder``: Z-order the traits rows by :data:`ZORDER_COLUMNS` (rewrites
    every file of the selected partitions; the other tables are compacted as usual).
    """
    lake = uri if isinstance(uri, Lake) else Lake(uri, storage_options=storage_options)
    out: dict[str, dict[str, Any]] = {}
    for name in tables:
        if not lake.exists(name):
            continue

        def op(name: TableName = name) -> dict[str, Any]:
            dt = lake.delta_table(name)
            pf = partition_filters if name == "traits" else None
            if zorder and name == "traits":
                return dict(dt.optimize.z_order(list(ZORDER_COLUMNS), partition_filters=pf,
                                                target_size=target_size))
            return dict(dt.optimize.compact(partition_filters=pf, target_size=target_size))

        out[name] = lake._retry(op, what=f"compact {name}")
    return out


def compact_touched(lake: Lake, *, target_size: int | None = None) -> dict[str, Any]:
    """Compact the traits partitions ``lake`` committed to (:attr:`Lake.touched`), plus the
    small ``rejects`` and ``versions`` tables; called by the processing job after a run. (Not
    ``runs``: live runs' heartbeats update it all the time; the maintenance job compacts it.)

    One optimize commit per table; never raises for a conflict it cannot resolve (a concurrent
    writer won): it logs it and returns ``{"error": ...}`` for that table, the next run or the
    maintenance job compacts instead. Returns delta-rs metrics per table.
    """
    from deltalake.exceptions import CommitFailedError

    out: dict[str, Any] = {}
    if lake.touched:
        years = sorted({p[0] for p in lake.touched})
        tubes = sorted({p[1] for p in lake.touched})
        pf = [("year", "in", [str(y) for y in years]), ("tube", "in", [str(t) for t in tubes])]
        try:
            out.update(compact(lake, tables=("traits",), partition_filters=pf,
                               target_size=target_size))
        except CommitFailedError as e:
            log.warning("post-run compaction of traits gave up: %s", str(e).splitlines()[0])
            out["traits"] = {"error": str(e).splitlines()[0]}
        lake.touched.clear()
    for name in ("rejects", "versions"):
        try:
            out.update(compact(lake, tables=(name,), target_size=target_size))
        except CommitFailedError as e:
            log.warning("post-run compaction of %s gave up: %s", name, str(e).splitlines()[0])
            out[name] = {"error": str(e).splitlines()[0]}
    return out


@dataclasses.dataclass(frozen=True)
class VacuumReport:
    table: str
    dry_run: bool
    retain_hours: int
    files: list[str]


def vacuum(uri: str, *, retain_hours: int = MIN_RETAIN_HOURS, dry_run: bool = True,
           force: bool = False, storage_options: StorageLike = None,
           tables: tuple[TableName, ...] = TABLES) -> list[VacuumReport]:
    """List (``dry_run``) or delete files no table version younger than ``retain_hours`` uses.

    Raises:
        VacuumRefused: ``retain_hours`` < 168 without ``force``.
    """
    if retain_hours < 0:
        raise ValueError("retain_hours must be >= 0")
    if retain_hours < MIN_RETAIN_HOURS and not force:
        raise VacuumRefused(
            f"refusing to vacuum with retention {retain_hours} h < {MIN_RETAIN_HOURS} h: readers "
            "and concurrent writers may still need those files; pass force=True (--force) if "
            "nothing else uses the lake")
    lake = Lake(uri, storage_options=storage_options)
    reports = []
    for name in tables:
        if not lake.exists(name):
            continue
        dt = lake.delta_table(name)
        files = dt.vacuum(retention_hours=retain_hours, dry_run=dry_run,
                          enforce_retention_duration=not force)
        reports.append(VacuumReport(table=name, dry_run=dry_run, retain_hours=retain_hours,
                                    files=sorted(files)))
    return reports


def show(uri: str, *, storage_options: StorageLike = None, n_runs: int = 5) -> dict[str, Any]:
    """Row counts, versions, file counts, partitions, the model versions present (with their
    first commit time and the run that first wrote them) and the latest runs of each table."""
    lake = Lake(uri, storage_options=storage_options)
    out: dict[str, Any] = {"uri": lake.uri, "tables": {}}
    for name in TABLES:
        if not lake.exists(name):
            out["tables"][name] = None
            continue
        dt = lake.delta_table(name)
        info: dict[str, Any] = {
            "version": dt.version(),
            "rows": dt.count(),
            "files": len(dt.file_uris()),
            "partition_columns": dt.metadata().partition_columns,
        }
        if name == "traits":
            info["partitions"] = len(dt.partitions())
            vs = [r for r in lake.versions(counts=True).to_pylist() if r["rows"]]
            info["versions"] = [
                {"model_name": r["model_name"], "model_version": r["model_version"],
                 "rows": r["rows"], "first_committed_at": r["first_committed_at"],
                 "first_run_id": r["first_run_id"]} for r in vs]
            info["latest"] = {r["model_name"]: r["model_version"] for r in vs}
        out["tables"][name] = info
    if lake.exists("runs"):
        runs = lake.runs().slice(0, n_runs).to_pylist()
        out["latest_runs"] = [
            {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in r.items()
             if k in ("run_id", "job_kind", "status", "started_at", "finished_at", "n_ok",
                      "n_rejected", "model_versions_json")}
            for r in runs]
    return out


def format_show(info: dict[str, Any]) -> str:
    lines = [f"lake {info['uri']}"]
    for name, t in info["tables"].items():
        if t is None:
            lines.append(f"  {name}: (not created yet)")
            continue
        lines.append(f"  {name}: {t['rows']} rows, {t['files']} files, version {t['version']}"
                     + (f", {t['partitions']} partitions" if "partitions" in t else ""))
        for v in t.get("versions", []):
            mark = " (latest)" if info["tables"][name]["latest"].get(v["model_name"]) == \
                v["model_version"] else ""
            first = v.get("first_committed_at")
            since = f", first committed {first:%Y-%m-%d %H:%M:%S}" if first else ""
            lines.append(f"    {v['model_name']} {v['model_version']}: {v['rows']} rows"
                         f"{since}{mark}")
    for r in info.get("latest_runs", []):
        lines.append(f"  run {r['run_id']} [{r['job_kind']}] {r['status']} started "
                     f"{r['started_at']} ok={r['n_ok']} rejected={r['n_rejected']} "
                     f"models={json.loads(r['model_versions_json'] or '{}')}")
    return "\n".join(lines)
