"""Real minirhizotron data: the EDT sampler on human masks, the predictor on a real frame."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rootflow.inference.prompts import edt, sample_edt_points
from rootflow.inference.rootsam import RootSAMPredictor
from rootflow.io.images import decode, decode_mask
from tests.inference._helpers import TINY

pytestmark = pytest.mark.realdata


def _pairs(root: Path, folder: str, n: int) -> list[tuple[Path, Path]]:
    masks = sorted((root / folder).glob("*_mask.png"))[:n]
    out = []
    for m in masks:
        stem = m.name[: -len("_mask.png")]
        imgs = [p for p in m.parent.glob(stem + ".*") if not p.name.endswith("_mask.png")]
        if imgs:
            out.append((imgs[0], m))
    return out


def test_edt_positives_on_real_root_centre_lines(real_data):
    pairs = _pairs(real_data, "segroot_soybean", 3)
    if not pairs:
        pytest.skip("no segroot_soybean pairs")
    for _, mask_path in pairs:
        mask = decode_mask(mask_path.read_bytes())
        pts, labels = sample_edt_points(mask, n_pos=64, n_neg=64, rng=0)
        rows = np.floor(pts[:, 1]).astype(int)
        cols = np.floor(pts[:, 0]).astype(int)
        assert mask[rows[:64], cols[:64]].all() and not mask[rows[64:], cols[64:]].any()
        d = edt(mask)
        # EDT weighting puts positives deeper inside roots than the average root pixel
        assert d[rows[:64], cols[:64]].mean() > d[mask].mean()


def test_predictor_on_a_real_frame(real_data):
    pairs = _pairs(real_data, "rhizotrak_sample", 1) or _pairs(real_data, "prmi_peanut", 1)
    if not pairs:
        pytest.skip("no real image pairs found")
    image_path, _ = pairs[0]
    rgb, bits = decode(image_path.read_bytes())
    assert bits == 8
    crop = rgb[:200, :301]  # a real corner, 2 tiles of the test model: CI time is shared
    res = RootSAMPredictor(TINY).predict([crop])[0]
    assert res.mask.shape == crop.shape[:2] and res.n_tiles == 2
    assert 0.0 <= res.confidence <= 1.0
