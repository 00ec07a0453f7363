"""Epoch time of RootSAM decoder training with and without the embedding cache.

The image encoder is frozen, so the cache encodes each augmented view once and later epochs only
run the prompt encoder + mask decoder. This script times, on one worker in-process (no Ray, so
only compute is measured):

* ``live``: ``train_epoch`` encoding every patch every epoch (the plain recipe);
* ``cache build``: encoding ``views`` views of every patch once (paid once per run);
* ``cached``: ``train_epoch`` on cached embeddings.

Random-init weights are fine here: the architecture (and so the cost) is the real one.
Example (the numbers in docs/training.md):

    nice .venv/bin/python benchmarks/embedding_cache.py --data ../shared/data/real/prmi_peanut \
        --variant hiera_tiny --patch 256 --images 6 --patches-per-image 2 --epochs 2
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from rootflow.training.data import PatchConfig
from rootflow.training.embedding_cache import EmbeddingCacheConfig
from rootflow.training.loop import LoopContext, TrainRunConfig
from rootflow.training.rootsam_task import RootSAMTask, RootSAMTrainConfig


def _ctx() -> LoopContext:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return LoopContext(world_rank=0, world_size=1, local_rank=0, device=dev,
                       run=TrainRunConfig(metric="val_miou", mode="max"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, help="folder of image/mask pairs or a manifest")
    ap.add_argument("--variant", default="hiera_tiny")
    ap.add_argument("--patch", type=int, default=256)
    ap.add_argument("--images", type=int, default=6)
    ap.add_argument("--patches-per-image", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    base = RootSAMTrainConfig(
        data=args.data, variant=args.variant, max_images=args.images,
        patch=PatchConfig(patch_size=args.patch, patches_per_image=args.patches_per_image),
        val_patch=PatchConfig(patch_size=args.patch, patches_per_image=1),
        batch_size=args.batch_size, val_fraction=0.2)
    out: dict[str, object] = {"variant": args.variant, "patch": args.patch,
                              "threads": torch.get_num_threads(),
                              "device": str(_ctx().device)}

    live = RootSAMTask(base)
    live.setup(_ctx())
    out["train_patches"] = len(live.train_ds)
    times = []
    for e in range(args.epochs):
        t0 = time.perf_counter()
        live.train_epoch(e)
        times.append(time.perf_counter() - t0)
    out["live_epoch_s"] = times

    with tempfile.TemporaryDirectory() as tmp:
        import dataclasses

        cfg = dataclasses.replace(base, cache=EmbeddingCacheConfig(uri=tmp, views=args.views))
        cached = RootSAMTask(cfg)
        t0 = time.perf_counter()
        cached.setup(_ctx())  # builds train (views) + val (1 view) caches
        out["cache_build_s"] = time.perf_counter() - t0
        times = []
        for e in range(args.epochs):
            t0 = time.perf_counter()
            cached.train_epoch(e)
            times.append(time.perf_counter() - t0)
        out["cached_epoch_s"] = times
    live_s = min(out["live_epoch_s"])  # type: ignore[type-var]
    cached_s = min(out["cached_epoch_s"])  # type: ignore[type-var]
    out["speedup_per_epoch"] = live_s / cached_s
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
