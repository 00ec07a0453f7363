"""Trained segmenters (forest, U-Net) as producers of the processing job."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rootflow.cli import app
from rootflow.inference.pipeline import InferConfig, run
from rootflow.inference.stages import mask_uri_for
from rootflow.io import storage
from rootflow.io.images import decode, decode_mask
from rootflow.lake import Lake
from tests.inference._segment_helpers import TinyModel, tiny_forest
from tests.pipeline._helpers import accounting, small_archive


@pytest.fixture(scope="module")
def forest(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return tiny_forest(tmp_path_factory.mktemp("forest"))


@pytest.mark.ray
def test_forest_producer_rows_masks_rejects_and_reruns(ray_local, tmp_path, forest) -> None:
    """Guards against forest rows with another version than the model's, masks written
    elsewhere than ``mask_uri_for`` (or not the model's prediction), a bad image not rejected
    for the forest too, and duplicates on re-runs (skipped or forced)."""
    arch = small_archive(str(tmp_path), n_images=3)
    lake_uri = str(tmp_path / "lake")
    res = CliRunner().invoke(app, [
        "infer", arch.manifest_uri, lake_uri, "--producers", "mask,forest",
        "--forest-model", forest.folder, "--forest-sha256", forest.sha256,
        "--summary-json", str(tmp_path / "s.json")])
    assert res.exit_code == 3, res.output  # the archive's three bad rows
    s = json.loads((tmp_path / "s.json").read_text())
    version = forest.model.version
    assert s["model_versions"]["forest"] == version
    assert s["stage_s"].get("forest", 0) > 0
    lake = Lake(lake_uri)
    accounting(lake, s["run_id"], ("mask", "forest"), arch)

    rejects = [r for r in lake.read("rejects").to_pylist() if r["model_name"] == "forest"]
    assert {r["image_id"]: r["stage"] for r in rejects} == arch.bad_ids  # corrupt JPEG included

    traits = lake.read("traits").to_pandas()
    rows = traits[traits["model_name"] == "forest"]
    assert len(rows) == arch.n_rows - len(arch.bad_ids)
    assert set(rows["model_version"]) == {version}
    assert rows["confidence"].between(0.5, 1.0).all()
    assert (rows["length_mm"] >= 0).all()
    for r in rows.to_dict("records"):
        assert r["mask_uri"] == mask_uri_for(lake_uri, "forest", version, r)
        mask = decode_mask(storage.read_bytes(r["mask_uri"]))
        rgb = decode(storage.read_bytes(r["image_uri"]))[0]
        assert mask.shape == rgb.shape[:2]
        assert (mask == forest.model.predict(rgb)).all()
        assert json.loads(r["params"])["confidence"] == "mean max(p, 1-p)"
    n_rows = lake.read("traits").num_rows

    cfg = InferConfig(producers=("mask", "forest"), forest={"model": forest.uri})
    s2 = run(arch.manifest_uri, lake_uri, cfg, progress=False)
    # done images skipped; the bad ones (same files, same versions) not retried either
    assert s2.n_skipped == arch.n_rows and s2.n_reject_skipped == 2 * len(arch.bad_ids)
    assert lake.read("traits").num_rows == n_rows
    s3 = run(arch.manifest_uri, lake_uri, dataclasses.replace(cfg, skip_done=False),
             progress=False)
    assert s3.n_images == arch.n_rows
    accounting(lake, s3.run_id, ("mask", "forest"), arch)
    assert lake.read("traits").num_rows == n_rows
    masks = list(Path(lake_uri, "masks", "forest").rglob("*.png"))
    assert len(masks) == len(rows)


def _no_ray(*_a, **_k) -> None:
    raise AssertionError("Ray must not start when the models are unusable")


@pytest.mark.parametrize("case", ["missing", "corrupt", "wrong_kind", "bad_digest", "short_digest"])
def test_unusable_model_is_one_line_and_exit_2_before_ray(case, forest, tmp_path,
                                                         monkeypatch) -> None:
    """Guards against a requested producer without a model URI, or a corrupt, wrong-kind or
    digest-mismatched model file, surfacing as a traceback after Ray has started (or as a
    reject per image) instead of one line on stderr and exit 2 before anything runs."""
    monkeypatch.setattr("rootflow.inference._cli.init_ray", _no_ray)
    corrupt = tmp_path / "forest.json"
    corrupt.write_text('{"format": "rootflow.forest/1", "trees": [')
    args, expect = {
        "missing": (["--producers", "mask,forest"], "--forest-model"),
        "corrupt": (["--producers", "forest", "--forest-model", str(corrupt)], str(corrupt)),
        "wrong_kind": (["--producers", "unet", "--unet-checkpoint", forest.uri],
                       "is a forest model, expected a unet model"),
        "bad_digest": (["--producers", "forest", "--forest-model", forest.uri,
                        "--forest-sha256", "0" * 64], "sha256 mismatch"),
        "short_digest": (["--producers", "forest", "--forest-model", forest.uri,
                          "--forest-sha256", forest.sha256[:12]], "64-hex"),
    }[case]
    manifest = small_archive(str(tmp_path / "arch"), n_images=1, bad=False,
                             height=64, width=80).manifest_uri  # a valid one: the model fails
    res = CliRunner().invoke(app, ["infer", manifest, str(tmp_path / "lake"), *args])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert len(res.stderr.strip().splitlines()) == 1 and expect in res.stderr
    assert not (tmp_path / "lake").exists()


def test_every_producer_is_a_model_name_the_lake_accepts() -> None:
    """Guards against adding a producer to the job that the lake then refuses at commit time
    (after all the images were processed)."""
    from rootflow.inference.pipeline import PRODUCERS
    from rootflow.lake.schema import MODEL_NAMES

    assert set(PRODUCERS) == set(MODEL_NAMES)


@pytest.mark.ray
def test_demo_forest_is_scored_only_on_windows_it_did_not_train_on(ray_local, tmp_path,
                                                                   monkeypatch) -> None:
    """Guards against the demo's forest being scored on its own training images (a flattering,
    meaningless number) or its comparison row losing the masks it is scored with."""
    import io

    import pyarrow.parquet as pq
    from rich.console import Console

    from rootflow import demo
    from rootflow.io.manifest import build_manifest, write_manifest
    from rootflow.synth import SynthConfig, generate_archive

    monkeypatch.setattr(demo, "DEMO_FOREST_SECONDS", 2.0)
    archive = tmp_path / "archive"
    generate_archive(str(archive), config=SynthConfig(
        n_images=6, n_tubes=1, n_windows=2, n_sessions=3, height=128, width=160,
        roots_per_dm2=40.0, empty_fraction=0.0, seed=4))
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(build_manifest(str(archive), experiment_config=str(
        archive / "experiment.yaml")).table, manifest)
    gt = pq.read_table(archive / "ground_truth.parquet").to_pandas()
    info, train_files = demo.train_demo_forest(archive, gt, tmp_path / "m")
    assert train_files and set(gt.loc[gt["file_name"].isin(train_files), "window"]) == set(
        demo.DEMO_FOREST_WINDOWS)
    lake_uri = str(tmp_path / "lake")
    run(manifest, lake_uri,
        InferConfig(producers=("mask", "forest"), forest={"model": info["model"]}),
        progress=False)
    out = io.StringIO()
    report = demo.summarize(lake_uri, gt, console=Console(file=out, width=200),
                            exclude={"forest": set(train_files)})
    assert report["forest"]["images"] == len(gt) - len(train_files)
    assert report["forest"]["left_out_images"] == len(train_files)
    assert report["forest"]["model_version"] == info["version"]
    assert 0.0 <= report["forest"]["mask_dice"] <= 1.0
    assert report["mask"]["images"] == len(gt)
    assert "training images are left out" in out.getvalue()
