"""Hold out whole tubes/windows of an image/mask folder for ``rootflow evaluate rootsam``.

    python benchmarks/rootsam_split.py --data ../shared/data/real/prmi_peanut \
        --out bench-output/rootsam-real --test-fraction 0.25

writes ``<out>/train`` and ``<out>/test``, each a folder of symlinks to ``<stem>.<ext>`` +
``<stem>_mask.png`` pairs, split by :func:`rootflow.training.splits.grouped_split` (sessions of
one window never land on both sides), and prints the split as JSON. ``rootflow train rootsam``
then splits ``train`` again (grouped) for its own validation; ``test`` is never seen by training.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--test-fraction", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--by", default="auto", choices=["auto", "tube", "window"])
    args = ap.parse_args()

    from rootflow.training.data import pairs_manifest
    from rootflow.training.splits import check_disjoint, grouped_split

    table = pairs_manifest(str(pathlib.Path(args.data).resolve()))
    train, test = grouped_split(table, val_fraction=args.test_fraction, seed=args.seed,
                                by=args.by)
    check_disjoint(train, test, by=args.by)
    out = pathlib.Path(args.out)
    summary = {}
    for name, t in (("train", train), ("test", test)):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        for old in d.iterdir():
            old.unlink()
        for img, mask in zip(t["image_uri"].to_pylist(), t["mask_uri"].to_pylist(),
                             strict=True):
            for src in (img, mask):
                src = src.removeprefix("file://")
                os.symlink(src, d / os.path.basename(src))
        summary[name] = {"folder": str(d), "images": t.num_rows}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
