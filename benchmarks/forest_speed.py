"""Forest segmenter on real SegRoot soybean scans: training time, one-core inference, Dice.

Data: ``$ROOTFLOW_REAL_DATA/segroot_soybean`` (default ``../shared/data/real``), 2550 x 2273
JPEG tube scans with hand-traced masks (0.1-3.5 % root pixels).

* **speed** (default): trains on ``--train N`` scans (the first N of tubes T002-T006, default 4),
  reports training wall seconds on this machine's threads, then times ``predict_proba`` of one
  scan of another tube with ``num_threads=1`` (and OMP/MKL/OpenCV/numba at one thread):
  ``--repeats`` runs (default 3) after a warm-up, median CPU seconds (``time.process_time``:
  on a shared machine wall time measures the neighbours). Prediction runs in a fresh
  process, so its peak RSS is inference's own (training's is reported separately).
* **--check**: the quality check of the issue: train on all scans of tubes T002-T006, predict
  every scan of T007-T012 (unseen tubes) and report pooled Dice (2 sum TP / (sum P + sum T))
  at the saved threshold, and per scan. The threshold is chosen at training time, out of fold,
  on training scans only.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/forest_speed.py [--train 4] [--repeats 3]
    .venv/bin/python benchmarks/forest_speed.py --check [--set boosting=rf ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import numpy as np  # noqa: E402


def _tube(p: Path) -> int:
    return int(p.name.split("_")[1][1:])


def _load(p: Path) -> tuple[np.ndarray, np.ndarray]:
    from rootflow.io import images

    img, _ = images.decode(p.read_bytes())
    mask = images.decode_mask(p.with_name(p.stem + "_mask.png").read_bytes())
    return img, mask


def _peak_rss_mb() -> float:
    """Peak RSS of this process (VmHWM; ``ru_maxrss`` would carry a parent's peak across
    fork + exec on Linux)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _time_predict(model: bytes, scan: str, repeats: int) -> dict[str, object]:
    """In a fresh process: one-thread predict_proba of ``scan``, CPU seconds and peak RSS."""
    import cv2

    from rootflow.models.forest import ForestSegmenter

    cv2.setNumThreads(1)
    seg = ForestSegmenter.from_bytes(model, num_threads=1)
    img, _ = _load(Path(scan))
    rss_before = _peak_rss_mb()
    seg.predict_proba(img[:600, :600])  # warm-up (numba kernel from cache or compiled)
    times = []
    for _ in range(repeats):
        t = time.process_time()
        seg.predict_proba(img)
        times.append(time.process_time() - t)
    return {"predict_cpu_s_median": round(statistics.median(times), 2),
            "predict_cpu_s": [round(x, 2) for x in times],
            "predict_peak_rss_mb": round(_peak_rss_mb()),
            "rss_before_predict_mb": round(rss_before)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--train", type=int, default=4, help="training scans for the speed run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check", action="store_true", help="train T002-T006, Dice on T007-T012")
    ap.add_argument("--threads", type=int, default=None, help="training threads")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="ForestConfig key=value")
    ap.add_argument("--save", default=None, help="write the trained model here")
    args = ap.parse_args()

    import cv2

    from rootflow import config as cfglib
    from rootflow.models.forest import ForestConfig, ForestSegmenter, fit_forest

    real = Path(os.environ.get("ROOTFLOW_REAL_DATA", "../shared/data/real")) / "segroot_soybean"
    scans = sorted(p for p in real.glob("*.jpg"))
    if not scans:
        sys.exit(f"no scans in {real}")
    train_scans = [p for p in scans if 2 <= _tube(p) <= 6]
    test_scans = [p for p in scans if 7 <= _tube(p) <= 12]
    if not args.check:
        train_scans = train_scans[:args.train]
        test_scans = test_scans[:1]
    cfg = cfglib.override(ForestConfig(), args.sets)

    pairs = [_load(p) for p in train_scans]
    t = time.perf_counter()
    seg = fit_forest([a for a, _ in pairs], [m for _, m in pairs], cfg, progress=False,
                     num_threads=args.threads, names=[p.name for p in train_scans])
    train_s = time.perf_counter() - t
    del pairs
    if args.save:
        seg.save(args.save)
    result: dict[str, object] = {
        "train_scans": len(train_scans), "train_seconds": round(train_s, 1),
        "train_threads": args.threads or "default", "threshold": round(seg.threshold, 4),
        "version": seg.version, "oof_dice": seg.train_info.get("oof_dice"),
        "n_trees": seg.train_info.get("n_trees"), "config_changes": args.sets,
    }

    one = ForestSegmenter.from_bytes(seg.to_bytes(), num_threads=1)
    cv2.setNumThreads(1)
    if args.check:
        tp = fp = fn = 0
        per_scan = {}
        for p in test_scans:
            img, mask = _load(p)
            t = time.process_time()
            pred = one.predict(img)
            cpu = time.process_time() - t
            a, b, c = int((pred & mask).sum()), int((pred & ~mask).sum()), int((~pred & mask).sum())
            tp, fp, fn = tp + a, fp + b, fn + c
            per_scan[p.name[9:33]] = {"dice": round(2 * a / max(1, 2 * a + b + c), 4),
                                      "cpu_s": round(cpu, 2)}
        result.update(pooled_dice=round(2 * tp / max(1, 2 * tp + fp + fn), 4),
                      test_scans=len(test_scans), per_scan=per_scan)
    else:
        import multiprocessing as mp

        with mp.get_context("spawn").Pool(1) as pool:
            timing = pool.apply(_time_predict, (seg.to_bytes(), str(test_scans[0]),
                                                args.repeats))
        result.update(scan=test_scans[0].name, **timing)
    result["train_peak_rss_mb"] = round(_peak_rss_mb())
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
