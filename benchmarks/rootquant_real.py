#!/usr/bin/env python
"""RootQuant on real minirhizotron images: grouped k-fold cross-validation, from scratch.

Labels are computed from the human masks with :func:`rootflow.traits.measure` (through
:func:`rootflow.training.labels.from_masks`, the ``masks`` label source). Folds are grouped by
window (``_L<nnn>_`` in the file name): frames of the same window on different dates share
roots, so a random split would leak. No ImageNet weights exist on this machine, so the backbone
starts from random initialisation: this measures what a few dozen labelled frames teach a small
network, not what RootQuant with pre-trained weights would do.

The dpi of these archives is not in their metadata; ``--dpi`` is an assumption. R2 does not
depend on it (one dpi per dataset scales every label and prediction alike); MAE is in "mm at
the assumed dpi". ``--scale`` sets the input scale relative to the native pixels (0.5 = half).

    nice -n 10 .venv/bin/python benchmarks/rootquant_real.py --dataset prmi_peanut --folds 5 --epochs 20

Reads ``$ROOTFLOW_REAL_DATA`` (default ``/work/shared/data/real``); never copies the data.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.rootquant_finetune import run_in_process  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=os.environ.get("ROOTFLOW_REAL_DATA",
                                                      "/work/shared/data/real"))
    ap.add_argument("--dataset", default="prmi_peanut")
    ap.add_argument("--dpi", type=float, default=150.0, help="assumed dpi of the dataset")
    ap.add_argument("--scale", type=float, default=0.5, help="model pixels per native pixel")
    ap.add_argument("--backbone", default="test_efficientnet")
    ap.add_argument("--tile-px", type=int, default=128)
    ap.add_argument("--cell-px", type=int, default=8)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--dense", action=argparse.BooleanOptionalAction, default=True,
                    help="supervise every cell from the masks (else image labels only)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    from rootflow.evaluation import metrics as rm
    from rootflow.inference.rootquant import RootQuantPredictor
    from rootflow.io import images, storage
    from rootflow.models.rootquant import RootQuantConfig
    from rootflow.training import labels as L
    from rootflow.training import rootquant_task as rqt

    torch.set_num_threads(args.threads)
    folder = pathlib.Path(args.root) / args.dataset
    pairs = sorted(p for p in folder.iterdir() if p.name.endswith("_mask.png"))
    rows = []
    for m in pairs:
        stem = m.name[: -len("_mask.png")]
        img = next(p for p in folder.iterdir() if p.stem == stem and p != m)
        rows.append({"image_uri": str(img), "mask_uri": str(m), "dpi": args.dpi})
    t0 = time.perf_counter()
    lab = L.from_masks(pa.Table.from_pylist(rows))
    print(f"{args.dataset}: {lab.num_rows} labelled images; labels from masks in "
          f"{time.perf_counter() - t0:.0f} s; length_mm mean {np.mean(lab['length_mm']):.1f}, "
          f"zeros {int(np.sum(lab['length_mm'].to_numpy() == 0))}", flush=True)

    from rootflow.training import splits

    keys = splits.group_keys(lab)  # the project's one grouping: tube, or window of one tube
    fold = splits.grouped_folds(keys, k=args.folds, seed=0)

    mm_per_px = 25.4 / args.dpi / args.scale
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="rq-real-"))
    oof = {k: np.full(lab.num_rows, np.nan) for k in ("length", "area", "presence")}
    per_fold = []
    for k in range(args.folds):
        tr, va = lab.filter(pa.array(fold != k)), lab.filter(pa.array(fold == k))
        pq.write_table(tr, tmp / f"train{k}.parquet")
        pq.write_table(va, tmp / f"val{k}.parquet")
        cfg = rqt.RootQuantTrainConfig(
            model=RootQuantConfig(backbone=args.backbone, tile_px=args.tile_px,
                                  mm_per_px=mm_per_px, cell_px=args.cell_px, head_hidden=64),
            data=rqt.RootQuantDataConfig(uri=str(tmp / f"train{k}.parquet"),
                                         columns=L.LabelColumns(mask="mask_uri"),
                                         val_uri=str(tmp / f"val{k}.parquet"),
                                         tile_labels=args.dense),
            optim=rqt.RootQuantOptimConfig(batch_images=4, lr=args.lr, warmup_epochs=1))
        t1 = time.perf_counter()
        uri = str(tmp / f"model{k}.pt")
        run_in_process(cfg, epochs=args.epochs, export_uri=uri)
        pred = RootQuantPredictor.from_checkpoint(uri, device="cpu", tile_batch=64)
        idx = np.flatnonzero(fold == k)
        for i in idx:
            rgb, _ = images.decode(storage.read_bytes(lab["image_uri"][int(i)].as_py()))
            p = pred.predict(rgb, dpi=args.dpi)
            oof["length"][i], oof["area"][i], oof["presence"][i] = (p.length_mm, p.area_mm2,
                                                                    p.presence)
        r = rm.regression_report(pred_length_mm=oof["length"][idx],
                                 true_length_mm=lab["length_mm"].to_numpy()[idx],
                                 pred_area_mm2=oof["area"][idx],
                                 true_area_mm2=lab["area_mm2"].to_numpy()[idx])
        per_fold.append({"fold": k, "n_val": int(len(idx)), "length_r2": round(r["length_r2"], 3),
                         "seconds": round(time.perf_counter() - t1, 1)})
        print(json.dumps(per_fold[-1]), flush=True)
    total = rm.regression_report(pred_length_mm=oof["length"],
                                 true_length_mm=lab["length_mm"].to_numpy(),
                                 pred_area_mm2=oof["area"], true_area_mm2=lab["area_mm2"].to_numpy(),
                                 presence=oof["presence"])
    print(json.dumps({"benchmark": "rootquant_real", "dataset": args.dataset,
                      "n_images": lab.num_rows, "folds": args.folds, "grouped_by": splits.resolve_by(lab),
                      "backbone": args.backbone, "init": "random", "epochs": args.epochs,
                      "dense": args.dense, "tile_px": args.tile_px, "cell_px": args.cell_px,
                      "assumed_dpi": args.dpi, "mm_per_px": round(mm_per_px, 4),
                      **{k: round(v, 4) for k, v in total.items()}}), flush=True)


if __name__ == "__main__":
    main()
