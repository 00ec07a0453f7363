"""Correction studio benchmark: seconds per click, time to first mask, NoC@85/90.

Run (bounded; ~10-15 min on 2 busy cores)::

    nice -n 5 .venv/bin/python benchmarks/studio_bench.py --real ../shared/data/real \
        --variants test,hiera_tiny --out bench-output/studio_bench.json

What it measures, with the studio's own engines (:mod:`rootflow.studio.engines`):

* **RootSAM seconds per click** on a real 2550 x 2273 SegRoot scan: the first click on a
  tile (encoder + decoder: what a click costs *without* background encoding), then clicks on
  already-encoded tiles (decoder only, the steady state); and the full HTTP round trip of the
  web app (click + the new mask PNG) for the ``test`` variant.
* **Time to first mask**: opening a scan (read + decode the JPEG and the proposal) until the
  first click's mask is back, with the tiles encoded in the background beforehand (the
  studio's prefetch) and without.
* **Forest seconds per click**: scribble retraining + re-prediction of the 512 px window.
* **NoC@85 / NoC@90**: clicks of the simulated clicker (:func:`simulated_click`, SAM2's
  "center" clicker: the error pixel farthest from its error region's border) until the
  root-class IoU reaches 85 / 90 %, counted as
  ``max_clicks`` (20) when never reached, mean over images; for RootSAM refine (from an empty
  mask) and for the forest with scribble retraining (whole-image prediction after each click;
  the forest starts with one root and one background click, both counted).

No SAM2.1 weights exist on this machine: RootSAM is **random-init** here, so its NoC numbers
measure the machinery, not the model. Pass ``--base-checkpoint`` (and ``--rootsam-checkpoint``)
to measure a real model with the same command.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _load(img: Path) -> tuple[np.ndarray, np.ndarray]:
    from rootflow.io.images import decode, decode_mask, to_rgb8

    rgb, _ = to_rgb8(decode(img.read_bytes())[0])
    mask = decode_mask(img.with_name(img.stem + "_mask.png").read_bytes())
    return rgb, mask


def _pairs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".png")
                  and not p.stem.endswith("_mask") and p.with_name(p.stem + "_mask.png").exists())


def rootsam_clicks(variant: str, scan: Path, *, base: str | None, rootsam: str | None,
                   n_clicks: int, whole_scan_variants: tuple[str, ...] = ("test",)) -> dict:
    from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor
    from rootflow.studio.engines import Click, RootSAMEngine, simulated_click

    t0 = time.perf_counter()
    rgb, truth = _load(scan)
    t_read = time.perf_counter() - t0
    pred = RootSAMPredictor(RootSAMInferenceConfig(
        variant=variant, base_checkpoint=base, rootsam_checkpoint=rootsam, device="cpu",
        embedding_cache_tiles=512))
    eng = RootSAMEngine(pred)
    g = eng.grid(*truth.shape)
    mask = np.zeros(truth.shape, bool)
    clicks: list[Click] = []
    first: float | None = None
    first_cpu = float("nan")
    steady: list[float] = []
    steady_cpu: list[float] = []
    # the clicker's clicks, each in the same tile as the first (decoder-only after it)
    for i in range(n_clicks):
        c = simulated_click(mask, truth)
        if c is None:
            break
        if i and set(g.tiles_containing(c.x + .5, c.y + .5)) != \
                set(g.tiles_containing(clicks[0].x + .5, clicks[0].y + .5)):
            c = Click(clicks[0].x + 3 * i, clicks[0].y + 2 * i, c.label)
        clicks.append(c)
        cpu0 = time.process_time()
        res = eng.click("scan", rgb, mask, clicks, c)
        cpu = time.process_time() - cpu0
        mask = res.mask
        if first is None:
            first, first_cpu = res.seconds, cpu
            tiles_first = len(res.tiles)
        else:
            steady.append(res.seconds)
            steady_cpu.append(cpu)
    # time to first mask with the image's tiles encoded in the background beforehand
    eng2 = RootSAMEngine(pred)
    c0 = simulated_click(np.zeros_like(truth), truth)
    touched = g.tiles_containing(c0.x + .5, c0.y + .5)
    whole = variant in whole_scan_variants
    t0, cpu0 = time.perf_counter(), time.process_time()
    n_tiles = eng2.prefetch("scan2", rgb, tiles=None if whole else touched)
    t_prefetch = time.perf_counter() - t0
    cpu_prefetch = time.process_time() - cpu0
    res = eng2.click("scan2", rgb, np.zeros_like(truth), [c0], c0)
    per_tile = t_prefetch / max(1, n_tiles)
    return {"variant": variant, "weights": base or "random-init",
            "scan": scan.name, "size": list(truth.shape[::-1]), "tiles_per_scan": len(g),
            "tile_px": g.tile, "read_decode_s": round(t_read, 3),
            "first_click_s_no_prefetch": round(first or float("nan"), 3),
            "first_click_cpu_s_no_prefetch": round(first_cpu, 3),
            "median_click_cpu_s_cached": round(statistics.median(steady_cpu), 3)
            if steady_cpu else None,
            "tiles_rerun_first_click": tiles_first,
            "median_click_s_cached": round(statistics.median(steady), 3) if steady else None,
            "clicks_cached": len(steady),
            "background_encode_s_per_tile": round(per_tile, 3), "tiles_encoded": n_tiles,
            "background_encode_cpu_s_per_tile": round(cpu_prefetch / max(1, n_tiles), 3),
            "background_encode_whole_scan_s": round(t_prefetch, 2) if whole else None,
            "background_encode_whole_scan_s_estimated": round(per_tile * len(g), 1),
            "time_to_first_mask_s_prefetched": round(t_read + res.seconds, 3),
            "time_to_first_mask_s_no_prefetch": round(t_read + (first or 0), 3)}


def http_round_trip(scan: Path, n: int = 5) -> dict:
    """The web app's click + mask PNG download on a full scan (test variant)."""
    import tempfile

    import pyarrow as pa
    from fastapi.testclient import TestClient

    from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor
    from rootflow.io.manifest import (
        ExperimentConfig,
        ExperimentSettings,
        validate_manifest,
        write_manifest,
    )
    from rootflow.studio.app import create_app
    from rootflow.studio.session import StudioConfig, build_studio

    tmp = Path(tempfile.mkdtemp(prefix="studio-bench-"))
    cfg = ExperimentConfig(date_order="DMY", depth_band_cm=10.0, experiments={"*": ExperimentSettings(
        dpi=100.0, frame_height_mm=20.0, insertion_angle_deg=45.0, surface_window=1,
        surface_offset_cm=0.0, species="soybean")})
    table = validate_manifest(pa.table({"image_uri": [str(scan)], "mask_uri": [
        str(scan.with_name(scan.stem + "_mask.png"))]}), experiment_config=cfg)
    man = write_manifest(table, str(tmp / "m.parquet"))
    pred = RootSAMPredictor(RootSAMInferenceConfig(variant="test", device="cpu",
                                                   embedding_cache_tiles=512))
    st = build_studio(StudioConfig(lake_uri=str(tmp / "lake"), manifest_uri=man,
                                   prefetch_ahead=0), rootsam=pred)
    cl = TestClient(create_app(st), base_url="http://127.0.0.1")
    iid = table["image_id"][0].as_py()
    t0 = time.perf_counter()
    info = cl.get(f"/api/images/{iid}").json()
    cl.get(f"/api/images/{iid}/image")
    cl.get(f"/api/images/{iid}/mask")
    t_open = time.perf_counter() - t0
    eng = st.engines["rootsam"]
    g = eng.grid(info["height"], info["width"])
    eng.prefetch(iid, st.sessions[iid].rgb, tiles=sorted({
        k for i in range(n) for k in g.tiles_containing(1200.5 + 7 * i, 1100.5 + 5 * i)}))
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        r = cl.post(f"/api/images/{iid}/click", json={"x": 1200 + 7 * i, "y": 1100 + 5 * i,
                                                       "label": 1})
        assert r.status_code == 200, r.text
        cl.get(f"/api/images/{iid}/mask")
        times.append(time.perf_counter() - t0)
    t0 = time.perf_counter()
    r = cl.post(f"/api/images/{iid}/accept", json={"person": "bench"})
    t_accept = time.perf_counter() - t0
    st.close()
    return {"size": [info["width"], info["height"]],
            "open_image_and_mask_s": round(t_open, 3),
            "median_click_round_trip_s": round(statistics.median(times), 3),
            "accept_s": round(t_accept, 3), "accept_status": r.status_code}


