"""``rootflow evaluate rootsam``: one JSON object with the seed's table, usage errors in one line."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from tests.training._rootsam_helpers import thick_pair

pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("held_out")
    for i in range(2):
        image, mask = thick_pair(70 + i, size=160)
        cv2.imwrite(str(d / f"v{i}.png"), image[..., ::-1])
        cv2.imwrite(str(d / f"v{i}_mask.png"), mask.astype(np.uint8) * 255)
    return d


def test_evaluate_rootsam_prints_the_table(held_out: Path, tmp_path: Path) -> None:
    """Guards against the evaluation command not scoring every labelled checkpoint through
    the deployed path, or printing anything but one JSON object with the seed's columns; the
    numbers are checked against the module function on the same views."""
    from rootflow.cli import app
    from rootflow.evaluation.rootsam import load_views, score
    from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor
    from rootflow.models.rootsam import build_rootsam, save_rootsam_checkpoint

    ckpt = str(tmp_path / "rs.pt")
    model = build_rootsam("micro")
    with __import__("torch").no_grad():
        for p in model.sam.sam_mask_decoder.parameters():
            p.mul_(0.5)
    save_rootsam_checkpoint(model, ckpt, version="rs-eval")
    res = CliRunner().invoke(app, ["evaluate", "rootsam", "--data", str(held_out),
                                   "--config", "micro", "--checkpoint", f"tuned={ckpt}",
                                   "--view", "128", "--max-clicks", "3", "--set",
                                   "tile_batch_size=2"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out) == {"base", "tuned", "meta"}
    for row in ("base", "tuned"):
        assert {"miou", "dice", "noc85", "noc90", "s_per_click"} <= set(out[row])
        assert 0 <= out[row]["noc85"] <= 3 and out[row]["n_views"] == 8  # 2 images x 2 x 2
    assert out["tuned"]["version"] == "rs-eval" and out["meta"]["random_init_base"] is True
    views, _ = load_views(str(held_out), size=128)
    direct = score(RootSAMPredictor(RootSAMInferenceConfig(variant="micro", device="cpu",
                                                           tile_batch_size=2,
                                                           rootsam_checkpoint=ckpt)),
                   views, max_clicks=3)
    assert out["tuned"]["miou"] == pytest.approx(direct["miou"], abs=1e-9)
    assert out["tuned"]["noc85"] == direct["noc85"]


def test_evaluate_rootsam_usage_errors(held_out: Path, tmp_path: Path) -> None:
    """Guards against tracebacks for user mistakes: a bad --checkpoint, a folder without
    pairs, a short digest each give one line on stderr and exit 2."""
    from rootflow.cli import app

    runner = CliRunner()
    for args, msg in (
        (["--data", str(held_out), "--checkpoint", "nolabel"], "LABEL=URI"),
        (["--data", str(tmp_path)], "no image"),
        (["--data", str(held_out), "--base-checkpoint", str(tmp_path / "x.pt"),
          "--base-sha256", "abc123"], "64-hex"),
    ):
        res = runner.invoke(app, ["evaluate", "rootsam", "--config", "micro", *args])
        assert res.exit_code == 2, res.output
        assert msg in res.stderr and "Traceback" not in res.output
