"""Pipeline efficiency: the whole job's images/s over the bare model loop's, same images/model/machine.

    python benchmarks/pipeline.py --preset small --n-images 8 --model rootsam --variant test
    python benchmarks/pipeline.py --preset ci600 --n-images 16 --model rootsam \
        --variant hiera_tiny --device cuda --gpus-per-actor 1   # on a GPU node

1. A synthetic archive is written to object storage (a local folder, or the loopback moto S3
   server with ``--s3``) and its manifest built. Not timed.
2. **Bare loop**: the images are decoded into memory first (not timed), then the model's own
   predictor runs over them in plain PyTorch, batch by batch, once before and once after the
   job; the faster of the two is the baseline (load drifts on a shared machine).
3. **Whole job**: :func:`rootflow.inference.pipeline.run` from the manifest on object storage to
   committed Delta rows (read, decode, model actor, traits, masks written, MERGE commits), on a
   Ray started beforehand (Ray's start-up is not counted; actor start-up and model load are).
4. efficiency = job images/s / bare images/s.

Both use the same number of torch threads for the model (``--threads``): on a shared 2-core
machine two OpenMP threads next to any other busy process run ~10x slower than one (measured). Prints one JSON line with everything measured.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _moto() -> tuple[subprocess.Popen, dict]:
    import socket

    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                             str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
    for _ in range(100):
        try:
            client.create_bucket(Bucket="bench")
            break
        except Exception:
            time.sleep(0.2)
    so = {"endpoint_url": endpoint, "region": "us-east-1", "key": "bench", "secret": "bench",
          "allow_http": True, "path_style": True}
    return proc, so


def _bare_model(args: argparse.Namespace, overrides: dict) -> tuple[dict, Callable]:
    """The model's own predictor and a ``predict(images, dpis)`` over it (plain PyTorch).

    ``--model both``: RootSAM then RootQuant on each batch; ``--set`` applies to RootSAM.
    """
    if args.model == "both":
        sam_cfg, sam = _bare_model(argparse.Namespace(**{**vars(args), "model": "rootsam"}),
                                   overrides)
        rq_cfg, rq = _bare_model(argparse.Namespace(**{**vars(args), "model": "rootquant"}), {})

        def both(batch: list, dpis: list) -> None:
            sam(batch, dpis)
            rq(batch, dpis)

        return {"rootsam": sam_cfg, "rootquant": rq_cfg}, both
    if args.model == "rootsam":
        from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor

        cfg = {"variant": args.variant, "device": args.device, **overrides}
        sam = RootSAMPredictor(RootSAMInferenceConfig(**cfg))
        return cfg, lambda batch, dpis: sam.predict(batch)
    from rootflow.inference.rootquant import RootQuantInferenceConfig, RootQuantStage

    cfg = {"backbone": args.backbone, "device": args.device, **overrides}
    rq = RootQuantStage(RootQuantInferenceConfig(**cfg)).predictor  # built as the job builds it
    return cfg, lambda batch, dpis: rq.predict_many(batch, dpis=dpis)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", help="synth preset: tiny, small, ci600, bartz")
    ap.add_argument("--n-images", type=int, default=8)
    ap.add_argument("--model", choices=["rootsam", "rootquant", "both"], default="rootsam")
    ap.add_argument("--no-fuse", action="store_true",
                    help="with --model both: two actor pools instead of one fused actor")
    ap.add_argument("--variant", default="test", help="RootSAM variant (test, hiera_tiny, ...)")
    ap.add_argument("--backbone", default="resnet10t", help="RootQuant backbone")
    ap.add_argument("--set", action="append", default=[], dest="model_set",
                    help="model config key=value (e.g. lattice_points_per_side=4)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--gpus-per-actor", type=float, default=0.0,
                    help="GPUs per model actor of the job (0 = CPU)")
    ap.add_argument("--actors", default="1", help="model actors MIN:MAX (N = N:N)")
    ap.add_argument("--model-cpus", type=float, default=1.0, help="CPU slots per model actor")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the model, in the bare loop and in the job's actors "
                         "(OMP_NUM_THREADS); on a shared 2-core machine 2 threads oversubscribe")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--s3", action="store_true", help="archive and lake on a loopback S3 server")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    # Same model threads on both sides: Ray workers inherit OMP_NUM_THREADS from the driver's
    # environment when Ray starts (Ray only sets it itself when it is unset).
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)

    import yaml

    from rootflow.inference.pipeline import InferConfig, Resources, init_ray, parse_actors, run
    from rootflow.io import images, storage
    from rootflow.io.manifest import build_manifest, read_manifest, write_manifest
    from rootflow.synth import SynthConfig, generate_archive

    work = args.out or tempfile.mkdtemp(prefix="rf-bench-")
    so: dict | None = None
    moto = None
    base = work
    if args.s3:
        moto, so = _moto()
        base = "s3://bench/run"
    archive = storage.join(base, "archive")
    # Enough tubes that the year x tube x window x session grid holds n images.
    cfg = SynthConfig.preset(args.preset, n_images=args.n_images, seed=11, n_windows=3,
                             n_sessions=3, n_tubes=max(1, -(-args.n_images // 9)))
    generate_archive(archive, config=cfg, storage_options=so)
    built = build_manifest(archive, experiment_config=storage.join(archive, "experiment.yaml"),
                           storage_options=so)
    manifest = storage.join(base, "manifest.parquet")
    write_manifest(built.table, manifest, storage_options=so)
    rows = read_manifest(manifest, storage_options=so).to_pylist()
    n = len(rows)

    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.model_set)}
    model_cfg, predict = _bare_model(args, overrides)

    # -- bare loop: decoded images in memory, plain PyTorch ---------------------------------
    decoded = [images.decode(storage.read_bytes(r["image_uri"], so))[0] for r in rows]
    dpis = [float(r["dpi"]) for r in rows]
    predict(decoded[:1], dpis[:1])  # warm-up (lazy init, allocator), not timed

    def bare_loop() -> float:
        t0 = time.perf_counter()
        for i in range(0, n, args.batch_size):
            predict(decoded[i:i + args.batch_size], dpis[i:i + args.batch_size])
        return time.perf_counter() - t0

    bare_before = bare_loop()

    # -- whole job: object storage -> committed Delta rows --------------------------------------
    init_ray(None, num_cpus=max(8, int(args.model_cpus) + 6))
    res = Resources(model_num_cpus=args.model_cpus, model_num_gpus=args.gpus_per_actor,
                    model_actors=parse_actors(args.actors),
                    model_batch_size=args.batch_size, fuse_models=not args.no_fuse)
    producers = ("rootsam", "rootquant") if args.model == "both" else (args.model,)
    per_model = model_cfg if args.model == "both" else {args.model: model_cfg}
    job_cfg = InferConfig(producers=producers, resources=res, commit_every=10_000, **per_model)
    lake = storage.join(base, "lake")
    t0 = time.perf_counter()
    summary = run(manifest, lake, job_cfg, storage_options=so, progress=False)
    job_s = time.perf_counter() - t0
    # The bare loop again after the job: on a shared machine the load drifts, and the faster of
    # the two bare runs is the conservative baseline for the efficiency.
    bare_after = bare_loop()
    bare_s = min(bare_before, bare_after)
    if moto:
        moto.terminate()

    bare_ips, job_ips = n / bare_s, n / job_s
    out = {
        "model": args.model, "fused": not args.no_fuse, "config": model_cfg, "preset": args.preset, "n_images": n,
        "image_hw": [cfg.height, cfg.width], "storage": "s3 (moto, loopback)" if args.s3 else "local",
        "bare_images_per_s": round(bare_ips, 4), "job_images_per_s": round(job_ips, 4),
        "efficiency": round(job_ips / bare_ips, 3),
        "bare_s_before_after": [round(bare_before, 2), round(bare_after, 2)],
        "job_s": round(job_s, 2), "job_stage_s": summary.stage_s, "job_status": summary.status,
        "model_cpus": args.model_cpus, "threads": args.threads, "gpus_per_actor": args.gpus_per_actor, "cores": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2), "machine": platform.machine(),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
