"""The studio through its HTTP API (FastAPI's TestClient, the real app, engines and lake)."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor
from rootflow.io.images import decode_mask
from rootflow.lake import Lake
from rootflow.studio.app import MAX_BODY, create_app
from rootflow.studio.engines import first_forest_clicks, iou, simulated_click
from rootflow.studio.session import StudioConfig, build_studio
from tests.studio._helpers import make_setup

BASE = "http://127.0.0.1"


def _predictor() -> RootSAMPredictor:
    return RootSAMPredictor(RootSAMInferenceConfig(variant="test", device="cpu",
                                                   embedding_cache_tiles=256, seed=0))


class EncodeCounter:
    """Counts calls to the model's image encoder (and calls through to it)."""

    def __init__(self, predictor: RootSAMPredictor) -> None:
        self.n = 0
        self._encode = predictor.model.encode

        def encode(*a, **k):
            self.n += 1
            return self._encode(*a, **k)

        predictor.model.encode = encode


def _client(tmp_path: Path, *, rootsam: bool = False, token: str | None = None, **kw):
    s = make_setup(tmp_path, **kw)
    st = build_studio(StudioConfig(lake_uri=s.lake_uri, manifest_uri=s.manifest_uri,
                                   person="tester", prefetch_ahead=1),
                      rootsam=_predictor() if rootsam else None)
    return s, st, TestClient(create_app(st, token=token), base_url=BASE)


def test_queue_orders_disputed_and_least_confident_first_and_filters(tmp_path):
    """Guards: the default order ignoring producer disagreement/confidence (the person would
    start on images the models already agree on), and filters that do not filter."""
    s = make_setup(tmp_path, n=3)
    lake = Lake(s.lake_uri)
    from rootflow.io.manifest import read_manifest

    man = {r["image_id"]: r for r in read_manifest(s.manifest_uri).to_pylist()}
    a, b, c = s.image_ids
    rows = []
    # a: producers agree, confident. b: producers disagree 2x. c: one unconfident producer.
    for iid, prod, length, conf in ((a, "rootsam", 100.0, 0.95), (a, "forest", 98.0, 0.9),
                                    (b, "rootsam", 100.0, 0.9), (b, "forest", 50.0, 0.9),
                                    (c, "rootsam", 80.0, 0.2)):
        rows.append({**man[iid], "model_name": prod, "model_version": f"{prod}-v1",
                     "length_mm": length, "confidence": conf, "run_id": "r1",
                     "mask_uri": man[iid]["mask_uri"], "processed_at": dt.datetime(2024, 1, 1)})
    lake.commit_traits(rows)
    st = build_studio(StudioConfig(lake_uri=s.lake_uri, manifest_uri=s.manifest_uri))
    cl = TestClient(create_app(st), base_url=BASE)
    order = [e["image_id"] for e in cl.get("/api/queue").json()["images"]]
    assert order == [c, b, a]  # priority 0.8 (1 - 0.2), 0.5 (disagreement), 0.1
    by_name = [e["image_id"] for e in cl.get("/api/queue?order=name").json()["images"]]
    assert by_name == sorted(s.image_ids)
    assert [e["image_id"] for e in cl.get("/api/queue?producer=forest").json()["images"]] == [b, a]
    depth_of = {iid: man[iid]["depth"] for iid in s.image_ids}
    d = depth_of[c]
    got = {e["image_id"] for e in cl.get(f"/api/queue?depth={d}").json()["images"]}
    assert got == {i for i in s.image_ids if depth_of[i] == d} and got != set(s.image_ids)
    assert cl.get("/api/queue?tube=2").json()["n"] == 0
    assert cl.get("/api/queue?date_from=2021-06-02").json()["n"] == 0
    assert cl.get("/api/queue?date_to=2021-06-01").json()["n"] == 3
    assert cl.get("/api/queue?tube=x").status_code == 400
    # every producer's mask can be shown
    keys = {p["key"] for p in cl.get(f"/api/images/{a}").json()["proposals"]}
    assert keys == {"mask@given", "rootsam@rootsam-v1", "forest@forest-v1"}
    assert cl.get(f"/api/images/{a}?proposal=forest@forest-v1").json()["proposal"]["producer"] \
        == "forest"


