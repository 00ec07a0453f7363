"""The processing job in-process on the shared local Ray: accounting, idempotence, resume."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

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
    # Guards against the post-run compaction being dropped from the job (small files pile up,
    # one per commit and partition): the run ends with an OPTIMIZE commit and one file per
    # traits partition, although it committed several times.
    dt = lake.delta_table("traits")
    assert "OPTIMIZE" in {h.get("operation") for h in dt.history()}
    per_dir: dict[str, int] = {}
    for f in dt.file_uris():
        per_dir[str(Path(f).parent)] = per_dir.get(str(Path(f).parent), 0) + 1
    assert max(per_dir.values()) == 1, per_dir
    # Analyst reads filter string columns of files written by MERGE (string_view in Parquet).
    n_ok = arch.n_rows - len(arch.bad_ids)
    latest = query.traits(lake, engine="pandas", filters=[("model_name", "=", "mask")])
    assert len(latest) == n_ok
    con = query.duckdb_connection(lake_uri)
    assert con.sql("SELECT count(*) FROM traits WHERE model_name = 'mask'").fetchall()[0][0] == n_ok
    lf = query.polars_traits(lake_uri)
    assert lf.filter(pl.col("model_name") == "mask").collect().height == n_ok

    # Re-running the same manifest skips the finished images, and does not retry the
    # permanently rejected ones (same files, same version): no new rows of either kind.
    n_rejects = lake.read("rejects").num_rows
    s2 = run(arch.manifest_uri, lake_uri, cfg, progress=False)
    assert s2.n_skipped == arch.n_rows and s2.n_images == 0 and s2.exit_code == 0
    assert s2.n_reject_skipped == len(arch.bad_ids)
    assert lake.read("traits").num_rows == traits.shape[0]
    assert lake.read("rejects").num_rows == n_rejects
    # A new reason retries them: a file that changed (the missing one appears) ...
    good = next(r for r in lake.read("traits").to_pylist())
    missing = next(r for r in lake.read("rejects").to_pylist() if r["image_id"] == "missing-0001")
    Path(missing["image_uri"]).write_bytes(Path(good["image_uri"]).read_bytes())
    s_changed = run(arch.manifest_uri, lake_uri, cfg, progress=False)
    assert s_changed.n_images == 1 and s_changed.n_reject_skipped == len(arch.bad_ids) - 1
    # (it is read and decoded now; its manifest row has no mask, a reject that is retried)
    # ... or asking for it.
    s_retry = run(arch.manifest_uri, lake_uri, dataclasses.replace(cfg, retry_rejects=True),
                  progress=False)
    assert s_retry.n_images == len(arch.bad_ids) and s_retry.n_reject_skipped == 0
    assert s_retry.exit_code == 3

    # Forcing a full re-run still leaves exactly one row per image and version (MERGE).
    s3 = run(arch.manifest_uri, lake_uri, dataclasses.replace(cfg, skip_done=False),
             progress=False)
    assert s3.n_images == arch.n_rows
    _accounting(lake, s3.run_id, ("mask",), arch)
    assert lake.read("traits").num_rows == traits.shape[0]


def test_models_fused_and_separate_give_same_rows(ray_local, tmp_path) -> None:
    """RootSAM + RootQuant (tiny, random) in one actor or in two pools: same accounting and
    the same outputs. Guards against fused mode handing a stage the wrong image or another
    stage's output (rows would then differ between the modes)."""
    arch = small_archive(str(tmp_path), n_images=3)
    producers = ("mask", "rootsam", "rootquant")
    base = InferConfig(producers=producers, rootsam={"variant": "test"},
                       rootquant={"backbone": "resnet10t"}, commit_every=100)
    outputs = {}
    compared = ["image_id", "model_name", "model_version", "length_mm", "confidence",
                "rootquant_length_mm", "rootquant_area_mm2"]
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
        outputs[fuse] = (traits[compared].sort_values(["image_id", "model_name"])
                         .reset_index(drop=True))
    import pandas as pd

    assert len(outputs[True]) == len(outputs[False]) > 0
    pd.testing.assert_frame_equal(outputs[True], outputs[False], check_exact=False, rtol=1e-5)


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


