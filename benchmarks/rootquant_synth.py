#!/usr/bin/env python
"""RootQuant on a synthetic archive: train a small backbone on CPU, score held-out scenes.

1. Three archives from :mod:`rootflow.synth` (``tiny`` geometry, 224 x 256 px at 150 dpi):
   ``train`` (config seed ``--seed``), ``select`` (seed ``--seed + 2000``: ranks the epochs'
   checkpoints by length R2) and ``test`` (seed ``--seed + 1000``: different scenes, soil,
   roots and photographs, never seen in training nor used to pick the checkpoint; the reported
   numbers). Cached under ``--work``.
2. Labels = the archives' exact ground truth (``ground_truth.parquet``: ``length_mm``,
   ``projected_area_mm2``, ``dpi``), read through :mod:`rootflow.training.labels`.
3. :func:`rootflow.training.rootquant_task.train` on a local Ray (Ray Train, 1 CPU worker).
4. The exported (best on ``select``) checkpoint is scored on ``test`` with :class:`RootQuantPredictor` (the inference
   path): R2 / MAE / RMSE / bias for length and area, zero/non-zero accuracy.

    nice -n 10 .venv/bin/python benchmarks/rootquant_synth.py --n-train 400 --n-test 300 --epochs 30

Prints progress and one final JSON line; record it in docs/rootquant.md with the command.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def make_archive(out: pathlib.Path, *, n: int, seed: int, look: str, workers: int,
                 height: int = 224, width: int = 256, dpi: float = 150.0) -> pathlib.Path:
    """A synth archive of ``n`` images (cached: reused when its ground truth exists)."""
    from rootflow.synth import SynthConfig, generate_archive

    gt = out / "ground_truth.parquet"
    if gt.exists():
        return gt
    n_windows, n_sessions = 5, 2
    cfg = SynthConfig(seed=seed, height=height, width=width, dpi=dpi, look=look,
                      n_tubes=math.ceil(n / (n_windows * n_sessions)), n_windows=n_windows,
                      n_sessions=n_sessions, n_images=n)
    t0 = time.perf_counter()
    generate_archive(str(out), config=cfg, workers=workers)
    print(f"archive {out.name}: {n} images ({look}, seed {seed}) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return gt


GT_COLUMNS = {"image": "image_uri", "length": "length_mm", "area": "projected_area_mm2",
              "dpi": "dpi"}
#: Training also reads the masks: per-tile labels (dense supervision), see docs/rootquant.md.
TRAIN_COLUMNS = {**GT_COLUMNS, "mask": "mask_uri"}


def evaluate(model_uri: str, gt_uri: pathlib.Path, *, presence_threshold: float | None = 0.5
             ) -> dict[str, float]:
    """Score a RootQuant checkpoint on an archive through the inference predictor."""
    from rootflow.training import labels as L

    lab = L.read_labels(str(gt_uri), columns=L.LabelColumns(**GT_COLUMNS))
    return score_table(model_uri, lab, presence_threshold=presence_threshold)


def score_table(model_uri: str, lab, *, presence_threshold: float | None = 0.5,  # type: ignore[no-untyped-def]
                preds: list | None = None) -> dict[str, float]:  # type: ignore[type-arg]
    """Length/area R2 etc. of a checkpoint on a label table (image_uri, dpi, length_mm,
    area_mm2), through the inference predictor, 16 images at a time. ``preds`` (a list), when
    given, receives one ``[image_uri, length_mm, area_mm2]`` per row (out-of-fold pooling)."""
    from rootflow.evaluation import metrics as rm
    from rootflow.inference.rootquant import RootQuantPredictor
    from rootflow.io import images, storage

    pred = RootQuantPredictor.from_checkpoint(model_uri, device="cpu", tile_batch=64,
                                              presence_threshold=presence_threshold)
    out = []
    rows = lab.to_pylist()
    for s in range(0, len(rows), 16):
        chunk = rows[s:s + 16]
        imgs = [images.decode(storage.read_bytes(r["image_uri"]))[0] for r in chunk]
        out += pred.predict_many(imgs, dpis=[r["dpi"] for r in chunk])
    if preds is not None:
        preds += [[r["image_uri"], float(p.length_mm), float(p.area_mm2)]
                  for r, p in zip(rows, out, strict=True)]
    return rm.regression_report(
        pred_length_mm=[p.length_mm for p in out], true_length_mm=lab["length_mm"].to_numpy(),
        pred_area_mm2=[p.area_mm2 for p in out], true_area_mm2=lab["area_mm2"].to_numpy(),
        presence=[p.presence for p in out])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/rootquant-bench")
    ap.add_argument("--n-train", type=int, default=400)
    ap.add_argument("--n-select", type=int, default=100)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--look", default="loam")
    ap.add_argument("--backbone", default="test_efficientnet")
    ap.add_argument("--tile-px", type=int, default=64)
    ap.add_argument("--mm-per-px", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--cell-px", type=int, default=8)
    ap.add_argument("--head-hidden", type=int, default=64)
    ap.add_argument("--init-presence-logit", type=float, default=-2.0,
                    help="initial cell presence logit (~ logit of the share of rooted cells)")
    ap.add_argument("--tile-weight", type=float, default=1.0,
                    help="weight of the per-cell loss (0 = image labels only)")
    ap.add_argument("--image-weight", type=float, default=0.0)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs (torch threads) of the worker")
    ap.add_argument("--gen-workers", type=int, default=2)
    ap.add_argument("--name", default=None)
    args = ap.parse_args()

    import ray

    from rootflow.models.rootquant import RootQuantConfig
    from rootflow.training import rootquant_task as rqt
    from rootflow.training.labels import LabelColumns
    from rootflow.training.loop import TrainRunConfig

    work = pathlib.Path(args.work)
    train_gt = make_archive(work / f"train-{args.look}-{args.seed}-{args.n_train}",
                            n=args.n_train, seed=args.seed, look=args.look,
                            workers=args.gen_workers)
    select_gt = make_archive(work / f"select-{args.look}-{args.seed + 2000}-{args.n_select}",
                             n=args.n_select, seed=args.seed + 2000, look=args.look,
                             workers=args.gen_workers)
    val_gt = make_archive(work / f"val-{args.look}-{args.seed + 1000}-{args.n_test}",
                          n=args.n_test, seed=args.seed + 1000, look=args.look,
                          workers=args.gen_workers)

    name = args.name or f"synth-{args.backbone}-{args.look}-{int(time.time())}"
    cfg = rqt.RootQuantTrainConfig(
        model=RootQuantConfig(backbone=args.backbone, tile_px=args.tile_px,
                              mm_per_px=args.mm_per_px, cell_px=args.cell_px,
                              head_hidden=args.head_hidden,
                              init_presence_logit=args.init_presence_logit),
        data=rqt.RootQuantDataConfig(uri=str(train_gt), columns=LabelColumns(**TRAIN_COLUMNS),
                                     val_uri=str(select_gt), tile_labels=args.tile_weight > 0),
        loss=rqt.RootQuantLossConfig(tile_weight=args.tile_weight,
                                     image_weight=args.image_weight),
        optim=rqt.RootQuantOptimConfig(batch_images=args.batch, lr=args.lr, warmup_epochs=1),
        run=TrainRunConfig(name=name, storage_path=str(work / "runs"), epochs=args.epochs,
                           cpus_per_worker=args.cpus, metric="val_length_r2", mode="max"))
    ray.init(address="local", num_cpus=max(4, args.cpus + 2), include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    try:
        t0 = time.perf_counter()
        res = rqt.train(cfg)
        train_s = time.perf_counter() - t0
    finally:
        ray.shutdown()
    for h in res.history:
        print(json.dumps({k: round(v, 4) for k, v in h.items()
                          if k in ("epoch", "train_loss", "val_loss", "val_length_r2",
                                   "val_area_r2", "train_images_per_s", "epoch_time_s")}),
              flush=True)
    metrics = evaluate(res.export_uri, val_gt)
    print(json.dumps({"benchmark": "rootquant_synth", "backbone": args.backbone,
                      "tile_px": args.tile_px, "cell_px": args.cell_px,
                      "mm_per_px": round(args.mm_per_px, 4),
                      "tile_weight": args.tile_weight, "image_weight": args.image_weight,
                      "lr": args.lr,
                      "n_train": args.n_train, "n_select": args.n_select, "n_test": args.n_test,
                      "epochs": res.epochs_run,
                      "best_epoch": res.best_epoch, "train_wall_s": round(train_s, 1),
                      "export_uri": res.export_uri,
                      **{k: round(v, 4) for k, v in metrics.items()}}), flush=True)


if __name__ == "__main__":
    main()
