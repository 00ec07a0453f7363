"""``rootflow evaluate masks``: pairing, the JSON contract, clear errors, real masks."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from rootflow.cli import app

KEYS = {"n_images", "dice", "iou", "precision", "recall", "cldice", "length_r2",
        "length_pearson_r2", "length_bias_pct", "area_r2"}


def _mask(path: Path, m: np.ndarray) -> None:
    cv2.imwrite(str(path), (m > 0).astype(np.uint8) * 255)


def _pairs(tmp: Path, n: int = 4, *, shrink: bool = False) -> tuple[Path, Path]:
    pred, truth = tmp / "pred", tmp / "truth"
    pred.mkdir(exist_ok=True)
    truth.mkdir(exist_ok=True)
    for i in range(n):
        t = np.zeros((60, 80), bool)
        t[20:24, 5:5 + 15 * (i + 1)] = True
        p = t.copy()
        if shrink:
            p[:, 5 + 8 * (i + 1):] = False  # pred misses part of each root
        _mask(truth / f"img{i}_mask.png", t)
        _mask(pred / f"img{i}_mask.png", p)
        cv2.imwrite(str(truth / f"img{i}.jpg"), np.full((60, 80, 3), 90, np.uint8))
    return pred, truth


def _run(*args: str):
    return CliRunner().invoke(app, ["evaluate", "masks", "--no-progress", *args])


def test_perfect_predictions_print_one_json_object(tmp_path: Path) -> None:
    """stdout must be exactly one JSON object with the documented keys (scripts parse it)."""
    pred, truth = _pairs(tmp_path)
    res = _run("--pred", str(pred), "--truth", str(truth), "--dpi", "300",
               "--csv", str(tmp_path / "rows.csv"))
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out) >= KEYS
    assert out["n_images"] == 4 and out["dice"] == 1.0 and out["cldice"] == pytest.approx(1.0)
    assert out["length_r2"] == pytest.approx(1.0) and out["length_bias_pct"] == pytest.approx(0.0)
    with open(tmp_path / "rows.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["stem"] for r in rows] == [f"img{i}" for i in range(4)]
    assert out["length_unit"] == "mm"


def test_missed_roots_lower_dice_recall_and_bias(tmp_path: Path) -> None:
    """Guards against metrics computed on the wrong pairing or swapped pred/truth."""
    pred, truth = _pairs(tmp_path, shrink=True)
    out = json.loads(_run("--pred", str(pred), "--truth", str(truth)).stdout)
    assert out["precision"] == pytest.approx(1.0) and out["recall"] < 0.8
    assert out["length_bias_pct"] < -20 and out["length_unit"] == "px"


def test_truth_without_prediction_and_size_mismatch_exit_2(tmp_path: Path) -> None:
    """A missing prediction or a wrong-size mask is one line naming the file, exit 2."""
    pred, truth = _pairs(tmp_path)
    (pred / "img2_mask.png").unlink()
    res = _run("--pred", str(pred), "--truth", str(truth))
    assert res.exit_code == 2 and "img2_mask.png" in res.stderr and "Traceback" not in res.output
    _mask(pred / "img2_mask.png", np.zeros((61, 80), bool))
    res = _run("--pred", str(pred), "--truth", str(truth))
    assert res.exit_code == 2 and "size mismatch" in res.stderr and "img2_mask.png" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_grey_mask_is_refused(tmp_path: Path) -> None:
    """A JPEG-like grey mask would be silently thresholded; it must be named instead."""
    pred, truth = _pairs(tmp_path)
    g = np.zeros((60, 80), np.uint8)
    g[10:20, 10:20] = 128
    g[30:40, 30:40] = 255
    cv2.imwrite(str(pred / "img1_mask.png"), g)
    res = _run("--pred", str(pred), "--truth", str(truth))
    assert res.exit_code == 2 and "not binary" in res.stderr and "img1_mask.png" in res.stderr


@pytest.mark.realdata
def test_real_human_masks_against_themselves_and_eroded(real_data: Path, tmp_path: Path) -> None:
    """On real soybean masks: identity scores 1, and eroding every root (a too-thin
    segmenter) drops Dice a lot while clDice's sensitivity drops much less."""
    src = real_data / "segroot_soybean"
    stems = sorted(p.name for p in src.glob("*_mask.png"))[:3]
    truth, pred = tmp_path / "t", tmp_path / "p"
    truth.mkdir()
    pred.mkdir()
    for s in stems:
        shutil.copy(src / s, truth / s)
        m = cv2.imread(os.fspath(src / s), cv2.IMREAD_GRAYSCALE) > 127
        er = cv2.erode(m.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0
        _mask(pred / s, er)
    same = json.loads(_run("--pred", str(truth), "--truth", str(truth), "--dpi", "100").stdout)
    assert same["dice"] == 1.0 and same["length_r2"] == pytest.approx(1.0)
    out = json.loads(_run("--pred", str(pred), "--truth", str(truth), "--dpi", "100").stdout)
    assert out["precision"] == pytest.approx(1.0) and out["dice"] < 0.9
    assert out["topology_sensitivity"] > out["recall"]
