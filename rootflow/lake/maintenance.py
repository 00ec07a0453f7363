"""Keeping the lake healthy: compaction, vacuum, and a summary of what is in it.

Every pipeline commit writes at least one small Parquet file per touched partition and a log
entry; after many runs a partition holds hundreds of small files and readers pay per file.
:func:`compact` rewrites them into few large files (delta-rs ``optimize.compact``, per
partition; idempotent). Replaced files stay on storage, referenced by old table versions for
time travel, until :func:`vacuum` deletes those older than the retention window.

Vacuum is the one destructive operation here, so it is guarded twice: it is a dry run unless
asked otherwise, and a retention under 168 h (7 days, Delta's default) is refused without
``force``: a shorter window can delete files that a long-running reader or a concurrent
writer's snapshot still needs.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Literal

from rootflow.io.storage import StorageLike
from rootflow.lake.tables import Lake

TableName = Literal["traits", "runs", "rejects"]
TABLES: tuple[TableName, ...] = ("traits", "runs", "rejects")
MIN_RETAIN_HOURS = 168


class VacuumRefused(ValueError):
    """Retention shorter than :data:`MIN_RETAIN_HOURS` without ``force``."""


def compact(uri: str, *, storage_options: StorageLike = None,
            tables: tuple[TableName, ...] = TABLES, target_size: int | None = None,
            partition_filters: list[tuple[str, str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Compact small files of each table (per partition); returns delta-rs metrics per table."""
    lake = Lake(uri, storage_options=storage_options)
    out: dict[str, dict[str, Any]] = {}
    for name in tables:
        if not lake.exists(name):
            continue

        def op(name: TableName = name) -> dict[str, Any]:
            dt = lake.delta_table(name)
            pf = partition_filters if name == "traits" else None
            return dict(dt.optimize.compact(partition_filters=pf, target_size=target_size))

        out[name] = lake._retry(op, what=f"compact {name}")
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
    """Row counts, versions, file counts, partitions and the latest runs of each table."""
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
            from rootflow.lake.query import latest_versions

            t = lake.read("traits", columns=["model_name", "model_version"])
            g = t.group_by(["model_name", "model_version"]).aggregate([([], "count_all")])
            info["versions"] = sorted(
                ({"model_name": r["model_name"], "model_version": r["model_version"],
                  "rows": r["count_all"]} for r in g.to_pylist()),
                key=lambda r: (r["model_name"], r["model_version"]))
            info["latest"] = latest_versions(lake)
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
            lines.append(f"    {v['model_name']} {v['model_version']}: {v['rows']} rows{mark}")
    for r in info.get("latest_runs", []):
        lines.append(f"  run {r['run_id']} [{r['job_kind']}] {r['status']} started "
                     f"{r['started_at']} ok={r['n_ok']} rejected={r['n_rejected']} "
                     f"models={json.loads(r['model_versions_json'] or '{}')}")
    return "\n".join(lines)
