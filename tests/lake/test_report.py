"""``rootflow report``: index.html with non-blank figures, on a local lake and on S3."""

from __future__ import annotations

import datetime as dt
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from rootflow.cli import app
from rootflow.lake import Lake
from rootflow.lake.report import build_report, producer_pairs, rld_by_depth
from tests.lake._helpers import SESSIONS, TRAIT_SCHEMA, manifest, traits_rows

FIGURES = {"runs", "rld_by_depth", "producers", "season"}


def _populate(lake: Lake) -> None:
    """Two runs (one with rejects), three producers on the same images, and dynamics rows."""
    m = manifest()
    lake.start_run(run_id="run-a", job_kind="infer", manifest_uri="m", config={},
                   model_versions={"mask": "v1"}, code_version="c")
    lake.commit_traits(traits_rows(m, run_id="run-a"))
    lake.finish_run("run-a", n_ok=24, n_rejected=0, status="ok")
    lake.start_run(run_id="run-b", job_kind="infer", manifest_uri="m", config={},
                   model_versions={"rootquant": "rq1", "rootsam": "s1"}, code_version="c")
    rng = np.random.default_rng(0)
    rq = traits_rows(m, model_name="rootquant", version="rq1", run_id="run-b")
    for r in rq:
        r["rootquant_length_mm"] = r["length_mm"] * 0.9 + float(rng.normal(0, 2))
    lake.commit_traits(rq)
    sam = traits_rows(m, model_name="rootsam", version="s1", run_id="run-b")
    lake.commit_traits([dict(r, length_mm=r["length_mm"] * 1.1) for r in sam])
    lake.commit_rejects([{"image_id": "x1", "run_id": "run-b", "model_name": "rootsam",
                          "stage": "decode", "reason": "decode: truncated"}])
    lake.finish_run("run-b", n_ok=23, n_rejected=1, status="ok_with_rejects")
    dyn = []
    for tube in (1, 2):
        for w in (1, 2, 3, 4):
            for s_from, s_to in ((1, 2),):
                dyn.append({
                    "experiment": "EXP", "tube": tube, "window": w, "year": 2021,
                    "depth": 0 if w < 3 else 4, "depth_cm": (w - 1) * 2 + 1.0,
                    "session_from": s_from, "session_to": s_to,
                    "captured_from": SESSIONS[s_from], "captured_to": SESSIONS[s_to],
                    "days": 14.0, "model_name": "mask", "model_version": "v1", "status": "ok",
                    "produced_mm_per_day": 0.5 * w + tube, "lost_mm_per_day": 0.1 * w,
                    "run_id": "dyn-1", "processed_at": dt.datetime(2024, 1, 1)})
    lake.commit_rows("dynamics", dyn)


def _not_blank(path: Path) -> None:
    img = np.asarray(Image.open(path).convert("L"), dtype=float)
    assert img.shape[0] > 200 and img.shape[1] > 200
    assert img.std() > 10, f"{path.name} looks blank"
    assert (img < 128).mean() > 0.005, f"{path.name} has almost no ink"


@pytest.mark.slow
def test_report_local(tmp_path) -> None:
    """Guards a report that silently drops a figure or writes an empty one: every figure is
    written, non-blank, referenced by index.html (relative path, no external resources), and
    the numbers behind them are the lake's."""
    lake = Lake(str(tmp_path / "lake"), trait_schema=TRAIT_SCHEMA)
    _populate(lake)
    res = build_report(lake, tmp_path / "report")
    assert set(res["figures"]) == FIGURES and res["skipped"] == {}
    page = (tmp_path / "report" / "index.html").read_text()
    for name, path in res["figures"].items():
        assert path.parent == tmp_path / "report" and f'src="{name}.png"' in page
        _not_blank(path)
    assert not re.search(r'(src|href)="(https?:)?//', page)
    assert "run-b" in page and "rq1" in page
    pairs = producer_pairs(lake)
    assert set(pairs) == {("rootquant", "rq1"), ("rootsam", "s1")}
    sam = pairs[("rootsam", "s1")]
    assert np.allclose(sam["value_mm"], sam["reference_mm"] * 1.1) and len(sam) == 24
    rld = rld_by_depth(lake)
    assert set(rld["tube"]) == {1, 2} and (rld["n_images"] == 2).all()


def test_report_cli(tmp_path) -> None:
    """Guards the command: writes the page, and a path with no lake is one error line, exit 2."""
    lake = Lake(str(tmp_path / "lake"), trait_schema=TRAIT_SCHEMA)
    lake.commit_traits(traits_rows(manifest(tubes=(1,))))
    runner = CliRunner()
    res = runner.invoke(app, ["report", lake.uri, "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "index.html").exists() and (tmp_path / "r" / "rld_by_depth.png").exists()
    assert "skipped producers" in res.output and "skipped season" in res.output
    res = runner.invoke(app, ["report", str(tmp_path / "nothing"), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no lake at" in res.output and "Traceback" not in res.output


@pytest.mark.s3
@pytest.mark.slow
def test_report_on_s3(s3, tmp_path) -> None:
    """Guards the report reading only local lakes: the same figures from an s3:// lake."""
    lake = Lake(s3.fresh_prefix("report"), storage_options=s3.storage, trait_schema=TRAIT_SCHEMA)
    _populate(lake)
    res = build_report(lake, tmp_path / "report")
    assert set(res["figures"]) == FIGURES
    for path in res["figures"].values():
        _not_blank(path)
