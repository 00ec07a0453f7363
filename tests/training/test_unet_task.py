"""U-Net training through the one Ray Train loop: learning, budget stop + resume, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from rootflow.models.unet import UNetSegmenter
from rootflow.training.unet_task import best_threshold, pooled_dice
from tests.training._rootsam_helpers import toy_pair, write_pairs

#: Seconds-scale recipe: 3-level net, 64 px patches, toy 96 x 128 images.
TINY_SETS = ["unet.widths=[4,8,16]", "unet.tile=128", "patch.patch_size=64",
             "patch.patches_per_image=4", "batch_size=4", "lr=0.005", "epochs=4",
             "early_stopping_patience=null", "augment.p_elastic=0", "val_fraction=0.25"]


@pytest.fixture(autouse=True)
def _fast_controller_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Train V2's controller polls workers every 2 s, which adds ~2 s to every tiny epoch."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def test_threshold_from_histograms() -> None:
    """Guards: an off-by-one bin (threshold k/bins must mean prob >= k/bins) or a Dice that is
    not the pooled one."""
    pos = np.zeros(10)
    neg = np.zeros(10)
    pos[[6, 7]] = [30, 70]  # roots at p in [0.6, 0.8)
    neg[[2, 5, 6]] = [1000, 50, 10]  # soil mostly low, some at [0.5, 0.6) and [0.6, 0.7)
    t, d = best_threshold(pos, neg)
    assert t == pytest.approx(0.6) and d == pytest.approx(200 / 210)  # 0.5: +50 fp; 0.7: -30 tp
    assert best_threshold(np.zeros(4), np.ones(4))[0] == pytest.approx(0.5)  # ties -> 0.5
    assert pooled_dice(0, 0, 0) == 1.0 and pooled_dice(5, 5, 0) == pytest.approx(10 / 15)


@pytest.mark.ray
def test_cli_learns_and_resumes_after_budget_stop(ray_local: object, tmp_path: Path) -> None:
    """Guards: a broken loss or training (held-out Dice no better than a constant model), a
    budget stop recorded as a finished run, a rerun that starts over instead of resuming, and a
    CLI that does not write ``<out>/unet.pt`` or prints more than one JSON object on stdout."""
    from rootflow.cli import app

    runner = CliRunner()
    data = write_pairs(tmp_path / "pairs", 8, seed=0, height=96, width=128)
    out = tmp_path / "out"
    args = ["train", "unet", "--data", str(data), "--out", str(out)]
    for s in TINY_SETS:
        args += ["--set", s]
    res = runner.invoke(app, [*args, "--max-minutes", "0.0001"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    first = json.loads(res.stdout)
    assert first["stopped_by_budget"] and not first["complete"]
    assert first["epochs_run"] == 1 and first["model_uri"] == str(out / "unet.pt")
    assert (out / "unet.pt").exists() and (out / "run").is_dir()
    rec1 = json.loads((out / "train.json").read_text())

    res = runner.invoke(app, [*args, "--max-minutes", "0"])  # 0 = no budget
    assert res.exit_code == 0, res.output + repr(res.exception)
    second = json.loads(res.stdout)
    assert second["complete"] and not second["stopped_by_budget"]
    rec2 = json.loads((out / "train.json").read_text())
    assert [h["epoch"] for h in rec2["history"]] == [0, 1, 2, 3]
    assert rec2["history"][0] == rec1["history"][0]  # epoch 0 kept, not retrained
    assert rec2["config"]["unet"]["widths"] == [4, 8, 16]
    assert 0.0 < second["threshold"] < 1.0 and second["val_dice"] is not None

    seg = UNetSegmenter.load(str(out))
    assert seg.version == second["version"] == f"unet-{second['sha256'][:12]}"
    tp = fp = fn = total = 0
    for i in range(4):  # held out: never in the training folder
        image, truth = toy_pair(100 + i, height=96, width=128)
        pred = seg.predict(image)
        tp += int((pred & truth).sum())
        fp += int((pred & ~truth).sum())
        fn += int((~pred & truth).sum())
        total += truth.size
    dice = pooled_dice(tp, fp, fn)
    share = (tp + fn) / total
    constant = 2 * share / (1 + share)  # Dice of "everything is root" (nothing: 0)
    assert dice > max(0.5, constant + 0.3), (dice, constant)


def test_cli_rejects_bad_input(tmp_path: Path) -> None:
    """Guards: bad input ending in a traceback (or a Ray start) instead of one ``error:`` line
    and exit code 2."""
    from rootflow.cli import app

    runner = CliRunner()
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = runner.invoke(app, ["train", "unet", "--data", str(empty), "--out", str(out)])
    assert bad.exit_code == 2 and bad.stdout == ""
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ")

    wrong = write_pairs(tmp_path / "wrong", 3, seed=5, height=96, width=128)
    cv2.imwrite(str(wrong / "toy_001_mask.png"), np.zeros((50, 60), np.uint8))
    bad = runner.invoke(app, ["train", "unet", "--data", str(wrong), "--out", str(out)])
    assert bad.exit_code == 2 and "toy_001_mask.png" in bad.stderr
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("error: ")
    bad = runner.invoke(app, ["train", "unet", "--data", str(wrong), "--out", str(out),
                              "--set", "unet.norm=layer"])
    assert bad.exit_code == 2 and "norm" in bad.stderr
    assert not out.exists()
