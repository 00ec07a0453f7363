"""``rootflow segment``: a mask PNG beside every image, with any trained model, without Ray.

For a folder of images on one machine (a new field season to look at, a model to eyeball)
this is quicker than writing a manifest and a lake. The model is a forest or U-Net file
(``--model``; kind read from the file by :func:`rootflow.models.segmenters.load_segmenter`) or
RootSAM (``--rootsam-config`` / ``--base-checkpoint`` / ``--rootsam-checkpoint``).

Exit codes: 0 every image segmented; 1 some images could not be read or segmented (one line
each on stderr, the others written); 2 nothing was processed: no model or an unusable one, no
input images, or not one image could be segmented.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

import numpy as np
import typer

from rootflow.io import storage

EXIT_SOME_FAILED = 1
EXIT_NOTHING = 2

#: Files a folder given as IMAGE expands to (``*_mask.png`` excluded).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")
MASK_SUFFIX = "_mask.png"


def is_mask_name(uri: str) -> bool:
    return PurePosixPath(uri).name.lower().endswith(MASK_SUFFIX)


def expand_inputs(inputs: list[str], storage_options: Any = None) -> list[str]:
    """Files and folders (local or object storage) -> image URIs, in order, without masks.

    A folder expands to its image files (not recursive, sorted); ``*_mask.png`` files are
    dropped, so ``DIR/*`` over a folder of image/mask pairs gives the images only. A name that
    does not exist is kept: it fails later as an unreadable image, named on stderr.
    """
    out: list[str] = []
    for item in inputs:
        try:
            fs = storage.filesystem(item, storage_options)
            path = storage.strip_protocol(item)
            is_dir = fs.isdir(path)
        except (OSError, ValueError):
            is_dir = False
        if is_dir:
            found = sorted(fs.ls(path, detail=False))
            out.extend(storage.to_uri(item, f) for f in found
                       if PurePosixPath(f).suffix.lower() in IMAGE_SUFFIXES and fs.isfile(f))
        else:
            out.append(item)
    return [u for u in dict.fromkeys(out) if not is_mask_name(u)]


def mask_name(uri: str) -> str:
    return f"{PurePosixPath(uri).stem}{MASK_SUFFIX}"


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def load_predictor(*, model: str | None, sha256: str | None, rootsam_config: str | None,
                   base_checkpoint: str | None, base_sha256: str | None,
                   rootsam_checkpoint: str | None, device: str, threads: int | None,
                   storage_options: Any) -> tuple[Callable[[np.ndarray], np.ndarray], str, str]:
    """(image -> bool mask, model version, kind) for the model the flags name.

    Raises:
        ValueError: no model, or both a segmenter file and RootSAM flags.
        Exception: whatever loading raises (the caller prints one line).
    """
    rootsam = any(v is not None for v in (rootsam_config, base_checkpoint, rootsam_checkpoint))
    if model and rootsam:
        raise ValueError("give either --model (forest/U-Net) or the RootSAM flags, not both")
    if not model and not rootsam:
        raise ValueError("no model: pass --model URI (forest or U-Net), or --rootsam-config / "
                         "--base-checkpoint / --rootsam-checkpoint for RootSAM")
    if model:
        from rootflow.inference.segment import SegmenterInferenceConfig, segment_image
        from rootflow.models.segmenters import load_segmenter

        SegmenterInferenceConfig(model=model, sha256=sha256)  # a full digest or none

        seg = load_segmenter(model, sha256=sha256, storage_options=storage_options,
                             device=device, num_threads=threads)
        return (lambda img: segment_image(seg, img)[0]), str(seg.version), str(seg.kind)

    import torch

    from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor

    if threads:
        torch.set_num_threads(threads)
    cfg = RootSAMInferenceConfig(variant=rootsam_config or "hiera_base_plus",
                                 base_checkpoint=base_checkpoint, base_sha256=base_sha256,
                                 rootsam_checkpoint=rootsam_checkpoint, device=device)
    pred = RootSAMPredictor(cfg, storage_options=storage_options)
    if pred.model.random_init:
        typer.echo(f"warning: RootSAM {pred.version} has random weights: masks are not roots",
                   err=True)
    return (lambda img: pred.predict([img])[0].mask), str(pred.version), "rootsam"


def register(app: typer.Typer) -> None:
    @app.command("segment")
    def segment(
        images: list[str] = typer.Argument(..., help="Images or folders (local or s3://); *_mask.png inputs are skipped."),
        out: str = typer.Option(..., "--out", help="Folder for the <stem>_mask.png files (created)."),
        model: str | None = typer.Option(None, "--model", help="Forest or U-Net model URI (file, or a `rootflow train` output folder); kind read from the file."),
        sha256: str | None = typer.Option(None, help="Expected full 64-hex sha256 of the --model file."),
        rootsam_config: str | None = typer.Option(None, help="RootSAM instead: SAM2.1 variant (hiera_tiny ... hiera_large, or test)."),
        base_checkpoint: str | None = typer.Option(None, help="RootSAM: SAM2.1 base checkpoint URI."),
        base_sha256: str | None = typer.Option(None, help="RootSAM: expected sha256 of the base checkpoint."),
        rootsam_checkpoint: str | None = typer.Option(None, help="RootSAM: fine-tuned decoder checkpoint URI."),
        device: str = typer.Option("cpu", help="torch device for a U-Net or RootSAM (cpu, cuda, cuda:N)."),
        threads: int | None = typer.Option(None, help="Inference threads (default: the library's)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="tqdm progress bar on stderr."),
        storage_option: list[str] = typer.Option([], "--storage-option", help="key=value for s3:// inputs/outputs (see `rootflow infer --help`)."),
    ) -> None:
        """Write <stem>_mask.png (0/255, the image's size) into --out for every image.

        Prints one JSON summary on stdout: n_images (masks written), out,
        model_version, seconds, failed (list of {image, error}).
        Exit code 0: all written; 1: some images failed (named on stderr, the
        rest written); 2: nothing processed (no or unusable model, no images,
        or every image failed).
        """
        from tqdm import tqdm

        from rootflow.io._cli import storage_from_cli
        from rootflow.io.images import decode, encode_png

        so = storage_from_cli(storage_option)
        t0 = time.perf_counter()
        try:
            predict, version, _kind = load_predictor(
                model=model, sha256=sha256, rootsam_config=rootsam_config,
                base_checkpoint=base_checkpoint, base_sha256=base_sha256,
                rootsam_checkpoint=rootsam_checkpoint, device=device, threads=threads,
                storage_options=so)
        except Exception as e:  # a bad model is one line, never a traceback
            msg = str(e) if isinstance(e, ValueError) else _line(e)
            typer.echo(f"error: {msg.strip().splitlines()[0]}", err=True)
            raise typer.Exit(EXIT_NOTHING) from None

        files = expand_inputs(images, so)
        if not files:
            typer.echo("error: no input images (folders are searched for "
                       f"{', '.join(IMAGE_SUFFIXES)}; *{MASK_SUFFIX} is skipped)", err=True)
            raise typer.Exit(EXIT_NOTHING)
        names: dict[str, str] = {}
        for f in files:
            other = names.setdefault(mask_name(f), f)
            if other != f:
                typer.echo(f"error: {other} and {f} would both write {mask_name(f)}", err=True)
                raise typer.Exit(EXIT_NOTHING)

        failed: list[dict[str, str]] = []
        written = 0
        for uri in tqdm(files, desc="segment", unit="img", file=sys.stderr, disable=not progress):
            try:
                rgb, _bits = decode(storage.read_bytes(uri, so))
                mask = predict(rgb)
                storage.write_bytes(storage.join(out, mask_name(uri)), encode_png(mask), so)
                written += 1
            except Exception as e:
                failed.append({"image": uri, "error": _line(e)})
                tqdm.write(f"{uri}: {_line(e)}", file=sys.stderr)
        typer.echo(json.dumps({"n_images": written, "out": out, "model_version": version,
                               "seconds": round(time.perf_counter() - t0, 3),
                               "failed": failed}))
        if failed:
            raise typer.Exit(EXIT_NOTHING if written == 0 else EXIT_SOME_FAILED)
