"""The dynamics job on a tiny synthetic lake: tables, idempotency, incremental runs, bad input."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from rootflow.dynamics.job import DynamicsConfig, run
from rootflow.lake import Lake
from tests.dynamics._synth import crop, lines, texture

pytestmark = pytest.mark.ray

DAY0 = dt.datetime(2024, 5, 1, 10, 0)
ROOT = [(20, 30, 150, 120)]
GROWTH = [(20, 30, 150, 120), (150, 120, 230, 200)]


def _row(tmp: Path, *, window: int, session: int, day: int, img: np.ndarray,
         mask: np.ndarray | None) -> dict[str, Any]:
    stem = f"EXP_T001_L{window:03d}_s{session}"
    ip = tmp / f"{stem}.png"
    cv2.imwrite(str(ip), img)
    mp = None
    if mask is not None:
        mp = tmp / f"{stem}_mask.png"
        cv2.imwrite(str(mp), mask.astype(np.uint8) * 255)
    return {"image_id": stem, "image_uri": str(ip), "file_name": ip.name, "experiment": "EXP",
            "tube": 1, "window": window, "session": session,
            "captured_at": DAY0 + dt.timedelta(days=day), "year": 2024, "dpi": 254.0,
            "depth_cm": 10.0 * window, "depth": 10 * window, "mask_uri": str(mp) if mp else None,
            "model_name": "mask", "model_version": "traits-test", "run_id": "seed",
            "length_mm": 1.0}


def _window(tmp: Path, window: int, offsets: list[tuple[int, int]], days: list[int],
            sessions: list[int] | None = None, drop_mask: int | None = None,
            sizes: list[tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    big = texture(seed=window)
    rows = []
    for i, ((x0, y0), day) in enumerate(zip(offsets, days, strict=True)):
        h, w = sizes[i] if sizes else (240, 320)
        img = crop(big, x0, y0, h, w)
        # roots drawn in texture coordinates, then cut out with the same crop as the image
        segs = ROOT if i == 0 else GROWTH
        full = lines(big.shape[:2], [(a + 300, b + 200, c + 300, d + 200) for a, b, c, d in segs])
        m = crop(full, x0, y0, h, w)
        img = img.copy()
        img[m] = 230
        rows.append(_row(tmp, window=window, session=(sessions or list(range(1, 99)))[i],
                         day=day, img=img, mask=None if i == drop_mask else m))
    return rows


@pytest.fixture()
def lake(tmp_path: Path) -> tuple[Lake, Path]:
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    rows += _window(data, 1, [(300, 200), (330, 180), (310, 215)], [0, 14, 28])   # good
    rows += _window(data, 2, [(300, 200)], [0])                                    # one session
    rows += _window(data, 3, [(300, 200), (320, 190)], [0, 14], drop_mask=1)      # no mask
    rows += _window(data, 4, [(300, 200), (320, 190)], [0, 14],
                    sizes=[(240, 320), (200, 300)])                                # sizes differ
    rows += _window(data, 5, [(300, 200), (325, 205)], [0, 14], sessions=[7, 6])   # order
    lk = Lake(str(tmp_path / "lake"))
    lk.commit_traits(rows)
    return lk, data


def test_job_end_to_end(ray_local: Any, lake: tuple[Lake, Path]) -> None:
    """Guards against: bad windows stopping the run or vanishing silently; duplicates on
    re-run; recomputing the season for one new session; producer/version/quality missing from
    rows; cumulative sums that ignore earlier pairs."""
    lk, data = lake
    s = run(lk.uri, DynamicsConfig(), progress=False)
    assert s.status == "ok_with_rejects"
    d = {(r["window"], r["session_from"], r["session_to"]): r
         for r in lk.read("dynamics").to_pylist()}
    assert set(d) == {(1, 1, 2), (1, 2, 3), (3, 1, 2), (4, 1, 2), (5, 7, 6)}
    good = d[(1, 1, 2)]
    assert good["status"] == "ok", good["reason"]
    assert good["align_dx"] == pytest.approx(30, abs=0.5)
    assert good["align_dy"] == pytest.approx(-20, abs=0.5)
    assert good["model_name"] == "mask" and good["model_version"] == "traits-test"
    assert good["align_quality"] > 0.5 and good["depth"] == 10 and good["year"] == 2024
    assert good["produced_mm"] == pytest.approx(np.hypot(80, 80) / 10, rel=0.15)
    assert good["lost_mm"] < 1.0
    assert good["days"] == pytest.approx(14.0)
    assert d[(1, 2, 3)]["cum_produced_mm"] == pytest.approx(
        good["produced_mm"] + d[(1, 2, 3)]["produced_mm"])
    assert d[(3, 1, 2)]["status"] == "error" and "no mask mask for session 2" in d[(3, 1, 2)]["reason"]
    assert d[(4, 1, 2)]["status"] == "error" and "different sizes" in d[(4, 1, 2)]["reason"]
    assert d[(5, 7, 6)]["status"] == "ok" and "out of date order" in d[(5, 7, 6)]["reason"]
    rejects = lk.read("rejects").to_pylist()
    assert [(r["window"], r["stage"]) for r in rejects] == [(2, "dynamics")]
    assert "one session" in rejects[0]["reason"]
    assert lk.read("alignments").num_rows == 5

    # idempotent: a second run computes nothing and adds no rows
    s2 = run(lk.uri, DynamicsConfig(), progress=False)
    assert s2.n_pairs == 0 and s2.n_skipped == 5
    assert lk.read("dynamics").num_rows == 5
    # forced: recomputed, MERGEd onto the same keys
    run(lk.uri, DynamicsConfig(force=True, producers=("mask",)), progress=False)
    assert lk.read("dynamics").num_rows == 5

    # a new session: one new pair, the season is not recomputed, cumulative continues
    new = _window(data, 1, [(300, 200), (330, 180), (310, 215), (305, 205)], [0, 14, 28, 42])[3:]
    new[0]["session"] = 4
    lk.commit_traits(new)
    s3 = run(lk.uri, DynamicsConfig(since="2024-06-01"), progress=False)
    assert s3.n_pairs == 1
    rows = {(r["window"], r["session_to"]): r for r in lk.read("dynamics").to_pylist()}
    assert len(rows) == 6
    assert rows[(1, 4)]["cum_produced_mm"] == pytest.approx(
        rows[(1, 3)]["cum_produced_mm"] + rows[(1, 4)]["produced_mm"])


def test_commit_rows_idempotent(tmp_path: Path) -> None:
    """Guards against duplicate dynamics rows when the same pair is committed twice, and
    against unknown table names being created silently."""
    from rootflow.lake.tables import LakeError

    lk = Lake(str(tmp_path / "lake"))
    row = {"experiment": "E", "tube": 1, "window": 2, "year": 2024, "depth": 10,
           "session_from": 1, "session_to": 2, "captured_from": DAY0,
           "captured_to": DAY0 + dt.timedelta(days=7), "model_name": "mask",
           "model_version": "v", "status": "ok", "run_id": "r", "produced_mm": 1.0}
    lk.commit_rows("dynamics", [row])
    lk.commit_rows("dynamics", [{**row, "produced_mm": 2.0}])
    t = lk.read("dynamics").to_pylist()
    assert len(t) == 1 and t[0]["produced_mm"] == 2.0
    with pytest.raises(LakeError, match="unknown table"):
        lk.commit_rows("nope", [row])
