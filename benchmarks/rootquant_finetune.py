#!/usr/bin/env python
"""RootQuant fine-tuning learning curve: pre-train on one synth look, adapt to another.

Pre-trained model: a RootQuant checkpoint trained on look ``--source-look`` (e.g. the export of
``benchmarks/rootquant_synth.py``; ``--pretrained``). Target: look ``--target-look`` archives
from :mod:`rootflow.synth` (train pool seed 2, held-out val seed 1002). For each N in ``--ns``:

* ``finetune``: from the pre-trained checkpoint, backbone frozen for the first
  ``--head-fraction`` of the epochs (default 0), then the whole network with the backbone at
  ``lr * --backbone-lr-factor`` (default 1: measured better than head-first + lr/10 across a
  change of look, docs/rootquant.md);
* ``scratch``: same steps and data from random initialisation (what pre-training buys);
* every run gets ``--steps`` optimiser steps of 8 images, whatever N;
* N = 0 is the pre-trained model applied as is (zero-shot across the domain shift).

The task runs in-process (``LoopContext`` on one CPU, no Ray Train start per point: same task
code, ~20 s less per run); the model of the last epoch is scored with the inference predictor.

    nice -n 10 .venv/bin/python benchmarks/rootquant_finetune.py \
        --pretrained /tmp/rootquant-bench/runs/<run>/export/model.pt --ns 0,25,50,100,200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.rootquant_synth import GT_COLUMNS, TRAIN_COLUMNS, evaluate, make_archive  # noqa: E402


def run_in_process(cfg, *, epochs: int, export_uri: str) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Drive the task's epochs on this process (the loop's protocol without Ray Train)."""
    import torch

    from rootflow.training.loop import LoopContext, TrainRunConfig
    from rootflow.training.rootquant_task import RootQuantTask

    torch.manual_seed(0)
    ctx = LoopContext(world_rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                      run=TrainRunConfig(epochs=epochs))
    task = RootQuantTask(cfg)
    task.setup(ctx)
    last: dict[str, float] = {}
    for e in range(epochs):
        last = task.train_epoch(e)
    last.update({f"val_{k}": v for k, v in task.validate(epochs - 1).items()})
    ctx.best = last
    task.export(export_uri)
    return last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pretrained", required=True)
    ap.add_argument("--work", default="/tmp/rootquant-bench")
    ap.add_argument("--target-look", default="sand")
    ap.add_argument("--ns", default="0,25,50,100,200")
    ap.add_argument("--n-val", type=int, default=100)
    ap.add_argument("--steps", type=int, default=300,
                    help="optimiser steps per run, whatever N (epochs = steps * batch / N): a "
                         "fixed number of epochs would give the small N almost no training")
    ap.add_argument("--head-fraction", type=float, default=0.0,
                    help="share of the epochs with the backbone frozen (fine-tuning)")
    ap.add_argument("--backbone-lr-factor", type=float, default=1.0,
                    help="fine-tuning backbone lr = lr x this, once it trains")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--target-masks", action=argparse.BooleanOptionalAction, default=False,
                    help="fine-tune with the target's masks (per-cell labels); default: per-image "
                         "length/area only, as a WinRHIZO export of a new species would give")
    ap.add_argument("--finetune", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--scratch", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import torch

    from rootflow.models import rootquant as rq
    from rootflow.training import rootquant_task as rqt
    from rootflow.training.labels import LabelColumns

    torch.set_num_threads(args.threads)
    ns = [int(x) for x in args.ns.split(",")]
    work = pathlib.Path(args.work)
    pool_gt = make_archive(work / f"train-{args.target_look}-2-{max(ns)}", n=max(max(ns), 1),
                           seed=2, look=args.target_look, workers=2)
    val_gt = make_archive(work / f"val-{args.target_look}-1002-{args.n_val}", n=args.n_val,
                          seed=1002, look=args.target_look, workers=2)
    base = rq.load(args.pretrained)
    out_dir = work / "finetune"
    out_dir.mkdir(parents=True, exist_ok=True)
    for n in ns:
        modes = ["zero_shot"] if n == 0 else (["finetune"] * args.finetune
                                             + ["scratch"] * args.scratch)
        epochs = max(2, math.ceil(args.steps * 8 / max(n, 1)))
        head_epochs = round(args.head_fraction * epochs)
        for mode in modes:
            t0 = time.perf_counter()
            if mode == "zero_shot":
                uri = args.pretrained
            else:
                cfg = rqt.RootQuantTrainConfig(
                    model=dataclasses.replace(base.config, mean=None, std=None),
                    init_from=args.pretrained if mode == "finetune" else None,
                    data=rqt.RootQuantDataConfig(uri=str(pool_gt),
                                                 columns=LabelColumns(
                                                     **(TRAIN_COLUMNS if args.target_masks
                                                        else GT_COLUMNS)),
                                                 val_uri=str(val_gt), limit=n),
                    optim=rqt.RootQuantOptimConfig(
                        batch_images=8, lr=args.lr, backbone_lr=args.lr * args.backbone_lr_factor
                        if mode == "finetune" else None,
                        head_only_epochs=head_epochs if mode == "finetune" else 0))
                uri = str(out_dir / f"{args.target_look}-{mode}-{n}.pt")
                run_in_process(cfg, epochs=epochs, export_uri=uri)
            m = evaluate(uri, val_gt)
            print(json.dumps({"benchmark": "rootquant_finetune", "target_look": args.target_look,
                              "mode": mode, "n_train": n, "epochs": 0 if n == 0 else epochs,
                              "target_masks": args.target_masks, "steps": args.steps,
                              "head_epochs": head_epochs if mode == "finetune" else 0,
                              "backbone_lr_factor": args.backbone_lr_factor,
                              "seconds": round(time.perf_counter() - t0, 1),
                              **{k: round(v, 4) for k, v in m.items()}}), flush=True)


if __name__ == "__main__":
    main()
