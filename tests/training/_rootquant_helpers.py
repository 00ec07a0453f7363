"""Seeded synthetic root images with exact length/area for RootQuant tests (tiny and fast).

Independent of :mod:`rootflow.synth` on purpose: RootQuant's tests need only "dark soil, bright
lines of known length", drawn in milliseconds, so they do not depend on the archive generator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa


def root_image(seed: int, *, height: int = 96, width: int = 128, dpi: float = 100.0,
               max_roots: int = 4, empty: bool | None = None
               ) -> tuple[np.ndarray, np.ndarray, float, float]:
    """``(uint8 image (H, W, 3), bool mask, length_mm, area_mm2)``.

    Roots are straight bright segments, 2 px wide; length is the sum of segment lengths and
    area the mask's pixel count, both converted with ``dpi``.
    """
    import cv2

    rng = np.random.default_rng(seed)
    soil = np.array([90, 65, 45], np.float32) + rng.normal(0, 8, (height, width, 3))
    img = np.clip(soil, 0, 255).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    n = 0 if (empty if empty is not None else rng.random() < 0.25) else int(rng.integers(1, max_roots + 1))
    length_px = 0.0
    for _ in range(n):
        x0, y0 = rng.uniform(0, width - 1), rng.uniform(0, height - 1)
        ang = rng.uniform(0, np.pi)
        seg = rng.uniform(10, 60)
        x1 = float(np.clip(x0 + seg * np.cos(ang), 0, width - 1))
        y1 = float(np.clip(y0 + seg * np.sin(ang), 0, height - 1))
        length_px += float(np.hypot(x1 - x0, y1 - y0))
        cv2.line(mask, (round(x0), round(y0)), (round(x1), round(y1)), 1, 2)
    img[mask > 0] = (225, 215, 190)
    mm = 25.4 / dpi
    return img, mask > 0, length_px * mm, float(mask.sum()) * mm * mm


def write_label_set(folder: Path, n: int, *, seed0: int = 0, dpi: float = 100.0,
                    **kw: object) -> Path:
    """Write ``n`` PNG images + ``labels.csv`` (relative file names) into ``folder``."""
    import pyarrow.csv as pacsv

    folder.mkdir(parents=True, exist_ok=True)
    rows = {"file": [], "length_mm": [], "area_mm2": [], "dpi": []}
    for i in range(n):
        img, _, length, area = root_image(seed0 + i, dpi=dpi, **kw)  # type: ignore[arg-type]
        name = f"img_{seed0 + i:04d}.png"
        (folder / name).write_bytes(_png(img))
        rows["file"].append(name)
        rows["length_mm"].append(length)
        rows["area_mm2"].append(area)
        rows["dpi"].append(dpi)
    path = folder / "labels.csv"
    pacsv.write_csv(pa.table(rows), path)
    return path


def _png(img: np.ndarray) -> bytes:
    import cv2

    ok, buf = cv2.imencode(".png", img[..., ::-1])
    assert ok
    return bytes(buf)
