"""CLI command for this trainer (registered under ``rootflow train``)."""

from __future__ import annotations

import typer


def register(train: typer.Typer) -> None:
    """Add this trainer's command to the ``train`` group."""
