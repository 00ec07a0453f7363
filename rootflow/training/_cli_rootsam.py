"""``rootflow train rootsam``: RootSAM's two-stage fine-tuning on Ray Train (registered under
``rootflow train``). ``jobs/train_rootsam.py`` runs the same command inside ``ray job submit``.

Everything is a field of :class:`rootflow.training.rootsam_task.RootSAMRecipe`: give a YAML with
``--config`` and change any field with ``--set a.b=value`` (e.g. ``--set task.loss.w_boundary=1``);
the flags below are shortcuts for the fields one changes most. The resolved recipe is printed
and saved inside every exported RootSAM checkpoint (``train_config``).
"""

from __future__ import annotations

import typer

_VARIANT_HELP = ("SAM2.1 variant: hiera_tiny|hiera_small|hiera_base_plus|hiera_large (or t, s, "
                 "b+, l), or 'test' (tiny CPU model, random init only makes sense for tests)")


def build_recipe(*, config: str | None, overrides: list[str], **shortcuts: object) -> object:
    """The recipe: YAML, then shortcut flags (None = not given), then ``--set`` (last wins)."""
    from rootflow import config as cfglib
    from rootflow.training.rootsam_task import RootSAMRecipe

    fields = {
        "data": "task.data", "out": "out", "base_checkpoint": "task.base_checkpoint",
        "base_sha256": "task.base_sha256", "model_config": "task.variant",
        "init_checkpoint": "task.init_checkpoint", "stage1_epochs": "stage1.epochs",
        "stage2_epochs": "stage2.epochs", "stage1_patch": "stage1.patch_size",
        "stage2_patch": "stage2.patch_size", "stage1_lr": "stage1.lr", "stage2_lr": "stage2.lr",
        "val_patch": ("stage1.val_patch_size", "stage2.val_patch_size"), "patches_per_image":
        "task.patch.patches_per_image", "empty_fraction": "task.patch.empty_fraction",
        "n_pos": "task.prompts.n_pos", "n_neg": "task.prompts.n_neg",
        "click_rounds": "task.click_rounds", "precision": "run.precision",
        "grad_clip": "run.grad_clip_norm", "loader_workers": "task.loader_workers",
        "batch_size": "task.batch_size", "max_images": "task.max_images",
        "workers": "run.num_workers", "gpu": "run.use_gpu", "storage_path": "run.storage_path",
        "name": "run.name", "max_failures": "run.max_failures",
        "early_stopping": "run.early_stopping_patience", "version": "task.version",
    }
    sets = []
    for key, value in shortcuts.items():
        if value is None:
            continue
        v = "true" if value is True else "false" if value is False else value
        targets = fields[key]
        for target in (targets,) if isinstance(targets, str) else targets:
            sets.append(f"{target}={v}")
    return cfglib.load(RootSAMRecipe, config, [*sets, *overrides])


