"""The job at scale on a local multi-node Ray cluster, with a fast stand-in model.

    nice -n 5 python benchmarks/pipeline_scale.py --n-images 20000          # the issue's size
    nice -n 5 python benchmarks/pipeline_scale.py --n-images 2000 --layouts actor,task

1. ``n`` small images (JPEG, ``--height x --width``) are generated directly (random roots
   drawn as lines: ~1 ms each, not the synthetic archive's ~0.1 CPU-s) with their manifest
   written straight from the rows. Not timed.
2. A head (0 CPUs: it runs the driver) and ``--workers`` worker nodes are started with
   ``ray start`` on loopback, each declaring ``--gpus-per-worker`` logical GPUs (slots, no CUDA):
   the job's default pool (1 .. cluster GPUs) fills them.
3. The stand-in model is a small pixel forest (``rootflow train forest`` in seconds on a few
   of the images): a real producer, fast on small images.
4. **Bare loop**: the same forest's ``predict`` over the images decoded in memory, in this
   process, one thread (the cluster's actors get ``model_num_cpus`` each).
5. **Job**: ``jobs/infer.py`` as a separate driver process attached to the cluster, at the
   default commit batch (2000 rows), into an empty lake: images/s end to end, the driver's peak
   RSS (``getrusage`` of the child), Delta commits, object-store bytes per image from Ray Data's
   own stats, and images per actor. ``--layouts actor,task`` repeats the job with the former
   layout (decode as a CPU task before the actor, pixels carried to the end) for the bytes
   comparison.

Prints one JSON line. Bounded: ``--timeout-s`` per job.

``--plan-only N`` measures instead what the driver spends on the manifest before any worker
runs, for an ``N``-row manifest (rows only, no image files): validation (``read_manifest``, as
the CLI's pre-flight and the run each do), the skip plan against a lake where the first half
of the rows are done, and handing the planned rows to Ray Data as blocks; time, the driver's
RSS growth, Arrow bytes and the number of blocks.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def train_standin(root: Path, manifest: str) -> str:
    import numpy as np
    import pyarrow.parquet as pq

    from rootflow.io import storage
    from rootflow.io.images import decode
    from rootflow.models.forest import ForestConfig, fit_forest

    uris = pq.read_table(manifest, columns=["image_uri"]).column(0).to_pylist()[:4]
    imgs = [decode(storage.read_bytes(u))[0] for u in uris]
    masks = [(im.mean(axis=2) > 180) for im in imgs]
    if not any(m.any() for m in masks):  # make sure both classes exist
        masks[0] = masks[0].copy()
        masks[0][0, :] = True
    seg = fit_forest(imgs, [np.asarray(m) for m in masks], ForestConfig(autocontext=False,
                     samples_per_class=500), max_seconds=5.0, progress=False)
    uri = str(root / "forest" / "forest.json")
    seg.save(uri)
    return uri


def bare_loop(manifest: str, forest_uri: str, limit: int) -> dict:
    import pyarrow.parquet as pq

    from rootflow.io import storage
    from rootflow.io.images import decode
    from rootflow.models.segmenters import load_segmenter

    seg = load_segmenter(forest_uri)
    uris = pq.read_table(manifest, columns=["image_uri"]).column(0).to_pylist()[:limit]
    imgs = [decode(storage.read_bytes(u))[0] for u in uris]
    seg.predict(imgs[0])
    t0 = time.perf_counter()
    for im in imgs:
        seg.predict(im)
    s = time.perf_counter() - t0
    return {"bare_images": len(imgs), "bare_s": round(s, 2),
            "bare_images_per_s": round(len(imgs) / s, 2)}


def run_job(cluster, manifest: str, lake: str, forest_uri: str, layout: str, out: Path,
            timeout_s: float) -> dict:
    from tests.pipeline.test_cluster import _env

    summary = out / f"summary-{layout}.json"
    cmd = [sys.executable, str(ROOT / "jobs" / "infer.py"), manifest, lake,
           "--producers", "forest", "--forest-model", forest_uri,
           "--set", "resources.model_num_cpus=0.5", "--set", "resources.block_rows=16",
           "--set", "resources.model_batch_size=16",
           "--set", f"resources.decode_in_actor={'true' if layout == 'actor' else 'false'}",
           "--address", cluster.gcs_address, "--summary-json", str(summary)]
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    (out / f"job-{layout}.log").write_text(done.stdout + done.stderr)  # its progress lines
    if done.returncode not in (0, 3):
        raise RuntimeError(f"job failed ({done.returncode}):\n{done.stderr[-3000:]}")
    s = json.loads(summary.read_text())
    return {"layout": layout, "job_wall_s": round(wall, 1),
            "job_images_per_s": round(s["n_images"] / wall, 2),
            "run_images_per_s": s["images_per_s"], "n_images": s["n_images"],
            "commits": s["commits"], "actors": len(s["actors"]),
            "images_per_actor": sorted(round(v) for v in s["actors"].values()),
            "object_store_bytes_per_image": s["object_store_bytes_per_image"],
            "output_bytes": s["output_bytes"],
            "driver_peak_rss_mb": round(max(rss, before) / 1024, 1),
            "pool": s["resources"]["model_actors"],
            "initial_actors": s["resources"].get("initial_actors")}


def manifest_rows(root: Path, n: int) -> str:
    """An ``n``-row manifest whose rows look like a real archive's (no image files)."""
    import datetime as dt
    import hashlib

    import pyarrow as pa

    from rootflow.io.manifest import MANIFEST_SCHEMA, write_manifest

    t0 = dt.datetime(2024, 5, 1)
    cols: dict[str, list] = {f.name: [] for f in MANIFEST_SCHEMA}
    for i in range(n):
        day = t0 + dt.timedelta(days=i // 8000)
        name = f"EXP_T{i // 400:03d}_L{i % 20:03d}_{day:%Y.%m.%d}_S{i // 20 % 20:03d}.jpg"
        uri = str(root / "archive" / f"tube{i // 400:03d}" / name)
        iid = hashlib.sha256(uri.encode()).hexdigest()[:20]
        for k, v in (("image_uri", uri), ("image_id", iid),
                     ("file_name", name), ("experiment", "scale"), ("tube", i // 400),
                     ("window", i % 20), ("session", i // 20 % 20),
                     ("captured_at", day), ("year", 2024),
                     ("operator", None), ("dpi", 100.0), ("depth_cm", float(i % 20) * 1.35),
                     ("depth", int(i % 20 * 1.35 // 10 * 10)),
                     ("mask_uri", uri[:-4] + "_mask.png"), ("species", None),
                     ("treatment", None), ("tile", None)):
            cols[k].append(v)
    uri = str(root / "manifest.parquet")
    write_manifest(pa.table(cols, schema=MANIFEST_SCHEMA), uri)
    return uri


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def plan_only(n: int, out: Path) -> dict:
    """Driver-side cost of a manifest of ``n`` rows (see the module docstring)."""
    import pyarrow as pa
    import ray

    from rootflow.inference import pipeline as pl
    from rootflow.io.manifest import read_manifest
    from rootflow.lake import Lake

    manifest = manifest_rows(out, n)
    cfg = pl.InferConfig(producers=("mask",))
    versions = pl.resolve_model_versions(cfg)
    lake = Lake(str(out / "lake"))
    done = read_manifest(manifest).slice(0, n // 2)
    lake.commit_traits(done.select(["image_id", "image_uri", "file_name", "dpi", "depth_cm",
                                    "experiment", "tube", "window",
                                    "session", "captured_at", "year", "depth"]).append_column(
        "model_name", pa.array(["mask"] * done.num_rows)).append_column(
        "model_version", pa.array([versions["mask"]] * done.num_rows)).append_column(
        "run_id", pa.array(["seed"] * done.num_rows)))
    del done
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    r: dict = {"manifest_rows": n,
               "manifest_file_mb": round(Path(manifest).stat().st_size / 2**20, 2)}
    rss0 = _rss_mb()
    t = time.perf_counter()
    read_manifest(manifest, allow_prefixes=["default"])  # the CLI's pre-flight
    r["preflight_validate_s"] = round(time.perf_counter() - t, 2)
    t = time.perf_counter()
    rows = pl.select_rows(read_manifest(manifest), cfg)
    r["run_read_validate_s"] = round(time.perf_counter() - t, 2)
    r["manifest_arrow_mb"] = round(rows.nbytes / 2**20, 1)
    t = time.perf_counter()
    planned, skipped, _ = pl.plan_work(rows, lake, versions, cfg, None)
    r["plan_s"] = round(time.perf_counter() - t, 2)
    r["planned_rows"], r["skipped_done"] = planned.num_rows, skipped
    t = time.perf_counter()
    ds = pl.build_dataset(planned, cfg=cfg, lake_uri=str(out / "lake"), run_id="x",
                          model_versions=versions, storage_options={})
    r["to_ray_s"] = round(time.perf_counter() - t, 2)
    del ds
    res = pl.Resources()
    per = max(res.block_rows, min(res.manifest_block_rows, -(-planned.num_rows // res.min_blocks)))
    r["rows_per_block"], r["blocks"] = per, -(-planned.num_rows // per)
    r["driver_rss_growth_mb"] = round(_rss_mb() - rss0, 1)
    r["driver_rss_mb"] = round(_rss_mb(), 1)
    ray.shutdown()
    return r


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-images", type=int, default=20000)
    ap.add_argument("--height", type=int, default=64)
    ap.add_argument("--width", type=int, default=80)
    ap.add_argument("--layouts", default="actor", help="actor (default), task, or actor,task")
    ap.add_argument("--bare-images", type=int, default=2000,
                    help="images in the bare loop (its rate is per image)")
    ap.add_argument("--timeout-s", type=float, default=3600)
    ap.add_argument("--out", default=None)
    ap.add_argument("--plan-only", type=int, default=0, metavar="N",
                    help="only measure the driver's manifest and plan cost for N rows")
    args = ap.parse_args(argv)
    if args.plan_only:
        r = plan_only(args.plan_only, Path(args.out or tempfile.mkdtemp(prefix="rf-plan-")))
        print(json.dumps(r))
        return r
    from tests.pipeline._helpers import direct_archive
    from tests.pipeline.test_cluster import WORKER_GPUS, local_cluster

    out = Path(args.out or tempfile.mkdtemp(prefix="rf-scale-"))
    load_before = [round(x, 1) for x in os.getloadavg()]
    t0 = time.perf_counter()
    manifest = direct_archive(out, args.n_images, args.height, args.width)
    gen_s = time.perf_counter() - t0
    forest = train_standin(out, manifest)
    result: dict = {"n_images": args.n_images, "image_hw": [args.height, args.width],
                    "generate_s": round(gen_s, 1), "cores": os.cpu_count(),
                    "gpu_slots": WORKER_GPUS * 2,
                    **bare_loop(manifest, forest, args.bare_images)}
    jobs = []
    with local_cluster() as cl:
        for layout in args.layouts.split(","):
            jobs.append(run_job(cl, manifest, str(out / f"lake-{layout}"), forest, layout, out,
                                args.timeout_s))
    result["jobs"] = jobs
    result["efficiency"] = round(jobs[0]["job_images_per_s"] / result["bare_images_per_s"], 3)
    result["load_avg_before"] = load_before  # 1, 5, 15 min: the machine is shared
    result["load_avg_after"] = [round(x, 1) for x in os.getloadavg()]
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
