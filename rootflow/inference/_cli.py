"""``rootflow infer``, ``rootflow reprocess``, ``rootflow segment`` and ``rootflow demo``.

``jobs/infer.py`` and ``jobs/reprocess.py`` call these same functions, so ``ray job submit ...
-- python jobs/infer.py ARGS`` and ``rootflow infer ARGS`` run identical code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from rootflow.io._cli import storage_from_cli

EXIT_FAILED = 1  # the run failed (its committed rows stay; a re-run resumes)
EXIT_USAGE = 2  # bad arguments, an invalid manifest or an unusable model file: nothing was run
EXIT_REJECTS = 3  # the run finished but some manifest rows were rejected (success with warnings)
EXIT_LEASE_HELD = 4  # another live run holds the lake's lease: nothing was run


def init_ray(address: str | None, *, num_cpus: int | None = None, quiet: bool = True) -> None:
    """:func:`rootflow.inference.pipeline.init_ray` (starting Ray belongs with the job)."""
    from rootflow.inference.pipeline import init_ray as _init_ray

    _init_ray(address, num_cpus=num_cpus, quiet=quiet)


def build_config(*, producers: str, config_file: str | None, overrides: list[str] | None,
                 rootsam_config: str | None, base_checkpoint: str | None,
                 base_sha256: str | None, rootsam_checkpoint: str | None,
                 rootquant_checkpoint: str | None, gpus_per_actor: float | None,
                 actors: str | None,
                 batch_size: int | None, fuse: bool | None, since: str | None,
                 until: str | None, force: bool, forest_model: str | None = None,
                 forest_sha256: str | None = None, unet_checkpoint: str | None = None,
                 unet_sha256: str | None = None, rootsam_sha256: str | None = None,
                 rootquant_sha256: str | None = None) -> Any:
    """InferConfig from a YAML file, ``--set`` overrides and the dedicated flags (flags win).

    Raises:
        ValueError: an unknown producer or key, a malformed digest, or a requested forest/unet
            producer without a model URI.
    """
    import dataclasses

    from rootflow import config as cfglib
    from rootflow.inference.pipeline import InferConfig, Resources

    for flag, digest in (("base", base_sha256), ("rootsam", rootsam_sha256),
                         ("rootquant", rootquant_sha256), ("forest", forest_sha256),
                         ("unet", unet_sha256)):
        _check_digest(f"--{flag}-sha256", digest)
    cfg = cfglib.load(InferConfig, config_file, overrides or [])
    rs = dict(cfg.rootsam)
    for key, val in (("variant", rootsam_config), ("base_checkpoint", base_checkpoint),
                     ("base_sha256", base_sha256), ("rootsam_checkpoint", rootsam_checkpoint),
                     ("rootsam_sha256", rootsam_sha256)):
        if val is not None:
            rs[key] = val
    rq = dict(cfg.rootquant)
    if rootquant_checkpoint is not None:
        rq["checkpoint"] = rootquant_checkpoint
    if rootquant_sha256 is not None:
        rq["sha256"] = rootquant_sha256
    seg = {"forest": dict(cfg.forest), "unet": dict(cfg.unet)}
    for name, key, val in (("forest", "model", forest_model), ("forest", "sha256", forest_sha256),
                           ("unet", "model", unet_checkpoint), ("unet", "sha256", unet_sha256)):
        if val is not None:
            seg[name][key] = val
    from rootflow.inference.pipeline import parse_actors

    res = cfg.resources
    if gpus_per_actor is not None:
        if gpus_per_actor < 0:
            raise ValueError(f"--gpus-per-actor must be >= 0, got {gpus_per_actor}")
        res = (Resources.gpu(gpus_per_actor, res.model_actors) if gpus_per_actor > 0
               else dataclasses.replace(res, model_num_gpus=0.0))
    if actors:
        res = dataclasses.replace(res, model_actors=parse_actors(actors))
    if batch_size:
        res = dataclasses.replace(res, model_batch_size=batch_size)
    if fuse is not None:
        res = dataclasses.replace(res, fuse_models=fuse)
    prods = tuple(p.strip() for p in producers.split(",") if p.strip())
    return dataclasses.replace(cfg, producers=prods, rootsam=rs, rootquant=rq,
                               forest=seg["forest"], unet=seg["unet"], resources=res,
                               since=since or cfg.since, until=until or cfg.until,
                               skip_done=cfg.skip_done and not force)


def _check_digest(flag: str, digest: str | None) -> None:
    """A digest given on the command line must be a full sha256 (64 hex digits)."""
    import re

    if digest is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        raise ValueError(f"{flag} must be the full 64-hex-digit sha256 of the file "
                         f"(got {len(digest)} characters)")


def check_manifest(manifest: str, storage: dict[str, Any], allow_prefix: list[str] | None) -> None:
    """Validate the manifest before anything starts: an invalid one, or one whose URIs point
    outside ``allow_prefix`` (default: the manifest's own bucket or folder), is one line on
    stderr naming column and row, and exit 2."""
    from rootflow.io.manifest import ManifestError, read_manifest

    try:
        read_manifest(manifest, storage_options=storage, allow_prefixes=allow_prefix or ["default"])
    except (ManifestError, OSError, ValueError) as e:
        raise _usage_error(str(e).strip().splitlines()[0] if str(e).strip()
                           else type(e).__name__) from None
    except Exception as e:  # storage client errors (no endpoint, refused credentials)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise _usage_error(f"cannot read manifest {manifest}: {type(e).__name__}: {first}") from None


def _usage_error(message: str) -> typer.Exit:
    """Print one line on stderr; the caller raises the returned exit (code 2)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(EXIT_USAGE)


def _config_or_exit(**kwargs: Any) -> Any:
    """:func:`build_config`, with a bad config or a missing model URI as one line and exit 2."""
    try:
        return build_config(**kwargs)
    except (ValueError, TypeError, OSError) as e:
        raise _usage_error(str(e)) from None


def preflight(cfg: Any, storage: dict[str, Any]) -> dict[str, str]:
    """Every producer's model version, resolved before Ray starts.

    Model files are read (and forests/U-Nets loaded, RootSAM/RootQuant checkpoints opened
    weights-only and checked) here, so an unsafe, corrupt, wrong-kind, missing or
    digest-mismatched file is one line on stderr and exit 2 in a second or two, instead of a
    traceback after Ray's start-up.
    """
    from rootflow.inference.pipeline import resolve_model_versions

    try:
        return resolve_model_versions(cfg, storage)
    except (ValueError, OSError, KeyError) as e:  # SegmenterLoadError, ChecksumError and
        # ModelFileError are ValueErrors; an unknown SAM2.1 variant is a KeyError
        text = (e.args[0] if isinstance(e, KeyError) and e.args else str(e)).strip()
        raise _usage_error(text.splitlines()[0] if text else type(e).__name__) from None


def _run_and_report(manifest: str, lake: str, cfg: Any, *, storage: dict[str, Any],
                    address: str | None, job_kind: str, summary_json: str | None,
                    versions: dict[str, str] | None = None,
                    allow_prefix: list[str] | None = None) -> None:
    """Run the job, print its summary (and write it as JSON), exit 3 if rows were rejected."""
    from rootflow.inference.pipeline import format_summary, run

    check_manifest(manifest, storage, allow_prefix)
    versions = versions if versions is not None else preflight(cfg, storage)
    init_ray(address)
    try:
        summary = run(manifest, lake, cfg, storage_options=storage, job_kind=job_kind,
                      model_versions=versions)
    except Exception as e:  # the run is recorded as failed in `runs`; a re-run resumes
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        typer.echo(f"error: run failed: {type(e).__name__}: {first}", err=True)
        raise typer.Exit(EXIT_FAILED) from None
    if summary.exit_code == EXIT_LEASE_HELD:
        typer.echo(f"error: {summary.status.removeprefix('lease_held: ')}", err=True)
    typer.echo(format_summary(summary))
    if summary_json:
        Path(summary_json).write_text(json.dumps(summary.to_dict(), indent=2, default=str))
    if summary.exit_code:
        raise typer.Exit(summary.exit_code)


_PRODUCERS_HELP = ("Comma-separated producers: mask (traits of the manifest's masks), forest, unet "
                   "(trained segmenters: --forest-model, --unet-checkpoint), rootsam, rootquant.")
_FOREST_HELP = "Forest model URI (forest.json, or the `rootflow train forest --out` folder)."
_UNET_HELP = "U-Net checkpoint URI (unet.pt, or the `rootflow train unet --out` folder)."
_SHA_HELP = "Expected full 64-hex sha256 of the {} file."
_ALLOW_HELP = ("URI prefix the manifest's image_uri/mask_uri may point into (repeatable); default: "
               "the manifest's own scheme and bucket (s3://bucket/), or its folder when local.")
_GPUS_HELP = ("GPUs per model actor; a fraction shares a GPU between actors, 0 = CPU. Default: 1 "
              "when the cluster has (or can scale to) GPUs, else 0.")
_ACTORS_HELP = ("Model actors MIN:MAX (N = N:N); the pool autoscales between them. Default: 1 to "
                "as many as the cluster's GPUs allow (adding GPU nodes adds actors), starting "
                "with one per GPU free at the start.")


def register(app: typer.Typer) -> None:
    @app.command("infer")
    def infer(
        manifest: str = typer.Argument(..., help="Manifest URI (Parquet/CSV), local or s3://."),
        lake: str = typer.Argument(..., help="Lake root URI: Delta tables traits/runs/rejects and masks."),
        producers: str = typer.Option("mask,rootsam,rootquant", help=_PRODUCERS_HELP),
        config: str | None = typer.Option(None, "--config", help="InferConfig YAML."),
        set_: list[str] = typer.Option([], "--set", help="Config override key=value (repeatable), e.g. rootsam.tile_size=512."),
        rootsam_config: str | None = typer.Option(None, help="SAM2.1 variant: hiera_tiny, hiera_small, hiera_base_plus, hiera_large (or test: a tiny CPU config)."),
        base_checkpoint: str | None = typer.Option(None, help="SAM2.1 base checkpoint URI (local or s3://)."),
        base_sha256: str | None = typer.Option(None, help="Expected sha256 of the base checkpoint."),
        rootsam_checkpoint: str | None = typer.Option(None, help="RootSAM (fine-tuned decoder) checkpoint URI."),
        rootquant_checkpoint: str | None = typer.Option(None, help="RootQuant checkpoint URI."),
        forest_model: str | None = typer.Option(None, help=_FOREST_HELP),
        forest_sha256: str | None = typer.Option(None, help=_SHA_HELP.format("forest")),
        unet_checkpoint: str | None = typer.Option(None, help=_UNET_HELP),
        unet_sha256: str | None = typer.Option(None, help=_SHA_HELP.format("U-Net")),
        rootsam_sha256: str | None = typer.Option(None, help=_SHA_HELP.format("RootSAM")),
        rootquant_sha256: str | None = typer.Option(None, help=_SHA_HELP.format("RootQuant")),
        allow_prefix: list[str] = typer.Option([], "--allow-prefix", help=_ALLOW_HELP),
        gpus_per_actor: float | None = typer.Option(None, help=_GPUS_HELP),
        actors: str | None = typer.Option(None, help=_ACTORS_HELP),
        batch_size: int | None = typer.Option(None, help="Images per model call."),
        fuse: bool | None = typer.Option(None, "--fuse/--no-fuse", help="All models in one actor (--no-fuse: one actor pool per model)."),
        since: str | None = typer.Option(None, help="Only images captured on/after this ISO date."),
        until: str | None = typer.Option(None, help="Only images captured on/before this ISO date."),
        force: bool = typer.Option(False, help="Re-process images that already have rows."),
        storage_option: list[str] = typer.Option([], "--storage-option", help="key=value: endpoint_url, region, allow_http, path_style (credentials from AWS_* env)."),
        address: str | None = typer.Option(None, help="Ray address (default: RAY_ADDRESS or a local Ray)."),
        summary_json: str | None = typer.Option(None, help="Also write the run summary as JSON here."),
        job_kind: str = typer.Option("infer", hidden=True),
    ) -> None:
        """Run the processing job: masks to object storage, rows to the traits/rejects/runs tables.

        Exit code 0: every row ok; 1: the run failed (a re-run resumes); 2: nothing run: bad
        arguments, an invalid manifest, no model URI for a requested producer, or a model file
        that is corrupt, of the wrong kind or fails its sha256; 3: finished, some rows rejected
        (rejects table); 4: another live run holds the lake's lease.
        """
        cfg = _config_or_exit(producers=producers, config_file=config, overrides=set_,
                              rootsam_config=rootsam_config, base_checkpoint=base_checkpoint,
                              base_sha256=base_sha256, rootsam_checkpoint=rootsam_checkpoint,
                              rootquant_checkpoint=rootquant_checkpoint,
                              gpus_per_actor=gpus_per_actor, actors=actors, batch_size=batch_size, fuse=fuse, since=since,
                              until=until, force=force, forest_model=forest_model,
                              forest_sha256=forest_sha256, unet_checkpoint=unet_checkpoint,
                              unet_sha256=unet_sha256, rootsam_sha256=rootsam_sha256,
                              rootquant_sha256=rootquant_sha256)
        _run_and_report(manifest, lake, cfg, storage=storage_from_cli(storage_option),
                        address=address, job_kind=job_kind, summary_json=summary_json,
                        allow_prefix=allow_prefix)

    @app.command("reprocess")
    def reprocess(
        source: str = typer.Argument(..., help="Manifest URI, or an archive prefix to (re)list."),
        lake: str = typer.Argument(..., help="Lake root URI."),
        producers: str = typer.Option("mask,rootsam,rootquant", help=_PRODUCERS_HELP),
        experiment_config: str | None = typer.Option(None, help="Experiment YAML when SOURCE is an archive prefix."),
        config: str | None = typer.Option(None, "--config", help="InferConfig YAML."),
        set_: list[str] = typer.Option([], "--set", help="Config override key=value (repeatable)."),
        rootsam_config: str | None = typer.Option(None),
        base_checkpoint: str | None = typer.Option(None),
        base_sha256: str | None = typer.Option(None),
        rootsam_checkpoint: str | None = typer.Option(None),
        rootquant_checkpoint: str | None = typer.Option(None),
        forest_model: str | None = typer.Option(None, help=_FOREST_HELP),
        forest_sha256: str | None = typer.Option(None, help=_SHA_HELP.format("forest")),
        unet_checkpoint: str | None = typer.Option(None, help=_UNET_HELP),
        unet_sha256: str | None = typer.Option(None, help=_SHA_HELP.format("U-Net")),
        rootsam_sha256: str | None = typer.Option(None, help=_SHA_HELP.format("RootSAM")),
        rootquant_sha256: str | None = typer.Option(None, help=_SHA_HELP.format("RootQuant")),
        allow_prefix: list[str] = typer.Option([], "--allow-prefix", help=_ALLOW_HELP),
        gpus_per_actor: float | None = typer.Option(None, help=_GPUS_HELP),
        actors: str | None = typer.Option(None, help=_ACTORS_HELP),
        retry_rejects: bool = typer.Option(False, help="Retry images rejected before for the same model version and file."),
        since: str | None = typer.Option(None, help="Capture date lower bound (ISO)."),
        until: str | None = typer.Option(None, help="Capture date upper bound (ISO)."),
        wait_s: float = typer.Option(0.0, help="Wait this long for an overlapping run to finish."),
        storage_option: list[str] = typer.Option([], "--storage-option"),
        address: str | None = typer.Option(None),
        summary_json: str | None = typer.Option(None),
    ) -> None:
        """Scheduled re-processing: only images lacking rows for the target model versions.

        Safe to run from a scheduler every night: images done by an earlier run are skipped, a
        run overlapping another on the same scope waits or exits without work, and rows are
        merged, never duplicated. Exit codes as ``infer``.
        """
        from rootflow.inference.sources import manifest_for_source

        so = storage_from_cli(storage_option)
        overrides = [*set_, f"wait_for_lease_s={wait_s}",
                     *(["retry_rejects=true"] if retry_rejects else [])]
        cfg = _config_or_exit(producers=producers, config_file=config, overrides=overrides,
                              rootsam_config=rootsam_config, base_checkpoint=base_checkpoint,
                              base_sha256=base_sha256, rootsam_checkpoint=rootsam_checkpoint,
                              rootquant_checkpoint=rootquant_checkpoint,
                              gpus_per_actor=gpus_per_actor, actors=actors, batch_size=None, fuse=None, since=since,
                              until=until, force=False, forest_model=forest_model,
                              forest_sha256=forest_sha256, unet_checkpoint=unet_checkpoint,
                              unet_sha256=unet_sha256, rootsam_sha256=rootsam_sha256,
                              rootquant_sha256=rootquant_sha256)
        versions = preflight(cfg, so)  # before listing the archive: a bad model fails at once
        from rootflow.io.manifest import ManifestError
        from rootflow.io.storage import default_allowed_prefixes

        try:
            manifest_uri = manifest_for_source(source, lake, experiment_config=experiment_config,
                                               storage_options=so)
        except (ManifestError, OSError) as e:
            raise _usage_error(str(e).strip().splitlines()[0] if str(e).strip()
                               else type(e).__name__) from None
        _run_and_report(manifest_uri, lake, cfg, storage=so, address=address,
                        job_kind="reprocess", summary_json=summary_json, versions=versions,
                        allow_prefix=allow_prefix or default_allowed_prefixes(source))

    @app.command("demo")
    def demo(
        out: str = typer.Option("demo-output", help="Folder for the archive, manifest and lake."),
        n_images: int = typer.Option(24, help="Synthetic images to generate."),
        seed: int = typer.Option(0),
        models: bool = typer.Option(True, "--models/--no-models", help="Also train a forest on part of the archive and run it, RootSAM and RootQuant (random weights) on the archive."),
    ) -> None:
        """End to end on an embedded default: synthetic archive -> manifest -> Ray -> Delta -> summary."""
        from rootflow.demo import run_demo

        result = run_demo(out, n_images=n_images, seed=seed, models=models)
        if result["exit_code"]:  # the job's own exit codes (3: done with rejects; see rejects)
            raise typer.Exit(result["exit_code"])

    from rootflow.inference import _cli_segment

    _cli_segment.register(app)
