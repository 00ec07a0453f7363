"""Write a synthetic minirhizotron archive (images, masks, ground truth) to any fsspec URI.

Layout (``contracts.md``)::

    <out>/<EXP>_T<tube:03>_L<window:03>_<YYYY.MM.DD>_<hhmmss>_<session:03>_<operator>.jpg
    <out>/<same stem>_mask.png      8-bit, 0 / 255
    <out>/ground_truth.parquet      one row per image
    <out>/roots.parquet             one row per visible root per image
    <out>/experiment.yaml           dpi, frame height, tube angle... (LAKE parses it)
    <out>/synth_config.yaml         the resolved SynthConfig (reproduces the archive)

The archive is a grid of seasons (years) x tubes x windows x sessions. A window keeps its
soil and root system through a season (one scene seed per year, tube and window) and each
session photographs it a fortnight later, so roots of a later session extend those of the
earlier one; every image draws its own derived seed, so images can be rendered in any order
or in parallel and still come out byte-identical.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from rootflow import config as config_io
from rootflow.io import storage
from rootflow.synth.config import SynthConfig

GROUND_TRUTH_SCHEMA = pa.schema([
    ("file_name", pa.string()),
    ("image_uri", pa.string()),
    ("mask_uri", pa.string()),
    ("length_mm", pa.float64()),
    ("projected_area_mm2", pa.float64()),
    ("mean_diameter_mm", pa.float64()),  # null when the image has no roots
    ("n_roots", pa.int32()),
    ("root_px", pa.int64()),
    ("dpi", pa.float64()),
    ("experiment", pa.string()),
    ("tube", pa.int32()),
    ("window", pa.int32()),
    ("session", pa.int32()),
    ("captured_at", pa.timestamp("us")),
    ("year", pa.int32()),
    ("operator", pa.string()),
    ("depth_cm", pa.float64()),
    ("day", pa.float64()),
    ("look", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("seed", pa.uint64()),
    ("scene_seed", pa.uint64()),
])

ROOTS_SCHEMA = pa.schema([
    ("file_name", pa.string()),
    ("root_id", pa.int32()),
    ("parent_id", pa.int32()),
    ("order", pa.int8()),
    ("length_mm", pa.float64()),
    ("mean_diameter_mm", pa.float64()),
])


@dataclasses.dataclass(frozen=True)
class ArchiveEntry:
    """One planned image: where it sits in the grid, when it was taken, and its seeds."""

    year: int
    tube: int
    window: int
    session: int
    captured_at: dt.datetime
    day: float
    depth_cm: float
    seed: int
    scene_seed: int
    file_name: str

    @property
    def stem(self) -> str:
        return self.file_name.rsplit(".", 1)[0]

    @property
    def mask_name(self) -> str:
        return f"{self.stem}_mask.png"


@dataclasses.dataclass(frozen=True)
class SynthArchive:
    """What :func:`generate_archive` wrote."""

    uri: str
    n_images: int
    n_empty: int
    ground_truth_uri: str
    roots_uri: str
    experiment_yaml_uri: str
    ground_truth: pa.Table
    seconds: float


def _derive(*key: int) -> int:
    return int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, np.uint64)[0]
               >> np.uint64(1))


def archive_entries(config: SynthConfig) -> list[ArchiveEntry]:
    """The images an archive of ``config`` holds, in write order (year, tube, window, session).

    Dates: each season is sown on 1 May plus a few seeded days; session ``s`` is taken
    ``first_session_day + (s-1) * session_interval_days`` days later (give or take a day),
    tube by tube from 08:00, a few seconds per window, as an operator walks the field.
    """
    out: list[ArchiveEntry] = []
    for yi in range(config.n_years):
        year = config.first_year + yi
        rng = np.random.default_rng(np.random.SeedSequence([config.seed, year, 0xDA7E]))
        sown = dt.datetime(year, 5, 1) + dt.timedelta(days=int(rng.integers(0, 10)))
        session_days = [config.first_session_day + s * config.session_interval_days
                        + int(rng.integers(-1, 2)) for s in range(config.n_sessions)]
        session_start = [int(rng.integers(8 * 3600, 10 * 3600)) for _ in range(config.n_sessions)]
        for tube in range(1, config.n_tubes + 1):
            for window in range(1, config.n_windows + 1):
                scene = _derive(config.seed, year, tube, window)
                depth_cm = config.depth_cm(window)
                for s in range(config.n_sessions):
                    secs = session_start[s] + (tube - 1) * 600 + (window - 1) * 9
                    taken = sown + dt.timedelta(days=int(session_days[s]), seconds=secs)
                    session = s + 1
                    name = (f"{config.experiment}_T{tube:03d}_L{window:03d}_"
                            f"{taken:%Y.%m.%d}_{taken:%H%M%S}_{session:03d}_{config.operator}.jpg")
                    out.append(ArchiveEntry(
                        year=year, tube=tube, window=window, session=session, captured_at=taken,
                        day=(taken - sown).total_seconds() / 86400.0, depth_cm=depth_cm,
                        seed=_derive(config.seed, year, tube, window, session), scene_seed=scene,
                        file_name=name,
                    ))
                    if config.n_images is not None and len(out) >= config.n_images:
                        return out
    return out


def experiment_yaml(config: SynthConfig) -> str:
    """The per-experiment YAML LAKE reads (format in contracts.md)."""
    import yaml

    doc = {
        "date_order": "YMD",
        "depth_band_cm": (int(config.depth_band_cm) if float(config.depth_band_cm).is_integer()
                          else float(config.depth_band_cm)),
        "experiments": {
            config.experiment: {
                "dpi": float(config.dpi),
                "frame_height_mm": float(config.frame_height_mm),
                "insertion_angle_deg": float(config.insertion_angle_deg),
                "surface_window": int(config.surface_window),
                "surface_offset_cm": float(config.surface_offset_cm),
                "species": config.species,
                "treatment": config.treatment,
            }
        },
    }
    return yaml.safe_dump(doc, sort_keys=False)


def _render_and_write(entry: ArchiveEntry, config: SynthConfig, out_uri: str,
                      storage_options: dict[str, Any] | None) -> tuple[dict[str, Any],
                                                                      list[dict[str, Any]]]:
    """Render one entry, write its JPEG and mask, return its ground-truth rows."""
    import cv2

    from rootflow.io.images import encode_png
    from rootflow.synth.render import generate_image

    img = generate_image(entry.seed, config, scene_seed=entry.scene_seed, day=entry.day,
                         depth_cm=entry.depth_cm)
    ok, jpg = cv2.imencode(".jpg", img.image[..., ::-1],
                           [cv2.IMWRITE_JPEG_QUALITY, int(config.jpeg_quality)])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {entry.file_name}")
    image_uri = storage.join(out_uri, entry.file_name)
    mask_uri = storage.join(out_uri, entry.mask_name)
    storage.write_bytes(image_uri, bytes(jpg), storage_options)
    storage.write_bytes(mask_uri, encode_png(img.mask), storage_options)
    row = {
        "file_name": entry.file_name, "image_uri": image_uri, "mask_uri": mask_uri,
        "length_mm": img.length_mm, "projected_area_mm2": img.projected_area_mm2,
        "mean_diameter_mm": None if img.n_roots == 0 else img.mean_diameter_mm,
        "n_roots": img.n_roots, "root_px": img.root_px, "dpi": float(config.dpi),
        "experiment": config.experiment, "tube": entry.tube, "window": entry.window,
        "session": entry.session, "captured_at": entry.captured_at, "year": entry.year,
        "operator": config.operator, "depth_cm": entry.depth_cm, "day": entry.day,
        "look": config.look, "height": config.height, "width": config.width,
        "seed": entry.seed, "scene_seed": entry.scene_seed,
    }
    roots = [{"file_name": entry.file_name, "root_id": r.root_id, "parent_id": r.parent_id,
              "order": r.order, "length_mm": r.length_mm,
              "mean_diameter_mm": r.mean_diameter_mm} for r in img.roots]
    return row, roots


def _job(args: tuple[ArchiveEntry, dict[str, Any], str, dict[str, Any] | None]
         ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    entry, cfg, out_uri, opts = args
    return _render_and_write(entry, config_io.from_dict(SynthConfig, cfg), out_uri, opts)


def generate_archive(out_uri: str, *, config: SynthConfig,
                     storage_options: storage.StorageLike = None, workers: int = 1,
                     progress: Callable[[int, int], None] | None = None) -> SynthArchive:
    """Render and write a whole archive.

    Args:
        out_uri: folder or prefix (local path, ``file://``, ``s3://bucket/prefix``...).
        config: what to generate; saved as ``synth_config.yaml`` next to the images.
        storage_options: endpoint/credentials (``StorageOptions``, a dict, or ``None`` for the
            environment).
        workers: processes rendering in parallel (1 = in this process, deterministic order
            of work; the *output* is identical for any value).
        progress: called as ``progress(done, total)`` after each image.

    Returns:
        A :class:`SynthArchive` with the ground-truth table and counts.
    """
    t0 = time.perf_counter()
    out_uri = storage.normalize(out_uri).rstrip("/")
    opts = storage.StorageOptions.from_mapping(storage_options) if storage.is_remote(out_uri) \
        else None
    opts_dict = opts.to_dict() if opts is not None else None
    entries = archive_entries(config)
    results: list[tuple[dict[str, Any], list[dict[str, Any]]]] = []
    for i, res in enumerate(_run(entries, config, out_uri, opts_dict, workers)):
        results.append(res)
        if progress is not None:
            progress(i + 1, len(entries))

    gt = pa.Table.from_pylist([r for r, _ in results], schema=GROUND_TRUTH_SCHEMA)
    roots = pa.Table.from_pylist([x for _, rs in results for x in rs], schema=ROOTS_SCHEMA)
    gt_uri = storage.join(out_uri, "ground_truth.parquet")
    roots_uri = storage.join(out_uri, "roots.parquet")
    yaml_uri = storage.join(out_uri, "experiment.yaml")
    storage.write_bytes(gt_uri, _parquet_bytes(gt), opts_dict)
    storage.write_bytes(roots_uri, _parquet_bytes(roots), opts_dict)
    storage.write_bytes(yaml_uri, experiment_yaml(config).encode(), opts_dict)
    storage.write_bytes(storage.join(out_uri, "synth_config.yaml"),
                        config_io.dump(config).encode(), opts_dict)
    n_empty = sum(1 for r, _ in results if r["n_roots"] == 0)
    return SynthArchive(uri=out_uri, n_images=len(results), n_empty=n_empty,
                        ground_truth_uri=gt_uri, roots_uri=roots_uri, experiment_yaml_uri=yaml_uri,
                        ground_truth=gt, seconds=time.perf_counter() - t0)


def _run(entries: list[ArchiveEntry], config: SynthConfig, out_uri: str,
         opts: dict[str, Any] | None, workers: int
         ) -> Iterator[tuple[dict[str, Any], list[dict[str, Any]]]]:
    if workers <= 1 or len(entries) <= 1:
        for e in entries:
            yield _render_and_write(e, config, out_uri, opts)
        return
    import concurrent.futures as cf
    import multiprocessing as mp

    cfg = config_io.to_dict(config)
    # spawn, not fork: the parent may hold s3fs/aiohttp threads that a fork would copy mid-lock.
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
        yield from ex.map(_job, [(e, cfg, out_uri, opts) for e in entries], chunksize=2)


def _parquet_bytes(table: pa.Table) -> bytes:
    import pyarrow.parquet as pq

    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return bytes(sink.getvalue().to_pybytes())
