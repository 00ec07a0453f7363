"""``rootflow demo``: the whole system on an embedded default, no cloud and no weights.

synthetic archive (exact ground truth) -> a forest segmenter trained in seconds on the images
of one window -> manifest -> local Ray -> the processing job (traits of the archive's masks,
the forest, RootSAM and RootQuant with random weights) -> Delta tables -> a summary queried back
from the tables and compared with the archive's ground truth.

The forest is the one producer with real output here: it is trained on the archive's own masks
of :data:`DEMO_FOREST_WINDOWS` and compared on the other windows only (its training images are
left out of its row of the comparison).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

RANDOM_WEIGHTS_NOTE = (
    "RootSAM and RootQuant ran with RANDOM weights: no SAM2.1 or ImageNet weights can be "
    "downloaded here, so their rows show the plumbing, not the science. Pass --base-checkpoint/"
    "--rootsam-checkpoint and --rootquant-checkpoint to `rootflow infer` for real ones."
)

#: Small, fast model settings for the demo (CPU, seconds per image).
DEMO_ROOTSAM: dict[str, Any] = {"variant": "test", "prompt_mode": "lattice",
                                "lattice_points_per_side": 4}
DEMO_ROOTQUANT: dict[str, Any] = {"backbone": "resnet10t"}
#: Windows (of the archive's 4) whose images and masks train the demo's forest.
DEMO_FOREST_WINDOWS: tuple[int, ...] = (2,)
#: The demo's forest: one stage (no autocontext) on 5000 sampled pixels per class and image.
#: On the demo archive (train window 2, 6 images) it reached a pooled held-out Dice of 0.70 in
#: ~8 s of training on 2 busy cores; autocontext scored 0.63 there in twice the time.
DEMO_FOREST: dict[str, Any] = {"autocontext": False, "samples_per_class": 5000}
#: Wall-clock cap on the demo's forest training (a cap, not a target: it usually ends sooner).
DEMO_FOREST_SECONDS = 30.0


def run_demo(out: str, *, n_images: int = 24, seed: int = 0, models: bool = True) -> dict[str, Any]:
    """Synthesise an archive, run the job on it and compare each producer with the truth.

    Returns what ``<out>/summary.json`` holds: ``run`` (the job's summary), ``comparison``
    (per producer against the ground truth) and ``exit_code`` (the job's: 0, or 3 when some
    images were rejected), which ``rootflow demo`` exits with.
    """
    import pyarrow.parquet as pq
    from rich.console import Console

    from rootflow.inference.pipeline import InferConfig, format_summary, init_ray, run
    from rootflow.io.manifest import build_manifest, write_manifest
    from rootflow.synth import SynthConfig, generate_archive

    console = Console(width=max(100, Console().width))
    root = Path(out).resolve()
    archive = root / "archive"
    lake = root / "lake"
    manifest = root / "manifest.parquet"
    t0 = time.perf_counter()

    console.rule("[bold]rootflow demo")
    with console.status(f"synthesising {n_images} minirhizotron images with exact ground truth"):
        generate_archive(str(archive), config=SynthConfig(n_images=n_images, seed=seed, n_windows=4))
    n_made = pq.read_metadata(archive / "ground_truth.parquet").num_rows
    console.print(f"archive: {archive} ({n_made} images + masks + ground_truth.parquet)")

    built = build_manifest(str(archive), experiment_config=str(archive / "experiment.yaml"))
    write_manifest(built.table, str(manifest))
    console.print(f"manifest: {manifest} ({built.table.num_rows} rows, "
                  f"{len(built.rejects)} rejected file names)")

    gt = pq.read_table(archive / "ground_truth.parquet").to_pandas()
    forest: dict[str, Any] = {}
    train_files: list[str] = []
    if models:
        from rootflow.models.forest import ForestError

        with console.status(f"training a forest on the images of window(s) "
                            f"{list(DEMO_FOREST_WINDOWS)} and their masks"):
            try:
                forest, train_files = train_demo_forest(archive, gt, root / "models")
            except ForestError as e:  # e.g. no root pixel in those windows (another --seed)
                console.print(f"[yellow]forest not trained ({e}); running without it")
        if forest:
            console.print(f"forest: {forest['model']} ({forest['version']}, {forest['n_trees']} "
                          f"trees, trained in {forest['seconds']:.0f} s on {len(train_files)} "
                          f"images of window(s) {list(DEMO_FOREST_WINDOWS)}; compared below on "
                          f"the other windows)")

    producers: tuple[str, ...] = ("mask",)
    if models:
        producers = ("mask", "forest", "rootsam", "rootquant") if forest else (
            "mask", "rootsam", "rootquant")
    cfg = InferConfig(producers=producers, rootsam=dict(DEMO_ROOTSAM),
                      rootquant=dict(DEMO_ROOTQUANT),
                      forest={"model": forest["model"]} if forest else {}, commit_every=1000)
    init_ray(None, num_cpus=8)
    if models:
        console.print(f"[yellow]{RANDOM_WEIGHTS_NOTE}")
    summary = run(str(manifest), str(lake), cfg, job_kind="demo", progress=True)
    console.print(format_summary(summary))

    report = summarize(str(lake), gt, console=console, exclude={"forest": set(train_files)})
    if models:
        console.print(f"[yellow]{RANDOM_WEIGHTS_NOTE}")
    console.print(f"done in {time.perf_counter() - t0:.0f} s. Tables: {lake}/traits, "
                  f"{lake}/runs, {lake}/rejects; query them with rootflow.lake (docs/lake.md).")
    result = {"run": summary.to_dict(), "comparison": report, "exit_code": summary.exit_code}
    (root / "summary.json").write_text(json.dumps(result, indent=2, default=str))
    return result


def train_demo_forest(archive: Path, ground_truth: Any,
                      out_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """Train the demo's forest on the images of :data:`DEMO_FOREST_WINDOWS` and their masks.

    Returns ``({"model", "sha256", "version", "n_trees", "seconds"}, training file names)``.

    Raises:
        ForestError: those images hold no root (or no background) pixel.
    """
    from rootflow.io import storage
    from rootflow.io.images import decode, decode_mask
    from rootflow.models.forest import ForestConfig, fit_forest

    t0 = time.perf_counter()
    rows = ground_truth[ground_truth["window"].isin(DEMO_FOREST_WINDOWS)]
    images = [decode(storage.read_bytes(u))[0] for u in rows["image_uri"]]
    labels = [decode_mask(storage.read_bytes(u)) for u in rows["mask_uri"]]
    model = fit_forest(images, labels, ForestConfig(**DEMO_FOREST),
                       max_seconds=DEMO_FOREST_SECONDS, progress=False,
                       names=[str(f) for f in rows["file_name"]])
    uri = str(out_dir / "forest.json")
    sha = model.save(uri)
    info = {"model": uri, "sha256": sha, "version": model.version,
            "n_trees": model.params().get("n_trees"), "seconds": time.perf_counter() - t0}
    return info, [str(f) for f in rows["file_name"]]


def _pooled_dice(pairs: Any) -> float:
    """Dice over all pixels of all (predicted, true) bool mask pairs (1.0 when all are empty).

    Pooled rather than averaged per image: a frame without roots where the model marks a few
    pixels would otherwise score 0 and weigh as much as a frame full of roots.
    """
    import numpy as np

    inter = total = 0
    for pred, true in pairs:
        inter += int(np.logical_and(pred, true).sum())
        total += int(pred.sum()) + int(true.sum())
    return 1.0 if total == 0 else 2.0 * inter / total


def summarize(lake_uri: str, ground_truth: Any, *, console: Any,
              exclude: dict[str, set[str]] | None = None) -> dict[str, Any]:
    """Query the traits table back and compare each producer with the ground truth.

    Args:
        exclude: file names left out of a producer's comparison (the forest's training images).
    """
    import numpy as np
    from rich.table import Table

    from rootflow.inference.stages import MASK_PRODUCERS
    from rootflow.io import storage
    from rootflow.io.images import decode_mask
    from rootflow.lake.query import traits

    df = traits(lake_uri, engine="pandas")
    masks = df[df["model_name"] == "mask"]

    t = Table(title="Root length by depth band (traits of the archive's masks)")
    for col in ("depth band (cm)", "images", "total length (mm)", "mean length/image (mm)"):
        t.add_column(col, justify="right")
    for depth, g in masks.groupby("depth"):
        t.add_row(f"{depth}-{depth + 10}", str(len(g)), f"{g['length_mm'].sum():.0f}",
                  f"{g['length_mm'].mean():.1f}")
    console.print(t)

    gt = ground_truth.set_index("file_name")
    cmp = Table(title="Each producer against the synthetic ground truth (per image)")
    for col in ("producer", "images", "length MAE (mm)", "length R²", "median |rel. err.|",
                "pooled Dice"):
        cmp.add_column(col, justify="left" if col == "producer" else "right")
    report: dict[str, Any] = {}
    exclude = exclude or {}
    from rootflow.inference.pipeline import PRODUCERS

    for name, g in sorted(df.groupby("model_name"), key=lambda kv: PRODUCERS.index(str(kv[0]))):
        g = g[g["file_name"].isin(gt.index)]
        left_out = g["file_name"].isin(exclude.get(str(name), set()))
        g = g[~left_out]
        if g.empty:
            continue
        truth = gt.loc[g["file_name"], "length_mm"].to_numpy(dtype=float)
        col = "rootquant_length_mm" if name == "rootquant" else "length_mm"
        pred = g[col].to_numpy(dtype=float)
        err = pred - truth
        ss = float(np.sum((truth - truth.mean()) ** 2))
        r2 = 1 - float(np.sum(err**2)) / ss if ss > 0 else float("nan")
        nz = truth > 0
        rel = float(np.median(np.abs(err[nz]) / truth[nz])) if nz.any() else float("nan")
        dice = float("nan")
        if name in MASK_PRODUCERS and g["mask_uri"].notna().all():
            dice = _pooled_dice(
                (decode_mask(storage.read_bytes(m)),
                 decode_mask(storage.read_bytes(gt.loc[f, "mask_uri"])))
                for f, m in zip(g["file_name"], g["mask_uri"], strict=True))
        versions = ",".join(sorted(set(g["model_version"])))
        if name == "mask":
            label = "mask"
        elif name == "forest":
            label = "forest (trained here)"
        else:
            label = f"{name} (random weights)"
        cmp.add_row(label, str(len(g)), f"{np.mean(np.abs(err)):.1f}", f"{r2:.3f}", f"{rel:.1%}",
                    "—" if np.isnan(dice) else f"{dice:.3f}")
        report[str(name)] = {"images": len(g), "length_mae_mm": float(np.mean(np.abs(err))),
                             "length_r2": r2, "median_abs_rel_error": rel, "mask_dice": dice,
                             "left_out_images": int(left_out.sum()), "model_version": versions}
    console.print(cmp)
    notes = ["mask = traits measured on the archive's exact masks (tests the traits code)"]
    if report.get("forest", {}).get("left_out_images"):
        notes.append(f"forest = trained by this demo; its {report['forest']['left_out_images']} "
                     "training images are left out of its row")
    console.print("; ".join(notes) + "; versions: "
                  + ", ".join(f"{k}={v['model_version']}" for k, v in report.items()))
    return report
