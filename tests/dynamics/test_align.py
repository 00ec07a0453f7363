"""Session registration: known motions on real images, real consecutive peanut sessions, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from rootflow.dynamics.align import align, rigid_matrix
from rootflow.dynamics.dynamics import mask_iou

PEANUT = "prmi_peanut"


def _img(real_data: Path, window: str, date: str) -> tuple[np.ndarray, np.ndarray]:
    p = next((real_data / PEANUT).glob(f"*_{window}_{date}_*[0-9]_BAZ.jpg"))
    img = cv2.imread(str(p))[..., ::-1].copy()
    mask = cv2.imread(str(p.with_name(p.stem + "_mask.png")), cv2.IMREAD_GRAYSCALE) > 0
    return img, mask


def _moved(img: np.ndarray, dx: float, dy: float, angle: float) -> np.ndarray:
    """The image a camera would see if aligning it back needs exactly (dx, dy, angle)."""
    m = rigid_matrix(dx, dy, angle, img.shape)
    return cv2.warpAffine(img, m, (img.shape[1], img.shape[0]),
                          flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)


@pytest.mark.realdata
@pytest.mark.parametrize(("window", "date", "dx", "dy", "angle"), [
    ("L046", "2016.06.16", 150.0, -20.0, 0.0),
    ("L042", "2016.06.08", 23.5, -40.2, -7.5),
    ("L048", "2016.05.26", -120.0, 90.0, 1.3),
])
def test_known_motion_recovered(real_data: Path, window: str, date: str, dx: float, dy: float,
                                angle: float) -> None:
    """Guards against a registration that is only roughly right, or has the sign or centre
    convention wrong: known shifts up to 150 px and rotations applied to real frames are
    recovered within half a pixel and 0.2 degrees."""
    img, _ = _img(real_data, window, date)
    r = align(img, _moved(img, dx, dy, angle))
    assert r.ok, r.reason
    assert abs(r.dx - dx) < 0.5 and abs(r.dy - dy) < 0.5, r
    assert abs(r.angle_deg - angle) < 0.2, r


# Pairs (window, earlier, later) where the human masks allow a rise of >= 0.1 in IoU.
REAL_PAIRS = [("L018", "2016.06.30", "2016.07.14"), ("L030", "2016.06.16", "2016.06.30"),
              ("L046", "2016.05.26", "2016.06.01"), ("L046", "2016.06.08", "2016.06.16"),
              ("L048", "2016.06.30", "2016.07.14"), ("L049", "2016.06.30", "2016.07.14")]


@pytest.mark.realdata
def test_identity_fails_the_iou_criterion(real_data: Path) -> None:
    """Guards against a test criterion that a do-nothing transform would pass: without
    alignment the human masks of consecutive sessions barely overlap (IoU gain 0)."""
    for window, a, b in REAL_PAIRS[:3]:
        _, fm = _img(real_data, window, a)
        _, mm = _img(real_data, window, b)
        iou = mask_iou(fm, mm, None)
        assert iou < 0.1, (window, a, b, iou)
        r = align(_img(real_data, window, a)[0], _img(real_data, window, b)[0],
                  method="identity")
        assert not r.ok and "quality" in (r.reason or "")  # and it is flagged as such


@pytest.mark.realdata
@pytest.mark.slow
def test_real_sessions_align(real_data: Path) -> None:
    """Guards against registration that works on synthetic motion but not between real
    sessions (new roots, condensation, lighting): the aligned human masks' IoU rises by at
    least 0.1, or the pair is flagged with a reason (docs/dynamics.md has all 49 pairs)."""
    for window, a, b in REAL_PAIRS:
        fi, fm = _img(real_data, window, a)
        mi, mm = _img(real_data, window, b)
        r = align(fi, mi)
        if not r.ok:
            assert r.reason
            continue
        gain = mask_iou(fm, mm, r) - mask_iou(fm, mm, None)
        assert gain >= 0.1, (window, a, b, r, gain)


def test_cli_roll_example_and_errors(tmp_path: Path) -> None:
    """Guards against the CLI contract drifting: the issue's np.roll example gives dx = -5
    on stdout as one JSON object with exit 0; an unalignable pair gives {"error"} and exit 1."""
    from typer.testing import CliRunner

    from rootflow.cli import app
    from tests.dynamics._synth import crop, texture

    fixed = crop(texture(seed=3), 100, 100, 240, 320)
    moving = np.roll(fixed, 5, axis=1)
    for name, a in (("f.png", fixed), ("m.png", moving), ("small.png", fixed[:200, :300]),
                    ("noise.png", np.random.default_rng(1).integers(0, 255, fixed.shape,
                                                                     np.uint8))):
        cv2.imwrite(str(tmp_path / name), a)
    runner = CliRunner()
    res = runner.invoke(app, ["align", str(tmp_path / "f.png"), str(tmp_path / "m.png")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert abs(out["dx"] + 5) < 0.5 and abs(out["dy"]) < 0.5 and abs(out["angle_deg"]) < 0.2
    assert 0 <= out["quality"] <= 1
    for other in ("small.png", "noise.png"):
        res = runner.invoke(app, ["align", str(tmp_path / "f.png"), str(tmp_path / other)])
        assert res.exit_code == 1
        assert json.loads(res.stdout)["error"]
