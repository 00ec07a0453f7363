"""``rootflow evaluate masks`` (and, from the RootSAM work, ``evaluate rootsam``).

Machine-readable by design: exactly one JSON object on stdout (NaN written as ``null``), logs and
progress on stderr, exit 2 with one line naming the files when the inputs cannot be scored.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import typer


def register(app: typer.Typer) -> None:
    """Add the ``evaluate`` command group to the top-level app."""
    evaluate = typer.Typer(help="Score model output against human annotations.",
                           no_args_is_help=True)
    evaluate.command("masks")(masks)
    app.add_typer(evaluate, name="evaluate")


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None, recursively (strict JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def masks(
    pred: Path = typer.Option(..., "--pred", help="Folder of predicted <stem>_mask.png files."),
    truth: Path = typer.Option(..., "--truth", help="Folder of human <stem>_mask.png files (an "
                                                     "image folder with masks beside works)."),
    dpi: float | None = typer.Option(None, "--dpi", help="Resolution for lengths/areas in mm "
                                                         "(without it they are in px)."),
    csv: Path | None = typer.Option(None, "--csv", help="Write one row per image here."),
    cldice: bool = typer.Option(True, "--cldice/--no-cldice", help="Skeleton overlap (clDice)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress on stderr."),
) -> None:
    """Pair <stem>_mask.png files by name and print pooled Dice, IoU, precision, recall,
    clDice and per-image length/area agreement (R², Pearson r², bias %) as one JSON object."""
    import logging

    from rootflow.evaluation.masks import EvaluationError, evaluate_masks
    from rootflow.io._cli import cli_error

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    try:
        out = evaluate_masks(pred, truth, dpi=dpi, csv_path=csv, cldice=cldice,
                             progress=progress)
    except EvaluationError as e:
        raise cli_error(e) from None
    typer.echo(json.dumps(json_safe(out)))
