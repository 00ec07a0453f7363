"""Grouped cross-validation of the trainable segmenters (forest, U-Net) on the real sets.

For every fold: train on the other folds' images (whole tubes or windows, from
:mod:`rootflow.training.splits`), segment the held-out images with the deployed path
(:func:`rootflow.models.segmenters.load_segmenter` -> ``predict``, tiled as in the job), and
write the out-of-fold masks. Then all out-of-fold masks of a set are scored together by
:func:`rootflow.evaluation.masks.evaluate_masks` (pooled Dice/clDice; length R² over every
image of the set), exactly what ``rootflow evaluate masks`` prints.

Resumable: a fold whose model and masks exist is skipped, a U-Net fold whose training was cut by
``--max-minutes`` continues from its last checkpoint when run again, so the study can run in
parts. Nothing here tunes on a held-out fold: the recipes are the defaults of
``rootflow train forest|unet``.

    python benchmarks/segmenters_cv.py --models forest --sets segroot_soybean,prmi_peanut,prmi_switchgrass
    python benchmarks/segmenters_cv.py --models unet --sets segroot_soybean --unet-minutes 10

Writes ``<work>/<set>/<model>/summary.json`` and prints one JSON line per (set, model).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from pathlib import Path

FOLDS = {"segroot_soybean": 3, "prmi_peanut": 5, "prmi_switchgrass": 3}


def _fold_tables(data_dir: Path, k: int, seed: int):
    from rootflow.training import splits
    from rootflow.training.data import pairs_manifest

    table = pairs_manifest(os.fspath(data_dir))
    by = splits.resolve_by(table)
    keys = splits.group_keys(table, by=by)  # type: ignore[arg-type]
    folds = splits.grouped_folds(keys, k=k, seed=seed)
    return table, folds, keys, by


def _write_manifest(table, path: Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_uri", "mask_uri"])
        for a, b in zip(table["image_uri"].to_pylist(), table["mask_uri"].to_pylist(),
                        strict=True):
            w.writerow([a, b])


def run_fold(model: str, table, folds, fold: int, out: Path, *, unet_minutes: float,
             forest_minutes: float | None, threads: int,
             forest_autocontext: bool = True) -> dict:
    import numpy as np
    import pyarrow as pa

    from rootflow.io import images, storage
    from rootflow.models.segmenters import load_segmenter

    idx = np.arange(table.num_rows)
    train = table.take(pa.array(idx[folds != fold]))
    test = table.take(pa.array(idx[folds == fold]))
    fdir = out / f"fold{fold}"
    pred_dir = out / "oof"
    fdir.mkdir(parents=True, exist_ok=True)
    pred_dir.mkdir(parents=True, exist_ok=True)
    info_path = fdir / "fold.json"
    if info_path.exists():
        return json.loads(info_path.read_text())
    manifest = fdir / "train.csv"
    _write_manifest(train, manifest)
    t0 = time.perf_counter()
    if model == "forest":
        import dataclasses

        from rootflow.models.forest import ForestConfig, train_forest

        cfg = dataclasses.replace(ForestConfig(), autocontext=forest_autocontext)
        res = train_forest(os.fspath(manifest), os.fspath(fdir / "model"), cfg=cfg,
                           max_minutes=forest_minutes, progress=False)
    else:
        from rootflow.inference._cli import init_ray
        from rootflow.training.unet_task import train_unet

        init_ray(None, num_cpus=8)
        res = train_unet(os.fspath(manifest), os.fspath(fdir / "model"),
                         max_minutes=unet_minutes)
    train_s = time.perf_counter() - t0
    info = {"fold": fold, "n_train": train.num_rows, "n_test": test.num_rows,
            "train_s": round(train_s, 1), "train": res}
    # A U-Net stopped by --unet-minutes is the study's budget, not a failure: it exports its
    # best epoch so far (re-running a fold with a larger budget continues from its checkpoint
    # after deleting fold.json and the fold's masks).
    seg = load_segmenter(os.fspath(fdir / "model"), num_threads=threads)
    seg_s = []
    for uri in test["image_uri"].to_pylist():
        img, _ = images.decode(storage.read_bytes(uri))
        t1 = time.perf_counter()
        mask = seg.predict(img)
        seg_s.append(time.perf_counter() - t1)
        stem = Path(uri).name.rsplit(".", 1)[0]
        (pred_dir / f"{stem}_mask.png").write_bytes(images.encode_png(mask))
    info.update(segment_s_per_image=round(float(np.median(seg_s)), 2), version=seg.version,
                complete=True, test_images=[Path(u).name for u in test["image_uri"].to_pylist()])
    info_path.write_text(json.dumps(info, default=str, indent=1))
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=os.environ.get("ROOTFLOW_REAL_DATA", "../shared/data/real"))
    ap.add_argument("--work", default="bench-output/segmenters_cv")
    ap.add_argument("--models", default="forest,unet")
    ap.add_argument("--sets", default=",".join(FOLDS))
    ap.add_argument("--folds", default=None, help="only these fold indices (e.g. 0,1)")
    ap.add_argument("--unet-minutes", type=float, default=10.0)
    ap.add_argument("--forest-minutes", type=float, default=None,
                    help="forest budget per fold (default: none, as rootflow train forest)")
    ap.add_argument("--forest-no-autocontext", action="store_true",
                    help="one-stage forest (ForestConfig.autocontext=False)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from rootflow.evaluation.masks import evaluate_masks

    for name in args.sets.split(","):
        k = FOLDS[name]
        table, folds, keys, by = _fold_tables(Path(args.data) / name, k, args.seed)
        for model in args.models.split(","):
            out = Path(args.work).resolve() / name / model
            out.mkdir(parents=True, exist_ok=True)
            want = range(k) if args.folds is None else [int(f) for f in args.folds.split(",")]
            infos = []
            for f in want:
                info = run_fold(model, table, folds, f, out, unet_minutes=args.unet_minutes,
                                forest_minutes=args.forest_minutes, threads=args.threads,
                                forest_autocontext=not args.forest_no_autocontext)
                infos.append(info)
                print(json.dumps({"set": name, "model": model, "fold": f,
                                  **{k2: info.get(k2) for k2 in ("n_train", "n_test", "train_s",
                                                                   "segment_s_per_image",
                                                                   "complete")}}),
                      file=sys.stderr, flush=True)
            done = sorted(int(p.parent.name[4:]) for p in out.glob("fold*/fold.json"))
            if done != list(range(k)):
                print(json.dumps({"set": name, "model": model, "folds_done": done,
                                  "note": "incomplete: run again to continue"}), flush=True)
                continue
            # score only this set's out-of-fold masks against its human masks
            summary = evaluate_masks(out / "oof", Path(args.data) / name)  # px: R² needs no dpi
            fold_infos = [json.loads((out / f"fold{f}" / "fold.json").read_text())
                          for f in range(k)]
            summary.update(set=name, model=model, folds=k, split_by=by,
                           groups=len(set(keys.tolist())),
                           train_s_per_fold=[i["train_s"] for i in fold_infos],
                           segment_s_per_image=[i["segment_s_per_image"] for i in fold_infos])
            (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
            print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
