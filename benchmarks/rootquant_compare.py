#!/usr/bin/env python
"""RootQuant studies on the CPU test backbone, same data and step budget per cell of a table.

``--study heads`` (the table that decides ``model.head``): heads {pooled, dense} x labels
{image (per-image length/area only), masks (per-cell labels from the masks + image loss)} x
data {synth (train seed 1, held-out test seed 1001, other scenes), peanut (PRMI peanut, one
split grouped by window: the test windows are never seen)}.

``--study recipe`` (image-level labels on real frames, grouped 5-fold CV over PRMI peanut
windows, the folds of ``benchmarks/segmenters_cv.py``): a dense model pre-trained with masks on
a synth ``sand`` archive (the look modelled on these frames) at the frames' own size and root
width in pixels, then per fold fine-tuned on the other folds' per-image length/area only
(``finetune``, backbone at lr/10), against the same network trained from scratch on the same
labels and steps (``scratch``) and the pre-trained model as is (``zeroshot``). Every held-out
prediction is written, so ``--summarize FILE[,FILE]`` pools the out-of-fold predictions of all
65 frames and prints them beside the segment-then-measure references (forest / U-Net
out-of-fold masks through the traits code, same folds):

    ROOTFLOW_REAL_DATA=../shared/data/real nice .venv/bin/python benchmarks/rootquant_compare.py \
        --study recipe --runs zeroshot,finetune --steps 800 --batch 4 --threads 1 --out a.jsonl
    ... --study recipe --runs scratch --steps 800 --batch 4 --threads 1 --out b.jsonl
    python benchmarks/segmenters_cv.py --models forest --forest-no-autocontext --sets prmi_peanut
    ... --study recipe --summarize a.jsonl,b.jsonl

``--study noise`` (the seed's central claim, measured): synth archive, masks give where the
root is, the per-image totals are corrupted for ``--noise`` of the training images (a third
each: scale error x U(0.5, 2), missed roots x U(0.2, 0.6), zero for an image with roots);
loss {huber (Huber in log space + presence term, the default), mse (squared error in log
space, no presence term), huber_nopres, mse_pres} over ``--seeds`` seeds (``--seed-list``:
these; a seed sets the corruption, the initialisation, the data order and the augmentations);
scored on clean held-out labels. ``--noise 0`` is the clean-label control.

Every run: ``test_efficientnet`` + the head, the task in-process (same task code as Ray Train
runs, one process), ``--steps`` optimiser steps of ``--batch`` images whatever the data size,
the model of the last step scored with the inference predictor (presence threshold off, so
R2 compares the amounts). Prints one JSON line per run and a summary; ``--out FILE`` also
appends every row to FILE as it comes (a run cut by ``timeout`` loses only itself) and
``--curve-every K`` adds learning-curve rows (test-set scores every K steps).

    nice -n 19 .venv/bin/python benchmarks/rootquant_compare.py --study noise --steps 800 \
        --threads 1 --seed-list 0 --losses huber,huber_nopres,mse --curve-every 100 --out n.jsonl
    nice -n 19 .venv/bin/python benchmarks/rootquant_compare.py --study heads --data synth \
        --steps 800 --threads 1 --out heads.jsonl

120 steps is too few: every run then still predicts ~0 (docs/rootquant.md, Numbers).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.rootquant_synth import make_archive, score_table  # noqa: E402

#: ``--out``: every result row (and every learning-curve point) is appended here as it comes,
#: so a run cut by ``timeout`` loses only the run in progress.
OUT: pathlib.Path | None = None


def emit(row: dict) -> None:  # type: ignore[type-arg]
    print(json.dumps(row), flush=True)
    if OUT is not None:
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


def drive(cfg, *, epochs: int, export_uri: str, seed: int, test=None,  # type: ignore[no-untyped-def]
          curve_every: int = 0, tag: str = "") -> None:
    """The loop's task protocol on this process (no Ray Train): ``seed`` seeds torch, numpy,
    random and the data order/augmentations (the loop's ``run.seed``), so seeds differ in
    initialisation and data order, not only in the labels. With ``curve_every`` > 0 the model
    is scored on ``test`` at the end of every epoch that crosses a multiple of that many steps
    (a learning curve; the cosine schedule is the full run's, so a point is not a shorter run)."""
    import random

    import numpy as np
    import torch

    from rootflow.training.loop import LoopContext, TrainRunConfig
    from rootflow.training.rootquant_task import RootQuantTask

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    ctx = LoopContext(world_rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                      run=TrainRunConfig(epochs=epochs, seed=seed))
    ctx.best = {}
    task = RootQuantTask(cfg)
    task.setup(ctx)
    per = cfg.optim.steps_per_epoch or math.ceil(task.train_labels.num_rows / cfg.optim.batch_images)
    done, t0 = 0, time.perf_counter()
    for e in range(epochs):
        last = task.train_epoch(e)
        before, done = done, done + per
        if curve_every and test is not None and (done // curve_every > before // curve_every
                                                 or e == epochs - 1):
            task.export(export_uri)
            r = score(export_uri, test)
            emit({"curve": tag, "step": done, "epoch": e + 1,
                  "wall_s": round(time.perf_counter() - t0, 1),
                  "train_loss": round(float(last.get("loss", float("nan"))), 4),
                  **{k: round(v, 4) for k, v in r.items() if k in CURVE_KEYS}})
    task.export(export_uri)


CURVE_KEYS = ("length_r2", "area_r2", "length_bias", "presence_accuracy")


def score(uri: str, table, *, threshold: float | None = None,  # type: ignore[no-untyped-def]
          preds: list | None = None) -> dict[str, float]:  # type: ignore[type-arg]
    """Length/area R2 etc. of a checkpoint on a label table, through the inference predictor;
    ``preds`` (a list) receives one ``[image_uri, length_mm, area_mm2]`` per row."""
    return score_table(uri, table, presence_threshold=threshold, preds=preds)


def synth_sets(work: pathlib.Path, n_train: int, n_test: int):  # type: ignore[no-untyped-def]
    from rootflow.training import labels as L

    cols = L.LabelColumns(image="image_uri", length="length_mm", area="projected_area_mm2",
                          dpi="dpi", mask="mask_uri")
    tr = make_archive(work / f"train-loam-1-{n_train}", n=n_train, seed=1, look="loam",
                      workers=1)
    te = make_archive(work / f"val-loam-1001-{n_test}", n=n_test, seed=1001, look="loam",
                      workers=1)
    return L.read_labels(str(tr), columns=cols), L.read_labels(str(te), columns=cols)


def peanut_sets(root: str, dpi: float):  # type: ignore[no-untyped-def]
    """The heads table's one grouped split of :func:`peanut_table` (30 % of the windows held out)."""
    from rootflow.training import splits

    return splits.grouped_split(peanut_table(root, dpi), val_fraction=0.3, seed=0)


def corrupt(table, share: float, seed: int):  # type: ignore[no-untyped-def]
    """Corrupt ``share`` of the per-image totals (length and area alike)."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    length = table["length_mm"].to_numpy().copy()
    area = table["area_mm2"].to_numpy().copy()
    idx = rng.permutation(len(length))[: round(share * len(length))]
    for n, i in enumerate(idx):
        kind = n % 3
        f = (rng.uniform(0.5, 2.0) if kind == 0 else rng.uniform(0.2, 0.6) if kind == 1
             else 0.0)
        length[i] *= f
        area[i] *= f
    t = table.set_column(table.column_names.index("length_mm"), "length_mm", pa.array(length))
    return t.set_column(t.column_names.index("area_mm2"), "area_mm2", pa.array(area))


def one_run(train, test, *, head: str, masks: bool, mm_per_px: float, tile_px: int,  # type: ignore[no-untyped-def]
            steps: int, batch: int, lr: float, tmp: pathlib.Path, tag: str,
            huber_delta: float | None = 1.0, presence_weight: float = 1.0, seed: int = 0,
            init_from: str | None = None, keep: str | None = None,
            curve_every: int = 0, backbone_lr: float | None = None,
            preds: list | None = None) -> dict[str, float]:  # type: ignore[type-arg]
    import pyarrow.parquet as pq

    from rootflow.models.rootquant import RootQuantConfig
    from rootflow.training import labels as L
    from rootflow.training import rootquant_task as rqt

    pq.write_table(train, tmp / f"{tag}-train.parquet")
    pq.write_table(test[:4], tmp / f"{tag}-val.parquet")  # the loop wants one; scoring is below
    per_epoch = max(1, math.ceil(train.num_rows / batch))
    epochs = max(1, math.ceil(steps / per_epoch))
    cfg = rqt.RootQuantTrainConfig(
        init_from=init_from,
        model=RootQuantConfig(backbone="test_efficientnet", tile_px=tile_px,
                              mm_per_px=mm_per_px, head_hidden=64, head=head),
        data=rqt.RootQuantDataConfig(uri=str(tmp / f"{tag}-train.parquet"),
                                     columns=L.LabelColumns(mask="mask_uri"),
                                     val_uri=str(tmp / f"{tag}-val.parquet"),
                                     tile_labels=masks),
        loss=rqt.RootQuantLossConfig(huber_delta=huber_delta, presence_weight=presence_weight),
        optim=rqt.RootQuantOptimConfig(batch_images=batch, lr=lr, backbone_lr=backbone_lr,
                                       warmup_epochs=0,
                                       precise_bn_images=64, tile_batch=128,
                                       steps_per_epoch=min(per_epoch, math.ceil(steps / epochs))))
    t0 = time.perf_counter()
    uri = keep or str(tmp / f"{tag}.pt")
    drive(cfg, epochs=epochs, export_uri=uri, seed=seed, test=test, curve_every=curve_every,
          tag=tag)
    train_s = time.perf_counter() - t0
    r = score(uri, test, preds=preds)
    return {"steps_run": epochs * cfg.optim.steps_per_epoch, "train_s": round(train_s, 1),
            **{k: round(v, 4) for k, v in r.items()}}


def peanut_table(root: str, dpi: float):  # type: ignore[no-untyped-def]
    """Every PRMI peanut frame with length/area labels computed from its human mask (pairs
    found by the training code's own :func:`rootflow.training.data.pairs_manifest`)."""
    import pyarrow as pa

    from rootflow.training import labels as L
    from rootflow.training.data import pairs_manifest

    pairs = pairs_manifest(str(pathlib.Path(root) / "prmi_peanut"))
    return L.from_masks(pairs.append_column("dpi", pa.array([dpi] * pairs.num_rows)))


def recipe_folds(table, k: int, seed: int = 0):  # type: ignore[no-untyped-def]
    """Fold of every row: whole windows per fold, the very folds of
    ``benchmarks/segmenters_cv.py`` (same helper, grouping, k and seed), so the
    segment-then-measure references score the same held-out frames."""
    from rootflow.training import splits

    keys = splits.group_keys(table, by=splits.resolve_by(table))  # type: ignore[arg-type]
    return splits.grouped_folds(keys, k=k, seed=seed)


#: the recipe's pre-training archive: the ``sand`` look (modelled on these BTC-100 peanut
#: frames, rootflow/synth/looks.py) at the frames' own size and the dpi assumed for them.
PEANUT_DPI, PEANUT_HW = 300.0, (552, 736)


def recipe(args, work: pathlib.Path, tmp: pathlib.Path) -> list[dict]:  # type: ignore[no-untyped-def,type-arg]
    """Image-level labels on real frames, grouped k-fold over PRMI peanut windows.

    ``pretrain``: dense head, synth ``sand`` archive at the frames' size, masks (per-cell labels).
    Per fold, trained on the other folds' frames with per-image length/area only:
    ``finetune`` (from ``pretrain``, backbone at lr/10) and ``scratch`` (same network, random
    init, same steps and lr); ``zeroshot`` is ``pretrain`` as is. Every held-out prediction is
    emitted, so :func:`summarize` pools the out-of-fold predictions of all 65 frames (runs may
    be split over processes with ``--fold-list``/``--runs``).
    """
    import numpy as np

    table = peanut_table(args.root, PEANUT_DPI)
    folds = recipe_folds(table, args.folds)
    mm = 25.4 / PEANUT_DPI / args.scale
    rows = []
    # Huber (delta 1) + presence was the default when the recipe first ran; squared error +
    # presence (``loss.huber_delta: null``) is the default since the noise study
    delta = {"huber": 1.0, "mse_pres": None}[args.recipe_loss]
    pre = str(work / f"pretrain-sand-{PEANUT_HW[0]}x{PEANUT_HW[1]}-{mm:.3f}-{args.n_train}-"
                     f"{args.pretrain_steps}{'' if args.recipe_loss == 'huber' else '-mse'}.pt")
    runs = args.runs.split(",")
    if any(r in runs for r in ("finetune", "zeroshot")) and not pathlib.Path(pre).exists():
        synth = make_archive(work / f"train-sand-1-{args.n_train}-{PEANUT_HW[1]}",
                             n=args.n_train, seed=1, look="sand", workers=1,
                             height=PEANUT_HW[0], width=PEANUT_HW[1], dpi=PEANUT_DPI)
        from rootflow.training import labels as L

        synth_lab = L.read_labels(str(synth), columns=L.LabelColumns(
            image="image_uri", length="length_mm", area="projected_area_mm2", dpi="dpi",
            mask="mask_uri"))
        r = one_run(synth_lab, table, head="dense", masks=True, mm_per_px=mm, tile_px=64,
                    steps=args.pretrain_steps, batch=args.batch, lr=args.lr, tmp=tmp,
                    tag="pretrain", keep=pre, huber_delta=delta)
        emit({"pretrain": pre, "look": "sand", "n_train": synth_lab.num_rows,
              "loss": args.recipe_loss,
              "steps": args.pretrain_steps, "note": "scored on all peanut frames", **r})
    fold_list = ([int(x) for x in args.fold_list.split(",")] if args.fold_list
                 else list(range(args.folds)))
    if "zeroshot" in runs:
        preds: list = []  # type: ignore[type-arg]
        score(pre, table, preds=preds)
        row = {"recipe": "zeroshot", "loss": args.recipe_loss, "fold": -1, "preds": preds}
        rows.append(row)
        emit(row)
    for fold in fold_list:
        idx = np.arange(table.num_rows)
        train = table.take(idx[folds != fold])
        test = table.take(idx[folds == fold])
        for name in ("scratch", "finetune"):
            if name not in runs:
                continue
            preds = []
            r = one_run(train, test, head="dense", masks=False, mm_per_px=mm, tile_px=64,
                        steps=args.steps, batch=args.batch, lr=args.lr, tmp=tmp,
                        tag=f"recipe-{name}-{fold}", seed=args.seed, huber_delta=delta,
                        init_from=pre if name == "finetune" else None,
                        backbone_lr=args.lr / 10 if name == "finetune" else None,
                        preds=preds)
            row = {"recipe": name, "loss": args.recipe_loss, "fold": fold,
                   "n_train": train.num_rows,
                   "n_test": test.num_rows, "steps": args.steps, "labels": "image",
                   **r, "preds": preds}
            rows.append(row)
            emit(row)
    return rows


def summarize(rows: list[dict], root: str, segmenters: str | None) -> list[dict]:  # type: ignore[type-arg]
    """Pool the recipe's out-of-fold predictions per run and score them on all frames, with the
    segment-then-measure references (``benchmarks/segmenters_cv.py`` out-of-fold masks through
    the traits code, same folds) where ``segmenters`` points at that benchmark's work folder."""
    from rootflow.evaluation import metrics as rm

    table = peanut_table(root, PEANUT_DPI)
    truth = dict(zip(table["image_uri"].to_pylist(), zip(table["length_mm"].to_pylist(),
                                                         table["area_mm2"].to_pylist(),
                                                         strict=True), strict=True))
    pooled: dict[str, dict[str, tuple[float, float]]] = {}
    folds: dict[str, set[int]] = {}
    for r in rows:
        if "recipe" in r:
            key = f"{r['recipe']} ({r.get('loss', 'huber')})"  # rows before --recipe-loss: huber
            pooled.setdefault(key, {}).update({u: (a, b) for u, a, b in r["preds"]})
            folds.setdefault(key, set()).add(r["fold"])
    out = []
    for name, got in pooled.items():
        uris = [u for u in truth if u in got]
        pl = [got[u][0] for u in uris]
        tl = [truth[u][0] for u in uris]
        pa_ = [got[u][1] for u in uris]
        ta = [truth[u][1] for u in uris]
        out.append({"summary": name, "frames": len(uris), "of": len(truth),
                    "folds": sorted(folds[name]),
                    "length_r2": round(rm.r2(pl, tl), 3),
                    "length_pearson_r2": round(rm.pearson_r2(pl, tl), 3),
                    "length_bias_pct": round(rm.bias_pct(pl, tl), 1),
                    "area_r2": round(rm.r2(pa_, ta), 3),
                    "area_pearson_r2": round(rm.pearson_r2(pa_, ta), 3)})
    if segmenters:
        for model in ("forest", "unet"):
            f = pathlib.Path(segmenters) / "prmi_peanut" / model / "summary.json"
            if f.exists():
                s = json.loads(f.read_text())
                keep = ("length_r2", "length_pearson_r2", "length_bias_pct", "area_r2")
                out.append({"summary": f"segment-then-measure ({model})", "source": str(f),
                            **{k: s.get(k) for k in keep}})
    for o in out:
        print(json.dumps(o), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", choices=("heads", "noise", "recipe"), required=True)
    ap.add_argument("--work", default="/tmp/rootquant-bench")
    ap.add_argument("--root", default=os.environ.get("ROOTFLOW_REAL_DATA",
                                                      "/work/shared/data/real"))
    ap.add_argument("--n-train", type=int, default=240)
    ap.add_argument("--n-test", type=int, default=100)
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", default="synth,peanut")
    ap.add_argument("--heads", default="pooled,dense")
    ap.add_argument("--labels", default="image,masks")
    ap.add_argument("--noise", type=float, default=0.3)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--seed-list", default=None, help="noise: these seeds (else 0..seeds-1)")
    ap.add_argument("--losses", default="huber,mse",
                    help="noise: which losses (huber, mse, huber_nopres, mse_pres)")
    ap.add_argument("--out", default=None, help="append every row (JSON lines) to this file")
    ap.add_argument("--folds", type=int, default=5, help="recipe: grouped folds (by window)")
    ap.add_argument("--fold-list", default=None, help="recipe: only these folds (e.g. 0,1)")
    ap.add_argument("--runs", default="zeroshot,scratch,finetune",
                    help="recipe: which of zeroshot, scratch, finetune")
    ap.add_argument("--pretrain-steps", type=int, default=800,
                    help="recipe: steps of synth pre-training (masks)")
    ap.add_argument("--scale", type=float, default=0.5,
                    help="recipe: input scale of the real frames (0.5 = half their pixels)")
    ap.add_argument("--seed", type=int, default=0, help="recipe: seed of every run")
    ap.add_argument("--recipe-loss", choices=("huber", "mse_pres"), default="mse_pres",
                    help="recipe: Huber + presence (the first runs) or squared error + presence "
                         "(the default loss now)")
    ap.add_argument("--summarize", default=None, metavar="JSONL",
                    help="recipe: pool the out-of-fold rows of these --out file(s) "
                         "(comma-separated) and print the table; trains nothing")
    ap.add_argument("--segmenters", default="bench-output/segmenters_cv",
                    help="recipe summary: work folder of benchmarks/segmenters_cv.py")
    ap.add_argument("--curve-every", type=int, default=0,
                    help="score on the test set every this many steps (learning curve rows)")
    args = ap.parse_args()
    bad = set(args.losses.split(",")) - {"huber", "mse", "huber_nopres", "mse_pres"}
    if bad:
        ap.error(f"--losses: unknown {sorted(bad)} (huber, mse, huber_nopres, mse_pres)")
    global OUT
    OUT = pathlib.Path(args.out) if args.out else None
    if args.summarize:
        rows = [json.loads(line) for f in args.summarize.split(",")
                for line in pathlib.Path(f).read_text().splitlines() if line.strip()]
        summarize(rows, args.root, args.segmenters)
        return

    import torch

    torch.set_num_threads(args.threads)
    work = pathlib.Path(args.work)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="rq-compare-"))
    results = []
    if args.study == "heads":
        for data in args.data.split(","):
            if data == "synth":
                train, test = synth_sets(work, args.n_train, args.n_test)
                scale = {"mm_per_px": 0.2, "tile_px": 64, "batch": args.batch}
            else:  # real frames at half their pixels, assumed 150 dpi (R2 does not depend on it)
                train, test = peanut_sets(args.root, 150.0)
                scale = {"mm_per_px": 25.4 / 150.0 / 0.5, "tile_px": 64,
                         "batch": max(1, args.batch // 2)}
            for labels in args.labels.split(","):
                for head in args.heads.split(","):
                    tag = f"{data}-{labels}-{head}"
                    r = one_run(train, test, head=head, masks=labels == "masks",
                                mm_per_px=scale["mm_per_px"], tile_px=scale["tile_px"],
                                steps=args.steps, batch=scale["batch"], lr=args.lr, tmp=tmp,
                                tag=tag, curve_every=args.curve_every)
                    row = {"data": data, "labels": labels, "head": head,
                           "n_train": train.num_rows, "n_test": test.num_rows,
                           "steps": args.steps, **r}
                    results.append(row)
                    emit(row)
    elif args.study == "recipe":
        results += recipe(args, work, tmp)
    else:
        train, test = synth_sets(work, args.n_train, args.n_test)
        seeds = ([int(x) for x in args.seed_list.split(",")] if args.seed_list
                 else list(range(args.seeds)))
        # (huber_delta, presence_weight): delta 1e6 makes the Huber terms squared error; the
        # presence weight switches the image and cell presence BCE terms on or off.
        losses = {"huber": (1.0, 1.0), "mse": (1e6, 0.0), "huber_nopres": (1.0, 0.0),
                  "mse_pres": (1e6, 1.0)}
        for seed in seeds:
            noisy = corrupt(train, args.noise, seed)
            for loss in args.losses.split(","):
                delta, pw = losses[loss]
                r = one_run(noisy, test, head="dense", masks=True, mm_per_px=0.2, tile_px=64,
                            steps=args.steps, batch=args.batch, lr=args.lr, tmp=tmp,
                            tag=f"noise-{seed}-{loss}", huber_delta=delta,
                            presence_weight=pw, seed=seed, curve_every=args.curve_every)
                row = {"loss": loss, "seed": seed, "noise": args.noise, "steps": args.steps,
                       **r}
                results.append(row)
                emit(row)
    print(json.dumps({"benchmark": "rootquant_compare", "study": args.study,
                      "results": results}), flush=True)


if __name__ == "__main__":
    main()
