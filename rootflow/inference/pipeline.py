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
    """Ray resources per stage. Defaults suit a CPU-only machine; see ``gpu()`` for a GPU node.

    Attributes:
        block_rows: manifest rows per Ray block (the unit of scheduling and retry).
        read_threads: concurrent object-storage reads inside one read task.
        read_num_cpus / decode_num_cpus / traits_num_cpus: CPU slots per task of each stage.
        model_actors: (min, max) actors per model pool (autoscaling between them).
        model_batch_size: images per model call.
        model_num_gpus / model_num_cpus: resources per model actor.
        fuse_models: run all model stages in the same actor (one GPU, no hand-off).
        max_in_flight_per_actor: batches queued per actor (keeps the GPU fed).
    """

    block_rows: int = 4
    read_threads: int = 8
    read_num_cpus: float = 0.25
    decode_num_cpus: float = 1.0
    traits_num_cpus: float = 1.0
    model_actors: tuple[int, int] = (1, 1)
    model_batch_size: int = 2
    model_num_gpus: float = 0.0
    model_num_cpus: float = 1.0
    fuse_models: bool = True
    max_in_flight_per_actor: int = 2

    @classmethod
    def gpu(cls, n_gpus: int = 1) -> Resources:
        """Defaults for a node with ``n_gpus`` GPUs: one fused actor per GPU, bigger batches."""
        return cls(block_rows=8, read_threads=16, model_actors=(n_gpus, n_gpus),
                   model_batch_size=8, model_num_gpus=1.0, model_num_cpus=2.0, fuse_models=True)


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
        lease_ttl_s: a run whose heartbeat is older than this is considered dead.
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
    lease_ttl_s: float = 900.0
    wait_for_lease_s: float = 0.0
    resources: Resources = dataclasses.field(default_factory=Resources)

    def __post_init__(self) -> None:
        bad = [p for p in self.producers if p not in PRODUCERS]
        if bad or not self.producers:
            raise ValueError(f"unknown producer(s) {bad}; choose from {list(PRODUCERS)}")
        for p in SEGMENTERS:
            if p in self.producers:
                segmenter_config(self, p)  # a missing model URI or a bad key fails here


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
    run starts.
    """
    versions: dict[str, str] = {}
    if "mask" in cfg.producers:
        from rootflow.traits import TRAITS_VERSION

        opts = json.dumps(cfg.trait_options, sort_keys=True, default=str)
        suffix = "" if not cfg.trait_options else "-" + hashlib.sha1(opts.encode()).hexdigest()[:8]
        versions["mask"] = f"traits-{TRAITS_VERSION}{suffix}"
    so = StorageOptions.from_mapping(storage).to_dict()
    for p in SEGMENTERS:
        if p in cfg.producers:
            from rootflow.inference.segment import model_version as seg_version

            versions[p] = seg_version(segmenter_config(cfg, p), storage_options=so)
    if "rootsam" in cfg.producers:
        from rootflow.inference.rootsam import model_version

        versions["rootsam"] = model_version(rootsam_config(cfg), storage_options=so)
    if "rootquant" in cfg.producers:
        from rootflow.inference.rootquant import model_version as rq_version

        versions["rootquant"] = rq_version(rootquant_config(cfg), storage_options=so)
    return versions


# --------------------------------------------------------------------------------------------
# the chain
# --------------------------------------------------------------------------------------------
def build_dataset(rows: pa.Table, *, cfg: InferConfig, lake_uri: str, run_id: str,
                  model_versions: dict[str, str], storage_options: dict[str, Any]) -> Any:
    """The whole processing chain as one Ray Dataset (lazy; nothing runs until iterated)."""
    import ray.data

    res = cfg.resources
    blocks = [rows.slice(i, res.block_rows) for i in range(0, rows.num_rows, res.block_rows)]
    ds = ray.data.from_arrow(blocks or [rows])
    ds = ds.map_batches(stages.read_bytes, batch_format="numpy", batch_size=res.block_rows,
                        fn_kwargs={"storage_options": storage_options,
                                   "threads": res.read_threads},
                        num_cpus=res.read_num_cpus)
    ds = ds.map_batches(stages.decode, batch_format="numpy", batch_size=res.block_rows,
                        num_cpus=res.decode_num_cpus)
    specs = model_stage_specs(cfg)
    groups = [specs] if res.fuse_models else [[s] for s in specs]
    for group in groups:
        if not group:
            continue
        ds = ds.map_batches(
            stages.ModelActor,
            fn_constructor_kwargs={"stages": group, "storage_options": storage_options},
            compute=ray.data.ActorPoolStrategy(
                min_size=res.model_actors[0], max_size=res.model_actors[1],
                max_tasks_in_flight_per_actor=res.max_in_flight_per_actor),
            batch_format="numpy", batch_size=res.model_batch_size,
            num_gpus=res.model_num_gpus, num_cpus=res.model_num_cpus,
        )
    ds = ds.map_batches(stages.traits, batch_format="numpy", batch_size=res.block_rows,
                        fn_kwargs={"producers": cfg.producers, "lake_uri": lake_uri,
                                   "storage_options": storage_options,
                                   "trait_options": cfg.trait_options,
                                   "write_masks": cfg.write_masks},
                        num_cpus=res.traits_num_cpus)
    ds = ds.map_batches(stages.to_records, batch_format="numpy", batch_size=res.block_rows,
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


def scope_key(manifest_uri: str, cfg: InferConfig, versions: dict[str, str]) -> str:
    """Identity of what a run covers; overlapping runs with the same scope share a lease."""
    blob = json.dumps({"manifest": manifest_uri, "versions": versions, "since": cfg.since,
                       "until": cfg.until}, sort_keys=True)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def run(manifest_uri: str, lake_uri: str, cfg: InferConfig, *,
        storage_options: StorageLike = None, run_id: str | None = None,
        job_kind: str = "infer", progress: bool = True,
        on_commit: Callable[[int], None] | None = None,
        model_versions: dict[str, str] | None = None) -> RunSummary:
    """Process a manifest into the lake. Requires a connected Ray (``ray.init`` done by caller).

    Args:
        manifest_uri: Parquet/CSV manifest (validated by :func:`rootflow.io.manifest.read_manifest`).
        lake_uri: root of the Delta tables (``traits``, ``runs``, ``rejects``) and masks.
        cfg: what to run.
        storage_options: object-storage settings (credentials are never logged or stored).
        run_id: defaults to a fresh id.
        job_kind: recorded in ``runs`` (``infer``, ``reprocess``, ``demo``).
        progress: show Ray Data's progress bars.
        on_commit: called with the number of rows committed so far (tests use it to kill us).
        model_versions: :func:`resolve_model_versions` already done by the caller (the CLI does
            it before starting Ray, so a bad model file fails in a second, not after Ray's
            start-up); None = resolve here.
    """
    import ray.data

    from rootflow.io.manifest import read_manifest
    from rootflow.lake import Lake

    t_start = time.perf_counter()
    so = StorageOptions.from_mapping(storage_options)
    so_dict = so.to_dict()
    run_id = run_id or f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = False

    manifest = read_manifest(manifest_uri, storage_options=so)
    n_manifest = manifest.num_rows
    rows = select_rows(manifest, cfg)
    if model_versions is None:
        versions = resolve_model_versions(cfg, so)
    else:
        versions = dict(model_versions)
        if set(versions) != set(cfg.producers):
            raise ValueError(f"model_versions has {sorted(versions)}, the run's producers are "
                             f"{sorted(cfg.producers)}")
    lake = Lake(lake_uri, storage_options=so)

    if cfg.skip_done and rows.num_rows:
        done: set[str] | None = None
        for producer, version in versions.items():
            ids = lake.done_image_ids(model_name=producer, model_version=version)
            done = ids if done is None else (done & ids)
        if done:
            keep = pc.invert(pc.is_in(rows["image_id"], pa.array(sorted(done), pa.string())))
            rows = rows.filter(keep)
    n_skipped = n_manifest - rows.num_rows

    scope = scope_key(manifest_uri, cfg, versions)
    config_record = {"infer": cfglib.to_dict(cfg), "storage": so.redacted(), "scope": scope}
    lake.start_run(run_id=run_id, job_kind=job_kind, manifest_uri=manifest_uri,
                   config=config_record, model_versions=versions, code_version=code_version())
    holder = _acquire_lease(lake, run_id, scope, cfg)
    if holder is not None:
        lake.finish_run(run_id, n_ok=0, n_rejected=0, status=f"skipped: run {holder} in progress")
        return RunSummary(run_id=run_id, status=f"skipped: run {holder} in progress",
                          n_manifest=n_manifest, n_skipped=n_manifest, n_images=0,
                          n_images_ok=0, n_images_rejected=0, n_traits_rows=0, n_reject_rows=0,
                          wall_s=time.perf_counter() - t_start, stage_s={},
                          model_versions=versions, lake_uri=lake_uri, reject_reasons={},
                          commits=0)

    counts = {"traits": 0, "reject": 0, "commits": 0}
    stage_s = dict.fromkeys(stages.TIMING_STAGES, 0.0)
    rejected_images: set[str] = set()
    reasons: dict[str, int] = {}
    status = "failed"
    try:
        if rows.num_rows:
            ds = build_dataset(rows, cfg=cfg, lake_uri=lake_uri, run_id=run_id,
                               model_versions=versions, storage_options=so_dict)
            buf: dict[str, list[dict[str, Any]]] = {"traits": [], "reject": []}

            def flush() -> None:
                now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
                if buf["traits"]:
                    for r in buf["traits"]:
                        r["processed_at"] = now
                    lake.commit_traits(buf["traits"])
                    counts["commits"] += 1
                if buf["reject"]:
                    for r in buf["reject"]:
                        r["at"] = now
                    lake.commit_rejects(buf["reject"])
                    counts["commits"] += 1
                counts["traits"] += len(buf["traits"])
                counts["reject"] += len(buf["reject"])
                buf["traits"], buf["reject"] = [], []
                lake.heartbeat(run_id)
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
                for s in stages.TIMING_STAGES:
                    stage_s[s] += float(np.sum(batch[f"t_{s}"]))
                if len(buf["traits"]) + len(buf["reject"]) >= cfg.commit_every:
                    flush()
            flush()
        status = "ok" if not rejected_images else "ok_with_rejects"
    finally:
        n_images = rows.num_rows
        n_rej = len(rejected_images)
        lake.finish_run(run_id, n_ok=n_images - n_rej if status != "failed" else counts["traits"],
                        n_rejected=n_rej, status=status)
    return RunSummary(
        run_id=run_id, status=status, n_manifest=n_manifest, n_skipped=n_skipped,
        n_images=rows.num_rows, n_images_ok=rows.num_rows - len(rejected_images),
        n_images_rejected=len(rejected_images), n_traits_rows=counts["traits"],
        n_reject_rows=counts["reject"], wall_s=time.perf_counter() - t_start,
        stage_s={k: round(v, 3) for k, v in stage_s.items() if v > 0}, model_versions=versions,
        lake_uri=lake_uri, reject_reasons=reasons, commits=counts["commits"])


def _iter(ds: Any) -> Iterator[dict[str, np.ndarray]]:
    yield from ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)


def _acquire_lease(lake: Any, run_id: str, scope: str, cfg: InferConfig) -> str | None:
    """Return None when this run may proceed, else the id of the live run holding the scope.

    The ``runs`` table is the lock: every run appends its row (with its scope) before working and
    heartbeats at each commit. Among live runs of the same scope (heartbeat younger than
    ``lease_ttl_s``), the earliest-started wins; ties break on run id. Runs killed mid-way stop
    heartbeating and lose the lease after the TTL, so a re-run can finish their work.
    """
    deadline = time.monotonic() + cfg.wait_for_lease_s
    while True:
        holder = lake.lease_holder(scope=scope, ttl_s=cfg.lease_ttl_s)
        if holder is None or holder == run_id:
            return None
        if time.monotonic() >= deadline:
            return str(holder)
        time.sleep(min(10.0, max(0.5, cfg.lease_ttl_s / 10)))


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
    if s.stage_s:
        per = ", ".join(f"{k} {v:.1f}" for k, v in s.stage_s.items())
        lines.append(f"  stage time (summed over workers, s): {per}")
    lines.append("  model versions: " + ", ".join(f"{k}={v}" for k, v in s.model_versions.items()))
    if s.reject_reasons:
        lines.append("  reject reasons: " + "; ".join(f"{k} x{v}" for k, v in s.reject_reasons.items()))
    lines.append(f"  tables: {s.lake_uri}/traits, {s.lake_uri}/rejects, {s.lake_uri}/runs")
    return "\n".join(lines)

