"""RootQuant predictor and Ray Data stage (stage contract of contracts.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rootflow.inference import rootquant as rqi
from rootflow.models import rootquant as rq
from tests.training._rootquant_helpers import root_image

TINY = rq.RootQuantConfig(backbone="resnet10t", tile_px=64, mm_per_px=0.5, head_hidden=32)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> tuple[str, str]:
    torch.manual_seed(0)
    model = rq.RootQuant(TINY)
    with torch.no_grad():  # presence bias up so random weights do not zero everything
        model.head.out.bias[0] = 2.0
    uri = str(tmp_path_factory.mktemp("rq") / "model.pt")
    return uri, rq.save(model, uri)


def _images() -> list[np.ndarray]:
    return [root_image(s, height=h, width=w, empty=False)[0]
            for s, (h, w) in enumerate([(96, 128), (64, 64), (150, 90)])]


def test_predictor_batching_is_invisible(ckpt) -> None:
    uri, sha = ckpt
    imgs, dpis = _images(), [100.0, 50.8, 200.0]
    p1 = rqi.RootQuantPredictor.from_checkpoint(uri, sha256=sha, device="cpu", tile_batch=1,
                                                presence_threshold=None)
    p64 = rqi.RootQuantPredictor.from_checkpoint(uri, device="cpu", tile_batch=64,
                                                 presence_threshold=None)
    many = p64.predict_many(imgs, dpis=dpis)
    for img, d, m in zip(imgs, dpis, many, strict=True):
        one = p1.predict(img, dpi=d)
        assert one.length_mm == pytest.approx(m.length_mm, rel=1e-4)
        assert one.area_mm2 == pytest.approx(m.area_mm2, rel=1e-4)
        assert one.presence == pytest.approx(m.presence, rel=1e-4)
        assert m.mm_per_px == 0.5 and m.n_tiles >= 1
    assert p64.version == f"rootquant@{sha[:12]}"
    assert p64.params()["mm_per_px"] == 0.5


def test_presence_threshold_zeroes_empty_calls(ckpt) -> None:
    uri, _ = ckpt
    img = _images()[0]
    raw = rqi.RootQuantPredictor.from_checkpoint(uri, device="cpu", presence_threshold=None)
    p = raw.predict(img, dpi=100.0)
    assert p.length_mm > 0
    strict = rqi.RootQuantPredictor.from_checkpoint(uri, device="cpu",
                                                    presence_threshold=p.presence + 1e-6)
    q = strict.predict(img, dpi=100.0)
    assert q.length_mm == 0.0 and q.area_mm2 == 0.0 and q.presence == pytest.approx(p.presence)


def _batch(imgs: list[np.ndarray], dpis: list[float], errors: list[str | None]) -> dict:
    image = np.empty(len(imgs), dtype=object)
    image[:] = imgs
    err = np.empty(len(imgs), dtype=object)
    err[:] = errors
    return {"image_id": np.array([f"id{i}" for i in range(len(imgs))], dtype=object),
            "image": image, "dpi": np.asarray(dpis, np.float64), "error": err}


def test_stage_contract_per_row_failures(ckpt) -> None:
    uri, sha = ckpt
    stage = rqi.RootQuantStage({"checkpoint": uri, "sha256": sha, "device": "cpu"})
    imgs = _images()
    bad_image = np.zeros((5, 5), np.uint8)  # not (H, W, 3)
    batch = _batch([imgs[0], imgs[1], imgs[2], bad_image],
                   [100.0, float("nan"), 100.0, 100.0],
                   [None, None, "decode: ImageDecodeError: truncated", None])
    out = stage(batch)
    assert set(batch) <= set(out) and set(rqi.OUTPUT_COLUMNS) <= set(out)
    assert out["error"][0] is None and np.isfinite(out["rootquant_length_mm"][0])
    assert out["error"][1].startswith("rootquant: ValueError: dpi must be a positive number")
    assert out["error"][2] == "decode: ImageDecodeError: truncated"  # passed through untouched
    assert out["error"][3].startswith("rootquant: ValueError:")
    for i in (1, 2, 3):
        assert np.isnan(out["rootquant_length_mm"][i]) and np.isnan(out["rootquant_presence"][i])
        assert out["rootquant_model_version"][i] is None
    assert out["rootquant_length_mm"].dtype == np.float64
    assert out["rootquant_model_version"][0] == f"rootquant@{sha[:12]}"
    assert json.loads(out["rootquant_params"][0])["mm_per_px"] == 0.5
    assert rqi.model_version({"checkpoint": uri}) == out["rootquant_model_version"][0]
    direct = stage.predictor.predict(imgs[0], dpi=100.0)
    assert out["rootquant_length_mm"][0] == pytest.approx(direct.length_mm, rel=1e-5)


def test_stage_without_checkpoint_is_seeded_random(ckpt) -> None:
    cfg = {"backbone": "resnet10t", "tile_px": 64, "mm_per_px": 0.5, "device": "cpu",
           "presence_threshold": None}
    a, b = rqi.RootQuantStage(cfg), rqi.RootQuantStage(cfg)
    batch = _batch(_images()[:1], [100.0], [None])
    assert a(batch)["rootquant_length_mm"][0] == b(batch)["rootquant_length_mm"][0]
    assert rqi.model_version(cfg) == a(batch)["rootquant_model_version"][0]
    assert "random" in rqi.model_version(cfg)


@pytest.mark.ray
def test_stage_in_ray_data_pipeline(ray_local, ckpt) -> None:
    import ray.data

    uri, sha = ckpt
    imgs = _images()
    rows = [{"image_id": f"id{i}", "image": im, "dpi": 100.0, "error": None}
            for i, im in enumerate(imgs)]
    rows.append({"image_id": "bad", "image": imgs[0], "dpi": -1.0, "error": None})
    ds = ray.data.from_items(rows).map_batches(
        rqi.RootQuantStage, fn_constructor_kwargs={"config": {"checkpoint": uri, "sha256": sha,
                                                              "device": "cpu"}},
        compute=ray.data.ActorPoolStrategy(size=1), batch_size=2, batch_format="numpy",
        num_cpus=1)
    got = {r["image_id"]: r for r in ds.take_all()}
    assert len(got) == 4
    pred = rqi.RootQuantPredictor.from_checkpoint(uri, device="cpu")
    for i, im in enumerate(imgs):
        r = got[f"id{i}"]
        assert not isinstance(r["error"], str)  # None (or NaN after Arrow) means no error
        assert r["rootquant_length_mm"] == pytest.approx(pred.predict(im, dpi=100.0).length_mm,
                                                         rel=1e-4)
        assert r["rootquant_model_version"] == f"rootquant@{sha[:12]}"
    assert got["bad"]["error"].startswith("rootquant: ValueError")
    assert np.isnan(got["bad"]["rootquant_length_mm"])


@pytest.mark.gpu
def test_predictor_cuda_autocast_matches_cpu(ckpt) -> None:
    uri, _ = ckpt
    img = _images()[0]
    cpu = rqi.RootQuantPredictor.from_checkpoint(uri, device="cpu", presence_threshold=None)
    gpu = rqi.RootQuantPredictor.from_checkpoint(uri, device="cuda", amp=True,
                                                 presence_threshold=None)
    a, b = cpu.predict(img, dpi=100.0), gpu.predict(img, dpi=100.0)
    assert b.length_mm == pytest.approx(a.length_mm, rel=0.05)
