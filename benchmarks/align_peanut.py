"""Which registration method aligns real consecutive minirhizotron sessions? (docs/dynamics.md)

For every pair of consecutive sessions of each PRMI peanut window (tube T064), every method in
:data:`rootflow.dynamics.align.METHODS` registers the later image to the earlier one; the human
masks are then compared: IoU of the earlier mask with the warped later mask, on the shared part
of both frames, against the IoU without alignment. A method "works" on a pair when the IoU
rises by at least 0.1 (the issue's criterion) or it flags the pair. ``oracle`` is the best
translation found by brute force on the masks themselves (a ceiling, not a method).

    python benchmarks/align_peanut.py [--data ../shared/data/real/prmi_peanut] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rootflow.dynamics.align import METHODS, align  # noqa: E402
from rootflow.dynamics.dynamics import mask_iou, oracle_shift  # noqa: E402
from rootflow.io.filenames import parse_name  # noqa: E402


def load(path: Path) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    img = cv2.imread(str(path))[..., ::-1]
    mask = cv2.imread(str(path.with_name(path.stem + "_mask.png")), cv2.IMREAD_GRAYSCALE) > 0
    return img, mask


def pairs(root: Path) -> list[tuple[str, Path, Path]]:
    by_window: dict[int, list[tuple[object, Path]]] = defaultdict(list)
    for p in sorted(root.glob("*.jpg")):
        n = parse_name(p.name)
        by_window[n.window].append((n.captured_at, p))
    out = []
    for w, items in sorted(by_window.items()):
        items.sort()
        for (_, a), (_, b) in zip(items[:-1], items[1:], strict=True):
            out.append((f"L{w:03d}", a, b))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default = Path(os.environ.get("ROOTFLOW_REAL_DATA", "../shared/data/real")) / "prmi_peanut"
    ap.add_argument("--data", type=Path, default=default)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    methods = args.methods.split(",")
    rows = []
    for window, a, b in tqdm(pairs(args.data), desc="pairs"):
        fi, fm = load(a)
        mi, mm = load(b)
        row = {"window": window, "fixed": parse_name(a.name).captured_at.date().isoformat(), "moving": parse_name(b.name).captured_at.date().isoformat()}
        base = mask_iou(fm, mm, None)
        row["iou_identity"] = round(base, 3)
        o = oracle_shift(fm, mm)
        row["oracle"] = {"dx": o[0], "dy": o[1], "iou": round(o[2], 3)}
        for m in methods:
            t0 = time.perf_counter()
            al = align(fi, mi, method=m)
            s = time.perf_counter() - t0
            iou = mask_iou(fm, mm, al)
            row[m] = {**al.to_dict(), "iou": round(iou, 3), "gain": round(iou - base, 3),
                      "s": round(s, 2)}
        rows.append(row)
    summary = {}
    for m in methods:
        gains = [r[m]["gain"] for r in rows]
        ok = [r[m]["ok"] for r in rows]
        passed = sum(1 for r in rows if r[m]["gain"] >= 0.1 or not r[m]["ok"])
        wrong_ok = sum(1 for r in rows if r[m]["ok"] and r[m]["gain"] < 0.1)
        summary[m] = {"pairs": len(rows), "criterion_met": passed, "accepted": sum(ok),
                      "accepted_but_iou_gain_below_0.1": wrong_ok,
                      "median_iou_gain": round(float(np.median(gains)), 3),
                      "median_s": round(float(np.median([r[m]["s"] for r in rows])), 2)}
    print(json.dumps(summary, indent=1))
    hdr = ["window", "fixed", "moving", "id", "oracle"] + methods
    print(" | ".join(hdr))
    for r in rows:
        cells = [r["window"], r["fixed"], r["moving"], f"{r['iou_identity']:.2f}",
                 f"{r['oracle']['iou']:.2f} ({r['oracle']['dx']},{r['oracle']['dy']})"]
        for m in methods:
            x = r[m]
            flag = "" if x["ok"] else " FLAG"
            cells.append(f"{x['iou']:.2f} q{x['quality']:.2f} ({x['dx']:.0f},{x['dy']:.0f},"
                         f"{x['angle_deg']:.1f}){flag}")
        print(" | ".join(cells))
    if args.out:
        args.out.write_text(json.dumps({"summary": summary, "pairs": rows}, indent=1))


if __name__ == "__main__":
    main()
