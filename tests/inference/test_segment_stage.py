"""The forest/U-Net model stage of the job and the one traits/records path of mask producers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rootflow.inference import stages
from rootflow.inference.segment import SegmenterStage, config_from, pixel_certainty
from rootflow.io.images import decode_mask
from rootflow.models.segmenters import SegmenterLoadError
from tests.inference._segment_helpers import TinyModel, synthetic_pairs, tiny_forest, tiny_unet


@pytest.fixture(scope="module")
def forest(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return tiny_forest(tmp_path_factory.mktemp("forest"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> list[tuple[np.ndarray, np.ndarray]]:
    return synthetic_pairs(tmp_path_factory.mktemp("pairs"), n=2, seed=5)


def _batch(images: list[np.ndarray], errors: list[str | None] | None = None) -> dict:
    n = len(images)
    return {"image_id": stages._objects([f"img-{i}" for i in range(n)]),
            "image": stages._objects(images),
            "error": stages._objects(errors or [None] * n)}


def test_stage_mask_is_the_models_prediction(forest, pairs) -> None:
    """Guards against the stage passing the wrong image, thresholding differently from the
    model's own ``predict``, or writing a mask of another size or encoding."""
    stage = SegmenterStage({"model": forest.uri, "kind": "forest"})
    img = pairs[0][0]
    out = stage(_batch([img]))
    mask = decode_mask(out["forest_mask_png"][0])
    assert mask.shape == img.shape[:2]
    np.testing.assert_array_equal(mask, forest.model.predict(img))
    assert out["forest_model_version"][0] == forest.model.version == stage.version
    assert 0.5 <= out["forest_confidence"][0] <= 1.0
    assert out["forest_confidence"][0] == pytest.approx(
        pixel_certainty(forest.model.predict_proba(img)))
    params = json.loads(out["forest_params"][0])
    assert params["confidence"] == "mean max(p, 1-p)"
    assert not out["error"][0]


def test_stage_isolates_one_bad_row(forest, pairs) -> None:
    """Guards against one bad image failing the batch (or the image's other producers): only
    that row gets ``forest_error``, the image's own ``error`` is left as it was."""
    imgs = [pairs[0][0], np.zeros((5, 5), np.uint8), pairs[1][0], pairs[0][0]]
    batch = _batch(imgs, [None, None, None, "decode: ImageDecodeError: bad"])
    stage = SegmenterStage({"model": forest.uri, "kind": "forest"})
    out = stages.run_guarded("forest", stage, batch)
    errs = [e or None for e in out["forest_error"]]
    assert errs[0] is None and errs[2] is None and errs[3] is None
    assert errs[1].startswith("forest: ValueError:") and "(5, 5)" in errs[1]
    assert [e or None for e in out["error"]] == [None, None, None, "decode: ImageDecodeError: bad"]
    assert len(out["forest_mask_png"][0]) and len(out["forest_mask_png"][2])
    assert not out["forest_mask_png"][1] and not out["forest_mask_png"][3]
    assert np.isnan(out["forest_confidence"][1]) and out["t_forest"].shape == (4,)


def test_stage_refuses_wrong_kind_and_corrupt_files(forest, tmp_path: Path) -> None:
    """Guards against a U-Net slot silently running a forest, or a corrupt file failing later
    with a traceback instead of a one-line SegmenterLoadError naming the file."""
    with pytest.raises(SegmenterLoadError, match="is a forest model, expected a unet"):
        SegmenterStage({"model": forest.uri, "kind": "unet"})
    bad = tmp_path / "forest.json"
    bad.write_text('{"format": "rootflow.forest/1", "trees": ')
    with pytest.raises(SegmenterLoadError, match=str(bad)):
        SegmenterStage({"model": str(bad), "kind": "forest"})


