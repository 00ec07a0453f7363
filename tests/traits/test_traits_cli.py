"""``rootflow traits MASK... --dpi N --csv OUT``."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from rootflow.cli import app
from rootflow.traits import measure, trait_schema
from tests.traits._helpers import capsule, star


def test_cli_writes_one_row_per_mask(tmp_path: Path) -> None:
    masks = {"a_mask.png": capsule(30, 120, 5).mask, "b_mask.png": star([90, 210, 330], 50, 5).mask}
    for name, m in masks.items():
        cv2.imwrite(str(tmp_path / name), m.astype(np.uint8) * 255)
    out = tmp_path / "traits.csv"
    res = CliRunner().invoke(app, ["traits", *(str(tmp_path / n) for n in masks), "--dpi", "300",
                                   "--csv", str(out)])
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(out.open()))
    assert [r["file_name"] for r in rows] == list(masks)
    assert list(rows[0]) == ["file_name", *trait_schema().names]
    for row, m in zip(rows, masks.values(), strict=True):
        assert float(row["length_mm"]) == pytest.approx(measure(m, dpi=300)["length_mm"])
    assert rows[1]["tips"] == "3" and rows[1]["branch_points"] == "1"


def test_cli_needs_a_calibration_and_reports_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "m.png"
    cv2.imwrite(str(good), capsule(0, 60, 5).mask.astype(np.uint8) * 255)
    res = CliRunner().invoke(app, ["traits", str(good)])
    assert res.exit_code != 0
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    res = CliRunner().invoke(app, ["traits", str(good), str(bad), "--px-per-mm", "10"])
    assert res.exit_code == 1
    assert "m.png" in res.stdout and "broken.png" in res.stderr
