"""RootSAM's two-stage recipe end to end on Ray Train (CPU, gloo): CLI -> stage 1 -> stage 2
(two DDP workers, starting from stage 1's best export) -> a RootSAM checkpoint inference loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.training._rootsam_helpers import write_pairs

pytestmark = [pytest.mark.ray, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _fast_controller_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def test_cli_two_stages_two_workers(ray_local: object, tmp_path: Path) -> None:
    from rootflow.cli import app
    from rootflow.models.rootsam import build_rootsam, load_rootsam_checkpoint

    data = write_pairs(tmp_path / "pairs", 4, height=96, width=128)
    out = tmp_path / "models" / "rootsam.pt"
    args = ["train", "rootsam", "--data", str(data), "--out", str(out),
            "--model-config", "test", "--stage1-epochs", "1", "--stage2-epochs", "1",
            "--stage1-patch", "64", "--stage2-patch", "96", "--val-patch", "96",
            "--patches-per-image", "1", "--batch-size", "2", "--workers", "2",
            "--storage-path", str(tmp_path / "runs"), "--name", "rs", "--version", "rs-test",
            "--set", "task.val_fraction=0.25", "--set", "task.augment.p_elastic=0"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    summary = json.loads(res.output[res.output.index("[\n"):])
    assert [s["epochs_run"] for s in summary] == [1, 1]
    stage1 = tmp_path / "models" / "rootsam-stage1.pt"
    assert summary[0]["export_uri"] == str(stage1) and summary[1]["export_uri"] == str(out)

    final = load_rootsam_checkpoint(str(out))
    first = load_rootsam_checkpoint(str(stage1))
    assert final.train_config["task"]["init_checkpoint"] == str(stage1)  # stage 2 from stage 1
    assert final.train_config["task"]["patch"]["patch_size"] == 96
    assert final.train_config["task"]["lr"] == pytest.approx(1e-5)
    assert first.train_config["task"]["patch"]["patch_size"] == 64
    assert final.train_config["run"]["num_workers"] == 2
    assert {"val_miou", "val_dice", "train_loss"} <= set(final.metrics)
    assert any(not torch.equal(first.state_dict[k], v) for k, v in final.state_dict.items())
    model = build_rootsam("test", rootsam_checkpoint=str(out))
    assert model.rootsam_version == "rs-test"
