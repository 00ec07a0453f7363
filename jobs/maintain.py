#!/usr/bin/env python
"""Scheduled table maintenance: compact small files, then vacuum files older than the retention.

    ray job submit --working-dir . -- python jobs/maintain.py s3://lab/lake --retain-hours 336

Processing runs compact the partitions they touched (``maintenance.compact_touched``); this job
compacts every table of the lake (Z-ordering the traits partitions by capture time and image
id with ``--zorder``), then vacuums: deletes files no table version younger than the retention
needs. Vacuum is refused under 168 h unless --force (running readers and writers may still need
those files) and is a dry run unless --apply. A refused vacuum exits 2 with one line saying why;
compaction has been done by then.
"""

from __future__ import annotations

import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import typer  # noqa: E402

from rootflow.io._cli import storage_from_cli  # noqa: E402
from rootflow.lake import maintenance  # noqa: E402


def main(
    lake: str = typer.Argument(..., help="Lake root URI."),
    retain_hours: int = typer.Option(maintenance.MIN_RETAIN_HOURS, help="Vacuum retention."),
    apply: bool = typer.Option(False, "--apply", help="Delete files (default: dry run)."),
    force: bool = typer.Option(False, help="Allow a retention under 168 h."),
    zorder: bool = typer.Option(False, "--zorder",
                                help="Z-order traits by capture time and image id."),
    storage_option: list[str] = typer.Option([], "--storage-option"),
) -> None:
    from deltalake.exceptions import DeltaError

    so = storage_from_cli(storage_option)
    compacted = maintenance.compact(lake, storage_options=so, zorder=zorder)
    for table, metrics in compacted.items():
        typer.echo(f"compact {table}: " + json.dumps(
            {k: metrics.get(k) for k in ("numFilesAdded", "numFilesRemoved")}))
    try:
        reports = maintenance.vacuum(lake, retain_hours=retain_hours, dry_run=not apply,
                                     force=force, storage_options=so)
    except maintenance.VacuumRefused as e:
        typer.echo(f"vacuum refused: {e}", err=True)
        raise typer.Exit(2) from None
    except DeltaError as e:  # delta-rs's own retention check (table property)
        typer.echo(f"vacuum refused by delta-rs: {str(e).splitlines()[0]}", err=True)
        raise typer.Exit(2) from None
    for r in reports:
        verb = "would delete" if r.dry_run else "deleted"
        typer.echo(f"vacuum {r.table}: {verb} {len(r.files)} files older than {r.retain_hours} h")


if __name__ == "__main__":
    typer.run(main)
