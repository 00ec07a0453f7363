"""``rootflow train rootsam|rootquant`` (registered by :mod:`rootflow.cli`)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from rootflow.training import _cli_rootquant, _cli_rootsam

    train = typer.Typer(help="Fine-tune RootSAM or RootQuant on Ray Train.", no_args_is_help=True)
    _cli_rootsam.register(train)
    _cli_rootquant.register(train)
    app.add_typer(train, name="train")
