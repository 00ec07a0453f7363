"""Real masks: rhizoTrak manual tracing length and RootDetector's own Kimura lengths."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from rootflow.traits import kimura_length_px, measure

pytestmark = pytest.mark.realdata


def test_rhizotrak_tracing_length_within_8pct(real_data: Path) -> None:
    path = real_data / "rhizotrak_sample" / "derived_mask_T23_tp1_500x250.png"
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    row = measure(mask, dpi=600 * 500 / 1420)  # the 500-px frame of a 1420-px, 600 dpi scan
    assert row["length_mm"] == pytest.approx(674.84, rel=0.08)


@pytest.mark.parametrize("stem,expected", [
    ("PD_T088_L004_13.11.18_091057_015_SS_crop.tiff", 5937),
    ("PD_T088_L004_17.10.18_140056_014_SS_crop.tiff", 5923),
])
def test_rootdetector_kimura_length(real_data: Path, stem: str, expected: int) -> None:
    folder = real_data / "rootdetector_testassets" / "reference_outputs_unzipped" / stem
    skel = cv2.imread(str(folder / f"{stem}.skeleton.png"), cv2.IMREAD_UNCHANGED)
    white = np.all(skel > 0, axis=-1)  # RootDetector draws the skeleton white (class 1)
    assert int(kimura_length_px(white)) == expected  # RootDetector truncates to int


def test_segroot_scan_is_measured_fast_and_sanely(real_data: Path) -> None:
    path = sorted((real_data / "segroot_soybean").glob("*_mask.png"))[1]
    mask = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE) > 0
    row = measure(mask, dpi=300)
    # ours sits between the two classic estimators, which bracket it on real roots
    assert row["kimura_length_mm"] < row["length_mm"] < row["rve_length_mm"]
    assert 0.05 < row["avg_diameter_mm"] < 1.0
