"""The studio's state: the queue, one editing session per open image, undo/redo, accept.

An :class:`ImageSession` holds the image, the proposal being corrected, the *model mask* (what
the click engine last returned) and the person's brush/eraser strokes, which always win over
the model (the shown mask is the model mask with the strokes painted on, in order). Every edit
pushes a snapshot (clicks, strokes, model mask packed to bits, and the forest engine's
model of that moment) on the undo stack, so undo also rolls back the forest a click retrained:
exactly (the earlier forest object) when no later edit retrained it, else by retraining on the
scribbles that remain.

:meth:`Studio.accept` writes, in this order: the mask PNG to
``<lake>/masks/studio/<image_id>/<annotation_id>.png``, one ``annotations`` row
(:data:`rootflow.lake.schema.ANNOTATIONS_SCHEMA`) and the mask's traits as producer ``mask``
with model version ``annotation-<annotation_id>`` (params name the annotation and the
proposal). Active seconds are the sum of the gaps between the person's actions on the image,
each gap capped at :data:`IDLE_CAP_S` (a coffee break is not annotation time).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np

from rootflow.io import storage
from rootflow.studio.engines import Click, EditResult, Stroke, iou
from rootflow.studio.queue import Entry, Proposal, QueueFilter, load_entries, ordered

log = logging.getLogger(__name__)

IDLE_CAP_S = 30.0
MAX_UNDO = 64


class StudioError(ValueError):
    """A request the studio refuses (``status``: the HTTP status to answer with)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


@dataclasses.dataclass
class _Snapshot:
    clicks: tuple[Click, ...]
    strokes: tuple[Stroke, ...]
    model_bits: np.ndarray
    engine: str | None
    forest: Any = None  # the forest engine's model at that moment (None: none trained yet)


class ImageSession:
    """Editing state of one image."""

    def __init__(self, entry: Entry, rgb: np.ndarray, proposal: Proposal | None,
                 proposal_mask: np.ndarray) -> None:
        self.entry = entry
        self.rgb = rgb
        self.h, self.w = rgb.shape[:2]
        self.proposal = proposal
        self.proposal_mask = proposal_mask
        self.model_mask = proposal_mask.copy()
        self.clicks: list[Click] = []
        self.strokes: list[Stroke] = []
        self.engines_used: list[str] = []
        self.undo: list[_Snapshot] = []
        self.redo: list[_Snapshot] = []
        self.forest_seen: Any = None  # the forest model as this session's last edit left it
        self.revision = 0
        self.started_at = utcnow()
        self._last_action = time.monotonic()
        self.active_seconds = 0.0
        self.current = self._compose()

    def _compose(self) -> np.ndarray:
        out = self.model_mask.copy()
        for st in self.strokes:
            out[st.paint(out.shape)] = st.mode == "brush"
        return out

    def touch(self) -> None:
        now = time.monotonic()
        self.active_seconds += min(IDLE_CAP_S, now - self._last_action)
        self._last_action = now

    def _snapshot(self, forest: Any = None) -> _Snapshot:
        return _Snapshot(tuple(self.clicks), tuple(self.strokes), np.packbits(self.model_mask),
                         self.engines_used[-1] if self.engines_used else None, forest)

    def _restore(self, s: _Snapshot) -> None:
        self.clicks = list(s.clicks)
        self.strokes = list(s.strokes)
        self.model_mask = np.unpackbits(s.model_bits, count=self.h * self.w).reshape(
            self.h, self.w).astype(bool)
        self.current = self._compose()
        self.revision += 1

    def push(self, forest: Any = None) -> None:
        """Save the state before an edit (``forest``: the forest model before it)."""
        self.undo.append(self._snapshot(forest))
        del self.undo[:-MAX_UNDO]
        self.redo.clear()

    def do_undo(self) -> _Snapshot | None:
        """Step back; returns the snapshot restored (None when there is nothing to undo)."""
        return self._step(self.undo, self.redo)

    def do_redo(self) -> _Snapshot | None:
        return self._step(self.redo, self.undo)

    def _step(self, src: list[_Snapshot], dst: list[_Snapshot]) -> _Snapshot | None:
        """Restore the last snapshot of ``src``, saving the current state on ``dst``."""
        if not src:
            return None
        dst.append(self._snapshot(self.forest_seen))
        s = src.pop()
        self._restore(s)
        return s

    def set_model(self, mask: np.ndarray) -> None:
        self.model_mask = mask
        self.current = self._compose()
        self.revision += 1

    def add_stroke(self, st: Stroke) -> None:
        self.strokes.append(st)
        self.current[st.paint(self.current.shape)] = st.mode == "brush"
        self.revision += 1


