"""Tiny trained segmenters for the job and CLI tests (seconds to make, real files on disk)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass(frozen=True)
class TinyModel:
    folder: str  # a `rootflow train ... --out` style folder holding the model file
    uri: str  # the model file itself
    sha256: str
    model: Any  # the segmenter, loaded back through load_segmenter


def synthetic_pairs(root: Path, *, n: int = 2, seed: int = 11, height: int = 128,
                    width: int = 160) -> list[tuple[np.ndarray, np.ndarray]]:
    """(uint8 RGB image, bool mask) pairs from a small synthetic archive, dense in roots (a
    frame this small would otherwise often hold none)."""
    import pyarrow.parquet as pq

    from rootflow.io import storage
    from rootflow.io.images import decode, decode_mask
    from rootflow.synth import SynthConfig, generate_archive

    arch = str(root / "pairs")
    generate_archive(arch, config=SynthConfig(n_images=n, seed=seed, height=height, width=width,
                                               empty_fraction=0.0, roots_per_dm2=40.0))
    gt = pq.read_table(f"{arch}/ground_truth.parquet").to_pylist()
    return [(decode(storage.read_bytes(r["image_uri"]))[0],
             decode_mask(storage.read_bytes(r["mask_uri"]))) for r in gt]


def tiny_forest(root: Path) -> TinyModel:
    """A forest fitted for a few seconds on two small synthetic images, saved as forest.json."""
    from rootflow.models.forest import ForestConfig, fit_forest
    from rootflow.models.segmenters import load_segmenter

    pairs = synthetic_pairs(root)
    seg = fit_forest([p[0] for p in pairs], [p[1] for p in pairs], ForestConfig(),
                     max_seconds=3.0, progress=False)
    folder = root / "forest-run"
    uri = str(folder / "forest.json")
    sha = seg.save(uri)
    return TinyModel(folder=str(folder), uri=uri, sha256=sha, model=load_segmenter(uri))


def tiny_unet(root: Path) -> TinyModel:
    """A randomly initialised two-level U-Net saved as unet.pt (plumbing, not roots)."""
    from rootflow.models.segmenters import load_segmenter
    from rootflow.models.unet import UNetConfig, build_unet, save_unet

    cfg = UNetConfig(widths=(4, 8), tile=64)
    folder = root / "unet-run"
    uri = str(folder / "unet.pt")
    sha = save_unet(build_unet(cfg), cfg, uri)
    return TinyModel(folder=str(folder), uri=uri, sha256=sha, model=load_segmenter(uri))
