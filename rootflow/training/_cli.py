"""``rootflow train rootsam|rootquant|forest|unet`` (registered by :mod:`rootflow.cli`)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from rootflow.training import _cli_forest, _cli_rootquant, _cli_rootsam, _cli_unet

    train = typer.Typer(help="Train the segmenters (forest, U-Net) or fine-tune RootSAM and "
                             "RootQuant on Ray Train.", no_args_is_help=True)
    _cli_rootsam.register(train)
    _cli_rootquant.register(train)
    _cli_forest.register(train)
    _cli_unet.register(train)
    app.add_typer(train, name="train")
