"""Small lakes with known numbers, for the lake, query and maintenance tests."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa

from rootflow.io.manifest import ExperimentConfig, ExperimentSettings, validate_manifest

# Tube geometry giving round depths: 45 deg would give irrational ones; 90 deg (vertical tube),
# 20 mm windows, surface at window 1 => window w is centred at (w - 1) * 2 + 1 cm.
GEOMETRY = ExperimentSettings(dpi=100.0, frame_height_mm=20.0, insertion_angle_deg=90.0,
                              surface_window=1, surface_offset_cm=0.0, species="maize")
CONFIG = ExperimentConfig(date_order="YMD", depth_band_cm=4.0, experiments={"*": GEOMETRY})

SESSIONS = {1: dt.datetime(2021, 6, 1, 10, 0, 0), 2: dt.datetime(2021, 6, 15, 10, 0, 0),
            3: dt.datetime(2022, 6, 1, 10, 0, 0)}

IMAGE_AREA_MM2 = 400.0  # every test image is 20 mm x 20 mm


def manifest(*, tubes=(1, 2), windows=(1, 2, 3, 4), sessions=(1, 2, 3),
             root: str = "/data/exp") -> pa.Table:
    """A validated manifest of ``len(tubes) * len(windows) * len(sessions)`` images.

    Window w of tube t sits at depth_cm (w-1)*2+1 -> depth band floor(.../4)*4:
    windows 1,2 -> band 0; windows 3,4 -> band 4.
    """
    names = []
    for t in tubes:
        for w in windows:
            for s in sessions:
                when = SESSIONS[s]
                names.append(f"EXP_T{t:03d}_L{w:03d}_{when:%Y.%m.%d}_{when:%H%M%S}_{s:03d}_AB.jpg")
    table = pa.table({"image_uri": [f"{root}/{n}" for n in names]})
    return validate_manifest(table, experiment_config=CONFIG)


def length_of(tube: int, window: int, session: int, version: str = "v1") -> float:
    """Known root length per image: grows with session, shrinks with depth; v2 reads 10% more."""
    base = 10.0 * tube + 5.0 * session - window
    return base * (1.1 if version == "v2" else 1.0)


def traits_rows(m: pa.Table, *, model_name: str = "mask", version: str = "v1",
                run_id: str = "run-1", processed_at: dt.datetime | None = None,
                extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    rows = []
    for r in m.to_pylist():
        length = length_of(r["tube"], r["window"], r["session"], version)
        rows.append({**r, "length_mm": length, "projected_area_mm2": length * 0.5,
                     "analysed_area_mm2": IMAGE_AREA_MM2, "tips": int(length) % 7,
                     "model_name": model_name, "model_version": version, "run_id": run_id,
                     "processed_at": processed_at or dt.datetime(2023, 1, 1),
                     "params": '{"source": "test"}', **(extra or {})})
    return rows


# Trait columns for Lake(..., trait_schema=TRAIT_SCHEMA): the lake takes the trait columns as
# data (by default from rootflow.traits.trait_schema()); these tests fix a few of the real
# names so the numbers they check do not depend on the traits module's full column list.
TRAIT_SCHEMA = pa.schema([
    pa.field("length_mm", pa.float64()),
    pa.field("projected_area_mm2", pa.float64()),
    pa.field("analysed_area_mm2", pa.float64()),
    pa.field("tips", pa.int64()),
])


def concurrent_writer(args: tuple[str, dict[str, Any], int, int]) -> tuple[int, int]:
    """Run in a child process: ``n`` times, MERGE the same 12 shared rows (tube 1) that every
    writer also writes, plus 4 rows of its own (tube 10 + ``writer``, session i): every commit
    rewrites files the other writers rewrite too (real commit conflicts) and appends new data.

    Returns (rows committed, conflicts retried)."""
    from rootflow.lake import Lake

    uri, storage_options, writer, n = args
    lake = Lake(uri, storage_options=storage_options, trait_schema=TRAIT_SCHEMA,
                backoff_s=0.05)
    shared = traits_rows(manifest(tubes=(1,)), run_id=f"writer-{writer}")
    done = 0
    for i in range(n):
        own = traits_rows(manifest(tubes=(10 + writer,), sessions=(i % 3 + 1,)),
                          run_id=f"writer-{writer}")
        done += lake.commit_traits(shared + own)
    return done, lake.n_conflicts
