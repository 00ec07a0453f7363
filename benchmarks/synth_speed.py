"""Time :func:`~rootflow.synth.render.generate_image` per preset and look (not a test).

    python benchmarks/synth_speed.py --preset ci600 -n 5

Reports CPU seconds (``time.process_time``: honest on a shared machine where wall time
depends on the neighbours) and wall seconds per image, after one warm-up image that pays the
imports. OpenCV is pinned to one thread so the numbers are per core.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main(argv: list[str] | None = None) -> None:
    import cv2

    from rootflow.synth.config import PRESETS, SynthConfig
    from rootflow.synth.looks import LOOKS
    from rootflow.synth.render import generate_image

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="small")
    ap.add_argument("--look", choices=sorted(LOOKS), default=None, help="default: all looks")
    ap.add_argument("-n", type=int, default=5, help="images per look")
    args = ap.parse_args(argv)
    cv2.setNumThreads(1)
    looks = [args.look] if args.look else sorted(LOOKS)
    for look in looks:
        cfg = SynthConfig.preset(args.preset, look=look, empty_fraction=0.0)
        generate_image(10_000, cfg)  # warm-up: imports, allocator
        cpu, wall, roots = [], [], []
        for seed in range(args.n):
            c0, w0 = time.process_time(), time.perf_counter()
            img = generate_image(seed, cfg)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
            roots.append(img.n_roots)
        print(f"{args.preset:6s} {cfg.width}x{cfg.height}@{cfg.dpi:g}dpi look={look:5s} "
              f"n={args.n}: cpu {statistics.median(cpu):.3f} s/image (median), "
              f"wall {statistics.median(wall):.3f} s, roots/image {statistics.mean(roots):.0f}")


if __name__ == "__main__":
    main()
