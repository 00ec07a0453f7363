"""Against the synthetic archive's exact ground truth: a few hundred roots, one at a time."""

from __future__ import annotations

import numpy as np
import pytest

from rootflow.synth import SynthConfig, generate_image, rasterize
from rootflow.traits import measure


def _tip_to_tip_truth_mm(root, box, px_per_mm: float) -> float:
    """Synth's truth is the drawn centre line; its tube has a round cap (a disc) at each end,
    and ``length_mm`` counts tip to tip, so free ends inside the frame add their radius."""
    x0, y0, x1, y1 = box
    caps_px = 0.0
    for (x, y), d in ((root.points_px[0], root.diameter_px[0]),
                      (root.points_px[-1], root.diameter_px[-1])):
        if x0 + d / 2 <= x <= x1 - d / 2 and y0 + d / 2 <= y <= y1 - d / 2:
            caps_px += d / 2
    return root.length_mm + caps_px / px_per_mm


@pytest.mark.slow  # ~13 s on 2 shared cores: renders 12 frames and measures ~300 roots
def test_per_root_length_error_distribution() -> None:
    cfg = SynthConfig.preset("small", empty_fraction=0.0)
    errors = []
    for seed in range(12):
        img = generate_image(seed, cfg)
        for root in img.roots:
            m = rasterize(root.points_px, root.diameter_px, shape=img.mask.shape,
                          box=img.soil_box_px)
            if not m.any():
                continue
            row = measure(m, dpi=img.dpi, min_component_px=0)
            truth = _tip_to_tip_truth_mm(root, img.soil_box_px, img.dpi / 25.4)
            errors.append(row["length_mm"] / truth - 1)
    err = np.array(errors)
    assert err.size >= 200
    assert abs(np.median(err)) < 0.03
    assert np.median(np.abs(err)) < 0.03
    assert np.percentile(np.abs(err), 90) < 0.08


def test_whole_frames_against_ground_truth() -> None:
    """Crossing and overlapping roots share pixels, so frames are looser than single roots."""
    cfg = SynthConfig.preset("small", empty_fraction=0.0)
    for seed in range(3):
        img = generate_image(seed, cfg)
        row = measure(img.mask, dpi=img.dpi, min_component_px=0)
        assert row["network_area_mm2"] == pytest.approx(img.projected_area_mm2, rel=1e-9)
        assert abs(row["length_mm"] / img.length_mm - 1) < 0.06
        assert abs(row["avg_diameter_mm"] / img.mean_diameter_mm - 1) < 0.15
