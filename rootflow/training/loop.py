"""The one training loop of rootflow: a task object driven by Ray Train (``TorchTrainer``).

RootSAM and RootQuant do not each write an epoch loop. They write a *task* (what to train, on
which data, with which loss) and hand a factory for it to :func:`fit`, which runs the same loop
for both under ``ray.train.torch.TorchTrainer`` (Ray 2.60 = Train V2). Stages of a recipe (RootSAM
stage 1 at 512 px, stage 2 at 1024 px) are two :class:`TrainRunConfig`/task configs of this loop,
not two loops. The shape follows Ray's own train benchmark ``runner.py``: setup, train, validate,
report with a checkpoint, resume from ``ray.train.get_checkpoint()``, write only on rank 0.

Task protocol (see :class:`TrainTask`)
--------------------------------------
A task is built on every worker by calling ``task_factory()`` (so the factory must be picklable:
a module-level class or a ``functools.partial`` of one, carrying only configs and URIs). Then:

``setup(ctx)``
    Build model, optimiser, data. Use ``ctx.device``, ``ctx.prepare_model(module)`` (DDP when
    there is more than one worker) and ``ctx.loader(dataset, ...)`` (a ``DataLoader`` whose
    ``DistributedSampler`` gives each worker a disjoint shard; the loop calls ``set_epoch``).
``train_epoch(epoch) -> dict[str, float]``
    One pass over this worker's shard. Returned numbers are averaged over workers by the loop
    and reported with a ``train_`` prefix (``{"loss": x}`` becomes ``train_loss``).
``validate(epoch) -> dict[str, float]``
    Metrics on the held-out shard, reported with a ``val_`` prefix and averaged over workers
    (DistributedSampler pads shards to equal length, so the mean of the per-worker means is
    the mean over images up to that padding; return already all-reduced sums via
    ``ctx.all_reduce`` if you need exact ratios: the mean of equal values is that value).
``on_epoch_end(epoch, metrics)`` (optional)
    Called with the averaged, prefixed metrics, identical on every rank: step
    ``ReduceLROnPlateau`` here so every worker changes its learning rate at the same epoch.
``state_dict() -> dict`` / ``load_state_dict(state)``
    Everything needed to continue (model, optimiser, scheduler). Saved with ``torch.save`` and
    loaded with ``weights_only=True``: tensors, plain containers, str/int/float/bool/None only.
``export(uri) -> str``
    Write the final artefact (e.g. a RootSAM checkpoint) to ``uri`` and return its URI. Called
    once, on rank 0, after the loop has loaded the *best* checkpoint's state into the task.
    ``ctx.history`` and ``ctx.best`` hold the reported metrics for the artefact's metadata.

What the loop guarantees
------------------------
* Checkpoints every epoch under ``<storage_path>/<name>/epoch_NNNN/`` (local or ``s3://``),
  kept best-``num_to_keep`` by ``metric`` (Ray always also keeps the latest, for resume).
* ``FailureConfig(max_failures)``: a worker that dies or raises restarts the whole worker group,
  which resumes from the latest checkpoint. Re-running :func:`fit` with the same
  ``storage_path`` + ``name`` resumes a finished or crashed run the same way (Train V2 restores
  its checkpoint manager from ``checkpoint_manager_snapshot.json`` there); a finished run just
  re-exports.
* Optional early stopping on ``metric`` with ``early_stopping_patience`` epochs.
* Optional wall-clock budget (``max_minutes``, counted from the start of this :func:`fit`
  call): after each epoch's checkpoint, when the slowest epoch of this call would not fit in
  what is left, the loop stops and exports the best checkpoint so far. A budget stop is *not*
  a finished run: the checkpoint says neither "early stopped" nor "last epoch", so calling
  :func:`fit` again with the same ``storage_path`` + ``name`` resumes at the next epoch (a long
  study can run in parts of 10 minutes). Every call runs at least one epoch, so each part makes
  progress even when one epoch is longer than the budget.
* ``<storage_path>/<name>/export.json`` records the export URI, the best epoch and metrics, the
  metric history and the resolved run config (no credentials), and :func:`fit` returns it as a
  :class:`FitResult`.

Why a ``DistributedSampler`` and not a ``ray.data`` shard: training samples are random patches
re-drawn every epoch from a few hundred whole images, so the dataset is small and indexable and
the expensive part is the model, not I/O. A map-style dataset + ``DistributedSampler`` gives
disjoint, reproducible shards (seeded by epoch) with no streaming executor competing for CPUs,
and the same code runs on one CPU worker (gloo) or N GPU workers (nccl). Ray Data shards are the
better tool for large row datasets and remain possible inside a task (``ray.train.get_dataset_shard``
would need ``datasets=`` plumbing we do not need today).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from rootflow import config as rf_config
from rootflow.io import storage

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
EXPORT_RECORD = "export.json"


@dataclasses.dataclass(frozen=True)
class TrainRunConfig:
    """How a training run executes (the *what* lives in the task's own config).

    Attributes:
        name: run name; checkpoints go to ``<storage_path>/<name>``. Re-using a name resumes.
        storage_path: local directory or ``s3://bucket/prefix`` shared by all workers.
        epochs: total epochs (a resumed run continues up to this number).
        num_workers: Ray Train workers (one process each; one GPU each with ``use_gpu``).
        use_gpu: put each worker on a GPU (nccl); CPU workers use gloo.
        cpus_per_worker: logical CPUs reserved per worker (also torch's thread count there).
        max_failures: worker-group restarts allowed (from the latest checkpoint); -1 = unlimited.
        metric: reported metric ranking checkpoints and driving early stopping, e.g.
            ``"val_miou"`` or ``"val_loss"`` (train metrics get ``train_``, val ``val_``).
        mode: ``"max"`` when a larger ``metric`` is better, ``"min"`` otherwise.
        num_to_keep: checkpoints kept (best by ``metric``; the latest is kept too).
        early_stopping_patience: stop after this many epochs without improvement (None = off).
        min_delta: improvement smaller than this does not reset the patience counter.
        export_uri: where ``task.export`` writes the artefact (default
            ``<storage_path>/<name>/export/model.pt``).
        seed: seeds torch/numpy/random identically on every worker before ``setup`` (so
            models initialise identically; DDP also broadcasts rank 0's weights).
        max_minutes: wall-clock budget of one :func:`fit` call in minutes (None = none); see
            the module docstring. Setup, Ray start-up and checkpoint writes count against it.
        precision: ``fp32`` (default) or ``bf16``: tasks run their forward passes inside
            ``ctx.autocast()``, which is bf16 autocast on CUDA workers and a no-op elsewhere
            (CPU runs stay fp32, so results do not depend on the host's bf16 support).
        grad_clip_norm: clip the global gradient norm to this before each optimiser step
            (tasks call ``ctx.clip_gradients(params)``); None = no clipping.
    """

    name: str = "rootflow-train"
    storage_path: str = "runs"
    epochs: int = 10
    num_workers: int = 1
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    max_failures: int = 1
    metric: str = "val_loss"
    mode: Literal["min", "max"] = "min"
    num_to_keep: int = 2
    early_stopping_patience: int | None = None
    min_delta: float = 0.0
    export_uri: str | None = None
    seed: int = 0
    max_minutes: float | None = None
    precision: Literal["fp32", "bf16"] = "fp32"
    grad_clip_norm: float | None = None

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "bf16"):
            raise ValueError(f"precision must be 'fp32' or 'bf16', got {self.precision!r}")
        if self.grad_clip_norm is not None and not self.grad_clip_norm > 0:
            raise ValueError(f"grad_clip_norm must be > 0 (or None), got {self.grad_clip_norm}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError(f"max_minutes must be > 0 (or None), got {self.max_minutes}")
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {self.mode!r}")
        if self.epochs < 1 or self.num_workers < 1 or self.num_to_keep < 1:
            raise ValueError("epochs, num_workers and num_to_keep must be >= 1")
        if not (self.metric.startswith("train_") or self.metric.startswith("val_")):
            raise ValueError(f"metric {self.metric!r} must start with 'train_' or 'val_'")

    @property
    def run_uri(self) -> str:
        """``<storage_path>/<name>`` as a URI (absolute local path or ``s3://``)."""
        return storage.join(storage.normalize(self.storage_path), self.name)

    @property
    def resolved_export_uri(self) -> str:
        return self.export_uri or storage.join(self.run_uri, "export", "model.pt")


@runtime_checkable
class TrainTask(Protocol):
    """What a model brings to the loop (see the module docstring for the contract)."""

    def setup(self, ctx: LoopContext) -> None: ...

    def train_epoch(self, epoch: int) -> Mapping[str, float]: ...

    def validate(self, epoch: int) -> Mapping[str, float]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...

    def export(self, uri: str) -> str: ...


@dataclasses.dataclass
class LoopContext:
    """Per-worker facts and helpers handed to ``task.setup``.

    Attributes:
        world_rank / world_size / local_rank: this worker's place in the group.
        device: ``cuda:<local>`` on GPU workers, ``cpu`` otherwise.
        run: the run config.
        storage_options: plain dict for :mod:`rootflow.io.storage` (read data, write export).
        history: metrics reported so far (one dict per epoch), restored on resume.
        best: the best epoch's metrics so far (None before the first epoch).
    """

    world_rank: int
    world_size: int
    local_rank: int
    device: torch.device
    run: TrainRunConfig
    storage_options: dict[str, Any] | None = None
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)
    best: dict[str, float] | None = None
    _samplers: list[Any] = dataclasses.field(default_factory=list, repr=False)

    @property
    def is_rank0(self) -> bool:
        return self.world_rank == 0

    def prepare_model(self, module: torch.nn.Module, **ddp_kwargs: Any) -> torch.nn.Module:
        """Move to ``device``; wrap in ``DistributedDataParallel`` when ``world_size > 1``.

        Only parameters with ``requires_grad`` take part in the gradient all-reduce, so a frozen
        sub-module costs nothing. DDP expects every trainable parameter to get a gradient in
        each step: pass ``find_unused_parameters=True`` (a ``ddp_kwargs``) when some do not
        (SAM's prompt encoder has box and mask-prompt weights that point prompts never use).
        """
        module = module.to(self.device)
        if self.world_size <= 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        if self.device.type == "cuda":
            ddp_kwargs = {"device_ids": [self.device], "output_device": self.device,
                          **ddp_kwargs}
        return DistributedDataParallel(module, **ddp_kwargs)

    @staticmethod
    def unwrap(module: torch.nn.Module) -> torch.nn.Module:
        """The module inside a DDP wrapper (for ``state_dict`` keys without ``module.``)."""
        return getattr(module, "module", module)

    def loader(self, dataset: Any, *, batch_size: int, shuffle: bool, drop_last: bool = False,
               num_workers: int = 0, collate_fn: Callable[..., Any] | None = None,
               seed: int | None = None) -> Any:
        """A ``DataLoader`` over this worker's shard of ``dataset``.

        A ``DistributedSampler`` splits indices disjointly over workers (padding the last
        shard; on one worker it is just a seeded shuffle); the loop calls its ``set_epoch``
        before each ``train_epoch`` so the shuffle differs per epoch and is the same on every
        rank, and a resumed run replays the same order. ``drop_last`` drops a short last
        *batch*; the sampler itself always pads shards to equal length. Loader processes are not
        persistent, so a dataset attribute set before iterating (``dataset.set_epoch``)
        reaches them.
        """
        from torch.utils.data import DataLoader, DistributedSampler

        # A DistributedSampler even on one worker: its shuffle is seeded by (seed, epoch), so a
        # resumed run replays the order an uninterrupted run would have used.
        sampler: DistributedSampler[Any] = DistributedSampler(
            dataset, num_replicas=self.world_size, rank=self.world_rank, shuffle=shuffle,
            seed=self.run.seed if seed is None else seed, drop_last=False)
        self._samplers.append(sampler)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=num_workers, collate_fn=collate_fn,
                          pin_memory=self.device.type == "cuda")

    def all_reduce(self, values: Mapping[str, float], *,
                   op: Literal["sum", "mean", "max", "min"] = "sum") -> dict[str, float]:
        """Reduce a dict of numbers over all workers (identity on one worker)."""
        keys = sorted(values)
        if self.world_size <= 1 or not keys:
            return {k: float(values[k]) for k in keys}
        import torch
        import torch.distributed as dist

        backend_device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64,
                         device=backend_device)
        reduce_op = {"sum": dist.ReduceOp.SUM, "mean": dist.ReduceOp.SUM,
                     "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op]
        dist.all_reduce(t, op=reduce_op)
        if op == "mean":
            t = t / self.world_size
        return {k: float(v) for k, v in zip(keys, t.cpu().tolist(), strict=True)}

    def autocast(self) -> Any:
        """bf16 autocast on a CUDA worker when ``run.precision == "bf16"``, else a no-op
        context (wrap forward passes and losses; call ``backward`` outside it)."""
        import contextlib

        import torch

        if self.run.precision == "bf16" and self.device.type == "cuda":
            return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def clip_gradients(self, parameters: Any) -> float | None:
        """Clip the global gradient norm to ``run.grad_clip_norm`` (no-op when None); returns
        the norm before clipping, or None when clipping is off."""
        if self.run.grad_clip_norm is None:
            return None
        import torch

        norm = torch.nn.utils.clip_grad_norm_(list(parameters), self.run.grad_clip_norm)
        return float(norm)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def _set_epoch(self, epoch: int) -> None:
        for s in self._samplers:
            s.set_epoch(epoch)


@dataclasses.dataclass(frozen=True)
class FitResult:
    """What :func:`fit` hands back (also stored as ``<run>/export.json``).

    Attributes:
        export_uri: the artefact ``task.export`` wrote (from the best checkpoint).
        best_epoch: epoch whose checkpoint was exported.
        best_metrics: that epoch's reported metrics.
        history: one metrics dict per epoch, in order (survives restarts).
        epochs_run: epochs completed (fewer than ``run.epochs`` after early stopping or a
            budget stop).
        stopped_early: whether early stopping ended the run.
        run_uri: ``<storage_path>/<name>`` where Ray keeps the checkpoints.
        stopped_by_budget: this call stopped at ``run.max_minutes`` with epochs left; calling
            :func:`fit` again with the same run resumes them.
    """

    export_uri: str
    best_epoch: int
    best_metrics: dict[str, float]
    history: list[dict[str, float]]
    epochs_run: int
    stopped_early: bool
    run_uri: str
    stopped_by_budget: bool = False

    @property
    def complete(self) -> bool:
        """All ``run.epochs`` ran, or early stopping ended the run (nothing left to resume)."""
        return self.stopped_early or not self.stopped_by_budget


# -- driver side ---------------------------------------------------------------------------------
def fit(task_factory: Callable[[], TrainTask], *, run: TrainRunConfig,
        storage_options: storage.StorageLike = None) -> FitResult:
    """Train ``task_factory()`` on Ray Train and export the best checkpoint.

    Needs a running Ray (``ray.init`` or a cluster address); Ray Train starts its own controller
    and workers there.

    Args:
        task_factory: picklable zero-argument callable building the task on each worker.
        run: execution settings (workers, storage, checkpoint ranking, failures).
        storage_options: object-storage settings for ``s3://`` storage paths and for the task's
            own reads/writes (never written to the run record).

    Returns:
        The :class:`FitResult` read back from ``<run>/export.json``.

    Raises:
        ray.train.TrainingFailedError: when failures exceed ``run.max_failures``.
    """
    import ray.train
    from ray.train.torch import TorchTrainer

    # An absolute wall-clock deadline: the same for every worker and for a worker group that
    # restarts after a failure within this call.
    deadline = time.time() + 60.0 * run.max_minutes if run.max_minutes else None
    opts = _worker_storage_options(run.storage_path, storage_options)
    storage_path, filesystem = _ray_storage(run.storage_path, opts)
    resources: dict[str, float] = {"CPU": run.cpus_per_worker}
    if run.use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _train_fn,
        train_loop_config={"factory": task_factory, "run": run, "storage_options": opts,
                           "deadline": deadline},
        scaling_config=ray.train.ScalingConfig(num_workers=run.num_workers, use_gpu=run.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=run.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            failure_config=ray.train.FailureConfig(max_failures=run.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=run.num_to_keep,
                checkpoint_score_attribute=run.metric,
                checkpoint_score_order=run.mode,
            ),
        ),
    )
    trainer.fit()
    record = json.loads(storage.read_bytes(storage.join(run.run_uri, EXPORT_RECORD), opts))
    return FitResult(
        export_uri=record["export_uri"], best_epoch=int(record["best_epoch"]),
        best_metrics=record["best_metrics"], history=record["history"],
        epochs_run=int(record["epochs_run"]), stopped_early=bool(record["stopped_early"]),
        run_uri=run.run_uri, stopped_by_budget=bool(record.get("stopped_by_budget", False)),
    )


def _worker_storage_options(uri: str, opts: storage.StorageLike) -> dict[str, Any] | None:
    """Picklable storage settings for workers: a plain dict, or None (local, environment)."""
    if opts is None and not storage.is_remote(uri):
        return None
    return storage.StorageOptions.from_mapping(opts).to_dict()


def _ray_storage(storage_path: str, opts: dict[str, Any] | None) -> tuple[str, Any]:
    """``(storage_path, storage_filesystem)`` for ``RunConfig``.

    For ``s3://`` we hand Ray a pyarrow ``S3FileSystem`` built from our own settings (custom
    endpoint, path-style, plain HTTP for loopback servers) and the path without its scheme, as
    ``RunConfig`` requires when a filesystem is given.
    """
    if storage.protocol(storage_path) in ("s3", "s3a"):
        fs = storage.StorageOptions.from_mapping(opts).pyarrow()
        return storage.strip_protocol(storage_path).rstrip("/"), fs
    if storage.is_remote(storage_path):
        return storage_path, None  # gs:// etc.: pyarrow resolves it from the environment
    path = storage.normalize(storage_path)
    os.makedirs(path, exist_ok=True)
    return path, None


# -- worker side ---------------------------------------------------------------------------------
def _train_fn(config: dict[str, Any]) -> None:
    """Ray Train worker entry: build the task, resume, loop epochs, report, export on rank 0."""
    import numpy as np
    import ray.train
    import torch

    from rootflow.models import checkpoint as ckpt_io

    run: TrainRunConfig = config["run"]
    opts: dict[str, Any] | None = config["storage_options"]
    tctx = ray.train.get_context()
    world_rank, world_size = tctx.get_world_rank(), tctx.get_world_size()
    local_rank = tctx.get_local_rank()
    if run.use_gpu and torch.cuda.is_available():
        device = torch.device("cuda", local_rank % max(1, torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(max(1, int(run.cpus_per_worker)))

    random.seed(run.seed)
    np.random.seed(run.seed % (2**32))
    torch.manual_seed(run.seed)

    ctx = LoopContext(world_rank=world_rank, world_size=world_size, local_rank=local_rank,
                      device=device, run=run, storage_options=opts)
    task = config["factory"]()
    task.setup(ctx)

    start_epoch, since_best, stopped_early = 0, 0, False
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as d:
            state = ckpt_io.load(os.path.join(d, STATE_FILE))
        task.load_state_dict(state["task"])
        loop = state["loop"]
        start_epoch = int(loop["epoch"]) + 1
        since_best = int(loop["since_best"])
        stopped_early = bool(loop["stopped_early"])
        ctx.history = list(loop["history"])
        ctx.best = loop["best"]
        log.info("rank %d resumed from epoch %d", world_rank, start_epoch - 1)

    deadline: float | None = config.get("deadline")
    slowest_epoch_s, stopped_by_budget = 0.0, False
    epoch = start_epoch - 1
    for epoch in range(start_epoch, run.epochs):
        if stopped_early:
            break
        ctx._set_epoch(epoch)
        t_epoch = time.perf_counter()
        t0 = time.perf_counter()
        train_metrics = dict(task.train_epoch(epoch))
        train_time = time.perf_counter() - t0
        val_metrics = dict(task.validate(epoch))
        metrics = {"epoch": float(epoch)}
        metrics.update({f"train_{k}": float(v) for k, v in train_metrics.items()})
        metrics.update({f"val_{k}": float(v) for k, v in val_metrics.items()})
        metrics["epoch_time_s"] = train_time
        metrics = ctx.all_reduce(metrics, op="mean")
        metrics["epoch"] = float(epoch)
        if run.metric not in metrics:
            raise KeyError(f"run.metric {run.metric!r} is not among the reported metrics "
                           f"{sorted(metrics)}")
        hook = getattr(task, "on_epoch_end", None)
        if hook is not None:
            hook(epoch, metrics)

        if _improved(metrics[run.metric], ctx.best, run):
            ctx.best, since_best = dict(metrics), 0
        else:
            since_best += 1
        ctx.history.append(dict(metrics))
        if run.early_stopping_patience is not None and since_best >= run.early_stopping_patience:
            stopped_early = True

        loop_state = {"epoch": epoch, "since_best": since_best, "stopped_early": stopped_early,
                      "history": ctx.history, "best": ctx.best}
        with tempfile.TemporaryDirectory(prefix="rf-ckpt-") as tmp:
            checkpoint = None
            if ctx.is_rank0:
                ckpt_io.save({"task": task.state_dict(), "loop": loop_state},
                             os.path.join(tmp, STATE_FILE))
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint,
                             checkpoint_dir_name=f"epoch_{epoch:04d}")
        if stopped_early:
            log.info("early stopping after epoch %d (%s has not improved for %d epochs)",
                     epoch, run.metric, since_best)
            break
        slowest_epoch_s = max(slowest_epoch_s, time.perf_counter() - t_epoch)
        if deadline is not None and epoch + 1 < run.epochs:
            # every rank must take the same decision: stop when any of them is out of time
            late = float(time.time() + slowest_epoch_s > deadline)
            if ctx.all_reduce({"late": late}, op="max")["late"] > 0:
                stopped_by_budget = True
                log.info("wall-clock budget of %.1f min: stopping after epoch %d (an epoch "
                         "takes up to %.0f s); run again to resume at epoch %d",
                         run.max_minutes or 0.0, epoch, slowest_epoch_s, epoch + 1)
                break

    if ctx.is_rank0:
        _export_best(task, ctx, stopped_early=stopped_early, stopped_by_budget=stopped_by_budget)
    ctx.barrier()


def _improved(value: float, best: Mapping[str, float] | None, run: TrainRunConfig) -> bool:
    if math.isnan(value):
        return False
    if best is None:
        return True
    ref = best[run.metric]
    return value > ref + run.min_delta if run.mode == "max" else value < ref - run.min_delta


def _export_best(task: Any, ctx: LoopContext, *, stopped_early: bool,
                 stopped_by_budget: bool = False) -> None:
    """Load the best epoch's checkpoint into ``task``, export it and write the run record."""
    import ray.train

    from rootflow.models import checkpoint as ckpt_io

    run = ctx.run
    if ctx.best is None:
        raise RuntimeError(f"no epoch produced a finite {run.metric!r}; nothing to export")
    # Export the best checkpoint Ray kept (ranked by the same metric); ties go to the earliest
    # epoch. Ray breaks ties by recency when pruning, so on a plateau this may be a later epoch
    # than the loop's own ``best`` (which only moves on a strict improvement).
    reported = [r for r in ray.train.get_all_reported_checkpoints()
                if not math.isnan(float(r.metrics.get(run.metric, math.nan)))]
    if not reported:
        raise RuntimeError(f"no kept checkpoint has a finite {run.metric!r}; nothing to export")
    sign = -1.0 if run.mode == "max" else 1.0
    chosen = min(reported, key=lambda r: (sign * float(r.metrics[run.metric]),
                                          float(r.metrics["epoch"])))
    best_metrics = {k: float(v) for k, v in chosen.metrics.items()
                    if isinstance(v, int | float)}
    best_epoch = int(best_metrics["epoch"])
    with chosen.checkpoint.as_directory() as d:
        state = ckpt_io.load(os.path.join(d, STATE_FILE))
    ctx.best = best_metrics
    task.load_state_dict(state["task"])
    export_uri = task.export(run.resolved_export_uri)
    record = {
        "export_uri": export_uri,
        "best_epoch": best_epoch,
        "best_metrics": best_metrics,
        "history": ctx.history,
        "epochs_run": len(ctx.history),
        "stopped_early": stopped_early,
        "stopped_by_budget": stopped_by_budget,
        "run": rf_config.to_dict(run),
    }
    storage.write_bytes(storage.join(run.run_uri, EXPORT_RECORD),
                        json.dumps(record, indent=2).encode(), ctx.storage_options)
