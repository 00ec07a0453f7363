#!/usr/bin/env python
"""RootQuant inference throughput (random weights: speed does not depend on them).

Measures the predictor end to end (resample to mm_per_px, tile, forward, sum per image) on:

* ``tile``: one image of exactly one tile at the model scale (296 x 296 for inception_resnet_v2);
  images/s here is the backbone's throughput at its input size;
* ``frame``: a 736 x 552 minirhizotron frame at ``--frame-dpi`` (PRMI-sized), several tiles.

    nice -n 10 .venv/bin/python benchmarks/rootquant_throughput.py --device cpu --n 16
    python benchmarks/rootquant_throughput.py --device cuda --batch 64 --n 512     # GPU session

Prints one JSON line per case; numbers go in docs/rootquant.md with the machine they ran on.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="inception_resnet_v2")
    ap.add_argument("--mm-per-px", type=float, default=0.1)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--batch", type=int, default=8, help="tiles per forward pass")
    ap.add_argument("--n", type=int, default=16, help="images per case")
    ap.add_argument("--frame-dpi", type=float, default=254.0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    args = ap.parse_args()

    import numpy as np
    import torch

    from rootflow.inference.rootquant import RootQuantPredictor
    from rootflow.models.rootquant import RootQuant, RootQuantConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = RootQuant(RootQuantConfig(backbone=args.backbone, mm_per_px=args.mm_per_px))
    pred = RootQuantPredictor(model, device=args.device, amp=args.amp, tile_batch=args.batch)
    t = model.tile_px
    rng = np.random.default_rng(0)
    cases = {
        "tile": ([rng.integers(0, 255, (t, t, 3), dtype=np.uint8) for _ in range(args.n)],
                 25.4 / args.mm_per_px),
        "frame": ([rng.integers(0, 255, (552, 736, 3), dtype=np.uint8) for _ in range(args.n)],
                  args.frame_dpi),
    }
    for name, (imgs, dpi) in cases.items():
        pred.predict_many(imgs[: max(1, args.batch // 4)], dpis=[dpi] * max(1, args.batch // 4))
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = []
        for s in range(0, len(imgs), args.batch):
            chunk = imgs[s:s + args.batch]
            out += pred.predict_many(chunk, dpis=[dpi] * len(chunk))
        if args.device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        n_tiles = sum(p.n_tiles for p in out)
        print(json.dumps({
            "case": name, "backbone": args.backbone, "tile_px": t, "device": args.device,
            "amp": pred.amp, "batch_tiles": args.batch, "images": len(imgs),
            "tiles_per_image": n_tiles / len(imgs), "images_per_s": round(len(imgs) / dt, 3),
            "tiles_per_s": round(n_tiles / dt, 3), "seconds": round(dt, 2),
            "torch_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name() if args.device == "cuda" else None,
            "cpu": platform.processor() or platform.machine()}), flush=True)


if __name__ == "__main__":
    main()
