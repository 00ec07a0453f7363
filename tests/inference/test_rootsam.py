"""RootSAM predictor (tiny random-init config): shapes, input forms, determinism, refinement."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor
from rootflow.io.images import to_rgb8
from tests.inference._helpers import TINY, root_image


@pytest.fixture(scope="module")
def predictor() -> RootSAMPredictor:
    return RootSAMPredictor(TINY)


@pytest.fixture(scope="module")
def lattice() -> RootSAMPredictor:
    return RootSAMPredictor(dataclasses.replace(TINY, prompt_mode="lattice"))


def test_output_shape_equals_input_for_odd_sizes(predictor):
    imgs = [root_image(37, 301), root_image(257, 129), root_image(33, 33)]
    res = predictor.predict(imgs, return_logits=True)
    for img, r in zip(imgs, res, strict=True):
        assert r.mask.shape == img.shape[:2] and r.mask.dtype == bool
        assert r.logits.shape == img.shape[:2]
        assert np.array_equal(r.mask, r.logits > 0)
        assert 0.0 <= r.confidence <= 1.0
        assert r.version == "sam2.1_test@random-init"
        assert r.params["random_init"] is True and r.params["prompt_mode"] == "auto"
        json.dumps(r.params)
    assert [r.n_tiles for r in res] == [2, 2, 1]


def test_black_and_uniform_images(predictor):
    res = predictor.predict([np.zeros((64, 80, 3), np.uint8),
                             np.full((50, 50, 3), 255, np.uint8)])
    assert [r.mask.shape for r in res] == [(64, 80), (50, 50)]
    assert all(np.isfinite(r.confidence) for r in res)


def test_grey_rgba_16bit_match_their_rgb8_form(lattice):
    rng = np.random.default_rng(1)
    grey16 = (rng.random((70, 90)) * 4000).astype(np.uint16)
    rgba = np.dstack([root_image(70, 90), np.full((70, 90), 255, np.uint8)])
    got = lattice.predict([grey16, rgba], return_logits=True)
    want = lattice.predict([to_rgb8(grey16)[0], to_rgb8(rgba)[0]], return_logits=True)
    for g, w in zip(got, want, strict=True):
        assert np.array_equal(g.mask, w.mask)
        np.testing.assert_allclose(g.logits, w.logits, atol=1e-5)


def test_results_do_not_depend_on_batch_composition(predictor):
    a, b = root_image(60, 300, seed=1), root_image(90, 70, seed=2)
    together = predictor.predict([a, b], return_logits=True)
    alone = predictor.predict([b], return_logits=True)
    np.testing.assert_allclose(together[1].logits, alone[0].logits, atol=1e-4)


def test_lattice_mode_decodes_one_policy_prompt_set_per_tile():
    """Guards against inference prompting outside the policy: in ``lattice`` mode each tile
    gets exactly the policy's lattice (n x n points over the image part of the tile, labelled
    by the prompt-free pass), one mask per tile."""
    pred = RootSAMPredictor(dataclasses.replace(TINY, prompt_mode="lattice"))
    img = root_image(64, 64)
    r = pred.predict([img], return_logits=True)[0]
    assert r.n_masks == 1 and r.params["prompt_mode"] == "lattice"
    pts, labs = r.tile_prompts[0]
    n = TINY.lattice_points_per_side
    assert pts.shape == (n * n, 2) and set(labs.tolist()) <= {0, 1}
    assert pts.max() < 64 and pts.min() > 0  # the image part of the padded 256 px tile


def test_refine_reruns_only_clicked_tiles_and_caches_embeddings(predictor, monkeypatch):
    img = root_image(60, 520)  # tiles start at x = 0, 224, 264
    prev = np.zeros((60, 520), bool)
    prev[:, 100:110] = True
    calls = []
    real_encode = predictor.model.encode
    monkeypatch.setattr(predictor.model, "encode", lambda x: calls.append(len(x)) or real_encode(x))
    res, rerun = predictor.refine(img, points=np.array([[10.5, 30.5]]), labels=np.array([1]),
                                  previous=prev, key="img-1")
    assert rerun == [0] and calls == [1]
    assert res.mask.shape == prev.shape and res.n_masks == 1
    # far from tile 0 (x >= 256: only tiles 1-2 cover it) the previous mask is untouched
    assert np.array_equal(res.mask[:, 256:], prev[:, 256:])
    res2, rerun2 = predictor.refine(img, points=np.array([[10.5, 30.5], [20.5, 5.5]]),
                                    labels=np.array([1, 0]), previous=res.logits, key="img-1")
    assert rerun2 == [0] and calls == [1]  # embedding came from the cache
    with pytest.raises(ValueError, match="outside"):
        predictor.refine(img, points=np.array([[600.0, 5.0]]), labels=np.array([1]),
                         previous=prev)
    with pytest.raises(ValueError, match="previous mask"):
        predictor.refine(img, points=np.array([[6.0, 5.0]]), labels=np.array([1]),
                         previous=prev[:10])


def test_config_records_prompt_policy(predictor):
    p = predictor.params
    assert p["tile_px"] == 256 and p["tile_overlap_px"] == 32
    assert p["auto_n_pos"] == 2 and p["auto_n_neg"] == 2 and p["seed"] == 0
    assert RootSAMInferenceConfig().variant == "hiera_base_plus"


def test_model_version_known_before_building(tmp_path):
    from rootflow.config import to_dict
    from rootflow.inference.rootsam import model_version
    from rootflow.models import rootsam as R

    assert model_version(TINY) == "sam2.1_test@random-init"
    base = str(tmp_path / "base.pt")
    sha = R.save_base_checkpoint(R.build_rootsam("test", seed=3), base)
    for given in (None, sha):  # without a digest model_version hashes the file
        cfg = dataclasses.replace(TINY, base_checkpoint=base, base_sha256=given)
        assert model_version(to_dict(cfg)) == RootSAMPredictor(cfg).version == f"sam2.1_test@{sha[:12]}"
    with pytest.raises(ValueError, match="full 64-hex"):  # a prefix is not a digest
        model_version(dataclasses.replace(TINY, base_checkpoint=base, base_sha256=sha[:12]))
    rs = str(tmp_path / "rs.pt")
    R.save_rootsam_checkpoint(R.build_rootsam("test", base_checkpoint=base), rs, version="rs-9")
    cfg = dataclasses.replace(TINY, base_checkpoint=base, rootsam_checkpoint=rs)
    assert model_version(cfg) == RootSAMPredictor(cfg).version == "rs-9"


def test_inference_uses_the_policy_the_checkpoint_was_trained_with(tmp_path):
    """Guards against a decoder being asked about prompts it was not trained on: a RootSAM
    checkpoint recording its training policy (``train_config.task.prompts``) sets the
    predictor's policy (and the recorded params) over the config's fields, unless the config
    says ``policy_source="config"``; a checkpoint without one falls back to the fields."""
    from rootflow import config as rf_config
    from rootflow.inference.prompts import PromptPolicy
    from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor, policy_of
    from rootflow.models.rootsam import build_rootsam, save_rootsam_checkpoint

    trained_with = PromptPolicy(mode="lattice", lattice_per_side=3, threshold=0.4)
    model = build_rootsam("micro")
    with_policy, without = str(tmp_path / "a.pt"), str(tmp_path / "b.pt")
    save_rootsam_checkpoint(model, with_policy, version="rs-a",
                            train_config={"task": {"prompts": rf_config.to_dict(trained_with)}})
    save_rootsam_checkpoint(model, without, version="rs-b")
    cfg = RootSAMInferenceConfig(variant="micro", device="cpu", rootsam_checkpoint=with_policy,
                                 prompt_mode="auto", lattice_points_per_side=2)
    pred = RootSAMPredictor(cfg)
    assert pred.policy == trained_with and pred.policy_source == "checkpoint"
    assert pred.params["prompt_mode"] == "lattice"
    assert pred.params["lattice_points_per_side"] == 3
    override = RootSAMPredictor(dataclasses.replace(cfg, policy_source="config"))
    assert override.policy == policy_of(cfg) and override.params["prompt_mode"] == "auto"
    fallback = RootSAMPredictor(dataclasses.replace(cfg, rootsam_checkpoint=without))
    assert fallback.policy == policy_of(cfg) and fallback.policy_source == "config"