def forest_clicks(scan: Path, n_clicks: int) -> dict:
    from rootflow.studio.engines import ForestEngine, first_forest_clicks, simulated_click

    rgb, truth = _load(scan)
    eng = ForestEngine(None, window=512)
    mask = np.zeros(truth.shape, bool)
    clicks, secs, cpus = [], [], []
    for i in range(n_clicks):
        c = first_forest_clicks(truth)[i] if i < 2 else simulated_click(mask, truth)
        if c is None:
            break
        clicks.append(c)
        cpu0 = time.process_time()
        res = eng.click("scan", rgb, mask, clicks, c)
        cpus.append(time.process_time() - cpu0)
        mask = res.mask
        secs.append(res.seconds)
    t0 = time.perf_counter()
    eng.propose(rgb)
    t_whole = time.perf_counter() - t0
    return {"scan": scan.name, "clicks": len(secs),
            "median_click_s": round(statistics.median(secs[2:]), 3),
            "median_click_cpu_s": round(statistics.median(cpus[2:]), 3),
            "max_click_s": round(max(secs), 3),
            "retrain_s_median": round(statistics.median(eng.retrain_seconds), 3),
            "whole_scan_predict_s": round(t_whole, 2),
            "note": "window re-predicted after each click: 512 px"}


def noc(engine_kind: str, images: list[Path], *, max_clicks: int, variant: str = "test",
        base: str | None = None, deadline: float) -> dict:
    from rootflow.studio.engines import (
        ForestEngine,
        RootSAMEngine,
        first_forest_clicks,
        iou,
        simulated_click,
    )

    per = []
    for img in images:
        if time.monotonic() > deadline:
            break
        rgb, truth = _load(img)
        if engine_kind == "rootsam":
            from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor

            eng = RootSAMEngine(RootSAMPredictor(RootSAMInferenceConfig(
                variant=variant, base_checkpoint=base, device="cpu", embedding_cache_tiles=512)))
        else:
            eng = ForestEngine(None, window=None, max_seconds=10.0)
        mask = np.zeros(truth.shape, bool)
        clicks, curve = [], []
        n85 = n90 = None
        for i in range(max_clicks):
            if engine_kind == "forest" and i < 2:
                c = first_forest_clicks(truth)[i]
            else:
                c = simulated_click(mask, truth)
            if c is None:
                break
            clicks.append(c)
            mask = eng.click(img.stem, rgb, mask, clicks, c).mask
            v = iou(mask, truth)
            curve.append(round(v, 4))
            if n85 is None and v >= 0.85:
                n85 = i + 1
            if n90 is None and v >= 0.90:
                n90 = i + 1
                break
        per.append({"image": img.name, "noc85": n85 or max_clicks, "noc90": n90 or max_clicks,
                    "iou_curve": curve})
    return {"engine": engine_kind, "images": len(per), "max_clicks": max_clicks,
            "noc85": round(statistics.fmean(p["noc85"] for p in per), 2) if per else None,
            "noc90": round(statistics.fmean(p["noc90"] for p in per), 2) if per else None,
            "final_iou_mean": round(statistics.fmean(p["iou_curve"][-1] for p in per), 4)
            if per else None, "per_image": per}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--real", default=os.environ.get("ROOTFLOW_REAL_DATA",
                                                     "../shared/data/real"))
    ap.add_argument("--variants", default="test,hiera_tiny")
    ap.add_argument("--base-checkpoint", default=None)
    ap.add_argument("--rootsam-checkpoint", default=None)
    ap.add_argument("--clicks", type=int, default=6)
    ap.add_argument("--noc-images", type=int, default=3)
    ap.add_argument("--max-clicks", type=int, default=20)
    ap.add_argument("--max-minutes", type=float, default=12.0)
    ap.add_argument("--out", default="bench-output/studio_bench.json")
    ap.add_argument("--whole-scan-prefetch", default="",
                    help="variants whose background encoding of a whole scan is timed (else "
                         "the click's tiles only, and the whole scan is estimated per tile)")
    ap.add_argument("--only", default="rootsam,http,forest,noc",
                    help="parts to run (comma-separated)")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch intra-op threads (1 = the studio's default, --torch-threads)")
    a = ap.parse_args()
    real = Path(a.real)
    deadline = time.monotonic() + a.max_minutes * 60
    scan = _pairs(real / "segroot_soybean")[0]
    out: dict = {"cpu_count": os.cpu_count(), "torch_threads": None,
                 "note": "RootSAM weights are random-init unless --base-checkpoint is given: "
                         "its NoC numbers measure the machinery, not the model"}
    import torch

    torch.set_num_threads(a.torch_threads)
    out["torch_threads"] = torch.get_num_threads()
    parts = set(a.only.split(","))
    if "rootsam" in parts:
        out["rootsam"] = [rootsam_clicks(v, scan, base=a.base_checkpoint,
                                         rootsam=a.rootsam_checkpoint, n_clicks=a.clicks,
                                         whole_scan_variants=tuple(
                                             a.whole_scan_prefetch.split(",")))
                          for v in a.variants.split(",") if v]
        print(json.dumps(out["rootsam"], indent=1), file=sys.stderr)
    if "http" in parts:
        out["http_test_variant"] = http_round_trip(scan)
        print(json.dumps(out["http_test_variant"]), file=sys.stderr)
    if "forest" in parts:
        out["forest_clicks"] = forest_clicks(scan, n_clicks=a.clicks + 2)
        print(json.dumps(out["forest_clicks"]), file=sys.stderr)
    if "noc" in parts:
        small = (_pairs(real / "prmi_switchgrass")[:a.noc_images]
                 + _pairs(real / "prmi_peanut")[:a.noc_images])
        out["noc_forest"] = noc("forest", small, max_clicks=a.max_clicks, deadline=deadline)
        print(json.dumps({k: v for k, v in out["noc_forest"].items() if k != "per_image"}),
              file=sys.stderr)
        out["noc_rootsam_test"] = noc("rootsam", small, max_clicks=a.max_clicks,
                                      variant="test", base=a.base_checkpoint,
                                      deadline=deadline + 300)
        print(json.dumps({k: v for k, v in out["noc_rootsam_test"].items()
                          if k != "per_image"}), file=sys.stderr)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
