"""The dynamics job: traits table -> consecutive session pairs -> ``alignments`` + ``dynamics``.

The chain (:func:`build_dataset` reads top to bottom)::

    driver: traits rows with masks -> one row per (window, consecutive pair, producer, version)
            still to do (plan_pairs)
    Ray Data: group by (experiment, tube, window) -> window_stage: read each image and mask once,
            align each pair once (shared by every producer), measure each producer's pair
    driver: cumulative production/mortality per window and producer, MERGE into Delta

Incremental by construction: a pair needs only its two sessions, and pairs whose key is already
in ``dynamics`` are skipped (``force`` recomputes), so the nightly run after a new session
computes one pair per window and producer; ``since`` narrows to pairs whose later session was
captured on or after a date. Cumulative values are summed from the table's numbers, not from
images, so they never need the season's images again.

Bad input never stops the other windows: a window with one session becomes a ``rejects`` row
(stage ``dynamics``); a missing mask, unreadable file or images of different sizes make the
pair's row ``status = "error"`` with the reason; a pair that cannot be aligned is
``status = "flagged"``; sessions whose numbers run against their dates are paired by date and
the rows say so in ``reason``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import pickle
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rootflow.dynamics.align import DEFAULT_METHOD, MIN_OVERLAP, MIN_QUALITY, Alignment
from rootflow.dynamics.dynamics import DEFAULT_K_MM, DYNAMICS_VERSION, cumulate
from rootflow.io.storage import StorageLike, StorageOptions

log = logging.getLogger(__name__)

STAGE = "dynamics"
_SESSION_COLS = ("image_id", "image_uri", "session", "captured_at", "year", "depth", "depth_cm",
                 "dpi")


@dataclasses.dataclass(frozen=True)
class DynamicsConfig:
    """What one dynamics run does.

    Attributes:
        producers: traits producers whose masks to compare (None: every producer with masks).
        model_version: only this model version (None: each producer's latest, as in queries).
        since: only pairs whose later session was captured on/after this ISO date.
        method: alignment method (:data:`rootflow.dynamics.align.METHODS`); ``identity``
            measures without alignment (for comparison; never flagged).
        k_mm: persistence tolerance (see :mod:`rootflow.dynamics.dynamics`).
        min_quality / min_overlap: alignment acceptance thresholds.
        force: recompute pairs already in the table.
        trait_options: keyword arguments for :func:`rootflow.traits.measure`.
        num_cpus: CPU slots per window task.
    """

    producers: tuple[str, ...] | None = None
    model_version: str | None = None
    since: str | None = None
    method: str = DEFAULT_METHOD
    k_mm: float = DEFAULT_K_MM
    min_quality: float = MIN_QUALITY
    min_overlap: float = MIN_OVERLAP
    force: bool = False
    trait_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    num_cpus: float = 1.0


@dataclasses.dataclass
class DynamicsSummary:
    run_id: str
    status: str
    n_pairs: int
    n_ok: int
    n_flagged: int
    n_error: int
    n_rejects: int
    n_skipped: int
    wall_s: float
    reasons: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------
# planning (driver)
# ------------------------------------------------------------------------------------------
def _traits_rows(lake: Any, cfg: DynamicsConfig) -> pa.Table:
    cols = ["experiment", "tube", "window", *_SESSION_COLS, "model_name", "model_version",
            "mask_uri", "processed_at"]
    if not lake.exists("traits"):
        return lake.schema("traits").empty_table().select(cols)
    return lake.read("traits", columns=cols)


def _producer_versions(rows: pa.Table, cfg: DynamicsConfig) -> list[tuple[str, str]]:
    """(producer, version) series to measure: those with masks, filtered by the config."""
    latest: dict[str, tuple[Any, str]] = {}
    for r in rows.filter(pc.is_valid(rows["mask_uri"])).select(
            ["model_name", "model_version", "processed_at"]).to_pylist():
        name, ver = r["model_name"], r["model_version"]
        if cfg.producers and name not in cfg.producers:
            continue
        if cfg.model_version and ver != cfg.model_version:
            continue
        cand = (r["processed_at"], ver)
        if name not in latest or cand > latest[name]:
            latest[name] = cand
    return sorted((k, v[1]) for k, v in latest.items())


def plan_pairs(rows: pa.Table, cfg: DynamicsConfig, *, done: set[tuple[Any, ...]],
               alignments: dict[tuple[Any, ...], dict[str, Any]]
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """(pair rows to compute, window-level reject rows, pairs skipped as already done).

    Sessions of a window are the union over every producer's traits rows, ordered by capture
    time; a producer without a mask at one of them gets an ``error`` pair naming the session.
    """
    series = _producer_versions(rows, cfg)
    since = dt.datetime.fromisoformat(cfg.since) if cfg.since else None
    windows: dict[tuple[str, int, int], dict[int, dict[str, Any]]] = defaultdict(dict)
    masks: dict[tuple[Any, ...], str] = {}
    for r in rows.to_pylist():
        wkey = (r["experiment"], int(r["tube"]), int(r["window"]))
        windows[wkey].setdefault(int(r["session"]), {c: r[c] for c in _SESSION_COLS})
        if r["mask_uri"]:
            masks[(*wkey, int(r["session"]), r["model_name"], r["model_version"])] = r["mask_uri"]
    pairs: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    n_skipped = 0
    for wkey, by_session in sorted(windows.items()):
        sessions = sorted(by_session.values(), key=lambda s: (s["captured_at"], s["session"]))
        if len(sessions) < 2:
            s = sessions[0]
            for name, _ in series:
                rejects.append({**s, "experiment": wkey[0], "tube": wkey[1], "window": wkey[2],
                                "model_name": name, "stage": STAGE,
                                "reason": "dynamics: window has one session only: nothing to "
                                          "compare it with"})
            continue
        order_note = None
        nums = [s["session"] for s in sessions]
        if nums != sorted(nums):
            bad = next(i for i in range(1, len(nums)) if nums[i] < nums[i - 1])
            order_note = (f"sessions out of date order: session {nums[bad - 1]} "
                          f"({sessions[bad - 1]['captured_at']:%Y-%m-%d}) was captured before "
                          f"session {nums[bad]} ({sessions[bad]['captured_at']:%Y-%m-%d}); "
                          "paired by capture date")
        for a, b in zip(sessions[:-1], sessions[1:], strict=True):
            if since is not None and b["captured_at"] < since:
                continue
            base = {"experiment": wkey[0], "tube": wkey[1], "window": wkey[2],
                    "year": a["year"], "depth": a["depth"], "depth_cm": a["depth_cm"],
                    "dpi": a["dpi"], "session_from": a["session"], "session_to": b["session"],
                    "captured_from": a["captured_at"], "captured_to": b["captured_at"],
                    "days": (b["captured_at"] - a["captured_at"]).total_seconds() / 86400.0,
                    "image_id_from": a["image_id"], "image_id_to": b["image_id"],
                    "image_uri_from": a["image_uri"], "image_uri_to": b["image_uri"],
                    "order_note": order_note or ""}
            akey = (*wkey, a["session"], b["session"], cfg.method)
            known = alignments.get(akey) if not cfg.force else None
            for name, ver in series:
                key = (*wkey, a["session"], b["session"], name, ver)
                if key in done and not cfg.force:
                    n_skipped += 1
                    continue
                mf = masks.get((*wkey, a["session"], name, ver))
                mt = masks.get((*wkey, b["session"], name, ver))
                missing = [f"session {s['session']} ({s['captured_at']:%Y-%m-%d})"
                           for s, m in ((a, mf), (b, mt)) if not m]
                pairs.append({**base, "model_name": name, "model_version": ver,
                              "mask_uri_from": mf or "", "mask_uri_to": mt or "",
                              "known_alignment": pickle.dumps(known),
                              "input_error": (f"no {name} mask for " + " and ".join(missing))
                              if missing else ""})
    return pairs, rejects, n_skipped


# ------------------------------------------------------------------------------------------
# the window stage (Ray task; pure function of its group)
# ------------------------------------------------------------------------------------------
def _read_image(uri: str, so: dict[str, Any]) -> np.ndarray:
    from rootflow.io import storage
    from rootflow.io.images import decode

    return decode(storage.read_bytes(uri, so))[0]


def _read_mask(uri: str, so: dict[str, Any]) -> np.ndarray:
    from rootflow.io import storage
    from rootflow.io.images import decode_mask

    return decode_mask(storage.read_bytes(uri, so))


def _cached(cache: dict[str, Any], uri: str, fn: Any) -> Any:
    if uri not in cache:
        try:
            cache[uri] = fn(uri)
        except Exception as e:  # a bad file fails its pairs, not the window
            cache[uri] = e
    return cache[uri]


def align_pair(fixed: np.ndarray | Exception, moving: np.ndarray | Exception, cfg: DynamicsConfig
               ) -> Alignment:
    """The job's alignment of one pair (never raises: failures come back flagged)."""
    from rootflow.dynamics.align import AlignError, align, quality

    for img, which in ((fixed, "earlier"), (moving, "later")):
        if isinstance(img, Exception):
            return Alignment(0, 0, 0, 0, 0, cfg.method, ok=False,
                             reason=f"cannot read the {which} image: {img}")
    assert not isinstance(fixed, Exception) and not isinstance(moving, Exception)
    try:
        if cfg.method == "identity":  # the no-alignment baseline: measured, never flagged
            base = Alignment(0.0, 0.0, 0.0, 0.0, 0.0, "identity")
            if fixed.shape[:2] != moving.shape[:2]:
                raise AlignError("images of different sizes: "
                                 f"{fixed.shape[1]}x{fixed.shape[0]} and "
                                 f"{moving.shape[1]}x{moving.shape[0]}")
            q, ov = quality(fixed, moving, base)
            return dataclasses.replace(base, quality=q, overlap=ov)
        return align(fixed, moving, method=cfg.method, min_quality=cfg.min_quality,
                     min_overlap=cfg.min_overlap)
    except AlignError as e:
        return Alignment(0, 0, 0, 0, 0, cfg.method, ok=False, reason=str(e))


def _align_cols(al: Alignment) -> dict[str, Any]:
    return {"align_ok": al.ok, "align_dx": al.dx, "align_dy": al.dy,
            "align_angle_deg": al.angle_deg, "align_quality": al.quality,
            "align_overlap": al.overlap, "align_reason": al.reason}


def window_stage(batch: dict[str, np.ndarray], *, cfg: DynamicsConfig,
                 storage_options: dict[str, Any], run_id: str) -> dict[str, np.ndarray]:
    """All pairs of one window: read each image/mask once, align each pair once, measure each
    producer. Returns ``kind`` ("dynamics" | "alignment") and pickled ``record`` columns."""
    from rootflow.dynamics.dynamics import pair_dynamics

    n = len(batch["session_from"])
    rows = [{k: _py(batch[k][i]) for k in batch} for i in range(n)]
    images: dict[str, Any] = {}
    masks: dict[str, Any] = {}
    aligned: dict[tuple[int, int], Alignment] = {}
    kinds: list[str] = []
    records: list[bytes] = []
    for r in sorted(rows, key=lambda r: (r["captured_to"], r["model_name"])):
        pkey = (r["session_from"], r["session_to"])
        out = {k: r[k] for k in ("experiment", "tube", "window", "year", "depth", "depth_cm",
                                 "dpi", "session_from", "session_to", "captured_from",
                                 "captured_to", "days", "image_id_from", "image_id_to",
                                 "model_name", "model_version")}
        out.update(run_id=run_id, align_method=cfg.method, dynamics_version=DYNAMICS_VERSION)
        if pkey not in aligned:
            known = pickle.loads(r["known_alignment"])
            if known is not None:
                aligned[pkey] = Alignment(known["align_dx"], known["align_dy"],
                                          known["align_angle_deg"], known["align_quality"],
                                          known["align_overlap"], cfg.method,
                                          ok=bool(known["align_ok"]),
                                          reason=known["align_reason"])
            else:
                fi = _cached(images, r["image_uri_from"], lambda u: _read_image(u, storage_options))
                mi = _cached(images, r["image_uri_to"], lambda u: _read_image(u, storage_options))
                aligned[pkey] = align_pair(fi, mi, cfg)
                kinds.append("alignment")
                records.append(pickle.dumps({
                    **{k: out[k] for k in ("experiment", "tube", "window", "year", "depth",
                                           "depth_cm", "session_from", "session_to",
                                           "captured_from", "captured_to", "days",
                                           "image_id_from", "image_id_to", "run_id")},
                    "method": cfg.method, **_align_cols(aligned[pkey])}))
        al = aligned[pkey]
        out.update(_align_cols(al))
        notes = [r["order_note"]] if r["order_note"] else []
        if r["input_error"]:
            out.update(status="error", reason="; ".join([r["input_error"], *notes]))
        elif not al.ok:
            size = al.reason is not None and al.reason.startswith(("images of different",
                                                                   "cannot read"))
            out.update(status="error" if size else "flagged",
                       reason="; ".join([f"alignment: {al.reason}", *notes]))
        else:
            ma = _cached(masks, r["mask_uri_from"], lambda u: _read_mask(u, storage_options))
            mb = _cached(masks, r["mask_uri_to"], lambda u: _read_mask(u, storage_options))
            bad = next((m for m in (ma, mb) if isinstance(m, Exception)), None)
            try:
                if bad is not None:
                    raise ValueError(f"cannot read a mask: {bad}")
                use = None if cfg.method == "identity" else al
                out.update(pair_dynamics(ma, mb, use, dpi=float(r["dpi"]), days=float(r["days"]),
                                         k_mm=cfg.k_mm, trait_options=cfg.trait_options))
                out.update(status="ok", reason="; ".join(notes) or None)
            except Exception as e:  # noqa: BLE001 - recorded as the pair's reason
                out.update(status="error", reason="; ".join([f"{type(e).__name__}: {e}",
                                                             *notes]))
        kinds.append("dynamics")
        records.append(pickle.dumps(out))
    return {"kind": np.array(kinds, dtype=object), "record": np.array(records, dtype=object)}


def _py(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, np.datetime64):
        v = v.astype("datetime64[us]").item()
    return v


# ------------------------------------------------------------------------------------------
# the chain and the driver
# ------------------------------------------------------------------------------------------
def build_dataset(pairs: list[dict[str, Any]], *, cfg: DynamicsConfig,
                  storage_options: dict[str, Any], run_id: str) -> Any:
    """Pairs -> grouped by window -> alignment and dynamics records (lazy Ray Dataset)."""
    import ray.data

    # Strings are never null here ("" = none): numpy batches turn null strings into NaN.
    table = pa.Table.from_pylist(pairs)
    n_windows = len({(p["experiment"], p["tube"], p["window"]) for p in pairs})
    # Few shuffle partitions: Ray's default (200) costs more than the work on small runs.
    ds: Any = ray.data.from_arrow(table)
    ds = ds.groupby(["experiment", "tube", "window"],
                    num_partitions=max(1, min(n_windows, 64))).map_groups(
        window_stage, batch_format="numpy", num_cpus=cfg.num_cpus,
        fn_kwargs={"cfg": cfg, "storage_options": storage_options, "run_id": run_id})
    return ds


def _iter(ds: Any) -> Iterator[dict[str, np.ndarray]]:
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def _done_keys(lake: Any) -> set[tuple[Any, ...]]:
    from rootflow.lake import schema as _schema

    if not lake.exists("dynamics"):
        return set()
    t = lake.read("dynamics", columns=list(_schema.DYNAMICS_KEY))
    return {tuple(r[k] for k in _schema.DYNAMICS_KEY) for r in t.to_pylist()}


def _known_alignments(lake: Any, method: str) -> dict[tuple[Any, ...], dict[str, Any]]:
    from rootflow.lake import schema as _schema

    if not lake.exists("alignments"):
        return {}
    t = lake.read("alignments").to_pylist()
    return {tuple(r[k] for k in _schema.ALIGNMENTS_KEY): r for r in t if r["method"] == method}


def _with_cumulative(lake: Any, new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """New rows plus existing rows of the same series whose cumulative values change."""
    from rootflow.lake import schema as _schema

    series = {(r["experiment"], r["tube"], r["window"], r["model_name"], r["model_version"])
              for r in new}
    old: list[dict[str, Any]] = []
    if series and lake.exists("dynamics"):
        old = [r for r in lake.read("dynamics").to_pylist()
               if (r["experiment"], r["tube"], r["window"], r["model_name"],
                   r["model_version"]) in series]
    new_keys = {tuple(r[k] for k in _schema.DYNAMICS_KEY) for r in new}
    before = {tuple(r[k] for k in _schema.DYNAMICS_KEY): (r["cum_produced_mm"], r["cum_lost_mm"])
              for r in old}
    merged: dict[tuple[Any, ...], list[dict[str, Any]]] = defaultdict(list)
    for r in [*(o for o in old if tuple(o[k] for k in _schema.DYNAMICS_KEY) not in new_keys),
              *new]:
        merged[(r["experiment"], r["tube"], r["window"], r["model_name"],
                r["model_version"])].append(r)
    out = []
    for rows in merged.values():
        for r in cumulate(rows):
            key = tuple(r[k] for k in _schema.DYNAMICS_KEY)
            if key in new_keys or before.get(key) != (r["cum_produced_mm"], r["cum_lost_mm"]):
                out.append(r)
    return out


def run(lake_uri: str, cfg: DynamicsConfig, *, storage_options: StorageLike = None,
        run_id: str | None = None, progress: bool = True) -> DynamicsSummary:
    """Compute and commit the dynamics of every pair still to do. Needs a connected Ray."""
    import ray.data

    from rootflow.inference.pipeline import code_version
    from rootflow.lake import Lake

    t0 = time.perf_counter()
    so = StorageOptions.from_mapping(storage_options)
    run_id = run_id or f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:8]}"
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = False
    lake = Lake(lake_uri, storage_options=so)
    rows = _traits_rows(lake, cfg)
    pairs, rejects, n_skipped = plan_pairs(rows, cfg, done=_done_keys(lake),
                                           alignments=_known_alignments(lake, cfg.method))
    lake.start_run(run_id=run_id, job_kind="dynamics", manifest_uri=None,
                   config={"dynamics": dataclasses.asdict(cfg), "storage": so.redacted()},
                   model_versions={}, code_version=code_version())
    dyn: list[dict[str, Any]] = []
    aligns: list[dict[str, Any]] = []
    status = "failed"
    try:
        if pairs:
            ds = build_dataset(pairs, cfg=cfg, storage_options=so.to_dict(), run_id=run_id)
            for batch in _iter(ds):
                for kind, blob in zip(batch["kind"], batch["record"], strict=True):
                    (dyn if kind == "dynamics" else aligns).append(pickle.loads(blob))
        if aligns:
            lake.commit_rows("alignments", aligns)
        if dyn:
            lake.commit_rows("dynamics", _with_cumulative(lake, dyn))
        if rejects:
            now = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
            lake.commit_rejects([{**r, "run_id": run_id, "at": now} for r in rejects])
        status = "ok" if all(r["status"] == "ok" for r in dyn) and not rejects \
            else "ok_with_rejects"
    finally:
        n_bad = sum(r["status"] != "ok" for r in dyn) + len(rejects)
        lake.finish_run(run_id, n_ok=sum(r["status"] == "ok" for r in dyn), n_rejected=n_bad,
                        status=status)
    reasons: dict[str, int] = defaultdict(int)
    for r in dyn:
        if r["status"] != "ok":
            reasons[f"{r['status']}: {str(r['reason']).split(':')[0]}"] += 1
    for r in rejects:
        reasons["reject: " + r["reason"].split(":", 2)[1].strip()] += 1
    return DynamicsSummary(
        run_id=run_id, status=status, n_pairs=len(dyn),
        n_ok=sum(r["status"] == "ok" for r in dyn),
        n_flagged=sum(r["status"] == "flagged" for r in dyn),
        n_error=sum(r["status"] == "error" for r in dyn), n_rejects=len(rejects),
        n_skipped=n_skipped, wall_s=round(time.perf_counter() - t0, 2), reasons=dict(reasons))