def test_model_versions_hash_every_output_changing_setting() -> None:
    """Guards against a changed inference setting (prompt mode, threshold, tiling) being
    treated as already done because the version ignored it, and against runtime-only settings
    (device, batch sizes) forcing a needless re-run of the archive."""
    from rootflow.inference.pipeline import resolve_model_versions

    def v(**kw: object) -> dict[str, str]:
        return resolve_model_versions(InferConfig(producers=("rootsam", "rootquant"), **kw))

    base = v(rootsam={"variant": "test"}, rootquant={"backbone": "resnet10t"})
    for changed in ({"rootsam": {"variant": "test", "prompt_mode": "lattice"},
                     "rootquant": {"backbone": "resnet10t"}},
                    {"rootsam": {"variant": "test", "iou_threshold": 0.7},
                     "rootquant": {"backbone": "resnet10t"}},
                    {"rootsam": {"variant": "test", "tile_overlap": 64},
                     "rootquant": {"backbone": "resnet10t"}}):
        other = v(**changed)
        assert other["rootsam"] != base["rootsam"] and other["rootquant"] == base["rootquant"]
        # the weights part (before "~") is the same model
        assert other["rootsam"].split("~")[0] == base["rootsam"].split("~")[0]
    rq = v(rootsam={"variant": "test"}, rootquant={"backbone": "resnet10t",
                                                    "presence_threshold": 0.3})
    assert rq["rootquant"] != base["rootquant"] and rq["rootsam"] == base["rootsam"]
    same = v(rootsam={"variant": "test", "device": "cpu", "point_batch_size": 4,
                      "tile_batch_size": 1},
             rootquant={"backbone": "resnet10t", "device": "cpu", "tile_batch": 2})
    assert same == base


def test_only_producers_without_rows_rerun(ray_local, tmp_path) -> None:
    """Guards against a new producer or a new version of one producer re-running every other
    producer on the whole archive: only (image, producer) pairs without a row for the
    producer's current version run; the others' rows stay those of the run that made them."""
    arch = small_archive(str(tmp_path), n_images=3, bad=False)
    lake_uri = str(tmp_path / "lake")
    lake = Lake(lake_uri)
    s1 = run(arch.manifest_uri, lake_uri, InferConfig(producers=("mask",)), progress=False)
    assert s1.n_images == 3
    cfg = InferConfig(producers=("mask", "rootquant"), rootquant={"backbone": "resnet10t"})
    s2 = run(arch.manifest_uri, lake_uri, cfg, progress=False)
    assert s2.n_images == 3 and s2.n_traits_rows == 3  # rootquant rows only
    s3 = run(arch.manifest_uri, lake_uri,
             dataclasses.replace(cfg, rootquant={"backbone": "resnet10t",
                                                 "presence_threshold": 0.3}), progress=False)
    assert s3.n_traits_rows == 3 and s3.model_versions["rootquant"] != s2.model_versions[
        "rootquant"]
    s4 = run(arch.manifest_uri, lake_uri, cfg, progress=False)
    assert s4.n_images == 0 and s4.n_skipped == 3
    traits = lake.read("traits").to_pylist()
    mask_runs = {r["run_id"] for r in traits if r["model_name"] == "mask"}
    assert mask_runs == {s1.run_id}, "mask rows were redone by a later run"
    rq = [r for r in traits if r["model_name"] == "rootquant"]
    assert len(rq) == 6 and {r["model_version"] for r in rq} == {
        s2.model_versions["rootquant"], s3.model_versions["rootquant"]}
    assert sum(s2.actors.values()) == 3 and sum(s3.actors.values()) == 3


