"""``rootflow`` command line. Each area registers its own commands from its ``_cli.py``.

Heavy imports (torch, ray, sam2) happen inside the commands, so ``rootflow --help`` is instant.
"""

from __future__ import annotations

import typer

from rootflow import __version__

app = typer.Typer(
    name="rootflow",
    help="Minirhizotron images to calibrated root traits in a Delta Lake.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"rootflow {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """rootflow: RootSAM, RootQuant and RhizoVision-compatible traits on Ray and Delta Lake."""


def _register_all() -> None:
    from rootflow.dynamics import _cli as dynamics_cli
    from rootflow.evaluation import _cli as evaluation_cli
    from rootflow.inference import _cli as inference_cli
    from rootflow.io import _cli as manifest_cli
    from rootflow.lake import _cli as lake_cli
    from rootflow.studio import _cli as studio_cli
    from rootflow.synth import _cli as synth_cli
    from rootflow.training import _cli as training_cli
    from rootflow.traits import _cli as traits_cli

    for module in (synth_cli, manifest_cli, traits_cli, inference_cli, training_cli,
                   evaluation_cli, lake_cli, dynamics_cli):
        module.register(app)
    studio_cli.register(app)


_register_all()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
