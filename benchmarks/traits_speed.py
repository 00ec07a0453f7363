"""Speed of ``rootflow.traits.measure`` vs a plain scikit-image/scipy implementation.

Masks: 2550x2273 tube scans (CI-600 at 300 dpi) -- the real SegRoot soybean masks when
``ROOTFLOW_REAL_DATA`` is set, plus synthetic ``ci600`` frames from :mod:`rootflow.synth`.
The baseline computes the same kind of traits the textbook way: ``remove_small_objects``,
``skimage.morphology.skeletonize`` (full-image sweeps), ``scipy.ndimage.distance_transform_edt``,
neighbour counts by convolution (tips, branch points), the 1/sqrt2 step length and
``skimage.measure.perimeter``. Each mask is timed best-of-3 on one thread, after a warm-up
call (numba compilation is excluded and reported separately). Times are CPU seconds of this
process (``time.process_time``): on a machine shared with other jobs, wall-clock time measures
the neighbours; for this single-threaded code CPU time is what one idle core would take.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/traits_speed.py [--synth N] [--real N]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np


def baseline(mask: np.ndarray, px_per_mm: float) -> dict[str, float]:
    """RhizoVision-style traits with scikit-image + scipy only."""
    import scipy.ndimage as ndi
    from skimage.measure import perimeter
    from skimage.morphology import remove_small_objects, skeletonize

    m = remove_small_objects(mask, max_size=9, connectivity=2)
    skel = skeletonize(m)
    edt = ndi.distance_transform_edt(m)
    nb = ndi.convolve(skel.astype(np.uint8), np.ones((3, 3), np.uint8), mode="constant") - 1
    tips = int((skel & (nb == 1)).sum())
    branch = int((skel & (nb >= 3)).sum())
    n_orth = (skel[1:] & skel[:-1]).sum() + (skel[:, 1:] & skel[:, :-1]).sum()
    n_diag = (skel[1:, 1:] & skel[:-1, :-1]).sum() + (skel[1:, :-1] & skel[:-1, 1:]).sum()
    length_px = n_orth + np.sqrt(2) * n_diag
    d = 2 * edt[skel]
    mm = 1 / px_per_mm
    return {
        "length_mm": float(length_px * mm),
        "network_area_mm2": float(m.sum() * mm * mm),
        "avg_diameter_mm": float(d.mean() * mm) if d.size else float("nan"),
        "perimeter_mm": float(perimeter(m) * mm),
        "tips": tips,
        "branch_points": branch,
    }


def _masks(n_synth: int, n_real: int) -> list[tuple[str, np.ndarray, float]]:
    out = []
    real = os.environ.get("ROOTFLOW_REAL_DATA")
    if real and n_real:
        import cv2

        for p in sorted(Path(real, "segroot_soybean").glob("*_mask.png"))[:n_real]:
            out.append((p.name[:34], cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) > 0, 300.0))
    if n_synth:
        from rootflow.synth import SynthConfig, generate_image

        cfg = SynthConfig.preset("ci600", empty_fraction=0.0)
        for seed in range(n_synth):
            img = generate_image(seed, cfg)
            out.append((f"synth-ci600-{seed}", img.mask, img.dpi))
    return out


def _best_of(fn, k: int = 3) -> float:
    best = np.inf
    for _ in range(k):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synth", type=int, default=3)
    ap.add_argument("--real", type=int, default=19)
    args = ap.parse_args()

    import cv2

    cv2.setNumThreads(1)
    from rootflow.traits import measure

    t = time.perf_counter()
    measure(np.eye(64, dtype=bool), dpi=300)
    print(f"first call (numba load/compile): {time.perf_counter() - t:.2f} s")
    rows = []
    for name, mask, dpi in _masks(args.synth, args.real):
        ours = _best_of(lambda m=mask, d=dpi: measure(m, dpi=d))
        base = _best_of(lambda m=mask, d=dpi: baseline(m, d / 25.4))
        r, b = measure(mask, dpi=dpi), baseline(mask, dpi / 25.4)
        rows.append((ours, base))
        print(f"{name:36s} {mask.shape[1]}x{mask.shape[0]} root {100 * mask.mean():5.2f} %  "
              f"rootflow {ours:6.3f} s  skimage {base:6.3f} s  x{base / ours:5.1f}   "
              f"length {r['length_mm']:8.1f} vs {b['length_mm']:8.1f} mm")
    if rows:
        a = np.array(rows)
        print(f"median over {len(rows)} masks: rootflow {np.median(a[:, 0]):.3f} s, "
              f"skimage baseline {np.median(a[:, 1]):.3f} s, "
              f"speed-up x{np.median(a[:, 1] / a[:, 0]):.1f}; max rootflow {a[:, 0].max():.3f} s")


if __name__ == "__main__":
    main()
