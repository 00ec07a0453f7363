"""RootQuant task on the shared loop: phases, validation metrics, a short Ray Train fit."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from rootflow.models import rootquant as rq
from rootflow.training import rootquant_task as rqt
from rootflow.training.labels import LabelColumns
from rootflow.training.loop import LoopContext, TrainRunConfig
from tests.training._rootquant_helpers import write_label_set

TINY = rq.RootQuantConfig(backbone="resnet10t", tile_px=32, mm_per_px=0.5, head_hidden=32)


@pytest.fixture(scope="module")
def label_csv(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("rq-data")
    return str(write_label_set(folder, 16, height=64, width=96, dpi=100.0))


def _config(label_csv: str, **optim) -> rqt.RootQuantTrainConfig:
    return rqt.RootQuantTrainConfig(
        model=TINY,
        data=rqt.RootQuantDataConfig(uri=label_csv, columns=LabelColumns(image="file"),
                                     val_fraction=0.25),
        optim=rqt.RootQuantOptimConfig(batch_images=4, lr=1e-3, **optim))


def _ctx(epochs: int) -> LoopContext:
    return LoopContext(world_rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                       run=TrainRunConfig(epochs=epochs))


def test_head_only_then_all_phases(label_csv) -> None:
    torch.manual_seed(0)
    task = rqt.RootQuantTask(_config(label_csv, head_only_epochs=1, backbone_lr=1e-4))
    task.setup(_ctx(epochs=2))
    assert task.train_labels.num_rows == 12 and task.val_labels.num_rows == 4
    bb0 = {k: v.clone() for k, v in task.net.backbone.state_dict().items()}
    head0 = task.net.head.mix.weight.clone()
    m0 = task.train_epoch(0)
    assert m0["backbone_trainable"] == 0.0 and np.isfinite(m0["loss"])
    for k, v in task.net.backbone.state_dict().items():  # weights and BN statistics frozen
        assert torch.equal(v, bb0[k]), k
    assert not torch.equal(task.net.head.mix.weight, head0)
    m1 = task.train_epoch(1)
    assert m1["backbone_trainable"] == 1.0
    assert not torch.equal(task.net.backbone.conv1[0].weight, bb0["conv1.0.weight"])
    assert task.optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # backbone, 1st epoch
    v = task.validate(1)
    assert v["n_images"] == 4 and {"length_r2", "length_mae_mm", "area_bias_mm2",
                                   "presence_accuracy", "loss"} <= set(v)


def test_state_round_trip_and_export(tmp_path, label_csv) -> None:
    torch.manual_seed(0)
    task = rqt.RootQuantTask(_config(label_csv))
    task.setup(_ctx(epochs=1))
    task.train_epoch(0)
    state = task.state_dict()
    other = rqt.RootQuantTask(_config(label_csv))
    other.setup(_ctx(epochs=1))
    other.load_state_dict(state)
    for k, v in task.net.state_dict().items():
        assert torch.equal(v, other.net.state_dict()[k]), k
    other.ctx.best = {"val_loss": 1.0}
    uri = other.export(str(tmp_path / "rq.pt"))
    back = rq.load(uri)
    assert back.config == task.net.config and back.meta["n_train_images"] == 12
    assert back.meta["train_config"]["data"]["columns"]["image"] == "file"


def test_kfold_split_and_limit(label_csv) -> None:
    table = rqt.load_labels(rqt.RootQuantDataConfig(uri=label_csv,
                                                    columns=LabelColumns(image="file")))
    seen: list[str] = []
    for k in range(4):
        data = rqt.RootQuantDataConfig(uri=label_csv, folds=4, fold=k, limit=5)
        train, val = rqt.split_labels(table, data)
        assert val.num_rows == 4 and train.num_rows == 5
        assert not set(val["image_uri"].to_pylist()) & set(train["image_uri"].to_pylist())
        seen += val["image_uri"].to_pylist()
    assert sorted(seen) == sorted(table["image_uri"].to_pylist())


def test_epoch_lr_schedules() -> None:
    assert rqt.epoch_lr(1.0, 0, epochs=10, schedule="cosine") == pytest.approx(1.0)
    assert rqt.epoch_lr(1.0, 10, epochs=10, schedule="cosine") == pytest.approx(0.01)
    assert rqt.epoch_lr(1.0, 3, epochs=10, schedule="constant") == 1.0
    assert rqt.epoch_lr(1.0, 0, epochs=10, schedule="cosine", warmup_epochs=1) == 0.5


@pytest.mark.ray
@pytest.mark.slow
def test_fit_on_ray_train_exports(ray_local, tmp_path, label_csv) -> None:
    run = TrainRunConfig(name="rq-fit", storage_path=str(tmp_path / "runs"), epochs=2,
                         num_workers=1, cpus_per_worker=1, metric="val_loss", mode="min")
    cfg = dataclasses.replace(_config(label_csv), run=run)
    res = rqt.train(cfg)
    assert res.epochs_run == 2 and len(res.history) == 2
    assert {"train_loss", "val_length_r2", "val_presence_accuracy"} <= set(res.history[-1])
    model = rq.load(res.export_uri)
    assert model.config.tile_px == 32 and model.meta["best"]["epoch"] == res.best_epoch
    record = json.loads((tmp_path / "runs" / "rq-fit" / "export.json").read_text())
    assert record["export_uri"] == res.export_uri


def test_cli_resolves_config_from_flags_and_sets() -> None:
    from typer.testing import CliRunner

    from rootflow.cli import app

    res = CliRunner().invoke(app, ["train", "rootquant", "--labels", "s3://b/labels.csv",
                                   "--epochs", "3", "--cpu", "--head-only-epochs", "1",
                                   "--set", "optim.lr=0.01", "--set", "model.backbone=resnet10t",
                                   "--print-config"])
    assert res.exit_code == 0, res.output
    import yaml

    cfg = yaml.safe_load(res.output)
    assert cfg["data"]["uri"] == "s3://b/labels.csv" and cfg["run"]["epochs"] == 3
    assert cfg["run"]["use_gpu"] is False and cfg["optim"]["head_only_epochs"] == 1
    assert cfg["optim"]["lr"] == 0.01 and cfg["model"]["backbone"] == "resnet10t"
    bad = CliRunner().invoke(app, ["train", "rootquant", "--set", "optim.nope=1",
                                   "--print-config"])
    assert bad.exit_code != 0 and "nope" in str(bad.exception)


def _grads(task: rqt.RootQuantTask, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
    task.optimizer.zero_grad(set_to_none=True)
    task._step(*batch)
    return {n: p.grad.clone() for n, p in task.net.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("head", ["dense", "pooled"])
def test_micro_batched_step_is_exact_gradient_accumulation(label_csv, head) -> None:
    """Guards the memory fix from changing what is learnt: a step cut into micro-batches of 3
    tiles (two passes: summaries first, then each micro-batch back-propagates its share of the
    image loss and of the cell loss) must give the same gradients as all tiles at once."""
    torch.manual_seed(0)
    cfg = _config(label_csv)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(TINY, head=head),
                              data=dataclasses.replace(cfg.data, tile_labels=False))
    task = rqt.RootQuantTask(cfg)
    task.setup(_ctx(1))
    task.net.eval()  # BatchNorm on running statistics: passes of any size compute the same
    items = [task.train_set[i] for i in range(4)]
    batch = rqt.collate(items)
    n_tiles = len(batch[0])
    g = task.net.grid
    cell_y = torch.rand(n_tiles, 2, g, g)
    cell_y[: n_tiles // 3] = float("nan")  # some tiles without cell labels
    batch = (*batch[:4], cell_y, batch[5])
    full = _grads(task, batch)
    task.config = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, tile_batch=3))
    assert n_tiles > 3
    micro = _grads(task, batch)
    assert full.keys() == micro.keys() and len(full) > 5
    for k in full:
        torch.testing.assert_close(micro[k], full[k], rtol=1e-4, atol=1e-6, msg=f"{k}: {micro[k]} {full[k]}")


def test_streaming_keeps_no_images_and_defaults_pick_it(label_csv) -> None:
    """Guards "every resampled image kept in memory per worker": with caching off (or a
    training set above ``cache_max_images``, or loader workers) items are read when drawn and
    nothing accumulates; small sets still cache."""
    cfg = _config(label_csv)
    small = rqt.RootQuantTask(cfg)
    small.setup(_ctx(1))
    assert small.train_set.cache
    big = rqt.RootQuantTask(dataclasses.replace(
        cfg, data=dataclasses.replace(cfg.data, cache_max_images=4)))
    big.setup(_ctx(1))
    assert not big.train_set.cache
    for i in range(len(big.train_set)):
        a = big.train_set[i]
        assert np.array_equal(a[0], big.train_set[i][0])  # same item when read again
    assert big.train_set._cache == {} and big.train_set._density == {}
    m = big.train_epoch(0)
    assert m["images_per_s"] > 0 and big.train_set._cache == {}


def test_defaults_rank_by_length_r2_and_cli_head_flag(tmp_path) -> None:
    """Checkpoints must be ranked by validation length R2 (val_loss picked R2 0.84 over 0.90);
    ``--head pooled|dense`` must reach the config, a wrong head and an old-format
    ``--init-from`` checkpoint must end in one error line with exit 2, not a traceback."""
    from typer.testing import CliRunner

    from rootflow.cli import app
    from rootflow.models import checkpoint

    run = rqt.RootQuantTrainConfig().run
    assert (run.metric, run.mode) == ("val_length_r2", "max")
    import yaml

    res = CliRunner().invoke(app, ["train", "rootquant", "--head", "pooled", "--print-config"])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load(res.output)["model"]["head"] == "pooled"
    bad = CliRunner().invoke(app, ["train", "rootquant", "--head", "global"])
    assert bad.exit_code == 2 and "--head must be one of dense, pooled" in bad.output
    assert "Traceback" not in bad.output
    uri = str(tmp_path / "old.pt")
    rq.save(rq.RootQuant(TINY), uri)
    obj = checkpoint.load(uri)
    obj["format"] = "rootflow.rootquant/1"
    checkpoint.save(obj, uri)
    old = CliRunner().invoke(app, ["train", "rootquant", "--labels", "x.csv",
                                   "--init-from", uri])
    assert old.exit_code == 2, old.output
    assert "old format 'rootflow.rootquant/1'" in old.output and "Traceback" not in old.output
