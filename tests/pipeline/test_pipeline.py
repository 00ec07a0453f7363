"""The processing job in-process on the shared local Ray: accounting, idempotence, resume."""

from __future__ import annotations

import dataclasses

import polars as pl
import pytest

from rootflow.inference.pipeline import InferConfig, Resources, run
from rootflow.lake import Lake, query
from tests.pipeline._helpers import accounting as _accounting
from tests.pipeline._helpers import small_archive

pytestmark = pytest.mark.ray


def test_mask_traits_end_to_end_with_bad_rows(ray_local, tmp_path) -> None:
    arch = small_archive(str(tmp_path), n_images=6)
    lake_uri = str(tmp_path / "lake")
    cfg = InferConfig(producers=("mask",), commit_every=4)
    s = run(arch.manifest_uri, lake_uri, cfg, progress=False)
    assert s.n_images == arch.n_rows
    assert s.n_images_rejected == len(arch.bad_ids)
    assert s.status == "ok_with_rejects"
    assert s.commits >= 2  # batched, but more than one commit with commit_every=4
    lake = Lake(lake_uri)
    _accounting(lake, s.run_id, ("mask",), arch)
    rejects = lake.read("rejects").to_pylist()
    got = {r["image_id"]: r["stage"] for r in rejects}
    assert got == arch.bad_ids
    assert all(r["reason"] for r in rejects)
    traits = lake.read("traits").to_pandas()
    assert (traits["length_mm"] >= 0).all()
    assert traits["model_version"].nunique() == 1
    runs = lake.read("runs").to_pylist()
    assert [r["status"] for r in runs] == ["ok_with_rejects"]
    # Analyst reads filter string columns of files written by MERGE (string_view in Parquet).
    n_ok = arch.n_rows - len(arch.bad_ids)
    latest = lake.traits(engine="pandas", filters=[("model_name", "=", "mask")])
    assert len(latest) == n_ok
    con = query.duckdb_connection(lake_uri)
    assert con.sql("SELECT count(*) FROM traits WHERE model_name = 'mask'").fetchall()[0][0] == n_ok
    lf = query.polars_traits(lake_uri)
    assert lf.filter(pl.col("model_name") == "mask").collect().height == n_ok

    # Re-running the same manifest skips the finished images and adds no rows.
    s2 = run(arch.manifest_uri, lake_uri, cfg, progress=False)
    assert s2.n_skipped == arch.n_rows - len(arch.bad_ids)
    assert s2.n_images == len(arch.bad_ids)  # only the rejected ones are tried again
    assert lake.read("traits").num_rows == traits.shape[0]

    # Forcing a full re-run still leaves exactly one row per image and version (MERGE).
    s3 = run(arch.manifest_uri, lake_uri, dataclasses.replace(cfg, skip_done=False),
             progress=False)
    assert s3.n_images == arch.n_rows
    _accounting(lake, s3.run_id, ("mask",), arch)
    assert lake.read("traits").num_rows == traits.shape[0]


def test_models_fused_and_separate_give_same_rows(ray_local, tmp_path) -> None:
    """RootSAM + RootQuant (tiny, random) in one actor or in two pools: same accounting."""
    arch = small_archive(str(tmp_path), n_images=3)
    producers = ("mask", "rootsam", "rootquant")
    base = InferConfig(producers=producers, rootsam={"variant": "test"},
                       rootquant={"backbone": "resnet10t"}, commit_every=100)
    for fuse in (True, False):
        lake_uri = str(tmp_path / f"lake-{fuse}")
        cfg = dataclasses.replace(base, resources=Resources(fuse_models=fuse))
        s = run(arch.manifest_uri, lake_uri, cfg, progress=False)
        lake = Lake(lake_uri)
        _accounting(lake, s.run_id, producers, arch)
        traits = lake.read("traits").to_pandas()
        rs = traits[traits["model_name"] == "rootsam"]
        assert rs["mask_uri"].notna().all() and rs["confidence"].between(0, 1).all()
        rq = traits[traits["model_name"] == "rootquant"]
        assert rq["rootquant_length_mm"].notna().all()
        assert s.stage_s.get("rootsam", 0) > 0 and s.stage_s.get("rootquant", 0) > 0


@pytest.mark.s3
def test_end_to_end_on_s3(ray_local, s3) -> None:
    """Archive, manifest, masks and Delta tables all on the loopback S3 server."""
    prefix = s3.fresh_prefix("pipeline")
    so = s3.storage.to_dict()
    arch = small_archive(prefix, n_images=3, storage_options=so)
    lake_uri = prefix + "/lake"
    s = run(arch.manifest_uri, lake_uri, InferConfig(producers=("mask",)), storage_options=so,
            progress=False)
    assert s.n_images_ok == 3 and s.n_images_rejected == len(arch.bad_ids)
    lake = Lake(lake_uri, storage_options=so)
    _accounting(lake, s.run_id, ("mask",), arch)
    runs = lake.read("runs").to_pylist()
    assert "testing" not in str(runs)  # credentials never land in tables
