"""Seeded toy minirhizotron pairs for RootSAM training tests (written as files, like an archive).

Dark soil with speckle, a few bright curved "roots" of 2-6 px drawn with OpenCV, and the exact
mask. Tiny (96-160 px) so the ``test`` SAM2 variant trains on them in seconds.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa


def toy_pair(seed: int, *, height: int = 128, width: int = 160,
             n_roots: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.normal(70, 12, (height, width, 3)).clip(0, 255).astype(np.uint8)
    image[..., 0] = np.clip(image[..., 0].astype(int) + 20, 0, 255)  # brownish soil
    mask = np.zeros((height, width), np.uint8)
    for _ in range(n_roots):
        x, y = float(rng.uniform(0, width)), 0.0
        angle = rng.uniform(np.pi / 3, 2 * np.pi / 3)
        thick = int(rng.integers(2, 6))
        pts = []
        while 0 <= y < height and 0 <= x < width:
            pts.append((int(x), int(y)))
            angle += rng.normal(0, 0.15)
            x, y = x + 4 * np.cos(angle), y + 4 * np.sin(angle)
        if len(pts) > 1:
            cv2.polylines(mask, [np.array(pts, np.int32)], False, 255, thick)
    root = mask > 0
    image[root] = np.clip(rng.normal(200, 15, (int(root.sum()), 3)), 0, 255).astype(np.uint8)
    return image, root


def write_pairs(folder: Path, n: int, *, seed: int = 0, **kw: int) -> Path:
    """``n`` toy pairs as ``toy_<i>.png`` + ``toy_<i>_mask.png`` (0/255) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        image, mask = toy_pair(seed + i, **kw)
        cv2.imwrite(str(folder / f"toy_{i:03d}.png"), image[..., ::-1])
        cv2.imwrite(str(folder / f"toy_{i:03d}_mask.png"), mask.astype(np.uint8) * 255)
    return folder


def write_manifest_csv(folder: Path, path: Path) -> Path:
    """An annotated manifest CSV (image_uri, mask_uri, split) of the pairs in ``folder``."""
    images = sorted(p for p in folder.glob("*.png") if not p.stem.endswith("_mask"))
    split = ["val" if i % 4 == 3 else "train" for i in range(len(images))]
    table = pa.table({"image_uri": [str(p) for p in images],
                      "mask_uri": [str(p.with_name(p.stem + "_mask.png")) for p in images],
                      "split": split})
    import pyarrow.csv as pacsv

    pacsv.write_csv(table, path)
    return path
