"""RootSAM's third prompt mode in the processing job: points labelled by a forest prior
(``rootsam.prior=forest``), on a tiny forest trained here and the random-init ``test`` SAM2.1."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rootflow.cli import app
from rootflow.inference.pipeline import InferConfig, Resources, prior_suffix, run
from rootflow.io import storage
from rootflow.io.images import decode, decode_mask
from rootflow.lake import Lake
from tests.inference._segment_helpers import TinyModel, tiny_forest
from tests.pipeline._helpers import accounting, counts_by_image, small_archive

RS = {"variant": "test", "device": "cpu"}


@pytest.fixture(scope="module")
def forest(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return tiny_forest(tmp_path_factory.mktemp("forest"))


def _rows(lake: Lake, producer: str) -> list[dict]:
    return [r for r in lake.read("traits").to_pylist() if r["model_name"] == producer]


@pytest.mark.ray
def test_rootsam_rows_name_the_prior_and_its_mask_reached_the_predictor(ray_local, tmp_path,
                                                                        forest) -> None:
    """Guards against ``rootsam.prior=forest`` being accepted but not used: RootSAM rows whose
    version or params do not name the forest's version (masks from different priors would
    share a version), or whose masks were not made from that image's forest mask (the job's
    mask and prior-labelled point counts must equal the predictor's own, given the forest mask
    the job wrote for the image)."""
    from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor

    arch = small_archive(str(tmp_path), n_images=2, height=128, width=160)
    lake_uri = str(tmp_path / "lake")
    cfg = InferConfig(producers=("forest", "rootsam"), forest={"model": forest.uri},
                      rootsam={**RS, "prior": "forest"})
    s = run(arch.manifest_uri, lake_uri, cfg, progress=False)
    lake = Lake(lake_uri)
    accounting(lake, s.run_id, ("forest", "rootsam"), arch)
    fv = forest.model.version
    assert s.model_versions["rootsam"].endswith(prior_suffix("forest", fv))
    assert fv.removeprefix("forest-") in s.model_versions["rootsam"]
    rs, fo = _rows(lake, "rootsam"), {r["image_id"]: r for r in _rows(lake, "forest")}
    assert len(rs) == arch.n_rows - len(arch.bad_ids) > 0
    predictor = RootSAMPredictor(RootSAMInferenceConfig(**RS, prior="forest"))
    for r in rs:
        assert r["model_version"] == s.model_versions["rootsam"]
        params = json.loads(r["params"])
        assert params["prior"] == "forest" and params["prior_version"] == fv
        assert params["prior_points"] > 0
        rgb = decode(storage.read_bytes(r["image_uri"]))[0]
        prior = decode_mask(storage.read_bytes(fo[r["image_id"]]["mask_uri"]))
        want = predictor.predict([rgb], priors=[prior])[0]
        assert params["prior_points"] == want.params["prior_points"]
        assert params["prior_positive"] == want.params["prior_positive"]
        got = decode_mask(storage.read_bytes(r["mask_uri"]))
        assert np.array_equal(got, want.mask)


@pytest.mark.ray
def test_resumed_run_runs_rootsam_with_an_in_stream_prior_without_duplicating_it(
        ray_local, tmp_path, forest) -> None:
    """Guards against a run whose forest rows are already in the lake (so its ``todo`` holds
    only RootSAM's new, prior-naming version) giving RootSAM no prior (its rows would be
    rejected or made without one), or writing the prior-only forest output again (duplicate
    traits rows or mask files), and against a rerun of the same settings not being skipped.
    Runs in separate actor pools, so the prior crosses from the forest's actor to RootSAM's."""
    arch = small_archive(str(tmp_path), n_images=2, height=128, width=160, bad=False)
    lake_uri = str(tmp_path / "lake")
    lake = Lake(lake_uri)
    plain = InferConfig(producers=("forest", "rootsam"), forest={"model": forest.uri},
                        rootsam=dict(RS), resources=Resources(fuse_models=False))
    s1 = run(arch.manifest_uri, lake_uri, plain, progress=False)
    forest_rows = {r["image_id"]: r for r in _rows(lake, "forest")}
    n_forest_masks = len(list(Path(lake_uri, "masks", "forest").rglob("*.png")))
    assert n_forest_masks == len(forest_rows) == arch.n_rows

    with_prior = dataclasses.replace(plain, rootsam={**RS, "prior": "forest"})
    s2 = run(arch.manifest_uri, lake_uri, with_prior, progress=False)
    assert s2.model_versions["forest"] == s1.model_versions["forest"]
    assert s2.model_versions["rootsam"] != s1.model_versions["rootsam"]
    assert s2.n_images == arch.n_rows
    assert s2.n_images_rejected == 0 and s2.stage_s.get("forest", 0) > 0
    # forest: the same rows (run 1's), no new mask files, no new rejects
    after = {r["image_id"]: r for r in _rows(lake, "forest")}
    assert set(counts_by_image(lake.read("traits"), "forest").values()) == {1}
    assert {k: r["run_id"] for k, r in after.items()} == \
        {k: r["run_id"] for k, r in forest_rows.items()}
    assert len(list(Path(lake_uri, "masks", "forest").rglob("*.png"))) == n_forest_masks
    rejects = lake.read("rejects").to_pylist()
    assert not [r for r in rejects if r["run_id"] == s2.run_id]
    # rootsam: one row per image and version, the new ones made with the forest prior
    new = [r for r in _rows(lake, "rootsam") if r["model_version"] == s2.model_versions["rootsam"]]
    assert sorted(r["image_id"] for r in new) == sorted(forest_rows)
    for r in new:
        params = json.loads(r["params"])
        assert params["prior_version"] == forest.model.version and params["prior_points"] > 0
        assert r["mask_uri"] != next(o["mask_uri"] for o in _rows(lake, "rootsam")
                                     if o["image_id"] == r["image_id"]
                                     and o["model_version"] == s1.model_versions["rootsam"])
    assert set(counts_by_image(lake.read("traits"), "rootsam").values()) == {2}

    s3 = run(arch.manifest_uri, lake_uri, with_prior, progress=False)
    assert s3.n_images == 0 and s3.n_skipped == arch.n_rows


def _no_ray(*_a, **_k) -> None:
    raise AssertionError("Ray must not start when the prior's producer is not requested")


def test_prior_producer_not_in_the_run_is_one_line_and_exit_2(tmp_path, monkeypatch) -> None:
    """Guards against ``--set rootsam.prior=forest`` without the forest producer starting a
    run in which every RootSAM image is rejected (no prior in the stream), or failing with a
    traceback, instead of one line on stderr and exit 2 before Ray starts."""
    monkeypatch.setattr("rootflow.inference._cli.init_ray", _no_ray)
    manifest = small_archive(str(tmp_path / "arch"), n_images=1, bad=False,
                             height=64, width=80).manifest_uri
    res = CliRunner().invoke(app, ["infer", manifest, str(tmp_path / "lake"),
                                   "--producers", "mask,rootsam", "--rootsam-config", "test",
                                   "--set", "rootsam.prior=forest"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "rootsam.prior=forest" in lines[0] and "--producers" in lines[0]
    assert not (tmp_path / "lake").exists()
