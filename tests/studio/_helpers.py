"""Small studio set-ups: synthetic root images with masks, a manifest, a lake with proposals."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa

from rootflow.io.images import encode_png
from rootflow.io.manifest import ExperimentConfig, ExperimentSettings, write_manifest

GEOMETRY = ExperimentSettings(dpi=300.0, frame_height_mm=20.0, insertion_angle_deg=90.0,
                              surface_window=1, surface_offset_cm=0.0, species="maize")
CONFIG = ExperimentConfig(date_order="YMD", depth_band_cm=4.0, experiments={"*": GEOMETRY})


def root_scene(h: int, w: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Soil-like noise with bright, 5-7 px wide curved 'roots'; returns (rgb, true mask)."""
    rng = np.random.default_rng(seed)
    img = rng.integers(50, 95, (h, w, 3), dtype=np.uint8)
    img[..., 0] = np.clip(img[..., 0].astype(int) + 15, 0, 255)
    mask = np.zeros((h, w), np.uint8)
    for k in range(3):
        x0 = int(rng.integers(20, w - 20))
        pts = np.array([[x0 + int(25 * np.sin(y / 40 + k)), y] for y in range(0, h, 8)],
                       np.int32)
        cv2.polylines(mask, [pts.reshape(-1, 1, 2)], False, 1, thickness=int(rng.integers(5, 8)))
    img[mask > 0] = (225, 205, 170)
    return img, mask > 0


@dataclasses.dataclass
class Setup:
    manifest_uri: str
    lake_uri: str
    image_ids: list[str]
    truth: dict[str, np.ndarray]
    images: dict[str, np.ndarray]


def make_setup(tmp: Path, *, n: int = 3, h: int = 240, w: int = 320,
               given_masks: bool = True) -> Setup:
    """``n`` images of tube 1 (windows 1..n) with masks (a third of each root erased, so there
    is something to correct), a validated Parquet manifest and an empty lake root."""
    data = tmp / "images"
    data.mkdir(parents=True)
    when = dt.datetime(2021, 6, 1, 10, 0, 0)
    uris, truth, images = [], {}, {}
    for i in range(n):
        rgb, mask = root_scene(h, w, seed=i)
        name = f"EXP_T001_L{i + 1:03d}_{when:%Y.%m.%d}_{when:%H%M%S}_001_AB"
        cv2.imwrite(str(data / f"{name}.png"), rgb[..., ::-1])
        given = mask.copy()
        given[: h // 3] = False  # the "model" missed the top third
        cv2.imwrite(str(data / f"{name}_given.png"), given.astype(np.uint8) * 255)
        uris.append(str(data / f"{name}.png"))
        truth[name] = mask
        images[name] = rgb
    table = pa.table({"image_uri": uris})
    if given_masks:
        table = table.append_column("mask_uri", pa.array(
            [u.replace(".png", "_given.png") for u in uris], pa.string()))
    from rootflow.io.manifest import validate_manifest

    table = validate_manifest(table, experiment_config=CONFIG)
    manifest_uri = write_manifest(table, str(tmp / "manifest.parquet"))
    ids = table["image_id"].to_pylist()
    by_uri = dict(zip(uris, ids, strict=True))
    return Setup(manifest_uri, str(tmp / "lake"), ids,
                 {by_uri[u]: truth[Path(u).stem] for u in uris},
                 {by_uri[u]: images[Path(u).stem] for u in uris})


def png(mask: np.ndarray) -> bytes:
    return encode_png(mask)
