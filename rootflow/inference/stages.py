"""CPU stages of the processing pipeline: plain functions of a batch (``dict[str, np.ndarray]``).

The chain is read bytes -> decode/validate -> model actors -> traits -> output records; see
:func:`rootflow.inference.pipeline.build_dataset`. Every stage obeys one rule so that every
manifest row ends as exactly one traits row per producer or one rejects row: a per-row failure
never raises; it writes ``"<stage>: <Type>: <message>"`` into the row's ``error`` column and the
later stages pass that row through untouched. Ray Data would otherwise fail the whole job on the
first errored block (``max_errored_blocks=0``).

Each stage also adds the wall time it spent per row to ``t_<stage>`` (seconds), so the job's
summary can say where the time went without a profiler.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from rootflow.io import images, storage

Batch = dict[str, np.ndarray]

log = logging.getLogger(__name__)


def worker_logging() -> None:
    """In a Ray worker process, let rootflow's log lines (info and up, warnings included)
    reach stderr, which Ray forwards to the driver and so to ``ray job logs``.

    Python's default prints only warnings and drops the logger's name; a process whose logging
    is configured already (a root handler: pytest, Ray's ``LoggingConfig``) is left alone.
    """
    pkg = logging.getLogger("rootflow")
    if pkg.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    pkg.addHandler(handler)
    pkg.setLevel(logging.INFO)


#: Errors that a retry cannot fix: the object is not there or we may not read it.
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError,
              ValueError)


def _n(batch: Batch) -> int:
    return len(next(iter(batch.values()))) if batch else 0


def _objects(values: list[Any]) -> np.ndarray:
    """1-D object array (``np.array`` would try to stack equal-shaped images into one block)."""
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _opt(batch: Batch, col: str, i: int) -> Any:
    """Row ``i`` of an optional column, or None.

    Ray hands an all-``None`` object column back as float NaN (it travels as an Arrow null
    array), so "missing" may arrive as None, NaN or an absent column.
    """
    if col not in batch:
        return None
    v = batch[col][i]
    if v is None or (isinstance(v, float | np.floating) and np.isnan(v)):
        return None
    if isinstance(v, str | bytes) and not v:
        return None
    if isinstance(v, np.ndarray) and v.size == 0:
        return None
    return v


def todo(batch: Batch, i: int, producers: tuple[str, ...]) -> tuple[str, ...]:
    """Producers still to run for row ``i``: the ``todo`` column (comma-separated, set by the
    driver from what the lake already holds per producer and version), else all of them."""
    val = _opt(batch, "todo", i)
    if val is None:
        return producers
    wanted = set(str(val).split(","))
    return tuple(p for p in producers if p in wanted)


def to_run(batch: Batch, i: int, producers: tuple[str, ...],
           priors: dict[str, str] | None = None) -> set[str]:
    """Producers whose model runs on row ``i``: its :func:`todo`, plus the prior producer of
    each of them (``priors``: ``{consumer: prior}``), whose mask the consumer needs in-stream
    even when the lake already holds the prior's row for the image."""
    row = todo(batch, i, producers)
    return set(row) | {priors[p] for p in row if priors and p in priors}


#: Type of every object column that travels between stages. Arrow infers a block's types from
#: its values, so an optional column that is all-None in one block and bytes in the next would
#: not unify; "missing" is therefore an *empty value of the column's type* ("" / b"" / an empty
#: image), which :func:`_opt` reads back as None.
_STR, _BYTES, _IMAGE = "", b"", np.zeros((0, 0, 3), np.uint8)

#: Producers whose model stage outputs a mask: each adds ``<p>_mask_png``, ``<p>_confidence``,
#: ``<p>_model_version`` and ``<p>_params``, and all are measured, written and recorded by the
#: same code (:func:`traits`, :func:`_producer_record`).
MASK_PRODUCERS = ("forest", "unet", "rootsam")

COLUMN_KINDS: dict[str, Any] = {
    "error": _STR, "image_bytes": _BYTES, "mask_bytes": _BYTES, "image": _IMAGE,
    "mask_png": _BYTES, "rootquant_model_version": _STR,
    "traits_mask": _STR, "error_mask": _STR, "rootquant_error": _STR, "todo": _STR,
    "actor": _STR, "rootquant_params": _STR,
}
for _p in MASK_PRODUCERS:
    COLUMN_KINDS.update({f"{_p}_mask_png": _BYTES, f"{_p}_mask_uri": _STR,
                         f"{_p}_params": _STR, f"{_p}_model_version": _STR,
                         f"traits_{_p}": _STR, f"error_{_p}": _STR, f"{_p}_error": _STR})
_FLOAT_COLUMNS = (*(f"{p}_confidence" for p in MASK_PRODUCERS), "rootquant_length_mm",
                  "rootquant_area_mm2", "rootquant_presence")


def normalize(batch: Batch) -> Batch:
    """Give every known column one Arrow-stable type (see :data:`COLUMN_KINDS`)."""
    for col, values in list(batch.items()):
        empty = COLUMN_KINDS.get(col)
        # (a float column a stage ran on no row of is all None: not a string column)
        if empty is None and values.dtype == object and col not in _FLOAT_COLUMNS:
            # A column a stage added that we do not know: strings (or nothing at all) make a
            # string column, bytes a bytes column; anything else is left to Ray.
            present = [v for v in values if not _is_missing(v)]
            if all(isinstance(v, str) for v in present):
                empty = _STR
            elif all(isinstance(v, bytes) for v in present):
                empty = _BYTES
        if empty is not None:
            batch[col] = _objects([empty if _is_missing(v) else v for v in values])
    for col in _FLOAT_COLUMNS:
        if col in batch:
            batch[col] = np.asarray([np.nan if _is_missing(v) else float(v) for v in batch[col]],
                                    dtype=np.float64)
    return batch


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float | np.floating) and bool(np.isnan(v)))