def test_config_needs_a_model_and_a_full_digest() -> None:
    """Guards against a requested forest/U-Net producer without a model URI (or with a short or
    malformed digest) getting past the config, to fail inside an actor mid-run."""
    from rootflow.inference.pipeline import InferConfig

    with pytest.raises(ValueError, match="--forest-model"):
        InferConfig(producers=("mask", "forest"))
    with pytest.raises(ValueError, match="--unet-checkpoint"):
        InferConfig(producers=("unet",), forest={"model": "x"})
    with pytest.raises(ValueError, match="64-hex"):
        config_from({"model": "m.json", "sha256": "abc123"}, kind="forest")
    with pytest.raises(ValueError, match="unknown key"):
        config_from({"model": "m.json", "treshold": 0.3}, kind="forest")
    assert config_from({"model": "m.json", "sha256": "a" * 64}, kind="unet").kind == "unet"


def test_every_mask_producer_goes_through_one_traits_and_record_path(tmp_path: Path) -> None:
    """Guards against forest/U-Net rows being built by a different (diverging) branch than
    RootSAM's: the same mask gives the same traits, a mask PNG at ``mask_uri_for`` and a row with
    the producer's own version; one producer's failure rejects only that producer."""
    mask = np.zeros((40, 50), bool)
    mask[10:12, 5:45] = True
    png = stages.images.encode_png(mask)
    producers = ("mask", "forest", "unet", "rootsam")
    batch = {"image_id": stages._objects(["a", "b"]), "year": np.array([2021, 2021]),
             "tube": np.array([1, 2]), "dpi": np.array([150.0, 150.0]),
             "error": stages._objects([None, None]), "mask_png": stages._objects([png, png])}
    for p in ("forest", "unet", "rootsam"):
        batch[f"{p}_mask_png"] = stages._objects([png, png])
        batch[f"{p}_confidence"] = np.array([0.9, 0.8])
        batch[f"{p}_model_version"] = stages._objects([f"{p}-v1", f"{p}-v1"])
        batch[f"{p}_params"] = stages._objects(['{"p": 1}', '{"p": 1}'])
        batch[f"{p}_error"] = stages._objects([None, None])
    batch["unet_mask_png"] = stages._objects([png, None])
    batch["unet_error"] = stages._objects([None, "unet: RuntimeError: out of memory"])
    lake = str(tmp_path / "lake")
    out = stages.traits(stages.normalize(batch), producers=producers, lake_uri=lake)
    versions = {"mask": "traits-x", "forest": "forest-v1", "unet": "unet-v1", "rootsam": "rootsam-v1"}
    recs = stages.to_records(out, producers=producers, run_id="r", model_versions=versions)
    import pickle

    rows = [(k, pickle.loads(r)) for k, r in zip(recs["kind"], recs["record"], strict=True)]
    traits = {(r["image_id"], r["model_name"]): r for k, r in rows if k == "traits"}
    rejects = {(r["image_id"], r["model_name"]): r for k, r in rows if k == "reject"}
    assert set(rejects) == {("b", "unet")}
    assert rejects[("b", "unet")]["stage"] == "unet"
    assert len(traits) == 7
    for (image_id, p), r in traits.items():
        assert r["length_mm"] == pytest.approx(traits[(image_id, "mask")]["length_mm"])
        if p == "mask":
            continue
        assert r["model_version"] == f"{p}-v1" and r["confidence"] in (0.9, 0.8)
        row = {"year": 2021, "tube": 1 if image_id == "a" else 2, "image_id": image_id}
        assert r["mask_uri"] == stages.mask_uri_for(lake, p, f"{p}-v1", row)
        assert f"/masks/{p}/{p}-v1/" in r["mask_uri"]
        np.testing.assert_array_equal(decode_mask(Path(r["mask_uri"]).read_bytes()), mask)


def test_unet_runs_through_the_same_stage(tmp_path: Path, pairs) -> None:
    """Guards against the stage only working for forests: a U-Net file loads by kind and
    produces full-size masks under its own column names and version."""
    unet = tiny_unet(tmp_path)
    stage = SegmenterStage({"model": unet.folder, "kind": "unet"})
    out = stage(_batch([pairs[0][0]]))
    assert decode_mask(out["unet_mask_png"][0]).shape == pairs[0][0].shape[:2]
    assert out["unet_model_version"][0] == unet.model.version
