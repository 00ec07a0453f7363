"""RootSAMStage: the stage contract directly, and inside a real Ray Data pipeline."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rootflow.config import to_dict
from rootflow.inference.rootsam import RootSAMStage
from rootflow.io.images import decode_mask
from tests.inference._helpers import TINY, root_image


def _batch() -> dict[str, np.ndarray]:
    images = np.empty(4, dtype=object)
    images[:] = [root_image(40, 300), root_image(50, 60), np.zeros((0, 0, 3), np.uint8),
                 root_image(33, 33)]
    errors = np.empty(4, dtype=object)
    # NaN: what an all-null Arrow ``error`` column becomes in a numpy batch
    errors[:] = [None, float("nan"), None, "decode: ImageDecodeError: truncated"]
    return {"image_id": np.array(["a", "b", "c", "d"], dtype=object), "image": images,
            "dpi": np.full(4, 150.0), "error": errors}


def test_stage_contract_direct():
    stage = RootSAMStage(to_dict(TINY))  # a plain dict config, as Ray passes it
    batch = _batch()
    out = stage(batch)
    assert set(batch) <= set(out)
    assert list(out["image_id"]) == ["a", "b", "c", "d"]
    for i, hw in ((0, (40, 300)), (1, (50, 60))):
        assert out["error"][i] is None
        assert decode_mask(out["rootsam_mask_png"][i]).shape == hw
        assert 0 <= out["rootsam_confidence"][i] <= 1
        assert out["rootsam_model_version"][i] == "sam2.1_test@random-init"
        assert json.loads(out["rootsam_params"][i])["prompt_mode"] == "auto"
    # the 0-px image fails alone, the pre-failed row passes through untouched
    assert out["error"][2].startswith("rootsam: ValueError:")
    assert out["error"][3] == "decode: ImageDecodeError: truncated"
    for i in (2, 3):
        assert out["rootsam_mask_png"][i] is None and np.isnan(out["rootsam_confidence"][i])
        assert out["rootsam_model_version"][i] is None and out["rootsam_params"][i] is None
    assert out["rootsam_confidence"].dtype == np.float64


@pytest.mark.ray
def test_stage_in_ray_data_pipeline(ray_local):
    import ray

    rows = [{"image_id": f"img{i}", "image": root_image(30 + 7 * i, 200 - 30 * i, seed=i),
             "dpi": 150.0, "error": None} for i in range(4)]
    rows[2]["error"] = "read: FileNotFoundError: gone"
    ds = ray.data.from_items(rows).map_batches(
        RootSAMStage,
        fn_constructor_kwargs={"config": to_dict(TINY), "storage_options": None},
        compute=ray.data.ActorPoolStrategy(size=1),
        batch_size=2,
        batch_format="numpy",
        num_gpus=0,
    )
    got = {r["image_id"]: r for r in ds.take_all()}
    assert sorted(got) == [f"img{i}" for i in range(4)]
    for i, r in enumerate(rows):
        g = got[r["image_id"]]
        if i == 2:
            assert g["error"] == "read: FileNotFoundError: gone" and g["rootsam_mask_png"] is None
            continue
        assert not isinstance(g["error"], str)  # None, or NaN for an all-null Arrow column
        assert decode_mask(g["rootsam_mask_png"]).shape == r["image"].shape[:2]
        assert g["rootsam_model_version"] == "sam2.1_test@random-init"
        assert np.isfinite(g["rootsam_confidence"])
