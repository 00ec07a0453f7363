"""Production / mortality bookkeeping on synthetic growth with known truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rootflow.dynamics.align import Alignment
from rootflow.dynamics.dynamics import cumulate, mask_iou, pair_dynamics
from tests.dynamics._synth import lines

DPI = 254.0  # 10 px per mm
SHAPE = (400, 500)


def _len_mm(x0: int, y0: int, x1: int, y1: int) -> float:
    return math.hypot(x1 - x0, y1 - y0) / 10.0


def _season() -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """Earlier: an old root and a root that dies. Later: the old root extended by 120 px, the
    dying root gone, a new root. Later frame content shifted by (+30, -20) px."""
    old = (60, 60, 260, 160)
    ext = (260, 160, 356, 232)  # 120 px extension along a new direction
    dying = (80, 300, 280, 330)
    new = (380, 60, 420, 300)
    earlier = lines(SHAPE, [old, dying])
    later0 = lines(SHAPE, [old, ext, new])
    later = np.roll(later0, (-20, 30), axis=(0, 1))
    truth = {"produced": _len_mm(*ext) + _len_mm(*new), "lost": _len_mm(*dying)}
    return earlier, later, truth


def test_bookkeeping_on_known_growth() -> None:
    """Guards against produced/lost lengths that do not add up: with the true alignment,
    produced and lost match the drawn truth within 5 %, and the change in present length
    equals produced - lost within 2 % of the present length."""
    earlier, later, truth = _season()
    al = Alignment(-30.0, 20.0, 0.0, 1.0, 1.0, "test")
    d = pair_dynamics(earlier, later, al, dpi=DPI, days=14.0)
    assert d["produced_mm"] == pytest.approx(truth["produced"], rel=0.05)
    assert d["lost_mm"] == pytest.approx(truth["lost"], rel=0.05)
    change = d["length_to_mm"] - d["length_from_mm"]
    assert abs(change - (d["produced_mm"] - d["lost_mm"])) <= 0.02 * d["length_to_mm"]
    assert d["bookkeeping_residual_mm"] == pytest.approx(change - (d["produced_mm"] - d["lost_mm"]))
    # persisting + produced is the later length exactly (one skeleton, steps split by class)
    assert d["persisting_mm"] + d["produced_mm"] == pytest.approx(d["length_to_mm"], rel=1e-9)
    assert d["produced_mm_per_day"] == pytest.approx(d["produced_mm"] / 14.0)
    assert d["rld_to_mm_per_cm2"] == pytest.approx(d["length_to_mm"] / d["overlap_area_cm2"])
    assert d["k_px"] == 5 and d["k_mm"] == pytest.approx(0.5)


def test_without_alignment_everything_is_turnover() -> None:
    """Guards against measuring dynamics on unaligned frames unnoticed: without the alignment
    the persisting root counts as both lost and produced, inflating both several-fold."""
    earlier, later, truth = _season()
    d = pair_dynamics(earlier, later, None, dpi=DPI, days=14.0)
    assert d["produced_mm"] > 1.5 * truth["produced"]
    assert d["lost_mm"] > 2 * truth["lost"]


def test_overlap_only() -> None:
    """Guards against counting roots outside the shared frame: a root in the part of the later
    frame that the earlier frame never saw is not 'produced'."""
    earlier = lines(SHAPE, [(100, 100, 300, 100)])
    later0 = lines(SHAPE, [(100, 100, 300, 100)])
    later = np.roll(later0, -150, axis=1)
    later[:, -140:] = False
    later |= lines(SHAPE, [(420, 200, 490, 300)])  # only in the later frame's new strip
    al = Alignment(150.0, 0.0, 0.0, 1.0, 1.0, "test")
    d = pair_dynamics(earlier, later, al, dpi=DPI, days=7.0)
    assert d["produced_mm"] < 1.0
    assert d["overlap_fraction"] == pytest.approx(350 / 500, abs=0.01)


def test_iou_and_cumulate() -> None:
    """Guards against the season sums running out of date order or counting flagged pairs."""
    earlier, later, _ = _season()
    assert mask_iou(earlier, later, Alignment(-30.0, 20.0, 0.0, 1, 1, "t")) > 0.25
    assert mask_iou(earlier, later, None) < 0.1
    rows = [{"captured_to": 3, "produced_mm": 2.0, "lost_mm": 1.0},
            {"captured_to": 1, "produced_mm": 5.0, "lost_mm": 0.0},
            {"captured_to": 2, "produced_mm": None, "lost_mm": None}]
    out = cumulate(rows)
    assert [r["cum_produced_mm"] for r in out] == [5.0, 5.0, 7.0]
    assert [r["cum_lost_mm"] for r in out] == [0.0, 0.0, 1.0]
