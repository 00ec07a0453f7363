"""The studio's queue: images from the lake's ``traits`` table and/or a manifest.

Each image carries its *proposals*: the latest mask of each producer that wrote one (``mask``
for given or accepted masks, ``forest``, ``unet``, ``rootsam``), with the producer's
confidence and measured root length. The default order puts first the images the studio can
help most with:

* **disputed**: producers disagree on root length (``(max - min) / max`` over producers);
* **least confident**: the lowest producer confidence (``1 - confidence``).

``priority = max(disagreement, 1 - min confidence)``, highest first; images that already have
an accepted annotation go last. ``order="name"`` sorts by image id instead.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Iterable, Mapping
from typing import Any

from rootflow.io import storage

MASK_PRODUCERS = ("mask", "forest", "unet", "rootsam")
META_COLUMNS = ("image_id", "image_uri", "file_name", "experiment", "tube", "window", "session",
                "captured_at", "year", "operator", "dpi", "depth_cm", "depth", "species",
                "treatment", "tile")


@dataclasses.dataclass(frozen=True)
class Proposal:
    """One producer's mask of an image."""

    producer: str
    version: str
    mask_uri: str | None
    confidence: float | None = None
    length_mm: float | None = None

    @property
    def key(self) -> str:
        return f"{self.producer}@{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {"producer": self.producer, "version": self.version, "key": self.key,
                "confidence": self.confidence, "length_mm": self.length_mm,
                "has_mask": self.mask_uri is not None}


@dataclasses.dataclass
class Entry:
    """One image of the queue (``meta``: its manifest columns, for the traits row)."""

    image_id: str
    image_uri: str
    meta: dict[str, Any]
    proposals: list[Proposal] = dataclasses.field(default_factory=list)
    done: bool = False

    @property
    def tube(self) -> int | None:
        v = self.meta.get("tube")
        return None if v is None else int(v)

    @property
    def depth(self) -> int | None:
        v = self.meta.get("depth")
        return None if v is None else int(v)

    @property
    def date(self) -> str | None:
        v = self.meta.get("captured_at")
        if v is None:
            return None
        return v.date().isoformat() if isinstance(v, dt.datetime) else str(v)[:10]

    @property
    def disagreement(self) -> float:
        lens = [p.length_mm for p in self.proposals if p.length_mm is not None
                and math.isfinite(p.length_mm)]
        if len(lens) < 2 or max(lens) <= 0:
            return 0.0
        return (max(lens) - min(lens)) / max(lens)

    @property
    def confidence(self) -> float | None:
        c = [p.confidence for p in self.proposals if p.confidence is not None
             and math.isfinite(p.confidence)]
        return min(c) if c else None

    @property
    def priority(self) -> float:
        c = self.confidence
        return max(self.disagreement, 0.0 if c is None else 1.0 - c)

    def default_proposal(self) -> Proposal | None:
        """The proposal shown first: an accepted/given mask, else the most confident model."""
        with_mask = [p for p in self.proposals if p.mask_uri]
        if not with_mask:
            return None
        given = [p for p in with_mask if p.producer == "mask"]
        if given:
            return given[-1]
        return max(with_mask, key=lambda p: -1.0 if p.confidence is None else p.confidence)

    def to_json(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "tube": self.tube, "depth": self.depth,
                "date": self.date, "done": self.done, "priority": round(self.priority, 4),
                "disagreement": round(self.disagreement, 4), "confidence": self.confidence,
                "producers": sorted({p.producer for p in self.proposals})}


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and not isinstance(v, (str, bytes)):
        try:
            return v.item()
        except (ValueError, AttributeError):
            return v
    return v