@dataclasses.dataclass
class StudioConfig:
    """How the studio runs (what the CLI resolves)."""

    lake_uri: str
    manifest_uri: str | None = None
    person: str | None = None
    prefetch_ahead: int = 2
    max_open: int = 4


class Studio:
    """Queue + sessions + engines + writer; the web app is a thin layer over this."""

    def __init__(self, cfg: StudioConfig, *, lake: Any, engines: dict[str, Any],
                 storage_options: storage.StorageLike = None) -> None:
        self.cfg = cfg
        self.lake = lake
        self.engines = engines
        self.storage_options = storage_options
        self.entries = load_entries(lake, cfg.manifest_uri, storage_options=storage_options)
        self.sessions: OrderedDict[str, ImageSession] = OrderedDict()
        self.lock = threading.RLock()
        self.timings: dict[str, list[float]] = {"click": [], "open": [], "accept": []}
        self._prefetch_q: list[str] = []
        self._prefetch_cv = threading.Condition()
        self._stop = threading.Event()
        self._prefetcher: threading.Thread | None = None
        self.prefetched: list[str] = []
        self.rgb_cache: OrderedDict[str, np.ndarray] = OrderedDict()

    # -- queue ---------------------------------------------------------------------------------
    def queue(self, flt: QueueFilter = QueueFilter(), order: str = "priority") -> list[Entry]:
        return ordered(self.entries.values(), flt, order=order)

    def entry(self, image_id: str) -> Entry:
        e = self.entries.get(image_id)
        if e is None:
            raise StudioError(f"unknown image id {image_id!r}", 404)
        return e

    def default_engine(self) -> str:
        return "rootsam" if "rootsam" in self.engines else "forest"

    # -- images --------------------------------------------------------------------------------
    def rgb(self, e: Entry) -> np.ndarray:
        from rootflow.io.images import decode, to_rgb8

        with self.lock:
            if e.image_id in self.rgb_cache:
                self.rgb_cache.move_to_end(e.image_id)
                return self.rgb_cache[e.image_id]
        img, _ = decode(storage.read_bytes(e.image_uri, self.storage_options))
        rgb, _ = to_rgb8(img)
        with self.lock:
            self.rgb_cache[e.image_id] = rgb
            while len(self.rgb_cache) > self.cfg.max_open + self.cfg.prefetch_ahead:
                self.rgb_cache.popitem(last=False)
        return rgb

    def _proposal_mask(self, e: Entry, p: Proposal | None, shape: tuple[int, int]) -> np.ndarray:
        from rootflow.io.images import decode_mask

        if p is None or not p.mask_uri:
            return np.zeros(shape, bool)
        m = decode_mask(storage.read_bytes(p.mask_uri, self.storage_options))
        if m.shape != shape:
            raise StudioError(f"{p.key} mask of {e.image_id} is {m.shape[1]}x{m.shape[0]}, "
                              f"the image is {shape[1]}x{shape[0]}", 409)
        return m

    def open(self, image_id: str, proposal_key: str | None = None) -> ImageSession:
        """Open (or return the open) session of an image; ``proposal_key`` switches proposal."""
        e = self.entry(image_id)
        with self.lock:
            s = self.sessions.get(image_id)
            if s is not None and (proposal_key is None or (s.proposal and
                                                           s.proposal.key == proposal_key)):
                self.sessions.move_to_end(image_id)
                return s
        t0 = time.perf_counter()
        rgb = self.rgb(e)
        shape = rgb.shape[:2]
        if proposal_key == "forest-studio":
            forest = self.engines.get("forest")
            mask = forest.propose(rgb) if forest is not None else None
            if forest is None or mask is None:
                raise StudioError("no studio forest yet: correct an image with the forest "
                                  "engine first", 409)
            p: Proposal | None = Proposal("forest", forest.version, None)
        else:
            if proposal_key is None:
                p = e.default_proposal()
            else:
                p = next((q for q in e.proposals if q.key == proposal_key), None)
                if p is None:
                    raise StudioError(f"{image_id} has no proposal {proposal_key!r}; has "
                                      f"{[q.key for q in e.proposals]}", 404)
            mask = self._proposal_mask(e, p, shape)
        s = ImageSession(e, rgb, p, mask)
        with self.lock:
            self.sessions[image_id] = s
            while len(self.sessions) > self.cfg.max_open:
                self.sessions.popitem(last=False)
        self.timings["open"].append(time.perf_counter() - t0)
        self._schedule_prefetch(image_id)
        return s

    def session(self, image_id: str) -> ImageSession:
        self.entry(image_id)
        s = self.sessions.get(image_id)
        if s is None:
            raise StudioError(f"image {image_id!r} is not open: GET /api/images/{image_id} "
                              "first", 409)
        return s

    # -- edits ---------------------------------------------------------------------------------
    def _check_xy(self, s: ImageSession, x: int, y: int) -> None:
        if not (0 <= x < s.w and 0 <= y < s.h):
            raise StudioError(f"point ({x}, {y}) is outside the {s.w}x{s.h} image")

    def click(self, image_id: str, x: int, y: int, label: int,
              engine: str | None = None) -> EditResult:
        s = self.session(image_id)
        self._check_xy(s, x, y)
        name = engine or self.default_engine()
        eng = self.engines.get(name)
        if eng is None:
            raise StudioError(f"engine {name!r} is not available; have {sorted(self.engines)}",
                              409)
        with self.lock:
            s.touch()
            new = Click(x, y, label)
            clicks = [*s.clicks, new]
            forest = self.engines.get("forest")
            before = forest.model if forest is not None else None
            if name == "forest":
                res = eng.click(image_id, s.rgb, s.current, clicks, new, strokes=s.strokes)
            else:
                res = eng.click(image_id, s.rgb, s.current, clicks, new)
            s.push(forest=before)
            s.forest_seen = forest.model if forest is not None else None
            s.clicks = clicks
            s.engines_used.append(name)
            s.set_model(res.mask)
            self.timings["click"].append(res.seconds)
        return res

    def stroke(self, image_id: str, st: Stroke) -> None:
        s = self.session(image_id)
        for x, y in st.points:
            self._check_xy(s, x, y)
        with self.lock:
            s.touch()
            forest = self.engines.get("forest")
            s.push(forest=forest.model if forest is not None else None)
            s.add_stroke(st)
            if forest is not None:  # strokes are scribbles for the forest too
                forest.set_scribbles(image_id, s.rgb, s.clicks, s.strokes)
                s.forest_seen = forest.model

    def undo(self, image_id: str, redo: bool = False) -> bool:
        s = self.session(image_id)
        with self.lock:
            s.touch()
            forest = self.engines.get("forest")
            seen = s.forest_seen
            snap = s.do_redo() if redo else s.do_undo()
            if snap is not None and forest is not None and image_id in forest._scribbles:
                forest.set_scribbles(image_id, s.rgb, s.clicks, s.strokes)
                if forest.model is seen:  # nothing retrained since this image's edit: exact
                    forest.restore_model(snap.forest)
                elif forest.model is not snap.forest:  # another image retrained it since
                    with forest.lock:
                        forest.retrain()
                s.forest_seen = forest.model
        return snap is not None

    def skip(self, image_id: str) -> str | None:
        """Close the image without writing; returns the next image of the queue."""
        self.entry(image_id)
        with self.lock:
            self.sessions.pop(image_id, None)
        return self.next_after(image_id)

    def next_after(self, image_id: str) -> str | None:
        q = [e.image_id for e in self.queue() if not e.done]
        if image_id in q:
            i = q.index(image_id)
            rest = q[i + 1:] + q[:i]
            return rest[0] if rest else None
        return q[0] if q else None

    # -- accept --------------------------------------------------------------------------------
    def accept(self, image_id: str, person: str) -> dict[str, Any]:
        """Write the mask, the ``annotations`` row and the ``mask`` traits row."""
        from rootflow.io.images import encode_png
        from rootflow.traits import measure

        s = self.session(image_id)
        t0 = time.perf_counter()
        with self.lock:
            s.touch()
            mask = s.current.copy()
            e = s.entry
            ended = utcnow()
            png = encode_png(mask)
            digest = hashlib.sha256(png).hexdigest()
            annotation_id = hashlib.sha256(
                f"{image_id}|{person}|{s.started_at.isoformat()}|{ended.isoformat()}|{digest}"
                .encode()).hexdigest()[:16]
            safe_id = "".join(c if c.isalnum() or c in "._-" else "_" for c in image_id)
            mask_uri = storage.join(self.cfg.lake_uri, "masks", "studio", safe_id,
                                    f"{annotation_id}.png")
            dpi = e.meta.get("dpi")
            traits = measure(mask, dpi=float(dpi)) if dpi else None
            p = s.proposal
            row = {
                "annotation_id": annotation_id, "image_id": image_id, "image_uri": e.image_uri,
                "mask_uri": mask_uri, "width": s.w, "height": s.h,
                "proposed_by": p.producer if p else None,
                "proposed_version": p.version if p else None,
                "proposal_mask_uri": p.mask_uri if p else None,
                "engine": ",".join(sorted(set(s.engines_used))) or None,
                "engine_version": ",".join(sorted({self.engines[n].version
                                                   for n in set(s.engines_used)})) or None,
                "clicks_json": json.dumps([c.to_json() for c in s.clicks]),
                "strokes_json": json.dumps([st.to_json() for st in s.strokes]),
                "n_clicks": len(s.clicks), "n_strokes": len(s.strokes),
                "iou_proposed_accepted": iou(s.proposal_mask, mask),
                "root_fraction": float(mask.mean()),
                "person": person, "started_at": s.started_at, "ended_at": ended,
                "active_seconds": round(s.active_seconds, 3),
            }
            storage.write_bytes(mask_uri, png, self.storage_options)
            self.lake.commit_rows("annotations", [row])
            if traits is not None:
                meta = {k: v for k, v in e.meta.items() if v is not None}
                trow = {**meta, **traits, "image_id": image_id, "image_uri": e.image_uri,
                        "mask_uri": mask_uri, "model_name": "mask",
                        "model_version": f"annotation-{annotation_id}", "run_id": "studio",
                        "params": json.dumps({"source": "studio annotation",
                                              "annotation_id": annotation_id,
                                              "proposed_by": row["proposed_by"],
                                              "proposed_version": row["proposed_version"]})}
                self.lake.commit_traits([trow])
            e.done = True
            e.proposals.append(Proposal("mask", f"annotation-{annotation_id}", mask_uri))
            self.sessions.pop(image_id, None)
            self.timings["accept"].append(time.perf_counter() - t0)
        return {"annotation_id": annotation_id, "mask_uri": mask_uri,
                "traits_written": traits is not None, "next": self.next_after(image_id),
                "active_seconds": row["active_seconds"]}

    # -- background encoding -------------------------------------------------------------------
    def _schedule_prefetch(self, image_id: str) -> None:
        eng = self.engines.get("rootsam")
        if eng is None or self.cfg.prefetch_ahead <= 0:
            return
        order = [e.image_id for e in self.queue() if not e.done or e.image_id == image_id]
        i = order.index(image_id) if image_id in order else -1
        nxt = [x for x in order[i + 1:] + order[:max(i, 0)] if x != image_id]
        nxt = nxt[:self.cfg.prefetch_ahead]
        with self._prefetch_cv:
            self._prefetch_q = [image_id, *nxt]
            self._prefetch_cv.notify()
        if self._prefetcher is None:
            self._prefetcher = threading.Thread(target=self._prefetch_loop, name="studio-encode",
                                                daemon=True)
            self._prefetcher.start()

    def _prefetch_loop(self) -> None:
        eng = self.engines["rootsam"]
        while not self._stop.is_set():
            with self._prefetch_cv:
                while not self._prefetch_q and not self._stop.is_set():
                    self._prefetch_cv.wait(timeout=1.0)
                if self._stop.is_set():
                    return
                image_id = self._prefetch_q.pop(0)
            try:
                e = self.entries[image_id]
                n = eng.prefetch(image_id, self.rgb(e), stop=self._stop)
                if n:
                    self.prefetched.append(image_id)
                    log.info("studio: encoded %d tiles of %s in the background", n, image_id)
            except Exception as exc:  # background work must never take the server down
                log.warning("studio: background encoding of %s failed: %s", image_id, exc)

    def close(self) -> None:
        self._stop.set()
        with self._prefetch_cv:
            self._prefetch_cv.notify_all()


def build_studio(cfg: StudioConfig, *, storage_options: storage.StorageLike = None,
                 rootsam: Any = None, forest_base: Any = None,
                 forest_factory: Callable[..., Any] | None = None) -> Studio:
    """A :class:`Studio` over ``cfg.lake_uri`` with a forest engine and, if given, RootSAM."""
    from rootflow.lake import Lake
    from rootflow.studio.engines import ForestEngine, RootSAMEngine

    lake = Lake(cfg.lake_uri, storage_options)
    engines: dict[str, Any] = {"forest": (forest_factory or ForestEngine)(forest_base)}
    if rootsam is not None:
        engines["rootsam"] = RootSAMEngine(rootsam)
    return Studio(cfg, lake=lake, engines=engines, storage_options=storage_options)
