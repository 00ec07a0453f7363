"""``rootflow train rootquant``: train or fine-tune RootQuant on Ray Train (registered under
``rootflow train``). ``jobs/train_rootquant.py`` runs the same command inside ``ray job submit``.

Everything is a field of :class:`rootflow.training.rootquant_task.RootQuantTrainConfig`: give a
YAML with ``--config`` and change any field with ``--set a.b=value``; the few flags below are
shortcuts for the fields one changes most. The resolved config is printed and saved inside the
exported checkpoint (``meta.train_config``).
"""

from __future__ import annotations

import typer


def build_config(*, config: str | None, overrides: list[str], labels: str | None,
                 source: str | None, manifest: str | None, image_column: str | None,
                 default_dpi: float | None, init_from: str | None, backbone: str | None,
                 epochs: int | None, workers: int | None, gpu: bool | None,
                 storage_path: str | None, name: str | None,
                 head_only_epochs: int | None, head: str | None = None) -> object:
    """The run's config: YAML, then shortcut flags, then ``--set`` overrides (last wins)."""
    from rootflow import config as cfglib
    from rootflow.training.rootquant_task import RootQuantTrainConfig

    shortcuts = [("data.uri", labels), ("data.source", source), ("data.manifest", manifest),
                 ("data.columns.image", image_column), ("data.default_dpi", default_dpi),
                 ("init_from", init_from), ("model.backbone", backbone), ("run.epochs", epochs),
                 ("run.num_workers", workers), ("run.use_gpu", gpu),
                 ("run.storage_path", storage_path), ("run.name", name),
                 ("optim.head_only_epochs", head_only_epochs), ("model.head", head)]
    sets = [f"{k}={'true' if v is True else 'false' if v is False else v}"
            for k, v in shortcuts if v is not None]
    return cfglib.load(RootQuantTrainConfig, config, [*sets, *overrides])


def register(train: typer.Typer) -> None:
    """Add ``rootquant`` to the ``train`` group."""

    @train.command("rootquant")
    def rootquant(
        labels: str | None = typer.Option(None, help="Labels: CSV/Parquet table, Delta traits table, or manifest with masks (see --source)."),
        source: str | None = typer.Option(None, help="table | traits | masks."),
        manifest: str | None = typer.Option(None, help="Manifest giving dpi/URIs for a label table (matched on URI or file name)."),
        image_column: str | None = typer.Option(None, help="Label table column naming the image."),
        default_dpi: float | None = typer.Option(None, help="dpi for labels that have none."),
        init_from: str | None = typer.Option(None, help="RootQuant checkpoint to fine-tune from."),
        backbone: str | None = typer.Option(None, help="timm backbone for a fresh model."),
        head: str | None = typer.Option(None, help="dense (hurdle density map over cells) | pooled (the seed's model: global pooling, two outputs; its Huber loss with --set loss.huber_delta=1)."),
        epochs: int | None = typer.Option(None),
        head_only_epochs: int | None = typer.Option(None, help="Epochs with the backbone frozen first."),
        workers: int | None = typer.Option(None, help="Ray Train workers."),
        gpu: bool | None = typer.Option(None, "--gpu/--cpu", help="One GPU per worker."),
        storage_path: str | None = typer.Option(None, help="Checkpoint root (local or s3://)."),
        name: str | None = typer.Option(None, help="Run name (re-use it to resume)."),
        config: str | None = typer.Option(None, "--config", help="RootQuantTrainConfig YAML."),
        set_: list[str] = typer.Option([], "--set", help="Config override a.b=value (repeatable)."),
        storage_option: list[str] = typer.Option([], "--storage-option", help="key=value: endpoint_url, region, allow_http, path_style (credentials from AWS_* env)."),
        address: str | None = typer.Option(None, help="Ray address (default: RAY_ADDRESS or a local Ray)."),
        print_config: bool = typer.Option(False, help="Print the resolved config and exit."),
    ) -> None:
        """Train or fine-tune RootQuant (length + area regression) on Ray Train."""
        import json

        from rootflow import config as cfglib
        from rootflow.io._cli import cli_error, storage_from_cli
        from rootflow.models.rootquant import HEADS

        if head is not None and head not in HEADS:
            raise cli_error(f"--head must be one of {', '.join(HEADS)}; got {head!r}")
        cfg = build_config(config=config, overrides=set_, labels=labels, source=source,
                           manifest=manifest, image_column=image_column,
                           default_dpi=default_dpi, init_from=init_from, backbone=backbone,
                           epochs=epochs, workers=workers, gpu=gpu, storage_path=storage_path,
                           name=name, head_only_epochs=head_only_epochs, head=head)
        typer.echo(cfglib.dump(cfg))
        if print_config:
            return
        from rootflow.inference._cli import init_ray
        from rootflow.training.rootquant_task import train

        so = storage_from_cli(storage_option)
        if cfg.init_from:  # type: ignore[attr-defined]
            from rootflow.models.rootquant import RootQuantFormatError, checkpoint_format

            try:  # an old or foreign checkpoint: one line here, not a trace from a Ray worker
                checkpoint_format(cfg.init_from, sha256=cfg.init_sha256,  # type: ignore[attr-defined]
                                  storage_options=so)
            except (RootQuantFormatError, FileNotFoundError) as e:
                raise cli_error(e) from None
        init_ray(address)
        result = train(cfg, storage_options=so)  # type: ignore[arg-type]
        typer.echo(json.dumps({"export_uri": result.export_uri, "best_epoch": result.best_epoch,
                               "best_metrics": result.best_metrics,
                               "epochs_run": result.epochs_run}, indent=2, default=str))
