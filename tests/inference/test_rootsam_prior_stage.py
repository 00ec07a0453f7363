"""RootSAMStage with ``prior`` set: each row's prior mask labels the points, and a row whose
prior failed is rejected naming the prior."""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from rootflow.config import to_dict
from rootflow.inference.rootsam import RootSAMPredictor, RootSAMStage
from rootflow.io.images import decode_mask, encode_png
from tests.inference._helpers import TINY, root_image


def test_stage_uses_each_rows_prior_and_rejects_a_row_whose_prior_failed() -> None:
    """Guards against a row whose forest failed (or did not run) getting a silent prompt-free
    RootSAM mask instead of a reject naming the prior, and against the stage handing the
    predictor another row's prior, or none (mask and prior point counts must equal the
    predictor's own for that row's prior; the all-root and all-soil priors label every point
    root and none)."""
    cfg = dataclasses.replace(TINY, prior="forest")
    stage = RootSAMStage(to_dict(cfg))
    imgs = [root_image(60, 70, seed=1), root_image(60, 70, seed=2), root_image(50, 40, seed=3),
            root_image(50, 40, seed=4)]
    priors = [np.ones((60, 70), bool), np.zeros((60, 70), bool), None, None]
    n = len(imgs)

    def col(values: list) -> np.ndarray:
        out = np.empty(n, dtype=object)
        out[:] = values
        return out

    batch = {"image_id": col(list("abcd")), "image": col(imgs), "dpi": np.full(n, 150.0),
             "error": col([None] * n),
             "forest_error": col([None, None, "forest: ValueError: bad tile", None]),
             "forest_mask_png": col([encode_png(p) if p is not None else None for p in priors]),
             "forest_model_version": col(["forest-0123456789ab"] * 2 + [None, None])}
    out = stage(batch)
    assert out["error"][2] == "rootsam: prior forest failed: forest: ValueError: bad tile"
    assert out["error"][3].startswith("rootsam: prior forest failed: no forest mask")
    assert out["rootsam_mask_png"][2] is None and out["rootsam_mask_png"][3] is None
    predictor = RootSAMPredictor(cfg)
    for i in (0, 1):
        assert out["error"][i] is None
        params = json.loads(out["rootsam_params"][i])
        assert params["prior"] == "forest" and params["prior_version"] == "forest-0123456789ab"
        want = predictor.predict([imgs[i]], priors=[priors[i]])[0]
        assert params["prior_points"] == want.params["prior_points"] > 0
        assert params["prior_positive"] == (params["prior_points"] if i == 0 else 0)
        assert np.array_equal(decode_mask(out["rootsam_mask_png"][i]), want.mask)


def test_model_actor_runs_the_prior_where_its_consumer_runs(tmp_path) -> None:
    """Guards against the prior's stage running only where the row's ``todo`` names it (a
    resumed run would give RootSAM no prior), against it running on rows whose ``todo`` leaves
    out RootSAM too, and against a stage that ran on no row of a batch crashing the actor
    (its all-None confidence column was normalized to a string column, then failed as float:
    ``could not convert string to float: ''``, which killed ``--no-fuse`` resumed runs)."""
    from rootflow.inference.pipeline import InferConfig, model_stage_specs
    from rootflow.inference.stages import ModelActor
    from tests.inference._segment_helpers import tiny_forest

    forest = tiny_forest(tmp_path)
    cfg = InferConfig(producers=("forest", "rootsam"), forest={"model": forest.uri},
                      rootsam={"variant": "test"})
    spec = model_stage_specs(cfg)[0]
    imgs = np.empty(3, dtype=object)
    imgs[:] = [root_image(40, 50, seed=s) for s in range(3)]

    def batch(todo: list[str]) -> dict[str, np.ndarray]:
        return {"image_id": np.array(list("abc"), dtype=object), "image": imgs.copy(),
                "error": np.array([None] * 3, dtype=object),
                "todo": np.array(todo, dtype=object)}

    with_prior = ModelActor([spec], producers=cfg.producers, priors={"rootsam": "forest"})
    out = with_prior(batch(["rootsam", "forest,rootsam", "mask"]))
    ran = [bool(v) for v in out["forest_mask_png"]]
    assert ran == [True, True, False]
    assert out["forest_confidence"].dtype == np.float64
    assert np.isnan(out["forest_confidence"][2]) and not np.isnan(out["forest_confidence"][0])
    without = ModelActor([spec], producers=cfg.producers)
    out = without(batch(["rootsam"] * 3))  # the forest runs on no row of this batch
    assert not any(bool(v) for v in out["forest_mask_png"])
    assert out["forest_confidence"].dtype == np.float64 and np.isnan(out["forest_confidence"]).all()
