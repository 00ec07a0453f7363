"""``rootflow demo``: the whole system on an embedded default, no cloud and no weights.

synthetic archive (exact ground truth) -> manifest -> local Ray -> the processing job (traits of
the archive's masks, RootSAM and RootQuant with random weights) -> Delta tables -> a summary
queried back from the tables and compared with the archive's ground truth.
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


def run_demo(out: str, *, n_images: int = 24, seed: int = 0, models: bool = True) -> dict[str, Any]:
    import pyarrow.parquet as pq
    from rich.console import Console

    from rootflow.inference._cli import init_ray
    from rootflow.inference.pipeline import InferConfig, format_summary, run
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

    producers = ("mask", "rootsam", "rootquant") if models else ("mask",)
    cfg = InferConfig(producers=producers, rootsam=dict(DEMO_ROOTSAM),
                      rootquant=dict(DEMO_ROOTQUANT), commit_every=1000)
    init_ray(None, num_cpus=8)
    if models:
        console.print(f"[yellow]{RANDOM_WEIGHTS_NOTE}")
    summary = run(str(manifest), str(lake), cfg, job_kind="demo", progress=False)
    console.print(format_summary(summary))

    gt = pq.read_table(archive / "ground_truth.parquet").to_pandas()
    report = summarize(str(lake), gt, console=console)
    if models:
        console.print(f"[yellow]{RANDOM_WEIGHTS_NOTE}")
    console.print(f"done in {time.perf_counter() - t0:.0f} s. Tables: {lake}/traits, "
                  f"{lake}/runs, {lake}/rejects; query them with rootflow.lake (docs/lake.md).")
    (root / "summary.json").write_text(json.dumps(
        {"run": summary.to_dict(), "comparison": report}, indent=2, default=str))
    return report


def summarize(lake_uri: str, ground_truth: Any, *, console: Any) -> dict[str, Any]:
    """Query the traits table back and compare each producer with the ground truth."""
    import numpy as np
    from rich.table import Table

    from rootflow.lake import Lake

    df = Lake(lake_uri).traits(engine="pandas")
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
    for col in ("producer", "images", "length MAE (mm)", "length R²", "median |rel. err.|"):
        cmp.add_column(col, justify="left" if col == "producer" else "right")
    report: dict[str, Any] = {}
    for name, g in df.groupby("model_name"):
        g = g[g["file_name"].isin(gt.index)]
        truth = gt.loc[g["file_name"], "length_mm"].to_numpy(dtype=float)
        col = "rootquant_length_mm" if name == "rootquant" else "length_mm"
        pred = g[col].to_numpy(dtype=float)
        err = pred - truth
        ss = float(np.sum((truth - truth.mean()) ** 2))
        r2 = 1 - float(np.sum(err**2)) / ss if ss > 0 else float("nan")
        nz = truth > 0
        rel = float(np.median(np.abs(err[nz]) / truth[nz])) if nz.any() else float("nan")
        versions = ",".join(sorted(set(g["model_version"])))
        label = name if name == "mask" else f"{name} (random weights)"
        cmp.add_row(label, str(len(g)), f"{np.mean(np.abs(err)):.1f}", f"{r2:.3f}", f"{rel:.1%}")
        report[name] = {"images": len(g), "length_mae_mm": float(np.mean(np.abs(err))),
                        "length_r2": r2, "median_abs_rel_error": rel, "model_version": versions}
    console.print(cmp)
    console.print("mask = traits measured on the archive's exact masks (tests the traits code); "
                  "versions: " + ", ".join(f"{k}={v['model_version']}" for k, v in report.items()))
    return report