def from_traits(rows: Iterable[Mapping[str, Any]]) -> dict[str, Entry]:
    """Entries from traits rows: the latest row of each (image, producer) with a mask."""
    latest: dict[tuple[str, str], Mapping[str, Any]] = {}
    for r in rows:
        if r.get("model_name") not in MASK_PRODUCERS:
            continue
        k = (str(r["image_id"]), str(r["model_name"]))
        if k not in latest or (r.get("processed_at") or dt.datetime.min) >= \
                (latest[k].get("processed_at") or dt.datetime.min):
            latest[k] = r
    out: dict[str, Entry] = {}
    for (image_id, producer), r in sorted(latest.items()):
        e = out.get(image_id)
        if e is None:
            meta = {c: _plain(r.get(c)) for c in META_COLUMNS if c in r}
            e = out[image_id] = Entry(image_id, str(r["image_uri"]), meta)
        length = r.get("length_mm")
        conf = r.get("confidence")
        e.proposals.append(Proposal(
            producer, str(r["model_version"]), r.get("mask_uri"),
            None if conf is None or (isinstance(conf, float) and math.isnan(conf)) else float(conf),
            None if length is None else float(length)))
    return out


def from_manifest(rows: Iterable[Mapping[str, Any]]) -> dict[str, Entry]:
    """Entries from manifest rows (a row's own ``mask_uri`` is the ``mask`` proposal)."""
    out: dict[str, Entry] = {}
    for r in rows:
        meta = {c: _plain(r.get(c)) for c in META_COLUMNS if c in r}
        e = Entry(str(r["image_id"]), str(r["image_uri"]), meta)
        if r.get("mask_uri"):
            e.proposals.append(Proposal("mask", "given", str(r["mask_uri"])))
        out[e.image_id] = e
    return out


def load_entries(lake: Any, manifest_uri: str | None, *,
                 storage_options: storage.StorageLike = None) -> dict[str, Entry]:
    """Manifest images (if given) plus every image with a mask in the lake; marks done ones."""
    entries: dict[str, Entry] = {}
    if manifest_uri:
        from rootflow.io.manifest import read_manifest

        entries = from_manifest(read_manifest(manifest_uri,
                                              storage_options=storage_options).to_pylist())
    if lake is not None and lake.exists("traits"):
        cols = ["image_id", "model_name", "model_version", "mask_uri", "confidence",
                "length_mm", "processed_at", *[c for c in META_COLUMNS if c != "image_id"]]
        have = set(lake.schema("traits").names)
        rows = lake.read("traits", columns=[c for c in dict.fromkeys(cols) if c in have])
        for image_id, e in from_traits(rows.to_pylist()).items():
            if image_id in entries:
                given = {p.key for p in entries[image_id].proposals}
                entries[image_id].proposals += [p for p in e.proposals if p.key not in given]
            elif not manifest_uri:
                entries[image_id] = e
    if lake is not None and lake.exists("annotations"):
        done = set(lake.read("annotations", columns=["image_id"])["image_id"].to_pylist())
        for image_id in done & set(entries):
            entries[image_id].done = True
    return entries


@dataclasses.dataclass(frozen=True)
class QueueFilter:
    """Filters of the queue (None = any)."""

    tube: int | None = None
    depth: int | None = None
    date_from: str | None = None
    date_to: str | None = None
    producer: str | None = None
    include_done: bool = True

    def keep(self, e: Entry) -> bool:
        if self.tube is not None and e.tube != self.tube:
            return False
        if self.depth is not None and e.depth != self.depth:
            return False
        d = e.date
        if self.date_from and (d is None or d < self.date_from):
            return False
        if self.date_to and (d is None or d > self.date_to):
            return False
        if self.producer and self.producer not in {p.producer for p in e.proposals}:
            return False
        return self.include_done or not e.done


def ordered(entries: Iterable[Entry], flt: QueueFilter = QueueFilter(), *,
            order: str = "priority") -> list[Entry]:
    """Filtered queue; ``priority`` (default): not done first, then highest priority."""
    keep = [e for e in entries if flt.keep(e)]
    if order == "name":
        return sorted(keep, key=lambda e: e.image_id)
    return sorted(keep, key=lambda e: (e.done, -e.priority, e.image_id))
