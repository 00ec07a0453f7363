"""The bad-input corpus through the real job, end to end (``rootflow infer`` on the shared Ray).

Every manifest row must end as exactly one ``traits`` row or one ``rejects`` row (rows in =
images with traits + rejected images), each kind with the outcome written beside it in
:mod:`tests.reliability._corpus`, and the exit code must say which case the run was.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
import pytest
from typer.testing import CliRunner

from rootflow.cli import app
from rootflow.io.manifest import MANIFEST_SCHEMA, validate_manifest, write_manifest
from rootflow.lake import Lake
from tests.reliability import _corpus as corpus

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def write_corpus(root: Path) -> tuple[str, dict[str, corpus.Kind]]:
    """Write every kind's files under ``root/images`` and a manifest naming them all."""
    img, mask = corpus.base_image()
    images = root / "images"
    images.mkdir(parents=True)
    good_mask = corpus._cv2_bytes(".png", mask)
    rows = []
    kinds = {}
    for i, kind in enumerate(corpus.KINDS):
        if kind.uri is not None:
            image_uri = kind.uri.replace("{root}", str(root))
        else:
            path = images / f"{kind.name}{kind.suffix}"
            path.write_bytes(kind.image(img, mask))  # type: ignore[misc]
            image_uri = str(path)
        mask_path = images / f"{kind.name}_mask.png"
        mask_path.write_bytes(kind.mask(img, mask) if kind.mask else good_mask)
        rows.append({"image_uri": image_uri, "image_id": kind.name,
                     "file_name": f"{kind.name}{kind.suffix}", "experiment": "CORPUS",
                     "tube": 1 + i // 10, "window": 1 + i % 10, "session": 1,
                     "captured_at": dt.datetime(2024, 5, 1, 12, 0, i),
                     "operator": None, "tile": None, "dpi": 100.0, "depth_cm": 5.0 + i,
                     "mask_uri": str(mask_path)})
        kinds[kind.name] = kind
    table = validate_manifest(pa.Table.from_pylist(rows))
    return write_manifest(table, str(root / "manifest.parquet")), kinds


def test_corpus_end_to_end(ray_local, tmp_path) -> None:
    """Guards against any kind of bad input killing the job, being lost (no row), counted twice,
    accepted when broken, or refused when merely unusual; and against a re-run adding rows."""
    manifest, kinds = write_corpus(tmp_path)
    lake_uri = str(tmp_path / "lake")
    summary_path = tmp_path / "summary.json"
    args = ["infer", manifest, lake_uri, "--producers", "mask", "--allow-prefix", str(tmp_path),
            "--allow-prefix", "nosuch://bucket/", "--summary-json", str(summary_path)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 3, res.output  # finished, with rejects
    lake = Lake(lake_uri)
    traits = {r["image_id"]: r for r in lake.read("traits").to_pylist()}
    rejects = {r["image_id"]: r for r in lake.read("rejects").to_pylist()}
    assert len(traits) + len(rejects) == len(kinds)  # rows in = traits images + rejected images
    assert lake.read("traits").num_rows == len(traits)  # no duplicates
    assert lake.read("rejects").num_rows == len(rejects)
    assert not set(traits) & set(rejects)
    wrong = []
    for name, kind in kinds.items():
        outcome, stage, words = corpus.expected(kind)
        if outcome == "ok":
            if name not in traits:
                wrong.append(f"{name}: expected traits, got {rejects.get(name, {}).get('reason')}")
        else:
            rej = rejects.get(name)
            if rej is None:
                wrong.append(f"{name}: expected a reject at {stage}, got traits")
            elif rej["stage"] != stage or words.lower() not in rej["reason"].lower():
                wrong.append(f"{name}: expected {stage}/{words!r}, got {rej['stage']}: "
                             f"{rej['reason']}")
            elif "\n" in rej["reason"] or "Traceback" in rej["reason"]:
                wrong.append(f"{name}: reason is not one line: {rej['reason']!r}")
    assert not wrong, "\n".join(wrong)
    # The same mask measured through every unusual image gives the same traits.
    lengths = {n: t["length_mm"] for n, t in traits.items() if n != "mask_all_zero"}
    assert len(set(round(v, 6) for v in lengths.values())) == 1 and min(lengths.values()) > 0
    assert traits["mask_all_zero"]["length_mm"] == 0
    s = json.loads(summary_path.read_text())
    assert s["n_images_rejected"] == len(rejects) and s["n_images_ok"] == len(traits)
    run = lake.read("runs").to_pylist()[-1]
    assert run["status"] == "ok_with_rejects"

    # Repeating the run adds nothing: done images are skipped, rejects are MERGEd.
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 3, res.output
    assert lake.read("traits").num_rows == len(traits)
    t2 = lake.read("traits").to_pylist()
    assert {r["image_id"] for r in t2} == set(traits)

    # An empty manifest is a clean run with nothing to do: exit 0.
    empty = write_manifest(pa.Table.from_pylist([], schema=MANIFEST_SCHEMA),
                           str(tmp_path / "empty.parquet"))
    res = CliRunner().invoke(app, ["infer", empty, str(tmp_path / "lake2"), "--producers", "mask"])
    assert res.exit_code == 0, res.output
