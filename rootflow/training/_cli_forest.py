"""``rootflow train forest``: the ilastik-style pixel classifier (registered under
``rootflow train``); seconds to minutes on a laptop's CPU, no Ray needed.

Every setting is a field of :class:`rootflow.models.forest.ForestConfig`: give a YAML with
``--config`` and change any field with ``--set key=value`` (``--set boosting=rf``,
``--set "sigmas=[0.7,1.6,3.5]"``, ``--set autocontext=false``). ``--out`` is a folder:
``<out>/forest.json`` (the model, JSON + LightGBM text, no pickle) and ``<out>/train.json``.
stdout gets exactly one JSON object (model URI, sha256, version, seconds, images, pixels,
threshold); logs and the progress bar go to stderr. Unusable annotations or settings exit with
code 2 and one ``error:`` line.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the ``forest`` command to the ``train`` group."""

    @app.command("forest")
    def forest(
        data: str = typer.Option(..., help="Folder of <stem>.<ext> + <stem>_mask.png pairs, or an annotated manifest (CSV/Parquet with image_uri, mask_uri)."),
        out: str = typer.Option(..., help="Output folder URI (local or s3://): forest.json and train.json."),
        max_minutes: float | None = typer.Option(None, help="Wall-clock budget in minutes: fewer images/trees (and no autocontext stage) when short."),
        config: str | None = typer.Option(None, "--config", help="ForestConfig YAML."),
        set_: list[str] = typer.Option([], "--set", help="ForestConfig override key=value (repeatable)."),
        storage_option: list[str] = typer.Option([], "--storage-option", help="key=value: endpoint_url, region, allow_http, path_style (credentials from AWS_* env)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="tqdm progress bars on stderr."),
        print_config: bool = typer.Option(False, help="Print the resolved config (YAML) and exit."),
    ) -> None:
        """Train the forest segmenter (multi-scale filters + LightGBM, with autocontext)."""
        import json

        from rootflow import config as cfglib
        from rootflow.io._cli import cli_error as fail
        from rootflow.models.forest import ForestConfig, ForestError, train_forest
        from rootflow.training.data import AnnotationError

        try:
            cfg = cfglib.load(ForestConfig, config, set_)
        except (ValueError, TypeError, OSError) as e:
            raise fail(e) from None
        if print_config:
            typer.echo(cfglib.dump(cfg))
            return
        from rootflow.io._cli import log_progress_to_stderr

        log_progress_to_stderr()
        from rootflow.io._cli import storage_from_cli

        so = storage_from_cli(storage_option) or None
        try:
            result = train_forest(data, out, cfg=cfg, max_minutes=max_minutes,
                                  storage_options=so, progress=progress)
        except (ForestError, AnnotationError, FileNotFoundError) as e:
            raise fail(e) from None
        typer.echo(json.dumps(result))
