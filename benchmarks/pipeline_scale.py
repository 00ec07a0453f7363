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
            "pool": s["resources"]["model_actors"]}


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
    args = ap.parse_args(argv)
    from tests.pipeline._helpers import direct_archive
    from tests.pipeline.test_cluster import WORKER_GPUS, local_cluster

    out = Path(args.out or tempfile.mkdtemp(prefix="rf-scale-"))
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
    result["load_avg_1m"] = round(os.getloadavg()[0], 1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
