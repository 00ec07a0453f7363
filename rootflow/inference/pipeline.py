"""The processing job: manifest -> Ray Data -> masks on object storage + rows in Delta tables.

The whole chain reads top to bottom in :func:`build_dataset`::

    manifest rows -> read bytes (threads, retries) -> decode/validate
      -> model actors (forest, U-Net, RootSAM, RootQuant; separate pools or fused on one GPU)
      -> traits (CPU) -> output records
    driver: stream records, commit traits/rejects to Delta in a few large MERGEs

Guarantees:
* every manifest row ends, per producer, as exactly one ``traits`` row or one ``rejects`` row
  (stages never raise on a bad row; see :mod:`rootflow.inference.stages`);
* idempotent: rows are MERGEd on ``(image_id, model_name, model_version)`` and masks are written
  to deterministic URIs, so a re-run never duplicates; images that already have rows for every
  requested producer/version are skipped, so a killed job resumes where it stopped;
* overlapping runs over the same scope do not duplicate work: a run takes a lease in the
  ``runs`` table (heartbeated) and a second run on the same scope waits for it or exits;
* memory stays bounded: Ray Data streams with backpressure and the driver commits every
  ``commit_every`` rows instead of collecting the archive.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import pickle
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rootflow import __version__
from rootflow import config as cfglib
from rootflow.inference import stages
from rootflow.io.storage import StorageLike, StorageOptions

log = logging.getLogger(__name__)

#: ``mask`` = traits of the manifest's given masks; ``forest``/``unet``/``rootsam`` = traits of
#: the mask each model makes; ``rootquant`` = length and area regressed from the image.
PRODUCERS = ("mask", "forest", "unet", "rootsam", "rootquant")


@dataclasses.dataclass(frozen=True)
class Resources:
    """Ray resources per stage. Defaults suit any cluster: see :func:`resolve_resources`.

    Attributes:
        block_rows: manifest rows per Ray block (the unit of scheduling and retry).
        read_threads: concurrent object-storage reads inside one read task.
        read_num_cpus / decode_num_cpus / traits_num_cpus: CPU slots per task of each stage.
        model_actors: (min, max) actors per model pool; Ray Data autoscales between them.
            ``max = 0`` means "as many as the cluster's GPUs allow" (``cluster GPUs //
            model_num_gpus``; 1 on a cluster without GPUs), so adding GPU nodes adds actors.
        initial_actors: actors the pool starts with (within min..max); 0 = as many as the
            GPUs free when the run starts allow. Ray Data grows a pool only when every actor
            already holds ``max_in_flight_per_actor`` batches and by the backlog it sees then,
            so a pool started at 1 may never reach GPUs that were idle from the start; the
            pool still grows to ``max`` when GPU nodes join (docs/pipeline.md).
        model_batch_size: images per model call.
        model_num_gpus: GPUs per model actor (a fraction shares a GPU between actors);
            None = 1 when the cluster has or can scale to GPUs, else 0 (CPU).
        model_num_cpus: CPUs per model actor.
        fuse_models: run all model stages in the same actor (one GPU, no hand-off).
        max_in_flight_per_actor: batches queued per actor (keeps the GPU fed).
        manifest_block_rows / min_blocks: the planned manifest rows enter Ray Data as blocks
            of up to ``manifest_block_rows`` rows (at least ``min_blocks`` blocks when there
            are enough rows); stages then work in batches of ``block_rows``. A block is also
            the unit an actor takes: blocks must outnumber the actors' in-flight slots by far,
            or the first actors take all the work and a growing pool has nothing to do
            (100k images: ~1.6k blocks of 64 rows instead of 25k blocks of 4).
        decode_in_actor: compressed bytes travel to the model actor, which decodes them and
            drops the pixels after its last model (False: the former layout, a CPU decode task
            before the actor and pixels carried to the end of the chain; kept to measure the
            difference, ``benchmarks/pipeline_scale.py``).
        actor_memory_mb: memory (MB) each model actor may take for its work (decoding and
            running the models on a batch) beyond what it holds once its models are loaded,
            enforced in the actor's process with ``RLIMIT_DATA``
            (:func:`rootflow.inference.stages.limit_memory`). An image that needs more is
            rejected ``"<stage>: out of memory: ..."`` and the actor goes on with the others;
            without it, such an image takes the node's memory until the OS kills the actor
            (or a neighbour). None (default): no cap. Linux only; decoding is covered only
            with ``decode_in_actor`` (the default).
    """

    block_rows: int = 4
    read_threads: int = 8
    read_num_cpus: float = 0.25
    decode_num_cpus: float = 1.0
    traits_num_cpus: float = 1.0
    model_actors: tuple[int, int] = (1, 0)
    initial_actors: int = 0
    model_batch_size: int = 2
    model_num_gpus: float | None = None
    model_num_cpus: float = 1.0
    fuse_models: bool = True
    max_in_flight_per_actor: int = 2
    manifest_block_rows: int = 64
    min_blocks: int = 64
    decode_in_actor: bool = True
    actor_memory_mb: int | None = None

    def __post_init__(self) -> None:
        lo, hi = self.model_actors
        if lo < 1 or hi < 0 or (hi and hi < lo):
            raise ValueError(f"model_actors must be (min >= 1, max >= min or 0 = auto), got "
                             f"{tuple(self.model_actors)}")
        if self.model_num_gpus is not None and self.model_num_gpus < 0:
            raise ValueError(f"model_num_gpus must be >= 0, got {self.model_num_gpus}")
        if self.actor_memory_mb is not None and self.actor_memory_mb <= 0:
            raise ValueError(f"actor_memory_mb must be > 0 (or unset), got {self.actor_memory_mb}")
        if self.initial_actors < 0:
            raise ValueError(f"initial_actors must be >= 0, got {self.initial_actors}")

    @classmethod
    def gpu(cls, gpus_per_actor: float = 1.0, actors: tuple[int, int] = (1, 0)) -> Resources:
        """Defaults for GPU nodes: fused actors of ``gpus_per_actor`` GPUs, bigger batches."""
        return cls(block_rows=8, read_threads=16, model_actors=actors, model_batch_size=8,
                   model_num_gpus=gpus_per_actor, model_num_cpus=2.0, fuse_models=True)


def parse_actors(text: str) -> tuple[int, int]:
    """``"MIN:MAX"`` (or ``"N"`` = ``N:N``; ``"MIN:"`` or ``"MIN:0"`` = up to the cluster's
    GPUs) as ``(min, max)``; raises ValueError with the reason."""
    parts = str(text).strip().split(":")
    try:
        if len(parts) == 1:
            lo = hi = int(parts[0])
        elif len(parts) == 2:
            lo, hi = int(parts[0]), int(parts[1] or 0)
        else:
            raise ValueError
    except ValueError:
        raise ValueError(f"--actors must be N or MIN:MAX (integers), got {text!r}") from None
    if lo < 1 or hi < 0 or (hi and hi < lo):
        raise ValueError(f"--actors must have 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def cluster_gpus() -> float:
    """GPUs the connected cluster can reach: the live cluster's, or the maximum its declared
    worker groups can scale to (KubeRay / cluster launcher), whichever is larger."""
    import sys

    import ray

    live = float(ray.cluster_resources().get("GPU", 0.0))
    declared = 0.0
    try:
        from ray._private.state import state

        declared = float((state.get_max_resources_from_cluster_config() or {}).get("GPU", 0))
    except Exception:  # no autoscaler config (a local or fixed cluster)
        declared = 0.0
    if declared >= sys.maxsize:  # an unbounded group: the live count is all we can promise
        declared = 0.0
    return max(live, declared)


def free_gpus() -> float:
    """GPUs of the connected cluster that no one holds right now."""
    import ray

    return float(ray.available_resources().get("GPU", 0.0))


def resolve_resources(res: Resources, gpus: float | None = None,
                      free: float | None = None) -> Resources:
    """Concrete GPUs per actor, pool bounds and start size for the connected cluster (see
    Resources): ``gpus`` the GPUs the cluster can reach (default :func:`cluster_gpus`), ``free``
    those free now (default :func:`free_gpus`, at most ``gpus``)."""
    gpus = cluster_gpus() if gpus is None else gpus
    per = res.model_num_gpus if res.model_num_gpus is not None else (1.0 if gpus > 0 else 0.0)
    lo, hi = res.model_actors
    if hi == 0:
        hi = max(lo, int(gpus // per)) if per > 0 else lo
    start = res.initial_actors
    if start == 0:
        if per > 0:
            free = min(gpus, free_gpus() if free is None else free)
            start = int(free / per + 1e-9)
        else:
            start = lo
    start = min(hi, max(lo, start))
    return dataclasses.replace(res, model_num_gpus=per, model_actors=(lo, hi),
                               initial_actors=start)


@dataclasses.dataclass(frozen=True)
class InferConfig:
    """What one processing run does.

    Attributes:
        producers: any of ``mask`` (traits of the manifest's given masks), ``forest``,
            ``unet``, ``rootsam``, ``rootquant``.
        forest / unet: fields of :class:`rootflow.inference.segment.SegmenterInferenceConfig`
            (``model`` URI, required when the producer is requested; ``sha256``,
            ``num_threads``, ``device``).
        rootsam / rootquant: fields of the models' inference configs (see their modules).
        trait_options: keyword arguments for :func:`rootflow.traits.measure`.
        write_masks: save the models' masks as PNG under ``<lake>/masks/<producer>/...``.
        commit_every: rows buffered by the driver between Delta commits.
        skip_done: skip images that already have rows for every producer/version (resume).
        since / until: only images captured in ``[since, until]`` (ISO dates).
        retry_rejects: re-run images rejected before for the same model version and the same
            file (by default a permanent reject is retried only when its file or the
            producer's version changed).
        lease_scope: None = the whole lake (one processing run per lake at a time); a name
            (e.g. an experiment) lets runs over disjoint archives of one lake work together.
        lease_ttl_s: a run whose heartbeat is older than this is considered dead.
        lease_heartbeat_s: seconds between the heartbeat thread's beats.
        lease_settle_s: pause before deciding who holds the lease (see rootflow.lake.lease);
            None = ``rootflow.lake.lease.SETTLE_S`` (3 s).
        wait_for_lease_s: how long a run waits for an overlapping run before giving up.
    """

    producers: tuple[str, ...] = ("mask",)
    forest: dict[str, Any] = dataclasses.field(default_factory=dict)
    unet: dict[str, Any] = dataclasses.field(default_factory=dict)
    rootsam: dict[str, Any] = dataclasses.field(default_factory=dict)
    rootquant: dict[str, Any] = dataclasses.field(default_factory=dict)
    trait_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    write_masks: bool = True
    commit_every: int = 2000
    skip_done: bool = True
    since: str | None = None
    until: str | None = None
    retry_rejects: bool = False
    lease_scope: str | None = None
    lease_ttl_s: float = 120.0
    lease_heartbeat_s: float = 30.0
    lease_settle_s: float | None = None
    wait_for_lease_s: float = 0.0
    resources: Resources = dataclasses.field(default_factory=Resources)

    def __post_init__(self) -> None:
        bad = [p for p in self.producers if p not in PRODUCERS]
        if bad or not self.producers:
            raise ValueError(f"unknown producer(s) {bad}; choose from {list(PRODUCERS)}")
        for p in SEGMENTERS:
            if p in self.producers:
                segmenter_config(self, p)  # a missing model URI or a bad key fails here
        prior = rootsam_prior(self)
        if prior is not None and prior not in self.producers:
            raise ValueError(f"rootsam.prior={prior} needs the {prior} producer in the same "
                             f"run: add {prior} to --producers (with its model)")


def rootsam_prior(cfg: InferConfig) -> str | None:
    """The producer whose mask labels RootSAM's points in this run (``rootsam.prior``), or
    None (no RootSAM, or no prior). Raises ValueError for a producer that cannot be one."""
    if "rootsam" not in cfg.producers or cfg.rootsam.get("prior") is None:
        return None
    prior = str(cfg.rootsam["prior"])
    if prior not in SEGMENTERS:
        raise ValueError(f"rootsam.prior must be one of {list(SEGMENTERS)} (or unset), "
                         f"got {prior!r}")
    return prior


#: Exit codes, the same for every command and job (``rootflow infer``/``reprocess``/``demo``,
#: ``jobs/*.py``): 0 all done; 1 the run failed; 2 usage error or invalid manifest; 3 done with
#: rejects (success with warnings: see the rejects table); 4 another live run holds the lease.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTS, EXIT_LEASE_HELD = 0, 1, 2, 3, 4


@dataclasses.dataclass
class RunSummary:
    run_id: str
    status: str
    n_manifest: int
    n_skipped: int
    n_images: int
    n_images_ok: int
    n_images_rejected: int
    n_traits_rows: int
    n_reject_rows: int
    wall_s: float
    stage_s: dict[str, float]
    model_versions: dict[str, str]
    lake_uri: str
    reject_reasons: dict[str, int]
    commits: int
    n_reject_skipped: int = 0
    actors: dict[str, float] = dataclasses.field(default_factory=dict)
    resources: dict[str, Any] = dataclasses.field(default_factory=dict)
    taken_over: list[str] = dataclasses.field(default_factory=list)
    #: bytes each Ray Data operator put into the object store (Ray's own stats), and their sum
    #: per processed image: what moving pixels through the cluster costs.
    output_bytes: dict[str, int] = dataclasses.field(default_factory=dict)
    object_store_bytes_per_image: float = 0.0

    @property
    def exit_code(self) -> int:
        if self.status.startswith("lease_held"):
            return EXIT_LEASE_HELD
        if self.status == "failed":
            return EXIT_FAILED
        return EXIT_REJECTS if self.n_images_rejected else EXIT_OK

    @property
    def images_per_s(self) -> float:
        return self.n_images / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["images_per_s"] = round(self.images_per_s, 3)
        return d


# --------------------------------------------------------------------------------------------
# model stages
# --------------------------------------------------------------------------------------------
def _rootsam_factory(cfg: Any, *, storage_options: dict[str, Any] | None = None) -> Any:
    from rootflow.inference.rootsam import RootSAMStage

    return RootSAMStage(cfg, storage_options=storage_options)


def _rootquant_factory(cfg: Any, *, storage_options: dict[str, Any] | None = None) -> Any:
    from rootflow.inference.rootquant import RootQuantStage

    return RootQuantStage(cfg, storage_options=storage_options)


def _segmenter_factory(cfg: Any, *, storage_options: dict[str, Any] | None = None) -> Any:
    from rootflow.inference.segment import SegmenterStage

    return SegmenterStage(cfg, storage_options=storage_options)


#: Producers that are trained per-pixel segmenters, loaded by ``load_segmenter``.
SEGMENTERS = ("forest", "unet")


def segmenter_config(cfg: InferConfig, producer: str) -> Any:
    """``cfg.forest`` / ``cfg.unet`` as a checked SegmenterInferenceConfig for ``producer``."""
    from rootflow.inference.segment import config_from

    return config_from(getattr(cfg, producer), kind=producer)


def rootsam_config(cfg: InferConfig) -> Any:
    from rootflow.inference.rootsam import RootSAMInferenceConfig

    return cfglib.from_dict(RootSAMInferenceConfig, cfg.rootsam)


def rootquant_config(cfg: InferConfig) -> Any:
    from rootflow.inference.rootquant import RootQuantInferenceConfig

    return cfglib.from_dict(RootQuantInferenceConfig, cfg.rootquant)


def model_stage_specs(cfg: InferConfig) -> list[tuple[str, Callable[..., Any], Any]]:
    specs: list[tuple[str, Callable[..., Any], Any]] = []
    for p in SEGMENTERS:
        if p in cfg.producers:
            specs.append((p, _segmenter_factory, segmenter_config(cfg, p)))
    if "rootsam" in cfg.producers:
        specs.append(("rootsam", _rootsam_factory, rootsam_config(cfg)))
    if "rootquant" in cfg.producers:
        specs.append(("rootquant", _rootquant_factory, rootquant_config(cfg)))
    return specs


def resolve_model_versions(cfg: InferConfig, storage: StorageLike = None) -> dict[str, str]:
    """Model version of each producer, known before any actor starts (for skip/resume).

    Forest and U-Net files are read and loaded here, once, on the driver: their version is the
    segmenter's own (hash of weights and output-changing settings), and a missing, corrupt or
    wrong-kind file raises :class:`~rootflow.models.segmenters.SegmenterLoadError` before the
    run starts. RootSAM and RootQuant checkpoints are opened weights-only and checked by
    :func:`rootflow.inference.model_files.check_checkpoints` (``ModelFileError``).
    """
    versions: dict[str, str] = {}
    if "mask" in cfg.producers:
        from rootflow.traits import TRAITS_VERSION

        opts = json.dumps(cfg.trait_options, sort_keys=True, default=str)
        suffix = "" if not cfg.trait_options else "-" + hashlib.sha1(opts.encode()).hexdigest()[:8]
        versions["mask"] = f"traits-{TRAITS_VERSION}{suffix}"
    so = StorageOptions.from_mapping(storage).to_dict()
    from rootflow.inference.model_files import check_checkpoints

    check_checkpoints(cfg, so)  # unsafe or wrong RootSAM/RootQuant files: refused here, once
    for p in SEGMENTERS:
        if p in cfg.producers:
            from rootflow.inference.segment import model_version as seg_version

            versions[p] = seg_version(segmenter_config(cfg, p), storage_options=so)
    if "rootsam" in cfg.producers:
        from rootflow.inference.rootsam import model_version

        rs = rootsam_config(cfg)
        # An unset prior stays out of the hash: versions made before the setting existed
        # keep their hash, and their images are not re-processed.
        skip = RUNTIME_ONLY["rootsam"] | ({"prior"} if rs.prior is None else frozenset())
        versions["rootsam"] = (f"{model_version(rs, storage_options=so)}"
                               f"~{settings_hash(rs, skip)}")
        if rs.prior is not None:  # a new forest/U-Net changes RootSAM's masks
            versions["rootsam"] += prior_suffix(rs.prior, versions[rs.prior])
    if "rootquant" in cfg.producers:
        from rootflow.inference.rootquant import model_version as rq_version

        rq = rootquant_config(cfg)
        skip = RUNTIME_ONLY["rootquant"] | (RQ_RANDOM_ONLY if rq.checkpoint else frozenset())
        versions["rootquant"] = (f"{rq_version(rq, storage_options=so)}"
                                 f"~{settings_hash(rq, skip)}")
    return versions


def prior_suffix(prior: str, prior_version: str) -> str:
    """``+prior-<producer>@<12 hex>`` appended to RootSAM's version when a prior labels its
    points: the 12 hex are the prior's own digest (``forest-<12 hex>``) or, for any other
    version string, the sha256 of it; masks made with different priors, or none, never share
    a version."""
    import re

    m = re.fullmatch(r"[a-z]+-([0-9a-f]{12,})", prior_version)
    tag = m[1][:12] if m else hashlib.sha256(prior_version.encode()).hexdigest()[:12]
    return f"+prior-{prior}@{tag}"


#: Settings that do not change a model's output (where its weights are, how they are checked,
#: which device, how work is batched). Every other field of the model's inference config is
#: part of its version, so changing a threshold or the prompt mode re-processes the archive.
RUNTIME_ONLY: dict[str, frozenset[str]] = {
    "rootsam": frozenset({"base_checkpoint", "base_sha256", "rootsam_checkpoint",
                          "rootsam_sha256", "device", "compile", "tile_batch_size",
                          "point_batch_size", "embedding_cache_tiles"}),
    "rootquant": frozenset({"checkpoint", "sha256", "device", "tile_batch"}),
}
#: RootQuant settings used only by the random-weights model (a checkpoint defines its own).
RQ_RANDOM_ONLY = frozenset({"backbone", "mm_per_px", "tile_px"})


def settings_hash(config: Any, runtime_only: frozenset[str]) -> str:
    """12 hex of the sha256 of a model's output-changing settings (its version suffix; the
    weights' own digest is the part before ``~``)."""
    d = {k: v for k, v in dataclasses.asdict(config).items() if k not in runtime_only}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------------------------
# the chain
# --------------------------------------------------------------------------------------------
def build_dataset(rows: pa.Table, *, cfg: InferConfig, lake_uri: str, run_id: str,
                  model_versions: dict[str, str], storage_options: dict[str, Any]) -> Any:
    """The whole processing chain as one Ray Dataset (lazy; nothing runs until iterated)."""
    import ray.data

    res = cfg.resources
    # The manifest rows are already validated and planned on the driver (which images need
    # which producer); they enter Ray as blocks of up to 64 rows: few enough to schedule
    # cheaply, many enough that every actor of a growing pool finds work.
    per_block = max(res.block_rows, min(res.manifest_block_rows,
                                        -(-rows.num_rows // max(1, res.min_blocks))))
    blocks = [rows.slice(i, per_block) for i in range(0, rows.num_rows, per_block)]
    ds: ray.data.Dataset = ray.data.from_arrow(blocks or [rows])
    ds = ds.map_batches(stages.read_bytes, batch_format="numpy", batch_size=res.block_rows,
                        fn_kwargs={"storage_options": storage_options,
                                   "threads": res.read_threads},
                        num_cpus=res.read_num_cpus)
    specs = model_stage_specs(cfg)
    if not specs:
        ds = ds.map_batches(stages.decode_masks_only, batch_format="numpy",
                            batch_size=res.block_rows, num_cpus=res.decode_num_cpus)
    elif not res.decode_in_actor:  # the former layout: pixels cross nodes to the actor
        ds = ds.map_batches(stages.decode, batch_format="numpy", batch_size=res.block_rows,
                            num_cpus=res.decode_num_cpus)
    # RootSAM's prior (rootsam.prior) runs wherever RootSAM does, in an earlier stage of the
    # chain (segmenters come first in ``specs``), so its mask travels in the same batch.
    prior = rootsam_prior(cfg)
    priors = {"rootsam": prior} if prior else {}
    groups = [specs] if res.fuse_models else [[s] for s in specs]
    groups = [g for g in groups if g]
    for k, group in enumerate(groups):
        ds = ds.map_batches(
            stages.ModelActor,
            fn_constructor_kwargs={"stages": group, "storage_options": storage_options,
                                   "producers": cfg.producers,
                                   "decode_first": k == 0 and res.decode_in_actor,
                                   "drop_image": k == len(groups) - 1 and res.decode_in_actor,
                                   "memory_limit_mb": res.actor_memory_mb,
                                   "priors": priors},
            compute=ray.data.ActorPoolStrategy(
                min_size=res.model_actors[0], max_size=res.model_actors[1],
                initial_size=min(res.model_actors[1], max(res.model_actors[0],
                                                          res.initial_actors)),
                max_tasks_in_flight_per_actor=res.max_in_flight_per_actor),
            batch_format="numpy", batch_size=res.model_batch_size,
            num_gpus=res.model_num_gpus, num_cpus=res.model_num_cpus,
        )
    # (stages.traits / to_records take their settings as required keyword arguments, which Ray
    # passes from fn_kwargs; Ray's stub types a one-argument callable.)
    ds = ds.map_batches(stages.traits,  # type: ignore[arg-type]
                        batch_format="numpy", batch_size=res.block_rows,
                        fn_kwargs={"producers": cfg.producers, "lake_uri": lake_uri,
                                   "storage_options": storage_options,
                                   "trait_options": cfg.trait_options,
                                   "write_masks": cfg.write_masks,
                                   "model_versions": model_versions},
                        num_cpus=res.traits_num_cpus)
    ds = ds.map_batches(stages.to_records,  # type: ignore[arg-type]
                        batch_format="numpy", batch_size=res.block_rows,
                        fn_kwargs={"producers": cfg.producers, "run_id": run_id,
                                   "model_versions": model_versions},
                        num_cpus=0.25)
    return ds


# --------------------------------------------------------------------------------------------
# the driver
# --------------------------------------------------------------------------------------------
def code_version() -> str:
    """rootflow version plus the git commit when run from a checkout."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
    except Exception:
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def select_rows(table: pa.Table, cfg: InferConfig) -> pa.Table:
    """Apply ``since``/``until`` on ``captured_at``."""
    if cfg.since:
        table = table.filter(pc.greater_equal(
            table["captured_at"], pa.scalar(dt.datetime.fromisoformat(cfg.since), pa.timestamp("us"))))
    if cfg.until:
        until = dt.datetime.fromisoformat(cfg.until)
        if len(cfg.until) <= 10:  # a bare date includes that whole day
            until += dt.timedelta(days=1)
        table = table.filter(pc.less(table["captured_at"], pa.scalar(until, pa.timestamp("us"))))
    return table


def scope_key(lake_uri: str, cfg: InferConfig) -> str:
    """What a run's lease covers: the lake (or ``cfg.lease_scope`` inside it), never the
    manifest file, so nightly runs that each list the archive into a new manifest still share
    one lease."""
    from rootflow.lake.lease import lake_scope

    return lake_scope(lake_uri, cfg.lease_scope)


def init_ray(address: str | None, *, num_cpus: int | None = None, quiet: bool = True) -> None:
    """Connect to a cluster (``auto``, ``ray://...``, inside ``ray job submit``) or start a local
    Ray with more logical CPUs than cores (actor pools otherwise starve the read tasks).

    On a cluster, workers' log lines (warnings included) are forwarded to the driver, so they
    reach ``ray job logs``.
    """
    import os

    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address != "local":
        _leave_ray_working_dir()
        ray.init(address=address, log_to_driver=True)
        return
    cpus = num_cpus or max(4, 2 * (os.cpu_count() or 2))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=not quiet,
             configure_logging=False)


def _leave_ray_working_dir() -> None:
    """Move a ``ray job submit`` driver out of Ray's copy of the job's ``working_dir``.

    Ray's runtime-env agent deletes and re-fetches a cached ``working_dir`` when it sets the same
    URI up again (ray-project/ray#49313), which can happen under a running driver, leaving it in
    a deleted directory. Libraries then fail in odd ways: oneMKL (inside torch) aborts the
    process with "Cannot load libtorch_cpu.so" at its first call. The driver moves into a
    private copy of the directory, so paths relative to the working dir keep working.
    """
    import os

    try:
        cwd = os.getcwd()
    except OSError:
        return
    marker = f"{os.sep}runtime_resources{os.sep}working_dir_files{os.sep}"
    if marker not in cwd + os.sep:
        return
    import shutil
    import tempfile

    copy = os.path.join(tempfile.mkdtemp(prefix="rootflow-job-"), os.path.basename(cwd))
    shutil.copytree(cwd, copy, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    os.chdir(copy)


#: Reject reasons a re-run cannot fix without a new reason (the file or the model changed):
#: the object is missing or unreadable for good, or its bytes are not a valid image/mask.
_PERMANENT_REASONS = ("read: FileNotFoundError", "read: PermissionError",
                      "read: IsADirectoryError", "read: NotADirectoryError", "read: ValueError",
                      "read_mask: FileNotFoundError", "read_mask: PermissionError",
                      "decode:", "decode_mask:")


def is_permanent(reason: str | None) -> bool:
    """A reject that retrying the same file with the same model cannot fix (an image that ran
    out of memory may fit the next run's limit: it is retried)."""
    return bool(reason) and str(reason).startswith(_PERMANENT_REASONS) and \
        ": out of memory" not in str(reason)


def file_fingerprint(uri: str, storage_options: dict[str, Any] | None) -> str:
    """``size:etag-or-mtime`` of an object (``missing`` when absent): tells a nightly run that
    a rejected file was replaced, without reading it."""
    from rootflow.io import storage as st

    try:
        info = st.filesystem(uri, storage_options).info(st.strip_protocol(uri))
    except FileNotFoundError:
        return "missing"
    except Exception as e:  # cannot tell: treat as changed (the image is retried)
        return f"unknown:{type(e).__name__}:{uuid.uuid4().hex[:8]}"
    stamp = info.get("ETag") or info.get("etag") or info.get("LastModified") or \
        info.get("mtime") or info.get("last_modified") or ""
    return f"{info.get('size')}:{stamp}"


def plan_work(rows: pa.Table, lake: Any, versions: dict[str, str], cfg: InferConfig,
              storage_options: dict[str, Any] | None) -> tuple[pa.Table, int, int]:
    """Which producers each row still needs: ``rows`` with a ``todo`` column, rows needing none
    dropped; also returns (rows skipped as done, producer runs skipped as known rejects).

    A producer re-runs on an image only when the lake has no traits row for its version; an
    image rejected permanently (:func:`is_permanent`) for that version is retried only when its
    file changed since (:func:`file_fingerprint`) or with ``retry_rejects``.
    """
    n0 = rows.num_rows
    ids = rows["image_id"].to_pylist()
    uris = rows["image_uri"].to_pylist()
    need = {p: [True] * n0 for p in versions}
    if cfg.skip_done and n0:
        for p, version in versions.items():
            done = lake.done_image_ids(model_name=p, model_version=version)
            need[p] = [i not in done for i in ids]
    n_reject_skipped = 0
    if cfg.skip_done and not cfg.retry_rejects and n0 and lake.exists("rejects"):
        rej = lake.read("rejects")
        cols = set(rej.column_names)
        if {"model_version", "source_fingerprint"} <= cols and rej.num_rows:
            latest: dict[tuple[str, str], dict[str, Any]] = {}
            for r in rej.select(["image_id", "model_name", "model_version", "reason",
                                 "source_fingerprint", "at"]).sort_by("at").to_pylist():
                if r["model_name"] in versions and r["model_version"] == versions[
                        r["model_name"]]:
                    latest[(r["image_id"], r["model_name"])] = r
            # Only the latest reject of an image and producer counts: a file that was missing
            # and now fails for another (transient) reason is retried.
            known = {k: r["source_fingerprint"] or "" for k, r in latest.items()
                     if is_permanent(r["reason"])}
            if known:
                pos = {i: k for k, i in enumerate(ids)}
                candidates = {img for img, p in known if img in pos}
                fps = _fingerprints({uris[pos[i]] for i in candidates}, storage_options)
                for (img, p), fp in known.items():
                    k = pos.get(img)
                    if k is not None and need[p][k] and fps.get(uris[k]) == fp:
                        need[p][k] = False
                        n_reject_skipped += 1
    todo = [",".join(p for p in versions if need[p][k]) for k in range(n0)]
    rows = rows.append_column("todo", pa.array(todo, pa.string()))
    rows = rows.filter(pc.not_equal(rows["todo"], ""))
    return rows, n0 - rows.num_rows, n_reject_skipped


#: StorageOptions fields that are credentials: they stay on the driver.
CREDENTIAL_FIELDS = ("key", "secret", "token")


def worker_storage_options(so: StorageOptions) -> dict[str, Any]:
    """What tasks and actors get: endpoint, region and addressing, never credentials.

    Workers find credentials through the standard provider chain of their own process
    (environment, web identity token, instance profile), which the client library refreshes;
    credentials copied into task arguments would be serialized into every task, logged by Ray
    on failures, and expire mid-run (session tokens), turning every later read into a reject.
    """
    return {k: v for k, v in so.to_dict().items() if k not in CREDENTIAL_FIELDS}


def _fingerprints(uris: set[str], storage_options: dict[str, Any] | None) -> dict[str, str]:
    from concurrent.futures import ThreadPoolExecutor

    uris_l = sorted(uris)
    with ThreadPoolExecutor(max_workers=16) as pool:
        return dict(zip(uris_l, pool.map(lambda u: file_fingerprint(u, storage_options), uris_l),
                        strict=True))


class Progress:
    """Images done of total, rate and time left: a live line on a terminal, and one line per
    Delta commit (so a job's logs show the same figures)."""

    def __init__(self, total: int, *, live: bool | None = None, stream: Any = None) -> None:
        import sys

        self.total, self.done, self.t0 = total, 0.0, time.perf_counter()
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._last = 0.0

    def text(self) -> str:
        el = time.perf_counter() - self.t0
        rate = self.done / el if el > 0 else 0.0
        left = (self.total - self.done) / rate if rate > 0 else float("nan")
        eta = "?" if left != left else _hms(left)
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"{self.done:.0f}/{self.total} images ({pct:.0f}%), {rate:.2f} images/s, "
                f"elapsed {_hms(el)}, left {eta}")

    def update(self, images: float) -> None:
        self.done += images
        now = time.perf_counter()
        if self.live and now - self._last > 0.5:
            self._last = now
            self.stream.write("\r" + self.text() + "   ")
            self.stream.flush()

    def commit(self, rows: int, commits: int) -> None:
        line = f"commit {commits}: {rows} rows so far; {self.text()}"
        if self.live:
            self.stream.write("\r")
        self.stream.write(line + "\n")
        self.stream.flush()
        log.info(line)

    def close(self) -> None:
        if self.live:
            self.stream.write("\r" + self.text() + "\n")
            self.stream.flush()


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def run(manifest_uri: str, lake_uri: str, cfg: InferConfig, *,
        storage_options: StorageLike = None, run_id: str | None = None,
        job_kind: str = "infer", progress: bool = True,
        on_commit: Callable[[int], None] | None = None,
        model_versions: dict[str, str] | None = None,
        cluster_gpus_override: float | None = None) -> RunSummary:
    """Process a manifest into the lake. Requires a connected Ray (:func:`init_ray`).

    Args:
        manifest_uri: Parquet/CSV manifest (validated by :func:`rootflow.io.manifest.read_manifest`).
        lake_uri: root of the Delta tables (``traits``, ``runs``, ``rejects``) and masks.
        cfg: what to run.
        storage_options: object-storage settings (credentials are never logged or stored, and
            workers get theirs from the standard provider chain, not from here).
        run_id: defaults to a fresh id.
        job_kind: recorded in ``runs`` (``infer``, ``reprocess``, ``demo``).
        progress: show images done/total, rate and time left (live on a terminal; one line per
            commit always).
        on_commit: called with the number of rows committed so far (tests use it to kill us).
        model_versions: :func:`resolve_model_versions` already done by the caller (the CLI does
            it before starting Ray, so a bad model file fails in a second, not after Ray's
            start-up); None = resolve here.
        cluster_gpus_override: GPUs to size the pool for instead of asking the cluster.

    Returns a summary whose ``status`` is ``ok``, ``ok_with_rejects``, ``failed`` or
    ``lease_held: ...`` (another live run holds the lake; nothing was done) and whose
    ``exit_code`` is the command's.
    """
    import ray.data

    from rootflow.io.manifest import read_manifest
    from rootflow.lake import Lake
    from rootflow.lake import lease as leaselib
    from rootflow.lake.lease import LeaseHeld, RunLease, driver_identity

    t_start = time.perf_counter()
    so = StorageOptions.from_mapping(storage_options)
    so_dict = so.to_dict()
    run_id = run_id or f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # ours (Progress) says images, rate and time left
    ctx.print_on_execution_start = False

    manifest = read_manifest(manifest_uri, storage_options=so)
    n_manifest = manifest.num_rows
    rows = select_rows(manifest, cfg)
    n_out_of_range = n_manifest - rows.num_rows
    if model_versions is None:
        versions = resolve_model_versions(cfg, so)
    else:
        versions = dict(model_versions)
        if set(versions) != set(cfg.producers):
            raise ValueError(f"model_versions has {sorted(versions)}, the run's producers are "
                             f"{sorted(cfg.producers)}")
    res = resolve_resources(cfg.resources, cluster_gpus_override)
    cfg = dataclasses.replace(cfg, resources=res)
    lake = Lake(lake_uri, storage_options=so)

    scope = scope_key(lake_uri, cfg)
    config_record = {"infer": cfglib.to_dict(cfg), "storage": so.redacted(), "scope": scope,
                     "driver": driver_identity()}
    lake.start_run(run_id=run_id, job_kind=job_kind, manifest_uri=manifest_uri,
                   config=config_record, model_versions=versions, code_version=code_version())
    lease = RunLease(lake, run_id, scope, ttl_s=cfg.lease_ttl_s,
                     heartbeat_s=cfg.lease_heartbeat_s,
                     settle_s=leaselib.SETTLE_S if cfg.lease_settle_s is None
                     else cfg.lease_settle_s)
    lease.start_heartbeat()

    def summary(status: str, **kw: Any) -> RunSummary:
        base: dict[str, Any] = dict(
            run_id=run_id, status=status, n_manifest=n_manifest, n_skipped=n_manifest,
            n_images=0, n_images_ok=0, n_images_rejected=0, n_traits_rows=0, n_reject_rows=0,
            wall_s=time.perf_counter() - t_start, stage_s={}, model_versions=versions,
            lake_uri=lake_uri, reject_reasons={}, commits=0,
            resources=cfglib.to_dict(res), taken_over=list(lease.taken_over))
        base.update(kw)
        return RunSummary(**base)

    try:
        lease.acquire(wait_s=cfg.wait_for_lease_s)
    except LeaseHeld as e:
        lease.stop()
        status = f"lease_held: {e}"
        lake.finish_run(run_id, n_ok=0, n_rejected=0, status=status)
        return summary(status)

    counts = {"traits": 0, "reject": 0, "commits": 0}
    stage_s = dict.fromkeys(stages.TIMING_STAGES, 0.0)
    rejected_images: set[str] = set()
    reasons: dict[str, int] = {}
    actors: dict[str, float] = {}
    status = "failed"
    n_skipped_done = n_reject_skipped = 0
    out_bytes: dict[str, int] = {}
    try:
        # What is done is read only once we hold the lease: a run that finished just before
        # has committed everything it did.
        rows, n_skipped_done, n_reject_skipped = plan_work(rows, lake, versions, cfg, so_dict)
        prog = Progress(rows.num_rows, live=None if progress else False) if progress else None
        if rows.num_rows:
            ds = build_dataset(rows, cfg=cfg, lake_uri=lake_uri, run_id=run_id,
                               model_versions=versions,
                               storage_options=worker_storage_options(so))
            buf: dict[str, list[dict[str, Any]]] = {"traits": [], "reject": []}
            fp_cache: dict[str, str] = {}

            def flush() -> None:
                lease.check()
                if not buf["traits"] and not buf["reject"]:
                    return  # (the final flush after one that emptied the buffer)
                now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
                if buf["traits"]:
                    for r in buf["traits"]:
                        r["processed_at"] = now
                    lake.commit_traits(buf["traits"])
                    counts["commits"] += 1
                if buf["reject"]:
                    for r in buf["reject"]:
                        r["at"] = now
                        r["model_version"] = versions.get(r["model_name"])
                        uri = r.get("image_uri")
                        if uri and uri not in fp_cache:
                            fp_cache[uri] = file_fingerprint(uri, so_dict)
                        r["source_fingerprint"] = fp_cache.get(uri) if uri else None
                    lake.commit_rejects(buf["reject"])
                    counts["commits"] += 1
                counts["traits"] += len(buf["traits"])
                counts["reject"] += len(buf["reject"])
                buf["traits"], buf["reject"] = [], []
                if prog:
                    prog.commit(counts["traits"] + counts["reject"], counts["commits"])
                if on_commit:
                    on_commit(counts["traits"] + counts["reject"])

            for batch in _iter(ds):
                for kind, blob in zip(batch["kind"], batch["record"], strict=True):
                    rec = pickle.loads(blob)
                    buf[kind].append(rec)
                    if kind == "reject":
                        rejected_images.add(rec["image_id"])
                        key = rec["reason"].split(":", 2)
                        short = ":".join(key[:2])
                        reasons[short] = reasons.get(short, 0) + 1
                for a, w in zip(batch["actor"], batch["image_weight"], strict=True):
                    if a:
                        actors[str(a)] = actors.get(str(a), 0.0) + float(w)
                if prog:
                    prog.update(float(np.sum(batch["image_weight"])))
                for s in stages.TIMING_STAGES:
                    stage_s[s] += float(np.sum(batch[f"t_{s}"]))
                if len(buf["traits"]) + len(buf["reject"]) >= cfg.commit_every:
                    flush()
            flush()
            if prog:
                prog.close()
            out_bytes = _operator_output_bytes(ds)
            from rootflow.lake.maintenance import compact_touched

            compact_touched(lake)  # few, large files in the partitions this run wrote (docs/lake.md)
        status = "ok" if not rejected_images else "ok_with_rejects"
    finally:
        lease.stop()
        n_images = rows.num_rows
        n_rej = len(rejected_images)
        try:
            lake.finish_run(run_id, n_ok=n_images - n_rej if status != "failed"
                            else counts["traits"], n_rejected=n_rej, status=status)
        except Exception as e:  # do not hide the run's own error behind this one
            log.error("run %s: could not record its end: %s", run_id, e)
    return summary(
        status, n_skipped=n_out_of_range + n_skipped_done, n_images=rows.num_rows,
        n_images_ok=rows.num_rows - len(rejected_images),
        n_images_rejected=len(rejected_images), n_traits_rows=counts["traits"],
        n_reject_rows=counts["reject"], wall_s=time.perf_counter() - t_start,
        stage_s={k: round(v, 3) for k, v in stage_s.items() if v > 0},
        reject_reasons=reasons, commits=counts["commits"], n_reject_skipped=n_reject_skipped,
        actors={k: round(v, 3) for k, v in sorted(actors.items())}, output_bytes=out_bytes,
        object_store_bytes_per_image=round(sum(out_bytes.values()) / rows.num_rows, 1)
        if rows.num_rows else 0.0)


def _operator_output_bytes(ds: Any) -> dict[str, int]:
    """Output bytes per operator from Ray Data's own execution stats (empty if unavailable)."""
    out: dict[str, int] = {}
    try:
        todo = [ds.get_stats_summary()]
        while todo:
            summ = todo.pop()
            for op in getattr(summ, "operators_stats", []) or []:
                b = getattr(op, "output_size_bytes", None)
                if b is not None:
                    out[op.operator_name] = out.get(op.operator_name, 0) + int(b.sum)
            todo.extend(getattr(summ, "parents", []) or [])
    except Exception as e:  # stats are diagnostics: never fail a run over them
        log.debug("no Ray Data stats: %s", e)
    return out


def _iter(ds: Any) -> Iterator[dict[str, np.ndarray]]:
    yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)


# --------------------------------------------------------------------------------------------
# helpers for the CLI / jobs
# --------------------------------------------------------------------------------------------
def format_summary(s: RunSummary) -> str:
    lines = [
        f"run {s.run_id}: {s.status}",
        f"  images: {s.n_images} processed ({s.n_images_ok} ok, {s.n_images_rejected} rejected), "
        f"{s.n_skipped} skipped (already done or out of range) of {s.n_manifest} in the manifest",
        f"  rows committed: {s.n_traits_rows} traits, {s.n_reject_rows} rejects in {s.commits} commits",
        f"  throughput: {s.images_per_s:.2f} images/s over {s.wall_s:.1f} s wall",
    ]
    if s.object_store_bytes_per_image:
        lines.append(f"  object store: {s.object_store_bytes_per_image / 1e3:.0f} kB per image "
                     "(all operators' outputs, Ray Data stats)")
    if s.stage_s:
        per = ", ".join(f"{k} {v:.1f}" for k, v in s.stage_s.items())
        lines.append(f"  stage time (summed over workers, s): {per}")
    if s.n_reject_skipped:
        lines.append(f"  {s.n_reject_skipped} producer runs not retried: rejected before for the "
                     "same model version and file (--retry-rejects to retry them)")
    if s.actors:
        lines.append(f"  model actors: {len(s.actors)} (" + ", ".join(
            f"{k}: {v:.0f} images" for k, v in s.actors.items()) + ")")
    if s.taken_over:
        lines.append("  took over the lease of dead run(s): " + ", ".join(s.taken_over))
    lines.append("  model versions: " + ", ".join(f"{k}={v}" for k, v in s.model_versions.items()))
    if s.reject_reasons:
        lines.append("  reject reasons: " + "; ".join(f"{k} x{v}" for k, v in s.reject_reasons.items()))
    lines.append(f"  tables: {s.lake_uri}/traits, {s.lake_uri}/rejects, {s.lake_uri}/runs")
    return "\n".join(lines)