def test_rootsam_click_redecodes_only_touched_tile_from_cache(tmp_path):
    """Guards: a click re-running the whole image (changes outside the touched tiles), a
    refined tile overwriting its neighbour's half of their overlap (a seam at the tile's own
    edge, where it decodes with the least context), and the encoder running again for a second
    click on the same tile (cached embedding unused)."""
    s, st, cl = _client(tmp_path, rootsam=True, n=1, h=240, w=700)
    st.cfg.prefetch_ahead = 0
    counter = EncodeCounter(st.engines["rootsam"].predictor)
    iid = s.image_ids[0]
    cl.get(f"/api/images/{iid}")
    before = st.sessions[iid].current.copy()
    r = cl.post(f"/api/images/{iid}/click", json={"x": 20, "y": 100, "label": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    after = st.sessions[iid].current
    y0, x0, y1, x1 = body["region"]
    outside = np.ones_like(before)
    outside[y0:y1, x0:x1] = False
    assert x1 < 700 and outside.any()
    assert np.array_equal(before[outside], after[outside])
    g = st.engines["rootsam"].grid(240, 700)
    assert body["tiles"] == [0] and g.xs[1] < g.tile  # tiles 0 and 1 overlap
    mid = (g.xs[1] + g.tile) / 2  # the middle of the band tiles 0 and 1 share
    assert x1 <= mid + 1  # tile 0 wrote nothing of tile 1's half of the band
    n1 = counter.n
    assert n1 >= 1
    r = cl.post(f"/api/images/{iid}/click", json={"x": 30, "y": 120, "label": 0})
    assert r.status_code == 200 and r.json()["tiles"] == body["tiles"]
    assert counter.n == n1  # same tile: decoder only


def test_next_images_are_encoded_in_the_background(tmp_path):
    """Guards: no background encoding, so the first click on the next image waits for the
    encoder (minutes per scan on CPU with real variants)."""
    s, st, cl = _client(tmp_path, rootsam=True, n=2)
    counter = EncodeCounter(st.engines["rootsam"].predictor)
    first = cl.get("/api/queue").json()["images"]
    a, b = first[0]["image_id"], first[1]["image_id"]
    cl.get(f"/api/images/{a}")
    deadline = time.monotonic() + 60
    while b not in st.prefetched and time.monotonic() < deadline:
        time.sleep(0.1)
    assert b in st.prefetched
    cl.get(f"/api/images/{b}")
    time.sleep(0.2)
    n = counter.n
    r = cl.post(f"/api/images/{b}/click", json={"x": 200, "y": 200, "label": 1})
    assert r.status_code == 200
    assert counter.n == n  # every tile of b was already encoded
    st.close()


def test_forest_retrains_on_corrections_and_the_next_image_starts_better(tmp_path):
    """Guards: forest clicks that do not retrain, or a retrained forest that does not carry
    over to the next image (RootPainter's corrective loop)."""
    s, st, cl = _client(tmp_path, n=2, given_masks=False)
    a, b = s.image_ids
    cl.get(f"/api/images/{a}")
    truth = s.truth[a]
    notes = []
    for i in range(6):  # the NoC clicker, on the forest engine
        c = first_forest_clicks(truth)[i] if i < 2 else simulated_click(st.sessions[a].current,
                                                                        truth)
        r = cl.post(f"/api/images/{a}/click", json={"x": c.x, "y": c.y, "label": c.label,
                                                     "engine": "forest"})
        assert r.status_code == 200, r.text
        notes.append(r.json()["note"])
    assert "" in notes  # it trained at least once
    forest = st.engines["forest"]
    assert forest.n_retrains >= 1
    assert iou(st.sessions[a].current, truth) > 0.5
    info = cl.get(f"/api/images/{b}?proposal=forest-studio").json()
    assert info["proposal"]["producer"] == "forest"
    start_b = st.sessions[b].current
    assert iou(start_b, s.truth[b]) > 0.5  # empty start was IoU 0


def test_undo_rolls_back_the_forest_a_click_retrained(tmp_path):
    """Guards: undo that restores the mask and scribbles but leaves the forest retrained on the
    undone click, so the next image (and the next click) still learn from a correction the
    person took back; and redo that does not bring that forest back."""
    s, st, cl = _client(tmp_path, n=2, given_masks=False)
    a, b = s.image_ids
    cl.get(f"/api/images/{a}")
    forest = st.engines["forest"]
    truth = s.truth[a]
    for c in first_forest_clicks(truth):
        cl.post(f"/api/images/{a}/click", json={"x": c.x, "y": c.y, "label": c.label,
                                                 "engine": "forest"})
    m1, n1 = forest.model, forest.n_retrains
    assert m1 is not None
    c = simulated_click(st.sessions[a].current, truth)
    cl.post(f"/api/images/{a}/click", json={"x": c.x, "y": c.y, "label": c.label,
                                             "engine": "forest"})
    m2 = forest.model
    assert m2 is not m1 and forest.n_retrains == n1 + 1
    assert cl.post(f"/api/images/{a}/undo").json()["changed"] is True
    assert forest.model is m1  # exactly the forest before the undone click
    assert forest.n_retrains == n1 + 1  # restored, not retrained
    assert forest._scribbles[a].labels[c.y, c.x] == -1  # the undone click's scribble is gone
    cl.post(f"/api/images/{a}/redo")
    assert forest.model is m2
    # another image retrains the forest; undoing on the first one must then retrain it on the
    # scribbles that remain rather than put back a forest that never saw the second image's
    cl.get(f"/api/images/{b}")
    for c in first_forest_clicks(s.truth[b]):
        cl.post(f"/api/images/{b}/click", json={"x": c.x, "y": c.y, "label": c.label,
                                                 "engine": "forest"})
    m3, n3 = forest.model, forest.n_retrains
    cl.post(f"/api/images/{a}/undo")
    assert forest.model is not m3 and forest.model is not m1
    assert forest.n_retrains == n3 + 1
    labelled = forest.n_labelled()
    assert labelled[0] > 0 and labelled[1] > 0


def test_undo_redo_restore_exact_masks(tmp_path):
    """Guards: undo/redo that lose or corrupt edits (strokes and clicks alike)."""
    s, st, cl = _client(tmp_path, n=1)
    iid = s.image_ids[0]
    cl.get(f"/api/images/{iid}")
    m0 = st.sessions[iid].current.copy()
    cl.post(f"/api/images/{iid}/stroke", json={"mode": "brush", "radius": 3,
                                               "points": [[5, 5], [60, 40]]})
    m1 = st.sessions[iid].current.copy()
    cl.post(f"/api/images/{iid}/stroke", json={"mode": "eraser", "radius": 6,
                                               "points": [[30, 20]]})
    m2 = st.sessions[iid].current.copy()
    assert m1.sum() > m0.sum() and m2.sum() < m1.sum()
    assert cl.post(f"/api/images/{iid}/undo").json()["n_strokes"] == 1
    assert np.array_equal(st.sessions[iid].current, m1)
    cl.post(f"/api/images/{iid}/undo")
    assert np.array_equal(st.sessions[iid].current, m0)
    assert cl.post(f"/api/images/{iid}/undo").json()["changed"] is False
    cl.post(f"/api/images/{iid}/redo")
    cl.post(f"/api/images/{iid}/redo")
    assert np.array_equal(st.sessions[iid].current, m2)
    png = cl.get(f"/api/images/{iid}/mask").content
    assert np.array_equal(decode_mask(png), m2)


def test_accept_writes_mask_annotation_row_and_mask_traits(tmp_path):
    """Guards: an accept that loses the mask, the clicks, the person or the timing, or that
    leaves the traits table without the corrected mask (producer ``mask``)."""
    s, st, cl = _client(tmp_path, n=2)
    iid = s.image_ids[0]
    cl.get(f"/api/images/{iid}")
    proposal = st.sessions[iid].proposal_mask.copy()
    cl.post(f"/api/images/{iid}/click", json={"x": 40, "y": 30, "label": 1})
    cl.post(f"/api/images/{iid}/stroke", json={"mode": "brush", "radius": 2,
                                               "points": [[100, 10], [100, 60]]})
    accepted = st.sessions[iid].current.copy()
    assert cl.post(f"/api/images/{iid}/accept", json={"person": ""}).status_code == 400
    r = cl.post(f"/api/images/{iid}/accept", json={"person": "Ana"})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["next"] == s.image_ids[1]
    lake = Lake(s.lake_uri)
    rows = lake.read("annotations").to_pylist()
    assert len(rows) == 1
    row = rows[0]
    assert row["annotation_id"] == out["annotation_id"] and row["image_id"] == iid
    assert row["person"] == "Ana" and row["proposed_by"] == "mask"
    assert json.loads(row["clicks_json"]) == [{"x": 40, "y": 30, "label": 1}]
    assert json.loads(row["strokes_json"])[0]["mode"] == "brush"
    assert row["n_clicks"] == 1 and row["n_strokes"] == 1
    assert row["ended_at"] >= row["started_at"] and row["active_seconds"] >= 0
    assert row["iou_proposed_accepted"] == pytest.approx(iou(proposal, accepted))
    assert np.array_equal(decode_mask(Path(row["mask_uri"]).read_bytes()), accepted)
    traits = lake.read("traits").to_pylist()
    assert len(traits) == 1
    t = traits[0]
    assert t["model_name"] == "mask" and t["model_version"] == f"annotation-{row['annotation_id']}"
    assert t["mask_uri"] == row["mask_uri"] and t["length_mm"] > 0
    assert json.loads(t["params"])["annotation_id"] == row["annotation_id"]
    fig = cl.get("/api/figures").json()
    assert fig["images_done"] == 1 and fig["median_clicks_per_image"] == 1
    assert fig["by_proposal"][0]["producer"] == "mask"
    q = cl.get("/api/queue").json()
    assert q["n_done"] == 1 and q["images"][-1]["image_id"] == iid  # done images go last


def test_train_reads_the_annotations_table(tmp_path):
    """Guards: ``rootflow train ... --data <lake>/annotations`` not reading the studio's
    table (the corrections would never reach training)."""
    from typer.testing import CliRunner

    from rootflow.cli import app
    from rootflow.training.data import pairs_manifest

    s, st, cl = _client(tmp_path, n=2)
    for iid in s.image_ids:
        cl.get(f"/api/images/{iid}")
        assert cl.post(f"/api/images/{iid}/accept", json={"person": "Ana"}).status_code == 200
    ann = str(Path(s.lake_uri) / "annotations")
    table = pairs_manifest(ann)
    assert sorted(table["image_id"].to_pylist()) == sorted(s.image_ids)
    assert all(Path(u).exists() for u in table["mask_uri"].to_pylist())
    res = CliRunner().invoke(app, ["train", "forest", "--data", ann, "--out",
                                   str(tmp_path / "forest"), "--no-progress",
                                   "--set", "autocontext=false", "--set", "n_estimators=5",
                                   "--set", "sigmas=[1.0,3.0]"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["n_images"] == 2


BAD_REQUESTS = [
    ("unknown id", "post", "/api/images/doesnotexist/click", {"x": 1, "y": 1, "label": 1}, 404),
    ("outside image", "post", "/api/images/{id}/click", {"x": 320, "y": 5, "label": 1}, 400),
    ("negative coord", "post", "/api/images/{id}/click", {"x": -1, "y": 5, "label": 1}, 400),
    ("bad label", "post", "/api/images/{id}/click", {"x": 1, "y": 1, "label": 2}, 400),
    ("bool label", "post", "/api/images/{id}/click", {"x": 1, "y": 1, "label": True}, 400),
    ("float coord", "post", "/api/images/{id}/click", {"x": 1.5, "y": 1, "label": 1}, 400),
    ("unknown field", "post", "/api/images/{id}/click", {"x": 1, "y": 1, "label": 1, "z": 0}, 400),
    ("missing field", "post", "/api/images/{id}/click", {"x": 1, "label": 1}, 400),
    ("stroke outside", "post", "/api/images/{id}/stroke",
     {"mode": "brush", "points": [[1, 1], [999, 1]]}, 400),
    ("stroke mode", "post", "/api/images/{id}/stroke", {"mode": "fill", "points": [[1, 1]]}, 400),
    ("path id", "get", "/api/images/..%5Cetc/mask", None, 400),
    ("dot id", "post", "/api/images/..passwd/accept", {"person": "x"}, 400),
    ("slash id", "get", "/api/images/a%2F..%2Fb", None, 404),
    ("accept unknown", "post", "/api/images/nope/accept", {"person": "x"}, 404),
    ("bad person", "post", "/api/images/{id}/accept", {"person": "a\nb"}, 400),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_a_reason_and_write_nothing(tmp_path, case):
    """Guards: bad input reaching the engines or the lake (a write, a crash, a 500)."""
    _, method, path, body, status = case
    s, st, cl = _client(tmp_path, n=1)
    iid = s.image_ids[0]
    cl.get(f"/api/images/{iid}")
    rev = st.sessions[iid].revision
    kw = {"json": body} if body is not None else {}
    r = getattr(cl, method)(path.replace("{id}", iid), **kw)
    assert r.status_code == status, r.text
    assert r.json()["error"]
    assert st.sessions[iid].revision == rev
    assert not Path(s.lake_uri).exists()


def test_malformed_oversized_token_and_host_are_refused(tmp_path):
    """Guards: malformed JSON or huge bodies being parsed, requests without the token or via
    a foreign Host header (DNS rebinding) being served."""
    s, st, cl = _client(tmp_path, n=1, token="t0ken-of-sixteen-chars")
    iid = s.image_ids[0]
    h = {"X-Studio-Token": "t0ken-of-sixteen-chars"}
    assert cl.get("/api/queue").status_code == 401
    assert cl.get("/api/queue", headers={"X-Studio-Token": "wrong"}).status_code == 401
    assert cl.get("/api/queue?token=t0ken-of-sixteen-chars").status_code == 200
    assert cl.get(f"/api/images/{iid}", headers=h).status_code == 200
    r = cl.post(f"/api/images/{iid}/click", content=b'{"x": 1,', headers={
        **h, "content-type": "application/json"})
    assert r.status_code == 400 and "malformed JSON" in r.json()["error"]
    r = cl.post(f"/api/images/{iid}/click", content=b"[1, 2]", headers=h)
    assert r.status_code == 400
    big = json.dumps({"mode": "brush", "points": [[1, 1]] * (MAX_BODY // 6)}).encode()
    r = cl.post(f"/api/images/{iid}/stroke", content=big, headers=h)
    assert r.status_code == 413
    evil = TestClient(create_app(st, token=None), base_url="http://evil.example")
    r = evil.get("/api/queue")
    assert r.status_code == 400 and "loopback" in r.json()["error"]
    assert st.sessions[iid].revision == 0 and not Path(s.lake_uri).exists()


def test_no_credentials_reach_the_page(tmp_path):
    """Guards: storage credentials leaking into any response the page can read."""
    from rootflow.io.storage import StorageOptions

    s = make_setup(tmp_path, n=1)
    secret = "SUPERSECRETKEY1234567890"
    so = StorageOptions(key="AKIDEXAMPLE", secret=secret, region="us-east-1")
    st = build_studio(StudioConfig(lake_uri=s.lake_uri, manifest_uri=s.manifest_uri),
                      storage_options=so)
    cl = TestClient(create_app(st), base_url=BASE)
    iid = s.image_ids[0]
    seen = b""
    for path in ("/", "/figures", "/static/app.js", "/static/figures.js", "/api/config",
                 "/api/queue", f"/api/images/{iid}", "/api/figures"):
        r = cl.get(path)
        assert r.status_code == 200, path
        seen += r.content
    r = cl.post(f"/api/images/{iid}/click", json={"x": 3, "y": 3, "label": 1})
    seen += r.content
    assert secret.encode() not in seen and b"AKIDEXAMPLE" not in seen


def test_cli_refuses_remote_host_without_token(tmp_path):
    """Guards: the studio (which writes to the lake) listening on the network unprotected."""
    from typer.testing import CliRunner

    from rootflow.cli import app

    for args, needle in ((["--host", "0.0.0.0"], "--allow-remote"),
                         (["--host", "0.0.0.0", "--allow-remote"], "--token"),
                         (["--host", "10.1.2.3", "--allow-remote", "--token", "short"],
                          "--token")):
        res = CliRunner().invoke(app, ["studio", "--lake", str(tmp_path / "lake"), *args])
        assert res.exit_code == 2
        assert needle in res.output and "Traceback" not in res.output
        assert len(res.output.strip().splitlines()) == 1


def test_latest_per_image_sees_the_corrected_mask(tmp_path):
    """Guards: the corrected mask hidden behind the producer's older rows in the default
    "latest" view, or an annotation hiding the given masks of the other images."""
    from rootflow.io.manifest import read_manifest
    from rootflow.lake.query import traits
    from rootflow.traits import measure

    s = make_setup(tmp_path, n=2)
    lake = Lake(s.lake_uri)
    rows = []
    for r in read_manifest(s.manifest_uri).to_pylist():
        m = decode_mask(Path(r["mask_uri"]).read_bytes())
        rows.append({**r, **measure(m, dpi=r["dpi"]), "model_name": "mask",
                     "model_version": "given-v1", "run_id": "r0"})
    lake.commit_traits(rows)
    st = build_studio(StudioConfig(lake_uri=s.lake_uri, manifest_uri=s.manifest_uri))
    cl = TestClient(create_app(st), base_url=BASE)
    a, b = s.image_ids
    cl.get(f"/api/images/{a}")
    cl.post(f"/api/images/{a}/stroke", json={"mode": "brush", "radius": 4,
                                             "points": [[20, 20], [200, 20]]})
    ann = cl.post(f"/api/images/{a}/accept", json={"person": "Ana"}).json()["annotation_id"]
    latest = traits(s.lake_uri, engine="arrow").to_pylist()
    got = {(r["image_id"], r["model_name"]): r["model_version"] for r in latest}
    assert got[(a, "mask")] == f"annotation-{ann}"
    assert got[(b, "mask")] == "given-v1"
