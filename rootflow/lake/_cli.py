"""``rootflow lake show|compact|vacuum`` (registered by :mod:`rootflow.cli`)."""

from __future__ import annotations

import json

import typer

lake_app = typer.Typer(help="Inspect and maintain the Delta tables.", no_args_is_help=True)

_STORAGE_HELP = "Object-storage setting key=value; repeatable (see `rootflow manifest build`)."


@lake_app.command("show")
def show(
    uri: str = typer.Argument(..., help="Lake root (holds traits/, runs/, rejects/...)."),
    runs: int = typer.Option(5, "--runs", help="How many latest runs to list."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text."),
    storage_option: list[str] = typer.Option(None, "--storage-option", "-s", help=_STORAGE_HELP),
) -> None:
    """Row counts, versions, files, model versions and the latest runs."""
    from rootflow.io._cli import storage_from_cli
    from rootflow.lake.maintenance import format_show
    from rootflow.lake.maintenance import show as _show

    info = _show(uri, storage_options=storage_from_cli(storage_option), n_runs=runs)
    typer.echo(json.dumps(info, indent=2, default=str) if as_json else format_show(info))


@lake_app.command("compact")
def compact(
    uri: str = typer.Argument(..., help="Lake root."),
    target_size: int | None = typer.Option(None, "--target-size",
                                           help="Target file size in bytes (default 100 MB)."),
    zorder: bool = typer.Option(False, "--zorder", help="Z-order traits rows by capture time "
                                "and image id inside each partition (rewrites every file)."),
    storage_option: list[str] = typer.Option(None, "--storage-option", "-s", help=_STORAGE_HELP),
) -> None:
    """Rewrite small files into large ones, partition by partition (idempotent)."""
    from rootflow.io._cli import storage_from_cli
    from rootflow.lake.maintenance import compact as _compact

    metrics = _compact(uri, storage_options=storage_from_cli(storage_option),
                       target_size=target_size, zorder=zorder)
    for name, m in metrics.items():
        typer.echo(f"{name}: {m.get('numFilesRemoved', 0)} files -> {m.get('numFilesAdded', 0)} "
                   f"({m.get('partitionsOptimized', 0)} partitions)")
    if not metrics:
        typer.echo("nothing to compact (no tables yet)")


@lake_app.command("vacuum")
def vacuum(
    uri: str = typer.Argument(..., help="Lake root."),
    retain_hours: int = typer.Option(168, "--retain-hours",
                                     help="Keep files needed by versions younger than this."),
    execute: bool = typer.Option(False, "--execute",
                                 help="Delete the files (default: dry run, list only)."),
    force: bool = typer.Option(False, "--force", help="Allow --retain-hours below 168."),
    storage_option: list[str] = typer.Option(None, "--storage-option", "-s", help=_STORAGE_HELP),
) -> None:
    """Delete (with --execute) files that no table version within the retention uses."""
    from rootflow.io._cli import storage_from_cli
    from rootflow.lake.maintenance import VacuumRefused
    from rootflow.lake.maintenance import vacuum as _vacuum

    try:
        reports = _vacuum(uri, retain_hours=retain_hours, dry_run=not execute, force=force,
                          storage_options=storage_from_cli(storage_option))
    except VacuumRefused as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2) from None
    verb = "would delete" if not execute else "deleted"
    for r in reports:
        typer.echo(f"{r.table}: {verb} {len(r.files)} files (retain {r.retain_hours} h)")
    if not execute:
        typer.echo("dry run: nothing deleted; pass --execute to delete")


def report(
    uri: str = typer.Argument(..., help="Lake root (local path or s3://...)."),
    out: str = typer.Option(..., "--out", "-o", help="Local folder for index.html + PNGs."),
    storage_option: list[str] = typer.Option(None, "--storage-option", "-s", help=_STORAGE_HELP),
) -> None:
    """Write OUT/index.html: runs, RLD by depth, producers compared, season dynamics."""
    from rootflow.io._cli import cli_error, storage_from_cli
    from rootflow.lake.report import build_report
    from rootflow.lake.tables import Lake

    lake = Lake(uri, storage_options=storage_from_cli(storage_option))
    if not lake.exists("traits") and not lake.exists("runs"):
        raise cli_error(f"no lake at {uri} (no traits or runs table)")
    res = build_report(lake, out)
    for name, why in res["skipped"].items():
        typer.echo(f"  skipped {name}: {why}")
    typer.echo(f"wrote {res['index']} ({len(res['figures'])} figures)")


def register(app: typer.Typer) -> None:
    """Add ``rootflow lake ...`` and ``rootflow report`` to the top-level app."""
    app.add_typer(lake_app, name="lake")
    app.command("report")(report)
