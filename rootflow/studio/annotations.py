"""The ``annotations`` table as training data, and the studio's figures.

``rootflow train rootsam|forest|unet --data <lake>/annotations`` reads the Delta table
directly: :func:`annotations_manifest` turns it into the annotated-manifest layout the training
commands already read (``image_id``, ``image_uri``, ``mask_uri``), keeping the most recent
accepted mask of each image. :func:`rootflow.training.data.pairs_manifest` calls it when the
folder it is given is an annotations table (the one hook).
"""

from __future__ import annotations

import statistics
from typing import Any

import pyarrow as pa

from rootflow.io import storage


def is_annotations_table(uri: str, storage_options: storage.StorageLike = None) -> bool:
    """True when ``uri`` is a Delta table with the annotations table's key columns."""
    try:
        from deltalake import DeltaTable

        so = storage.StorageOptions.from_mapping(storage_options)
        opts = so.deltalake() if storage.is_remote(uri) else None
        if not DeltaTable.is_deltatable(uri, opts):
            return False
        names = set(pa.schema(DeltaTable(uri, storage_options=opts).schema().to_arrow()).names)
    except Exception:
        return False
    return {"annotation_id", "image_id", "image_uri", "mask_uri", "ended_at"} <= names


def annotations_manifest(uri: str, *, storage_options: storage.StorageLike = None) -> pa.Table:
    """``image_id, image_uri, mask_uri`` (+ ``annotation_id``, ``person``): the latest
    accepted mask per image, sorted by ``image_uri`` (stable splits)."""
    from deltalake import DeltaTable

    so = storage.StorageOptions.from_mapping(storage_options)
    opts = so.deltalake() if storage.is_remote(uri) else None
    t = DeltaTable(uri, storage_options=opts).to_pyarrow_table(
        columns=["annotation_id", "image_id", "image_uri", "mask_uri", "person", "ended_at"])
    latest: dict[str, dict[str, Any]] = {}
    for r in t.to_pylist():
        k = r["image_id"]
        if k not in latest or (r["ended_at"], r["annotation_id"]) > \
                (latest[k]["ended_at"], latest[k]["annotation_id"]):
            latest[k] = r
    rows = sorted(latest.values(), key=lambda r: r["image_uri"])
    cols = ("image_id", "image_uri", "mask_uri", "annotation_id", "person")
    return pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in cols})


def figures(lake: Any) -> dict[str, Any]:
    """Images done, median active minutes, clicks per image, and IoU proposed vs accepted by
    producer and version, from the ``annotations`` table (what the figures page shows)."""
    if not lake.exists("annotations"):
        return {"images_done": 0, "annotations": 0, "median_active_minutes": None,
                "median_clicks_per_image": None, "mean_clicks_per_image": None,
                "by_proposal": [], "per_annotation": []}
    t = lake.read("annotations", columns=[
        "annotation_id", "image_id", "proposed_by", "proposed_version", "n_clicks",
        "n_strokes", "active_seconds", "iou_proposed_accepted", "person", "ended_at"])
    rows = sorted(t.to_pylist(), key=lambda r: r["ended_at"])
    active = [r["active_seconds"] / 60 for r in rows if r["active_seconds"] is not None]
    clicks = [int(r["n_clicks"] or 0) for r in rows]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["proposed_by"] or "none", r["proposed_version"] or "none"),
                          []).append(r)
    by = []
    for (producer, version), rs in sorted(groups.items()):
        ious = [r["iou_proposed_accepted"] for r in rs if r["iou_proposed_accepted"] is not None]
        by.append({"producer": producer, "version": version, "n": len(rs),
                   "median_iou": statistics.median(ious) if ious else None,
                   "mean_iou": statistics.fmean(ious) if ious else None,
                   "median_clicks": statistics.median([int(r["n_clicks"] or 0) for r in rs]),
                   "median_active_minutes": statistics.median(
                       [r["active_seconds"] / 60 for r in rs]) if rs else None})
    return {
        "images_done": len({r["image_id"] for r in rows}),
        "annotations": len(rows),
        "median_active_minutes": statistics.median(active) if active else None,
        "median_clicks_per_image": statistics.median(clicks) if clicks else None,
        "mean_clicks_per_image": statistics.fmean(clicks) if clicks else None,
        "by_proposal": by,
        "per_annotation": [{"image_id": r["image_id"], "n_clicks": r["n_clicks"],
                            "active_minutes": (r["active_seconds"] or 0) / 60,
                            "iou": r["iou_proposed_accepted"], "producer": r["proposed_by"],
                            "person": r["person"]} for r in rows],
    }