def _rootquant_like(cfg: object, storage_options: object = None):
    """A model stage that regresses a length from each row's image (its mean pixel)."""
    import numpy as np

    def stage(batch: dict) -> dict:
        out = dict(batch)
        out["rootquant_length_mm"] = np.asarray([float(im.mean()) for im in batch["image"]])
        out["rootquant_area_mm2"] = out["rootquant_length_mm"] * 2
        out["rootquant_presence"] = np.ones(len(batch["image"]))
        out["rootquant_model_version"] = np.asarray(["rq@x"] * len(batch["image"]), object)
        return out

    return stage


def test_model_actor_runs_a_model_only_on_rows_that_need_it() -> None:
    """Guards against a fused actor running a model on images that already have its rows
    (wasted GPU time), or mixing up rows when it runs on a subset: rows not needing the model
    get no output, the others get their own image's output, in order."""
    import numpy as np

    from rootflow.inference import stages

    images = [np.full((4, 4, 3), v, np.uint8) for v in (10, 20, 30, 40)]
    batch = {"image_id": np.asarray(list("abcd"), object),
             "image": stages._objects(images),
             "error": stages._objects([None, None, "decode: bad", None]),
             "todo": stages._objects(["mask,rootquant", "mask", "rootquant", "rootquant"])}
    actor = stages.ModelActor([("rootquant", _rootquant_like, None)],
                              producers=("mask", "rootquant"))
    out = actor(dict(batch))
    got = out["rootquant_length_mm"]
    assert got[0] == 10.0 and np.isnan(got[1]) and got[3] == 40.0
    assert list(out["error"]) == ["", "", "decode: bad", ""]
    assert out["t_rootquant"][1] == 0.0 and out["t_rootquant"][0] > 0
    recs = stages.to_records(out, producers=("rootquant",), run_id="r",
                             model_versions={"rootquant": "rq@x~abc"})
    kinds = [(pickle.loads(r)["image_id"], pickle.loads(r)["model_name"], k)
             for k, r in zip(recs["kind"], recs["record"], strict=True)]
    assert ("b", "rootquant", "traits") not in kinds and ("a", "rootquant", "traits") in kinds
    assert ("c", "rootquant", "reject") in kinds and len(kinds) == 3


def test_default_pool_starts_with_every_free_gpu_and_can_grow_to_all() -> None:
    """Guards against the default pool starting at one actor on a cluster whose GPUs are
    already there (Ray Data grows a pool only while every actor holds two batches and by the
    backlog it sees then, so GPUs could stay idle all run), and against it not reaching the
    GPUs that worker groups add later (scale from zero starts at 1, can grow to the max)."""
    from rootflow.inference.pipeline import resolve_resources

    r = resolve_resources(Resources(), gpus=4.0, free=4.0)
    assert (r.model_num_gpus, r.model_actors, r.initial_actors) == (1.0, (1, 4), 4)
    # Another job holds one GPU: start with the 3 free, still allowed to grow to 4.
    r = resolve_resources(Resources(), gpus=4.0, free=3.0)
    assert (r.model_actors, r.initial_actors) == ((1, 4), 3)
    # GPU groups that scale from zero to 16: nothing free yet, start at 1, grow to 16.
    r = resolve_resources(Resources(), gpus=16.0, free=0.0)
    assert (r.model_actors, r.initial_actors) == ((1, 16), 1)
    # Half a GPU per actor: two actors per free GPU; bounds given by the user win.
    r = resolve_resources(Resources(model_num_gpus=0.5), gpus=2.0, free=2.0)
    assert (r.model_actors, r.initial_actors) == ((1, 4), 4)
    r = resolve_resources(Resources(model_actors=(2, 3)), gpus=8.0, free=8.0)
    assert (r.model_actors, r.initial_actors) == ((2, 3), 3)
    # No GPUs: one CPU actor.
    r = resolve_resources(Resources(), gpus=0.0, free=0.0)
    assert (r.model_num_gpus, r.model_actors, r.initial_actors) == (0.0, (1, 1), 1)
