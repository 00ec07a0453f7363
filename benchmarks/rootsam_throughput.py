"""RootSAM throughput: image-encoder tiles/s and whole-scan images/s.

Random-init weights (speed does not depend on the values). Examples::

    # CPU here (2 shared cores): hiera tiny and base+, fp32 and bf16 autocast
    nice -n 10 .venv/bin/python benchmarks/rootsam_throughput.py --variants hiera_tiny hiera_base_plus \
        --precisions fp32 bf16 --image-hw 2273 2550 --images 1
    # a GPU session
    python benchmarks/rootsam_throughput.py --device cuda --variants hiera_tiny hiera_base_plus \
        hiera_large --precisions fp32 bf16 --tile-batch 8 --images 8

Prints one JSON line per (variant, precision) and a Markdown table at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import time

import numpy as np
import torch

from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_s() -> float:
    """CPU seconds of this process (all threads): a load-independent cost on a shared host."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _scan(h: int, w: int, seed: int) -> np.ndarray:
    """A scan-like image: noisy soil with bright curved lines."""
    rng = np.random.default_rng(seed)
    img = rng.integers(40, 100, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for k in range(6):
        img[np.abs(yy - (k + 1) * h / 7 - 40 * np.sin(xx / (120 + 30 * k))) < 2 + k % 3] = 215
    return img


def bench(variant: str, precision: str, args: argparse.Namespace) -> dict[str, object]:
    cfg = RootSAMInferenceConfig(
        variant=variant, device=args.device, precision=precision,
        tile_batch_size=args.tile_batch, prompt_mode=args.prompt_mode,
        lattice_points_per_side=args.lattice, point_batch_size=args.point_batch,
        compile=args.compile)
    pred = RootSAMPredictor(cfg)
    dev = pred.device
    s = pred.tile
    tiles = np.random.default_rng(0).integers(0, 256, (pred.tile_batch_size, s, s, 3),
                                              dtype=np.uint8)
    with torch.inference_mode():
        pred._encode(tiles)  # warm-up (and compile)
        _sync(dev)
        t0, c0 = time.perf_counter(), _cpu_s()
        for _ in range(args.encoder_reps):
            pred._encode(tiles)
        _sync(dev)
        enc_s, enc_cpu = time.perf_counter() - t0, _cpu_s() - c0
    n_tiles = args.encoder_reps * len(tiles)
    imgs = [_scan(*args.image_hw, seed=i) for i in range(args.images)]
    pred.predict([_scan(s, s, seed=99)])  # warm-up of the whole path (one tile)
    _sync(dev)
    t0, c0 = time.perf_counter(), _cpu_s()
    res = pred.predict(imgs)
    _sync(dev)
    img_s, img_cpu = time.perf_counter() - t0, _cpu_s() - c0
    out = {
        "variant": variant, "precision": precision, "device": str(dev),
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "tile_px": s, "tile_batch": pred.tile_batch_size,
        "encoder_tiles_per_s": n_tiles / enc_s, "encoder_s_per_tile": enc_s / n_tiles,
        "encoder_cpu_s_per_tile": enc_cpu / n_tiles,
        "image_hw": list(args.image_hw), "tiles_per_image": res[0].n_tiles,
        "images_per_s": len(imgs) / img_s, "s_per_image": img_s / len(imgs),
        "cpu_s_per_image": img_cpu / len(imgs),
        "prompt_mode": args.prompt_mode, "lattice": args.lattice,
    }
    if dev.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", nargs="+", default=["hiera_tiny", "hiera_base_plus"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"],
                    choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tile-batch", type=int, default=0, help="0 = automatic")
    ap.add_argument("--encoder-reps", type=int, default=2)
    ap.add_argument("--images", type=int, default=1)
    ap.add_argument("--image-hw", type=int, nargs=2, default=[2273, 2550])
    ap.add_argument("--prompt-mode", default="auto", choices=["auto", "lattice"])
    ap.add_argument("--lattice", type=int, default=8)
    ap.add_argument("--point-batch", type=int, default=32)
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    rows = []
    for v in args.variants:
        for p in args.precisions:
            try:
                r = bench(v, p, args)
            except Exception as e:  # e.g. an autocast dtype a device does not support
                r = {"variant": v, "precision": p, "error": f"{type(e).__name__}: {e}"}
            print(json.dumps(r), flush=True)
            rows.append(r)
    print("\n| variant | precision | device | tile batch | encoder tiles/s | s/tile | "
          "CPU s/tile | tiles/image | s/image | CPU s/image | images/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['variant']} | {r['precision']} | error: {r['error']} |||||||||")
            continue
        print(f"| {r['variant']} | {r['precision']} | {r['device_name']} ({r['threads']} thr) | "
              f"{r['tile_batch']} | {r['encoder_tiles_per_s']:.3f} | "
              f"{r['encoder_s_per_tile']:.2f} | {r['encoder_cpu_s_per_tile']:.2f} | "
              f"{r['tiles_per_image']} | {r['s_per_image']:.1f} | {r['cpu_s_per_image']:.1f} | "
              f"{r['images_per_s']:.4f} |")


if __name__ == "__main__":
    main()
