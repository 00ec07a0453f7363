"""``rootflow evaluate masks`` and ``rootflow evaluate rootsam``.

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
    evaluate.command("rootsam")(rootsam)
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


def rootsam(
    data: str = typer.Option(..., "--data", help="Folder of held-out <stem>.<ext> + "
                                                 "<stem>_mask.png pairs (never trained on)."),
    config: str = typer.Option(..., "--config", help="SAM2.1 variant: hiera_tiny|hiera_small|"
                                                     "hiera_base_plus|hiera_large|test."),
    base_checkpoint: str | None = typer.Option(None, "--base-checkpoint", help="Meta's "
                                               "SAM2.1 .pt (without it: random init, the "
                                               "numbers then measure machinery only)."),
    base_sha256: str | None = typer.Option(None, "--base-sha256", help="Full 64-hex sha256 "
                                                                       "of the base."),
    checkpoint: list[str] = typer.Option([], "--checkpoint", help="LABEL=URI of a RootSAM "
                                         "checkpoint to score (repeatable)."),
    view: int = typer.Option(512, "--view", help="View side in px."),
    max_views: int | None = typer.Option(None, "--max-views", help="Score only the first N "
                                                                    "views (round-robin)."),
    max_clicks: int = typer.Option(20, "--max-clicks", help="Click budget of NoC."),
    set_: list[str] = typer.Option([], "--set", help="RootSAMInferenceConfig override "
                                                     "key=value (e.g. prompt_mode=lattice)."),
    storage_option: list[str] = typer.Option([], "--storage-option", help="key=value."),
) -> None:
    """RootSAM's evaluation table: for the base and each --checkpoint, mIoU and pooled Dice
    with fixed-point prompts (no ground truth, no human), NoC@85/90 with the simulated
    clicker, and s per click (CPU, embeddings cached), as one JSON object."""
    import logging

    from rootflow.evaluation.rootsam import RootSAMEvaluationError, evaluate_rootsam
    from rootflow.io._cli import cli_error, storage_from_cli
    from rootflow.models.checkpoint import ChecksumError

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING, format="%(message)s")
    labelled: dict[str, str] = {}
    for item in checkpoint:
        label, sep, uri = item.partition("=")
        if not sep or not label or not uri:
            raise cli_error(f"--checkpoint must be LABEL=URI, got {item!r}")
        if label in labelled:
            raise cli_error(f"--checkpoint label {label!r} given twice")
        labelled[label] = uri
    overrides: dict[str, object] = {}
    for item in set_:
        key, sep, value = item.partition("=")
        if not sep:
            raise cli_error(f"--set must be key=value, got {item!r}")
        try:
            overrides[key] = json.loads(value)  # numbers, true/false, null
        except json.JSONDecodeError:
            overrides[key] = value
    try:
        out = evaluate_rootsam(data, variant=config, base_checkpoint=base_checkpoint,
                               base_sha256=base_sha256, checkpoints=labelled, view=view,
                               max_views=max_views, max_clicks=max_clicks, inference=overrides,
                               storage_options=storage_from_cli(storage_option))
    except (RootSAMEvaluationError, ChecksumError, FileNotFoundError, ValueError,
            TypeError) as e:
        raise cli_error(e) from None
    typer.echo(json.dumps(json_safe(out)))
