"""``rootflow align`` (one pair of images) and ``rootflow dynamics`` (the season job).

``jobs/dynamics.py`` calls the same ``dynamics`` command, so ``ray job submit ... -- python
jobs/dynamics.py LAKE`` and ``rootflow dynamics LAKE`` run identical code.
"""

from __future__ import annotations

import json
from typing import Any

import typer

EXIT_NOT_ALIGNED = 1
EXIT_FLAGGED = 3  # the run finished but some pairs were flagged, failed or rejected


def _read(path: str) -> Any:
    from rootflow.io import storage
    from rootflow.io.images import decode

    return decode(storage.read_bytes(path))[0]


def register(app: typer.Typer) -> None:
    @app.command("align")
    def align_cmd(
        fixed: str = typer.Argument(..., help="Earlier session's image (path or URI)."),
        moving: str = typer.Argument(..., help="Later session's image, registered onto FIXED."),
        method: str = typer.Option(None, "--method",
                                   help="Registration method (default: the measured best)."),
    ) -> None:
        """Register MOVING onto FIXED; print {dx, dy, angle_deg, quality, ...} as JSON.

        Rotate MOVING by angle_deg about its centre (counter-clockwise as displayed), then
        shift by (dx, dy) px. Exit 0 when aligned; 1 with {"error": ...} when not.
        """
        from rootflow.dynamics.align import DEFAULT_METHOD, align

        try:
            a, b = _read(fixed), _read(moving)
            res = align(a, b, method=method or DEFAULT_METHOD)
        except Exception as e:  # noqa: BLE001 - every failure is one JSON line
            typer.echo(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            raise typer.Exit(EXIT_NOT_ALIGNED) from None
        if not res.ok:
            typer.echo(json.dumps({"error": res.reason, **res.to_dict()}))
            raise typer.Exit(EXIT_NOT_ALIGNED)
        typer.echo(json.dumps(res.to_dict()))

    @app.command("dynamics")
    def dynamics_cmd(
        lake: str = typer.Argument(..., help="Lake root (reads traits/, writes dynamics/, "
                                             "alignments/)."),
        producer: list[str] = typer.Option(None, "--producer", "-p",
                                           help="Producer(s) whose masks to compare "
                                                "(default: every producer with masks)."),
        model_version: str = typer.Option(None, "--model-version",
                                          help="Only this model version (default: latest)."),
        since: str = typer.Option(None, "--since",
                                  help="Only pairs whose later session is on/after this ISO date."),
        method: str = typer.Option(None, "--method", help="Alignment method ('identity' = none)."),
        k_mm: float = typer.Option(None, "--k-mm", help="Persistence tolerance in mm."),
        force: bool = typer.Option(False, "--force", help="Recompute pairs already done."),
        address: str = typer.Option(None, "--address", help="Ray address (default: local)."),
        as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
        storage_option: list[str] = typer.Option(None, "--storage-option", "-s",
                                                 help="Object-storage key=value; repeatable."),
    ) -> None:
        """Root production and mortality between consecutive sessions of every window."""
        import dataclasses

        from rootflow.dynamics.job import DynamicsConfig, run
        from rootflow.inference._cli import init_ray
        from rootflow.io._cli import storage_from_cli

        cfg = DynamicsConfig(producers=tuple(producer) if producer else None,
                             model_version=model_version, since=since)
        if method:
            from rootflow.dynamics.align import METHODS

            if method not in METHODS:
                typer.echo(f"error: unknown method {method!r}; choose from {sorted(METHODS)}",
                           err=True)
                raise typer.Exit(2)
            cfg = dataclasses.replace(cfg, method=method)
        if k_mm is not None:
            cfg = dataclasses.replace(cfg, k_mm=k_mm)
        cfg = dataclasses.replace(cfg, force=force)
        storage = storage_from_cli(storage_option)
        init_ray(address)
        s = run(lake, cfg, storage_options=storage)
        if as_json:
            typer.echo(json.dumps(s.to_dict(), indent=2, default=str))
        else:
            typer.echo(f"run {s.run_id}: {s.status}: {s.n_pairs} pairs ({s.n_ok} ok, "
                       f"{s.n_flagged} flagged, {s.n_error} error), {s.n_rejects} windows "
                       f"rejected, {s.n_skipped} pairs already done; {s.wall_s:.1f} s")
            for reason, n in sorted(s.reasons.items()):
                typer.echo(f"  {reason} x{n}")
        if s.status != "ok":
            raise typer.Exit(EXIT_FLAGGED)
