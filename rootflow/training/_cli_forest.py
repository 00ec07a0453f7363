"""``rootflow train forest`` (placeholder: being written)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the ``forest`` command to the ``train`` group."""
