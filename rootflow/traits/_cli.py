"""``rootflow traits MASK... (--dpi N | --px-per-mm X) [--csv OUT]``: traits of mask files."""

from __future__ import annotations

import sys
from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    """Add this area's commands to the top-level app."""
    app.command("traits")(traits)


def traits(
    masks: list[str] = typer.Argument(..., metavar="MASK...",
                                      help="Mask files or URIs (PNG/TIFF/JPEG; local, s3://, ...)."),
    dpi: float | None = typer.Option(None, "--dpi", help="Image resolution in dots per inch."),
    px_per_mm: float | None = typer.Option(None, "--px-per-mm", help="Image resolution in pixels per mm."),
    csv: Path | None = typer.Option(None, "--csv", help="Write the table here (default: stdout)."),
    threshold: float | None = typer.Option(
        None, "--threshold",
        help="Root = grey value > THRESHOLD (0-255), for JPEG or probability masks. "
             "Default: any non-zero pixel is root."),
    min_component_px: int | None = typer.Option(None, "--min-component-px",
                                                help="Drop root components smaller than this (px)."),
    prune_px: float | None = typer.Option(None, "--prune-px", help="Prune skeleton spurs shorter than this (px)."),
    diameter_edges_mm: str | None = typer.Option(
        None, "--diameter-edges-mm", help="Comma-separated diameter class edges in mm, e.g. 0.2,0.5,1,2."),
) -> None:
    """Measure root masks: one CSV row per mask, ``file_name`` first, lengths in mm."""
    import csv as csv_mod

    import numpy as np

    from rootflow.io import images, storage
    from rootflow.traits import measure, trait_schema

    if (dpi is None) == (px_per_mm is None):
        raise typer.BadParameter("give exactly one of --dpi or --px-per-mm")
    opts: dict[str, object] = {}
    if min_component_px is not None:
        opts["min_component_px"] = min_component_px
    if prune_px is not None:
        opts["prune_px"] = prune_px
    if diameter_edges_mm:
        try:
            opts["diameter_edges_mm"] = tuple(float(v) for v in diameter_edges_mm.split(","))
        except ValueError as e:
            raise typer.BadParameter(f"--diameter-edges-mm: {e}") from e
    schema_kw = {k: v for k, v in opts.items() if k == "diameter_edges_mm"}
    columns = ["file_name", *trait_schema(**schema_kw).names]  # type: ignore[arg-type]

    out = open(csv, "w", newline="") if csv is not None else sys.stdout  # noqa: SIM115
    failed = 0
    try:
        writer = csv_mod.DictWriter(out, fieldnames=columns)
        writer.writeheader()
        for uri in masks:
            try:
                data = storage.read_bytes(uri)
                if threshold is None:
                    mask = images.decode_mask(data)
                else:
                    rgb, _ = images.decode(data)
                    mask = np.asarray(rgb).max(axis=2)
                row = measure(mask, dpi=dpi, px_per_mm=px_per_mm, threshold=threshold,
                              **opts)  # type: ignore[arg-type]
            except Exception as e:  # one bad file must not stop a batch
                failed += 1
                typer.echo(f"{uri}: {type(e).__name__}: {e}", err=True)
                continue
            writer.writerow({"file_name": uri.rstrip("/").rsplit("/", 1)[-1], **row})
            out.flush()
    finally:
        if csv is not None:
            out.close()
    if failed:
        typer.echo(f"{failed} of {len(masks)} mask(s) failed", err=True)
        raise typer.Exit(1)
