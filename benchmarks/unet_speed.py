#!/usr/bin/env python
"""U-Net whole-scan inference on CPU: seconds per 2550 x 2273 scan, seams, and held-out Dice.

Speed: the default :class:`~rootflow.models.unet.UNetConfig` (random weights are fine: the
compute does not depend on them) or a trained ``--model``, run with
:meth:`UNetSegmenter.predict_proba` (tiled, stitched) on ``--threads`` torch threads. Reports
wall and process CPU seconds per scan (CPU s is the steadier number on a shared machine).

``--seams``: also the largest and mean difference between tiled and untiled probabilities on
the first scan, and the share of pixels whose mask flips (untiled needs ~2 GB for a full scan).

``--pairs DIR``: with a trained ``--model``, segment every ``<stem>.<ext>`` + ``<stem>_mask.png``
in DIR (``--glob`` to pick tubes) and report pooled Dice / IoU / precision / recall / clDice
(:class:`rootflow.evaluation.metrics.PixelMeter`: all TP over all predicted + true root pixels)
and per-image Dice.

    nice -n 10 .venv/bin/python benchmarks/unet_speed.py --threads 2
    .venv/bin/python benchmarks/unet_speed.py --model out/unet.pt --pairs /tmp/test-tubes --seams
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

REAL = pathlib.Path(os.environ.get("ROOTFLOW_REAL_DATA", "../shared/data/real"))


def _load_model(uri: str | None):  # type: ignore[no-untyped-def]
    import torch

    from rootflow.models.unet import UNetConfig, UNetSegmenter, build_unet

    if uri:
        return UNetSegmenter.load(uri)
    torch.manual_seed(0)
    cfg = UNetConfig()
    return UNetSegmenter(build_unet(cfg), cfg)


def _pairs(folder: pathlib.Path, pattern: str) -> list[tuple[pathlib.Path, pathlib.Path]]:
    out = []
    for p in sorted(folder.glob(pattern)):
        if p.stem.endswith("_mask") or p.suffix.lower() not in (".jpg", ".jpeg", ".png", ".tif"):
            continue
        m = p.with_name(p.stem + "_mask.png")
        if m.exists():
            out.append((p, m))
    return out


def _read(path: pathlib.Path) -> np.ndarray:
    from rootflow.io.images import decode

    return decode(path.read_bytes())[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="unet.pt (default: random weights, default config)")
    ap.add_argument("--image", help="one scan for the speed test (default: a SegRoot scan, "
                                    "else a random 2550x2273 image)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seams", action="store_true", help="tiled vs untiled on the scan")
    ap.add_argument("--pairs", help="folder of image/mask pairs to score a trained --model on")
    ap.add_argument("--glob", default="*", help="file pattern inside --pairs")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    seg = _load_model(args.model)
    report: dict[str, object] = {"threads": args.threads, "params": seg.params(),
                                 "version": seg.version}

    if args.image:
        image = _read(pathlib.Path(args.image))
    else:
        scans = sorted((REAL / "segroot_soybean").glob("*_Untitled.jpg"))
        image = (_read(scans[0]) if scans else
                 np.random.default_rng(0).integers(0, 256, (2273, 2550, 3), dtype=np.uint8))
    h, w = image.shape[:2]
    from rootflow.inference.tiling import make_grid

    pad_h, pad_w = -(-h // seg.stride) * seg.stride, -(-w // seg.stride) * seg.stride
    grid = make_grid(max(pad_h, seg.tile), max(pad_w, seg.tile), tile=seg.tile,
                     overlap=seg.overlap)
    seg.predict_proba(image[:seg.tile, :seg.tile])  # warm-up (oneDNN kernels)
    walls, cpus = [], []
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        seg.predict_proba(image)
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    report["speed"] = {"image": f"{w}x{h}", "tiles": len(grid),
                       "tiled_px_over_image_px": round(len(grid) * seg.tile**2 / (h * w), 3),
                       "wall_s_min": round(min(walls), 2), "wall_s": [round(x, 2) for x in walls],
                       "cpu_s_min": round(min(cpus), 2), "cpu_s": [round(x, 2) for x in cpus]}

    if args.seams:
        from rootflow.models.unet import UNetSegmenter

        whole = UNetSegmenter(seg.model, dataclasses.replace(seg.cfg, tile=max(pad_h, pad_w)),
                              threshold=seg.threshold, mean=seg.mean, std=seg.std)
        a, b = seg.predict_proba(image), whole.predict_proba(image)
        d = np.abs(a - b)
        report["seams"] = {"max_abs_diff": float(d.max()), "mean_abs_diff": float(d.mean()),
                           "mask_flips": float(((a >= seg.threshold) != (b >= seg.threshold))
                                               .mean())}

    if args.pairs:
        from rootflow.evaluation.metrics import PixelMeter, pixel_counts, summarize_pixels
        from rootflow.io.images import decode_mask

        meter, rows, cpu = PixelMeter(cldice=True), [], []
        for img_path, mask_path in _pairs(pathlib.Path(args.pairs), args.glob):
            img = _read(img_path)
            truth = decode_mask(mask_path.read_bytes())
            c = time.process_time()
            pred = seg.predict(img)
            cpu.append(time.process_time() - c)
            meter.update(pred, truth)
            one = summarize_pixels(pixel_counts(pred, truth, cldice=False))
            rows.append({"image": img_path.name, "dice": round(one["dice"], 4),
                         "root_share": round(float(truth.mean()), 4),
                         "pred_share": round(float(pred.mean()), 4)})
        pooled = meter.summary()
        report["eval"] = {"images": len(rows),
                          **{k: round(pooled[k], 4) for k in ("dice", "iou", "precision",
                                                              "recall", "cldice")},
                          "mean_image_dice": round(float(np.mean([r["dice"] for r in rows])), 4)
                          if rows else None,
                          "cpu_s_per_scan": round(float(np.mean(cpu)), 2) if cpu else None,
                          "per_image": rows}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
