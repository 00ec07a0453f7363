"""``rootflow train unet``: a U-Net trained from scratch on Ray Train (registered under
``rootflow train``).

Everything is a field of :class:`rootflow.training.unet_task.UNetTrainConfig`: give a YAML with
``--config`` and change any field with ``--set a.b=value`` (``--set unet.widths=[16,32,64]``,
``--set patch.patch_size=128``). ``--out`` is a folder: ``<out>/unet.pt`` (the model),
``<out>/run/`` (checkpoints: the same command again resumes) and ``<out>/train.json``.
stdout gets exactly one JSON object (model URI, sha256, version, best epoch, validation Dice,
seconds...); logs go to stderr. Unusable annotations exit with code 2 and one ``error:`` line.
"""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the ``unet`` command to the ``train`` group."""

    @app.command("unet")
    def unet(
        data: str = typer.Option(..., help="Annotated manifest (CSV/Parquet with image_uri, mask_uri[, split]) or a folder of <stem>.<ext> + <stem>_mask.png pairs."),
        out: str = typer.Option(..., help="Output folder URI (local or s3://): unet.pt, run/, train.json. Re-use it to resume."),
        max_minutes: float = typer.Option(20.0, help="Wall-clock budget of this call in minutes (0 = none); a budget stop exports the best so far and the same command resumes."),
        epochs: int | None = typer.Option(None, help="Total epochs (default 30; a resumed run continues up to this)."),
        encoder: str | None = typer.Option(None, help="'plain' (default) or a timm model name."),
        encoder_weights: str | None = typer.Option(None, help="Encoder weights: a timm state dict or a previous unet.pt (local or s3://)."),
        encoder_sha256: str | None = typer.Option(None, help="Expected sha256 of --encoder-weights."),
        workers: int = typer.Option(1, help="Ray Train workers."),
        gpu: bool = typer.Option(False, "--gpu/--cpu", help="One GPU per worker."),
        cpus_per_worker: float | None = typer.Option(None, help="CPUs (and torch threads) per worker (default: this machine's cores / workers)."),
        max_failures: int = typer.Option(1, help="Worker-group restarts allowed."),
        config: str | None = typer.Option(None, "--config", help="UNetTrainConfig YAML."),
        set_: list[str] = typer.Option([], "--set", help="Config override a.b=value (repeatable)."),
        storage_option: list[str] = typer.Option([], "--storage-option", help="key=value: endpoint_url, region, allow_http, path_style (credentials from AWS_* env)."),
        address: str | None = typer.Option(None, help="Ray address (default: RAY_ADDRESS or a local Ray)."),
        print_config: bool = typer.Option(False, help="Print the resolved config (YAML) and exit."),
    ) -> None:
        """Train a U-Net segmenter from scratch (or from encoder weights) on Ray Train."""
        import json
        import time

        started = time.time()

        from rootflow import config as cfglib
        from rootflow.io._cli import cli_error
        from rootflow.training.data import AnnotationError
        from rootflow.training.unet_task import UNetTrainConfig

        shortcuts = {"epochs": epochs, "unet.encoder": encoder,
                     "encoder_weights": encoder_weights, "encoder_sha256": encoder_sha256}
        sets = [f"{k}={v}" for k, v in shortcuts.items() if v is not None]
        try:
            cfg = cfglib.load(UNetTrainConfig, config, [*sets, *set_])
        except (ValueError, TypeError) as e:
            raise cli_error(e) from None
        import dataclasses

        cfg = dataclasses.replace(cfg, data=data)
        if print_config:
            typer.echo(cfglib.dump(cfg))
            return
        from rootflow.io._cli import log_progress_to_stderr

        log_progress_to_stderr()

        from rootflow.inference._cli import init_ray
        from rootflow.io._cli import storage_from_cli
        from rootflow.training.unet_task import check_data, train_unet

        so = storage_from_cli(storage_option) or None
        try:  # before Ray starts: bad input costs a second, not a worker group
            check_data(cfg, storage_options=so)
        except (AnnotationError, OSError) as e:
            raise cli_error(e) from None
        init_ray(address)
        try:
            summary = train_unet(data, out, cfg=cfg, max_minutes=max_minutes or None,
                                 num_workers=workers, use_gpu=gpu,
                                 cpus_per_worker=cpus_per_worker, max_failures=max_failures,
                                 storage_options=so, check=False,
                                 started=started)
        except AnnotationError as e:
            raise cli_error(e) from None
        typer.echo(json.dumps(summary))