def register(train: typer.Typer) -> None:
    """Add ``rootsam`` to the ``train`` group."""

    @train.command("rootsam")
    def rootsam(
        data: str | None = typer.Option(None, help="Annotated manifest (CSV/Parquet with image_uri, mask_uri[, split]) or a folder of <stem>.<ext> + <stem>_mask.png pairs."),
        out: str | None = typer.Option(None, help="URI of the final RootSAM checkpoint (stage 1's lands beside it)."),
        base_checkpoint: str | None = typer.Option(None, help="Meta's SAM2.1 .pt for the variant (local or s3://). Without it: random init (mechanics only)."),
        base_sha256: str | None = typer.Option(None, help="Expected sha256 of the base checkpoint."),
        model_config: str | None = typer.Option(None, help=_VARIANT_HELP),
        init_checkpoint: str | None = typer.Option(None, help="RootSAM checkpoint to start stage 1 from."),
        stage1_epochs: int | None = typer.Option(None, help="Stage 1 epochs (0 skips; default 20)."),
        stage2_epochs: int | None = typer.Option(None, help="Stage 2 epochs (0 skips; default 10)."),
        stage1_patch: int | None = typer.Option(None, help="Stage 1 patch side (default 512)."),
        stage2_patch: int | None = typer.Option(None, help="Stage 2 patch side (default 1024)."),
        stage1_lr: float | None = typer.Option(None, help="Stage 1 learning rate (default 1e-4)."),
        stage2_lr: float | None = typer.Option(None, help="Stage 2 learning rate (default 1e-5)."),
        val_patch: int | None = typer.Option(None, help="Validation patch side of both stages (default: each stage's own patch side)."),
        patches_per_image: int | None = typer.Option(None, help="Training patches per image per epoch."),
        empty_fraction: float | None = typer.Option(None, help="Share of root-free patches."),
        n_pos: int | None = typer.Option(None, help="EDT-weighted positive points of the prompt policy (task.prompts)."),
        n_neg: int | None = typer.Option(None, help="EDT-weighted negative points of the prompt policy."),
        click_rounds: int | None = typer.Option(None, help="Simulated corrective clicks per training sample (default 2)."),
        precision: str | None = typer.Option(None, help="fp32 or bf16 (bf16 autocast on CUDA workers only)."),
        grad_clip: float | None = typer.Option(None, help="Clip the gradient norm to this."),
        loader_workers: int | None = typer.Option(None, help="DataLoader processes per Ray worker."),
        batch_size: int | None = typer.Option(None, help="Patches per step per worker."),
        max_images: int | None = typer.Option(None, help="Use only the first N annotated images."),
        cache: str | None = typer.Option(None, help="Embedding cache folder (local or s3://): train the decoder on cached encoder outputs."),
        cache_views: int = typer.Option(4, help="Augmented views per patch in the embedding cache."),
        workers: int | None = typer.Option(None, help="Ray Train workers."),
        gpu: bool | None = typer.Option(None, "--gpu/--cpu", help="One GPU per worker."),
        storage_path: str | None = typer.Option(None, help="Checkpoint root (local or s3://; shared by all nodes)."),
        name: str | None = typer.Option(None, help="Run name (re-use it to resume)."),
        max_failures: int | None = typer.Option(None, help="Worker-group restarts allowed."),
        early_stopping: int | None = typer.Option(None, help="Stop a stage after N epochs without val mIoU gain."),
        version: str | None = typer.Option(None, help="RootSAM version string for the export."),
        config: str | None = typer.Option(None, "--config", help="RootSAMRecipe YAML."),
        set_: list[str] = typer.Option([], "--set", help="Recipe override a.b=value (repeatable)."),
        storage_option: list[str] = typer.Option([], "--storage-option", help="key=value: endpoint_url, region, allow_http, path_style (credentials from AWS_* env)."),
        address: str | None = typer.Option(None, help="Ray address (default: RAY_ADDRESS or a local Ray)."),
        print_config: bool = typer.Option(False, help="Print the resolved recipe and exit."),
    ) -> None:
        """Fine-tune RootSAM (SAM2.1, frozen image encoder) in two stages on Ray Train."""
        import dataclasses
        import json

        from rootflow import config as cfglib
        from rootflow.training.embedding_cache import EmbeddingCacheConfig

        recipe = build_recipe(
            config=config, overrides=set_, data=data, out=out, base_checkpoint=base_checkpoint,
            base_sha256=base_sha256, model_config=model_config, init_checkpoint=init_checkpoint,
            stage1_epochs=stage1_epochs, stage2_epochs=stage2_epochs, stage1_patch=stage1_patch,
            stage2_patch=stage2_patch, stage1_lr=stage1_lr, stage2_lr=stage2_lr,
            val_patch=val_patch, patches_per_image=patches_per_image,
            empty_fraction=empty_fraction, n_pos=n_pos, n_neg=n_neg, click_rounds=click_rounds,
            precision=precision, grad_clip=grad_clip, loader_workers=loader_workers,
            batch_size=batch_size,
            max_images=max_images, workers=workers, gpu=gpu, storage_path=storage_path,
            name=name, max_failures=max_failures, early_stopping=early_stopping,
            version=version)
        if cache:
            task = dataclasses.replace(recipe.task,  # type: ignore[attr-defined]
                                       cache=EmbeddingCacheConfig(uri=cache, views=cache_views))
            recipe = dataclasses.replace(recipe, task=task)  # type: ignore[type-var]
        typer.echo(cfglib.dump(recipe))
        if print_config:
            return
        if not recipe.task.data:  # type: ignore[attr-defined]
            raise typer.BadParameter("--data (or task.data in --config) is required")
        from rootflow.inference._cli import init_ray
        from rootflow.io._cli import storage_from_cli
        from rootflow.training.rootsam_task import recipe_stages, train_rootsam

        so = storage_from_cli(storage_option)
        init_ray(address)
        results = train_rootsam(recipe_stages(recipe), storage_options=so)  # type: ignore[arg-type]
        typer.echo(json.dumps([{"export_uri": r.export_uri, "best_epoch": r.best_epoch,
                                "epochs_run": r.epochs_run, "best_metrics": r.best_metrics,
                                "run_uri": r.run_uri} for r in results], indent=2))
