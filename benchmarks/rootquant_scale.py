#!/usr/bin/env python
"""RootQuant training memory at archive scale: peak memory per worker vs manifest size.

For each ``--rows`` (default 2,000 and 20,000) a label table of that many rows is written
(rows name ``--distinct`` synthetic 224 x 256 frames at 150 dpi, reused, with masks), and a
*fresh process* runs the RootQuant task (in-process, the same task code Ray Train runs) for a
fixed ``--steps`` steps of ``--batch`` images with ``--loader-workers`` DataLoader processes
(streaming: images are read and resampled when drawn, nothing is cached) and
``tile_batch`` micro-batching. It reports the peak resident memory of the training process
and of its largest loader process (``ru_maxrss``), and images/s of the step loop. Flat peak
memory across sizes is the claim; the CPU test backbone keeps it quick.

    nice -n 5 .venv/bin/python benchmarks/rootquant_scale.py --rows 2000,20000 --steps 30
"""

from __future__ import annotations

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def write_table(folder: pathlib.Path, rows: int, distinct: int) -> pathlib.Path:
    import cv2
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(0)
    files = []
    for i in range(distinct):
        img = np.clip(rng.normal(100, 25, (224, 256, 3)), 0, 255).astype(np.uint8)
        mask = np.zeros((224, 256), np.uint8)
        for _ in range(3):
            p = rng.integers(0, 224, 4)
            cv2.line(mask, (int(p[0]), int(p[1])), (int(p[2]) + 30, int(p[3])), 255, 3)
        img[mask > 0] = 220
        ip, mp = folder / f"img_{i:03d}.png", folder / f"img_{i:03d}_mask.png"
        cv2.imwrite(str(ip), img)
        cv2.imwrite(str(mp), mask)
        files.append((str(ip), str(mp), float((mask > 0).sum()) * (25.4 / 150) ** 2))
    idx = np.arange(rows) % distinct
    t = pa.table({"image_uri": [files[i][0] for i in idx], "mask_uri": [files[i][1] for i in idx],
                  "length_mm": rng.uniform(10, 80, rows), "area_mm2": [files[i][2] for i in idx],
                  "dpi": np.full(rows, 150.0)})
    out = folder / f"labels-{rows}.parquet"
    pq.write_table(t, out)
    return out


def child(table: str, val: str, steps: int, batch: int, workers: int, tile_batch: int) -> None:
    import resource
    import time

    import torch

    from rootflow.models.rootquant import RootQuantConfig
    from rootflow.training import labels as L
    from rootflow.training import rootquant_task as rqt
    from rootflow.training.loop import LoopContext, TrainRunConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = rqt.RootQuantTrainConfig(
        model=RootQuantConfig(backbone="test_efficientnet", tile_px=64, mm_per_px=0.2,
                              head_hidden=64),
        data=rqt.RootQuantDataConfig(uri=table, columns=L.LabelColumns(mask="mask_uri"),
                                     val_uri=val, loader_workers=workers),
        optim=rqt.RootQuantOptimConfig(batch_images=batch, steps_per_epoch=steps,
                                       precise_bn_images=0, tile_batch=tile_batch))
    ctx = LoopContext(world_rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                      run=TrainRunConfig(epochs=1))
    task = rqt.RootQuantTask(cfg)
    t0 = time.perf_counter()
    task.setup(ctx)
    setup_s = time.perf_counter() - t0
    m = task.train_epoch(0)
    kib_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kib_child = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"rows": task.train_labels.num_rows, "steps": steps, "batch": batch,
                      "loader_workers": workers, "cached": task.train_set.cache,
                      "setup_s": round(setup_s, 1),
                      "peak_rss_trainer_mib": round(kib_self / 1024, 1),
                      "peak_rss_loader_mib": round(kib_child / 1024, 1),
                      "images_per_s": round(m["images_per_s"], 2),
                      "tiles_per_s": round(m["tiles_per_s"], 1)}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="2000,20000")
    ap.add_argument("--distinct", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--loader-workers", type=int, default=1)
    ap.add_argument("--tile-batch", type=int, default=32)
    ap.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.steps, args.batch, args.loader_workers,
              args.tile_batch)
        return
    folder = pathlib.Path(tempfile.mkdtemp(prefix="rq-scale-"))
    val = write_table(folder, 4, 4)
    out = []
    for rows in (int(r) for r in args.rows.split(",")):
        table = write_table(folder, rows, args.distinct)
        res = subprocess.run([sys.executable, __file__, "--child", str(table), str(val),
                              "--steps", str(args.steps), "--batch", str(args.batch),
                              "--loader-workers", str(args.loader_workers),
                              "--tile-batch", str(args.tile_batch)],
                             capture_output=True, text=True, check=True)
        line = res.stdout.strip().splitlines()[-1]
        print(line, flush=True)
        out.append(json.loads(line))
    print(json.dumps({"benchmark": "rootquant_scale", "runs": out}), flush=True)


if __name__ == "__main__":
    main()
