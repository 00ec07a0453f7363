"""The generic Ray Train loop on CPU: reports, keep-best, export, failure recovery, S3, resume."""

from __future__ import annotations

import dataclasses
import functools
import json
import os

import pytest
import ray.cloudpickle

import tests.training._loop_helpers as helpers
from rootflow.io import storage
from rootflow.models import checkpoint as ckpt_io
from rootflow.training.loop import TrainRunConfig, fit

# Ray workers do not have ``tests`` on their path: ship the helper task by value.
ray.cloudpickle.register_pickle_by_value(helpers)

pytestmark = pytest.mark.ray


@pytest.fixture(autouse=True)
def _fast_controller_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    """Train V2's controller polls workers every 2 s, which adds ~2 s to every tiny epoch."""
    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")


def _factory(**kw: object) -> functools.partial[helpers.LineTask]:
    return functools.partial(helpers.LineTask, helpers.LineConfig(**kw))  # type: ignore[arg-type]


def test_run_config_validates() -> None:
    with pytest.raises(ValueError, match="train_"):
        TrainRunConfig(metric="loss")
    with pytest.raises(ValueError, match="mode"):
        TrainRunConfig(mode="best")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_minutes"):
        TrainRunConfig(max_minutes=0)


def test_budget_stop_exports_and_the_same_run_resumes(ray_local: object, tmp_path: object) -> None:
    """Guards: a wall-clock budget stop that is recorded as finished (so a rerun would only
    re-export) or that restarts from scratch instead of continuing at the next epoch."""
    run = TrainRunConfig(name="budget", storage_path=str(tmp_path), epochs=3, metric="val_loss",
                         max_minutes=1e-4)  # over after the first epoch, which always runs
    res = fit(_factory(marker_dir=str(tmp_path)), run=run)
    assert res.stopped_by_budget and not res.complete and not res.stopped_early
    assert [h["epoch"] for h in res.history] == [0] and res.best_epoch == 0
    assert "model" in ckpt_io.load(res.export_uri)
    record = json.loads(storage.read_bytes(storage.join(res.run_uri, "export.json")))
    assert record["stopped_by_budget"] is True

    res2 = fit(_factory(marker_dir=str(tmp_path)), run=dataclasses.replace(run, max_minutes=None))
    assert res2.complete and not res2.stopped_by_budget
    assert [h["epoch"] for h in res2.history] == [0, 1, 2]
    assert res2.history[0] == res.history[0]
    events = (tmp_path / "events-rank0.log").read_text().splitlines()  # type: ignore[operator]
    second = events.index("setup", 1)
    assert events[second:second + 3] == ["setup", "load_state_dict", "train 1"]
    assert events.count("train 0") == 1


@pytest.mark.slow
def test_fit_one_worker_keeps_best_and_exports(ray_local: object, tmp_path: object) -> None:
    run = TrainRunConfig(name="line", storage_path=str(tmp_path), epochs=4, num_workers=1,
                         metric="val_loss", mode="min", num_to_keep=1)
    res = fit(_factory(marker_dir=str(tmp_path)), run=run)

    assert [h["epoch"] for h in res.history] == [0, 1, 2, 3]
    losses = [h["val_loss"] for h in res.history]
    assert losses[-1] < losses[0] * 0.5, losses
    assert res.best_metrics["val_loss"] == min(losses)
    assert res.best_epoch == losses.index(min(losses))
    assert {"train_loss", "train_lr", "val_loss", "epoch_time_s"} <= set(res.history[0])
    # the exported artefact holds the best epoch's weights (loadable through checkpoint.load)
    exported = ckpt_io.load(res.export_uri)
    assert exported["best"]["epoch"] == res.best_epoch
    # keep-best: one best checkpoint (+ the latest, which Ray keeps for resume)
    kept = sorted(d for d in os.listdir(res.run_uri) if d.startswith("epoch_"))
    assert 1 <= len(kept) <= 2 and f"epoch_{res.best_epoch:04d}" in kept
    record = json.loads(storage.read_bytes(storage.join(res.run_uri, "export.json")))
    assert record["run"]["name"] == "line" and record["best_epoch"] == res.best_epoch

    # same storage_path + name again: Train V2 restores the finished run; nothing retrains
    res2 = fit(_factory(marker_dir=str(tmp_path)), run=run)
    assert [h["epoch"] for h in res2.history] == [0, 1, 2, 3]
    events = (tmp_path / "events-rank0.log").read_text().split()  # type: ignore[operator]
    assert events.count("train") == 4 and events.count("load_state_dict") >= 2


@pytest.mark.slow
def test_two_workers_recover_from_injected_failure(ray_local: object, tmp_path: object) -> None:
    """Rank 1 raises at epoch 2 on its first attempt; the group restarts from epoch 1's checkpoint."""
    run = TrainRunConfig(name="ddp", storage_path=str(tmp_path), epochs=4, num_workers=2,
                         max_failures=1, metric="val_loss", num_to_keep=2)
    res = fit(_factory(fail_at_epoch=2, fail_rank=1, marker_dir=str(tmp_path)), run=run)

    assert (tmp_path / "failed-once").exists()  # type: ignore[operator]
    assert [h["epoch"] for h in res.history] == [0, 1, 2, 3]
    assert res.history[-1]["val_loss"] < res.history[0]["val_loss"]
    events = (tmp_path / "events-rank0.log").read_text().splitlines()  # type: ignore[operator]
    assert events.count("setup") == 2  # first attempt + the restart
    restart = events.index("setup", 1)
    assert events[restart + 1] == "load_state_dict"  # resumed, did not start over
    assert events[restart + 2] == "train 2"
    assert ckpt_io.load(res.export_uri)["model"]["weight"].shape == (1, 1)


@pytest.mark.s3
def test_fit_on_s3_storage_with_early_stopping(ray_local: object, s3: object) -> None:
    """Checkpoints and export on the loopback S3 server; lr=0 never improves: patience 1 stops."""
    prefix = s3.fresh_prefix("loop")  # type: ignore[attr-defined]
    run = TrainRunConfig(name="line-s3", storage_path=prefix, epochs=10, num_to_keep=1,
                         early_stopping_patience=1)
    res = fit(_factory(lr=0.0), run=run, storage_options=s3.storage)  # type: ignore[attr-defined]
    assert res.stopped_early and res.epochs_run == 2
    assert res.best_metrics["val_loss"] == res.history[0]["val_loss"]
    assert res.export_uri.startswith("s3://") and res.run_uri == f"{prefix}/line-s3"
    state = ckpt_io.load(res.export_uri, storage_options=s3.storage)  # type: ignore[attr-defined]
    assert "model" in state
    fs = storage.filesystem(prefix, s3.storage)  # type: ignore[attr-defined]
    names = {p.rsplit("/", 1)[-1] for p in fs.ls(storage.strip_protocol(res.run_uri))}
    assert "export.json" in names and any(n.startswith("epoch_") for n in names)