def _errors(batch: Batch, col: str = "error") -> list[str | None]:
    if col in batch:
        return [e if isinstance(e, str) and e else None for e in batch[col]]
    return [None] * _n(batch)


def _fail(stage: str, exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return out_of_memory_reason(f"{stage}: {type(exc).__name__}: {msg}"[:500])


#: Words by which an allocation failure shows in a reason: numpy/Python ``MemoryError``,
#: torch's ``DefaultCPUAllocator: can't allocate memory`` (a RuntimeError), CUDA's
#: ``OutOfMemoryError`` and ``ENOMEM`` from C libraries.
_OOM_WORDS = ("MemoryError", "can't allocate memory", "out of memory", "Cannot allocate memory",
              "OutOfMemoryError", "std::bad_alloc")

#: The model actor's memory limit (MB on top of its loaded models; see :func:`limit_memory`),
#: named in out-of-memory reasons; None outside a limited actor.
_MEMORY_LIMIT_MB: int | None = None


def out_of_memory_reason(reason: str) -> str:
    """``"<stage>: out of memory: ..."`` for a reject reason that is an allocation failure,
    naming the limit that was hit; any other reason unchanged."""
    stage, _, detail = reason.partition(": ")
    # Under the cap a thread's stack (a private mapping) may not fit either: Python then says
    # "can't start new thread" (outside a capped actor that is more likely a thread limit).
    words = (*_OOM_WORDS, "can't start new thread") if _MEMORY_LIMIT_MB else _OOM_WORDS
    if not detail or detail.startswith("out of memory") or not any(w in detail for w in words):
        return reason
    limit = (f"the model actor's memory limit (resources.actor_memory_mb={_MEMORY_LIMIT_MB})"
             if _MEMORY_LIMIT_MB else "the memory of its worker")
    return (f"{stage}: out of memory: this image needs more than {limit} allows; raise the "
            f"limit or run it on a bigger node ({detail})")[:500]


def limit_memory(mb: int) -> int:
    """Cap this process's private memory at its current size plus ``mb`` MB; returns the cap
    in bytes.

    ``RLIMIT_DATA`` (Linux >= 4.7 counts private writable mappings, so every ``malloc``/``mmap``
    of numpy, torch, PIL and OpenCV) makes an allocation past the cap fail with ``ENOMEM``,
    which Python raises as ``MemoryError`` and torch as ``RuntimeError: ... can't allocate
    memory``: the image that needed it is rejected and the process lives on. It leaves out
    what a Ray worker maps without using (``RLIMIT_AS`` would count the shared object store,
    address space reserved without access such as malloc's arenas, and CUDA's address-space
    reservations on a GPU); thread stacks do count. The cap is relative to what the process holds when it is set (a
    Ray worker with torch loaded already has ~1 GB of private mappings, most never touched),
    so the setting reads as "memory for the work, beyond the loaded models".
    """
    import resource

    global _MEMORY_LIMIT_MB
    held = 0
    with open("/proc/self/status") as f:  # the same count RLIMIT_DATA is checked against
        for line in f:
            if line.startswith("VmData:"):
                held = int(line.split()[1]) * 1024
    cap = held + int(mb) * 2**20
    _soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    _MEMORY_LIMIT_MB = int(mb)
    return cap


def _timed(batch: Batch, stage: str, t0: float) -> None:
    n = max(_n(batch), 1)
    batch[f"t_{stage}"] = np.full(_n(batch), (time.perf_counter() - t0) / n, dtype=np.float64)


def read_with_retries(uri: str, storage_options: dict[str, Any] | None, *, attempts: int = 5,
                      base_delay_s: float = 0.2) -> bytes:
    """Read an object, retrying transient storage errors with jittered exponential backoff.

    Missing objects and permission errors are permanent and raise at once (their message is the
    reject reason); timeouts, throttling and dropped connections are retried.
    """
    for attempt in range(attempts):
        try:
            return storage.read_bytes(uri, storage_options)
        except _PERMANENT:
            raise
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(base_delay_s * (2**attempt) * (0.5 + random.random()))
    raise AssertionError("unreachable")


def read_bytes(batch: Batch, *, storage_options: dict[str, Any] | None = None,
               threads: int = 8) -> Batch:
    """Fetch ``image_uri`` (and ``mask_uri`` where present) into ``image_bytes``/``mask_bytes``.

    Object-storage reads are latency-bound, so one task reads its rows on a thread pool: many
    reads are in flight while only one CPU slot is held.
    """
    t0 = time.perf_counter()
    n = _n(batch)
    errors = _errors(batch)
    uris = list(batch["image_uri"])
    masks = [_opt(batch, "mask_uri", i) for i in range(n)]

    def one(i: int) -> tuple[bytes | None, bytes | None, str | None]:
        if errors[i]:
            return None, None, errors[i]
        try:
            img = read_with_retries(str(uris[i]), storage_options)
        except Exception as e:
            return None, None, _fail("read", e)
        mask = None
        if isinstance(masks[i], str) and masks[i]:
            try:
                mask = read_with_retries(masks[i], storage_options)
            except Exception as e:
                return None, None, _fail("read_mask", e)
            if not mask:  # b"" would travel as "no mask" (see _opt) and skip the mask's checks
                return None, None, "decode_mask: ImageDecodeError: empty mask file (0 bytes)"
        return img, mask, None

    with ThreadPoolExecutor(max_workers=max(1, min(threads, n))) as pool:
        results = list(pool.map(one, range(n)))
    batch["image_bytes"] = _objects([r[0] for r in results])
    batch["mask_bytes"] = _objects([r[1] for r in results])
    batch["error"] = _objects([r[2] for r in results])
    _timed(batch, "read", t0)
    return normalize(batch)


def decode_masks_only(batch: Batch) -> Batch:
    """:func:`decode` for runs without a model: the image is decoded (validated, its bit depth
    known) but dropped at once, since traits need only the masks."""
    batch = decode(batch)
    batch.pop("image", None)
    return batch


def decode(batch: Batch) -> Batch:
    """Decode and validate images (and given masks) into ``image`` (uint8 RGB) and ``mask_png``.

    The raw bytes are dropped here: past this stage images travel decoded (the models need the
    pixels) and masks travel PNG-encoded (a 2550x2273 mask is 5.8 MB raw, ~50 kB as PNG).
    """
    t0 = time.perf_counter()
    errors = _errors(batch)
    out_img: list[np.ndarray | None] = []
    out_mask: list[bytes | None] = []
    bits: list[int] = []
    for i in range(_n(batch)):
        decoded = None
        if not errors[i]:
            try:
                decoded = _decode_row(_opt(batch, "image_bytes", i), _opt(batch, "mask_bytes", i))
            except _RowError as e:
                errors[i] = str(e)
        rgb, b, mask_png = decoded or (None, 0, None)
        out_img.append(rgb)
        out_mask.append(mask_png)
        bits.append(b)
    del batch["image_bytes"], batch["mask_bytes"]
    batch["image"] = _objects(out_img)
    batch["mask_png"] = _objects(out_mask)
    batch["bit_depth"] = np.asarray(bits, dtype=np.int32)
    batch["error"] = _objects(errors)
    _timed(batch, "decode", t0)
    return normalize(batch)


class _RowError(Exception):
    """A row's reject reason (already prefixed with its stage)."""


def _decode_row(data: bytes, mdata: bytes | None) -> tuple[np.ndarray, int, bytes | None]:
    """Image bytes (+ optional mask bytes) -> (uint8 RGB, bit depth, mask as PNG or None)."""
    try:
        rgb, bits = images.decode(data)
    except Exception as e:
        raise _RowError(_fail("decode", e)) from e
    if mdata is None:
        return rgb, bits, None
    try:
        m = images.decode_mask(mdata)
        if m.shape != rgb.shape[:2]:
            raise ValueError(f"mask is {m.shape[1]}x{m.shape[0]} px but image is "
                             f"{rgb.shape[1]}x{rgb.shape[0]} px")
        return rgb, bits, images.encode_png(m)
    except Exception as e:
        raise _RowError(_fail("decode_mask", e)) from e


def mask_uri_for(lake_uri: str, model_name: str, model_version: str, row: dict[str, Any]) -> str:
    """Deterministic URI of a produced mask, so re-runs overwrite instead of duplicating."""
    safe_version = "".join(c if c.isalnum() or c in "._+-~" else "_" for c in model_version)
    parts = [model_name, safe_version, f"year={row['year']}", f"tube={row['tube']}",
             f"{row['image_id']}.png"]
    for part in parts:
        if not part or "/" in part or "\\" in part or part in (".", "..") or \
                part.startswith("..") or "\x00" in part:
            raise ValueError(f"refusing to write a mask outside the lake: path part {part!r}")
    return storage.join(lake_uri, "masks", *parts)


def traits(batch: Batch, *, producers: tuple[str, ...], lake_uri: str,
           storage_options: dict[str, Any] | None = None,
           trait_options: dict[str, Any] | None = None, write_masks: bool = True,
           model_versions: dict[str, str] | None = None) -> Batch:
    """Measure traits of the given mask (producer ``mask``) and of every model's mask.

    Adds ``traits_<p>`` (JSON string or None) for ``mask`` and each requested producer of
    :data:`MASK_PRODUCERS`, and ``<p>_mask_uri`` (where that producer's mask PNG was written,
    :func:`mask_uri_for`). A row fails here only for a reason that concerns the whole image; a
    producer-specific failure is recorded for that producer alone in ``error_<p>`` so the other
    producers' rows still land.
    """
    from rootflow.traits import measure

    t0 = time.perf_counter()
    n = _n(batch)
    errors = _errors(batch)
    opts = dict(trait_options or {})
    models = [p for p in MASK_PRODUCERS if p in producers]
    result: dict[str, list[Any]] = {}
    for p in ("mask", *models):
        result[f"traits_{p}"] = [None] * n
        result[f"error_{p}"] = [None] * n
    for p in models:
        result[f"{p}_mask_uri"] = [None] * n

    def measured(png: bytes, dpi: float) -> str:
        return json.dumps(measure(images.decode_mask(png), dpi=dpi, **opts))

    for i in range(n):
        if errors[i]:
            continue
        dpi = float(batch["dpi"][i])
        row_todo = todo(batch, i, producers)
        if "mask" in row_todo:
            png = _opt(batch, "mask_png", i)
            if png is None:
                result["error_mask"][i] = "traits: no mask_uri for this image"
            else:
                try:
                    result["traits_mask"][i] = measured(png, dpi)
                except Exception as e:
                    result["error_mask"][i] = _fail("traits", e)
        for p in models:
            if p not in row_todo:
                continue
            png = _opt(batch, f"{p}_mask_png", i)
            if png is None:
                result[f"error_{p}"][i] = _opt(batch, f"{p}_error", i) or f"{p}: no mask produced"
                continue
            try:
                result[f"traits_{p}"][i] = measured(png, dpi)
                if write_masks:
                    row = {k: batch[k][i] for k in ("year", "tube", "image_id")}
                    version = (model_versions or {}).get(p) or str(batch[f"{p}_model_version"][i])
                    uri = mask_uri_for(lake_uri, p, version, row)
                    storage.write_bytes(uri, png, storage_options)
                    result[f"{p}_mask_uri"][i] = uri
            except Exception as e:
                result[f"error_{p}"][i] = _fail("traits", e)
    for k, v in result.items():
        batch[k] = _objects(v)
    _timed(batch, "traits", t0)
    return normalize(batch)


#: Manifest columns carried into every output row.
MANIFEST_COLUMNS = ("image_id", "image_uri", "file_name", "experiment", "tube", "window",
                    "session", "captured_at", "year", "operator", "dpi", "depth_cm", "depth",
                    "mask_uri", "species", "treatment", "tile")

TIMING_STAGES = ("read", "decode", *MASK_PRODUCERS, "traits", "rootquant")


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    return v


def to_records(batch: Batch, *, producers: tuple[str, ...], run_id: str,
               model_versions: dict[str, str]) -> Batch:
    """Turn each image row into its output records: one ``traits`` record per producer, or
    ``reject`` records naming the stage and reason. Images are dropped here.

    Returns a batch with columns ``kind`` ("traits" | "reject"), ``record`` (a pickled dict ready
    for the lake: one stable binary column whatever the record's fields) and the per-row timings (repeated on each of the image's records, weighted so
    that their sum over records equals the image's time).
    """
    n = _n(batch)
    errors = _errors(batch)
    kinds: list[str] = []
    records: list[dict[str, Any]] = []
    weights: list[tuple[int, float]] = []
    for i in range(n):
        base = {c: _plain(_opt(batch, c, i)) for c in MANIFEST_COLUMNS if c in batch}
        base["run_id"] = run_id
        out: list[tuple[str, dict[str, Any]]] = []
        err = errors[i]
        row_todo = todo(batch, i, producers)
        if err:
            stage = err.split(":", 1)[0]
            for p in row_todo:
                out.append(("reject", {**base, "model_name": p, "stage": stage,
                                       "reason": err}))
        else:
            for p in row_todo:
                out.append(_producer_record(batch, i, p, base, model_versions))
        for kind, rec in out:
            kinds.append(kind)
            records.append(rec)
            weights.append((i, 1.0 / len(out)))
    actors = [_opt(batch, "actor", i) or "" for i in range(n)]
    res: Batch = {"kind": np.asarray(kinds, dtype=object),
                  "record": _objects([pickle.dumps(r, protocol=5) for r in records]),
                  # which model actor handled the image, and the image's share of each record
                  # (their sum per actor is its image count: the summary's per-actor work)
                  "actor": _objects([actors[i] for i, _ in weights]),
                  "image_weight": np.asarray([w for _, w in weights], dtype=np.float64)}
    for s in TIMING_STAGES:
        col = batch.get(f"t_{s}")
        res[f"t_{s}"] = np.asarray([float(col[i]) * w if col is not None else 0.0
                                    for i, w in weights], dtype=np.float64)
    return res


def _producer_record(batch: Batch, i: int, producer: str, base: dict[str, Any],
                     model_versions: dict[str, str]) -> tuple[str, dict[str, Any]]:
    rec = {**base, "model_name": producer, "model_version": model_versions[producer]}
    if producer == "mask" or producer in MASK_PRODUCERS:
        err = _opt(batch, f"error_{producer}", i)
        if err:
            return "reject", {**base, "model_name": producer, "stage": err.split(":", 1)[0],
                              "reason": err}
        rec.update(json.loads(batch[f"traits_{producer}"][i]))
        if producer == "mask":
            rec["params"] = json.dumps({"source": "given mask"})
        else:
            # The mask this row's traits were measured on (None with write_masks off), and the
            # version the actor that made it reports.
            rec["mask_uri"] = _opt(batch, f"{producer}_mask_uri", i)
            rec["confidence"] = float(batch[f"{producer}_confidence"][i])
            rec["params"] = str(batch[f"{producer}_params"][i])
            mismatch = _version_mismatch(str(batch[f"{producer}_model_version"][i]),
                                         model_versions[producer], producer)
            if mismatch:
                return "reject", {**base, "model_name": producer, "stage": producer,
                                  "reason": mismatch}
        return "traits", rec
    if producer == "rootquant":
        err = _opt(batch, "rootquant_error", i)
        length = _opt(batch, "rootquant_length_mm", i)
        if err or length is None:
            return "reject", {**base, "model_name": producer, "stage": "rootquant",
                              "reason": err or "rootquant: no prediction"}
        mismatch = _version_mismatch(str(batch["rootquant_model_version"][i]),
                                     model_versions[producer], producer)
        if mismatch:
            return "reject", {**base, "model_name": producer, "stage": producer,
                              "reason": mismatch}
        rec.update({"rootquant_length_mm": float(length),
                    "rootquant_area_mm2": float(batch["rootquant_area_mm2"][i]),
                    "rootquant_presence": float(batch["rootquant_presence"][i]),
                    "mask_uri": None,
                    "params": _opt(batch, "rootquant_params", i)
                    or json.dumps({"source": "regression from image"})})
        return "traits", rec
    raise ValueError(f"unknown producer {producer!r}")


def _version_mismatch(actor_version: str, run_version: str, producer: str) -> str | None:
    """None when the model an actor loaded is the one the run resolved on the driver.

    The run's version is the model's own (weights) version, optionally followed by
    ``~<settings hash>`` (see :func:`rootflow.inference.pipeline.resolve_model_versions`).
    """
    if actor_version == run_version or run_version.startswith(actor_version + "~"):
        return None
    return (f"{producer}: the actor loaded model version {actor_version} but the run resolved "
            f"{run_version} (the model file changed during the run?)")


#: Columns each model stage adds (besides ``<name>_error`` and ``t_<name>``), so a batch in
#: which a stage ran on no row still has them (blocks must keep one schema).
STAGE_COLUMNS: dict[str, tuple[str, ...]] = {
    **{p: (f"{p}_mask_png", f"{p}_confidence", f"{p}_model_version", f"{p}_params")
       for p in MASK_PRODUCERS},
    "rootquant": ("rootquant_length_mm", "rootquant_area_mm2", "rootquant_presence",
                  "rootquant_model_version", "rootquant_params"),
}


def _take(batch: Batch, idx: np.ndarray) -> Batch:
    return {k: v[idx] for k, v in batch.items()}


def _scatter(full: Batch, part: Batch, idx: np.ndarray, name: str) -> Batch:
    """Columns ``part`` (rows ``idx`` of ``full``) added or changed, spread back over ``full``;
    other rows get the column's missing value."""
    n = _n(full)
    out = dict(full)
    cols = ((set(part) - set(full)) | set(STAGE_COLUMNS.get(name, ()))
            | {f"{name}_error", f"t_{name}"})
    for col in sorted(cols):
        src = part.get(col)
        if src is not None and src.dtype != object and np.issubdtype(src.dtype, np.number):
            fill = np.nan if np.issubdtype(src.dtype, np.floating) and \
                not col.startswith("t_") else 0
            arr = np.full(n, fill, dtype=src.dtype)
            if col in full and full[col].dtype == src.dtype:
                arr[:] = full[col]
        else:
            arr = _objects(list(full[col]) if col in full else [None] * n)
        if src is not None:
            arr[idx] = src
        elif col == f"t_{name}":
            arr = np.zeros(n, dtype=np.float64)
        out[col] = arr
    return out


class ModelActor:
    """Ray Data actor holding one or more model stages (forest, U-Net, RootSAM, RootQuant).

    Each inner stage follows the stage contract (it marks failed rows in ``error``). This wrapper
    keeps failures *per producer*: errors an inner stage adds are moved to ``<stage>_error`` and
    the image's own ``error`` is restored, so a RootSAM failure does not drop the same image's
    mask-derived or RootQuant rows. An exception escaping a stage marks the whole batch for that
    producer instead of killing the job. With several stages in one actor the models
    share a GPU and the decoded image never leaves the actor between them ("fused" mode).

    Args:
        stages: ``(name, factory, config)`` triples; ``factory(config, storage_options=...)``
            builds the stage once, in the actor.
        storage_options: plain dict for :class:`~rootflow.io.storage.StorageOptions`.
        memory_limit_mb: cap on the memory this actor may take beyond its loaded models
            (:func:`limit_memory`); an image whose decode or model work needs more is
            rejected ``"<stage>: out of memory: ..."`` and the actor goes on. None: no cap.
        priors: ``{consumer: prior producer}`` (``{"rootsam": "forest"}``): the prior's stage
            also runs on every row whose ``todo`` names the consumer (:func:`to_run`), even
            when the row's own ``todo`` leaves the prior out; such a prior-only output feeds
            the consumer and is never recorded (traits and records follow ``todo`` alone).
    """

    def __init__(self, stages: list[tuple[str, Callable[..., Any], Any]],
                 storage_options: dict[str, Any] | None = None,
                 producers: tuple[str, ...] | None = None, decode_first: bool = False,
                 drop_image: bool = False, memory_limit_mb: int | None = None,
                 priors: dict[str, str] | None = None) -> None:
        worker_logging()
        t0 = time.perf_counter()
        self.stages = [(name, factory(cfg, storage_options=storage_options))
                       for name, factory, cfg in stages]
        self.producers = producers or tuple(name for name, _, _ in stages)
        self.priors = dict(priors or {})
        self.decode_first = decode_first
        self.drop_image = drop_image
        self.ident = _actor_identity()
        # The cap is set once the models are loaded: it bounds the work on the images.
        self.memory_cap = limit_memory(memory_limit_mb) if memory_limit_mb else None
        # One line per actor in the job's logs: where each model runs (node, GPU slot).
        log.info("model actor %s ready: %s loaded in %.1f s, at %s UTC", self.ident,
                 ",".join(name for name, _ in self.stages), time.perf_counter() - t0,
                 time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()))

    def __call__(self, batch: Batch) -> Batch:
        if self.decode_first:
            # Compressed bytes travel to the actor and are decoded here: a 2550x2273 scan is
            # ~1 MB as JPEG and 17 MB decoded, and the decoded pixels never cross nodes.
            batch = decode(batch)
        n = _n(batch)
        for name, stage in self.stages:
            # Only rows whose ``todo`` names this producer (or a producer it is the prior of)
            # run it; the others already have a row for this producer and version in the lake.
            want = np.asarray([name in to_run(batch, i, self.producers, self.priors)
                               for i in range(n)], dtype=bool)
            if want.all():
                batch = run_guarded(name, stage, batch)
            else:
                idx = np.flatnonzero(want)
                part = run_guarded(name, stage, _take(batch, idx)) if idx.size else {}
                batch = normalize(_scatter(batch, part, idx, name))
        batch["actor"] = _objects([self.ident] * n)
        if self.drop_image:
            # The last stage that needs the pixels is done: traits need only the masks (PNG).
            batch.pop("image", None)
        return batch


def _actor_identity() -> str:
    """``<node id[:8]>/gpu<ids>/pid<pid>``: which node, GPU slot and process ran an image."""
    import os

    node, gpus = "local", ""
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            node = ctx.get_node_id()[:8]
            gpus = ",".join(str(g) for g in ray.get_gpu_ids())
    except Exception:
        pass
    return f"{node}/gpu{gpus or '-'}/pid{os.getpid()}"


def run_guarded(name: str, stage: Callable[[Batch], Batch], batch: Batch) -> Batch:
    """Run one model stage with per-producer error isolation and timing (see ModelActor)."""
    t0 = time.perf_counter()
    before = _errors(batch)
    inp = dict(batch)
    inp["error"] = _objects(before)  # the stage contract: None for rows that are fine
    try:
        out = stage(inp)
        after = _errors(out)
        new = [a if (a and not b) else None for a, b in zip(after, before, strict=True)]
    except Exception as e:
        out = dict(batch)
        new = [None if b else _fail(name, e) for b in before]
    new = [out_of_memory_reason(e) if e else None for e in new]  # stages word their own
    out["error"] = _objects(before)
    out[f"{name}_error"] = _objects(new)
    _timed(out, name, t0)
    return normalize(out)
