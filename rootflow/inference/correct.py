"""Human-in-the-loop correction: refine RootSAM masks with positive/negative clicks.

A reviewer clicks where RootSAM missed a root (label 1) or painted soil (label 0), in image
pixel coordinates; the clicks arrive as a table (Parquet or CSV: ``image_id, x, y, label``).
For each image, only the tiles containing a click are re-run, with the clicks plus the
previous mask as SAM's mask prompt (:meth:`RootSAMPredictor.refine`; tile embeddings are
cached so a second round on the same image skips the encoder).

The corrected mask is its **own model version**: ``<version>+clicks-<hash>``, the hash over
the image's clicks (order-independent). Both the original and the corrected traits stay in
the lake, queryable side by side, and the same clicks always give the same version, so
re-running a correction is idempotent under the lake's MERGE on
``(image_id, model_name, model_version)``.

Click coordinates: ``x`` is the column and ``y`` the row. Integer clicks name a pixel and
are moved to its centre (``+0.5``, the convention of :mod:`rootflow.inference.prompts`);
fractional ones are used as given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from rootflow.inference.rootsam import RootSAMPredictor
from rootflow.io import storage
from rootflow.io.images import encode_png

CLICK_COLUMNS = ("image_id", "x", "y", "label")


@dataclasses.dataclass(frozen=True)
class Clicks:
    """One image's clicks.

    Attributes:
        image_id: the manifest's image id.
        points: float32 ``(N, 2)`` xy in image pixels (pixel centres).
        labels: int32 ``(N,)`` 1 = root, 0 = not root.
    """

    image_id: str
    points: np.ndarray
    labels: np.ndarray

    def __post_init__(self) -> None:
        if self.points.shape != (len(self.labels), 2):
            raise ValueError(f"{self.image_id}: points {self.points.shape} do not match "
                             f"{len(self.labels)} labels")
        bad = sorted(set(self.labels.tolist()) - {0, 1})
        if bad:
            raise ValueError(f"{self.image_id}: click labels must be 0 or 1, got {bad}")

    @property
    def digest(self) -> str:
        """12 hex chars identifying this set of clicks (order-independent)."""
        rows = sorted(f"{x:.2f},{y:.2f},{int(lab)}" for (x, y), lab in
                      zip(self.points.tolist(), self.labels.tolist(), strict=True))
        return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:12]


@dataclasses.dataclass
class CorrectionResult:
    """A corrected mask, ready for traits and the lake (the lead's job writes it).

    Attributes:
        image_id: the image.
        mask: bool ``(H, W)``.
        mask_png: the mask as PNG bytes (0/255).
        confidence: mean predicted IoU of the re-run tiles.
        model_version: ``<parent version>+clicks-<digest>``.
        parent_version: the version that produced the corrected mask.
        params: JSON-safe producer settings (prompt policy, clicks digest, re-run tiles).
        tiles_rerun: indices of the tiles that were re-run.
    """

    image_id: str
    mask: np.ndarray
    mask_png: bytes
    confidence: float
    model_version: str
    parent_version: str
    params: dict[str, Any]
    tiles_rerun: list[int]

    @property
    def params_json(self) -> str:
        return json.dumps(self.params, sort_keys=True)


def corrected_version(parent_version: str, clicks: Clicks) -> str:
    """``<parent>+clicks-<digest>``: a new, deterministic model version for corrected masks."""
    return f"{parent_version}+clicks-{clicks.digest}"


def clicks_from_table(table: Any) -> dict[str, Clicks]:
    """Group a click table (pyarrow / pandas / mapping of columns) by ``image_id``.

    Raises:
        ValueError: a column is missing, or a row has a null/NaN value or a bad label.
    """
    cols = _columns(table)
    missing = [c for c in CLICK_COLUMNS if c not in cols]
    if missing:
        raise ValueError(f"click table lacks column(s) {missing}; needs {list(CLICK_COLUMNS)}")
    ids = [None if v is None else str(v) for v in cols["image_id"]]
    try:
        xs = np.asarray(cols["x"], np.float64)
        ys = np.asarray(cols["y"], np.float64)
        labs_f = np.asarray(cols["label"], np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"click table: x, y and label must be numbers ({e})") from e
    bad_rows = [i for i in range(len(ids)) if ids[i] is None or not np.isfinite(xs[i])
                or not np.isfinite(ys[i]) or not np.isfinite(labs_f[i])]
    if bad_rows:
        raise ValueError(f"click table: null or NaN values in row(s) {bad_rows[:10]}")
    out: dict[str, list[int]] = {}
    for i, image_id in enumerate(ids):
        out.setdefault(str(image_id), []).append(i)
    result = {}
    for image_id, rows in out.items():
        r = np.asarray(rows)
        pts = np.stack([_centre(xs[r]), _centre(ys[r])], axis=1).astype(np.float32)
        result[image_id] = Clicks(image_id, pts, labs_f[r].astype(np.int32))
    return result


def _centre(v: np.ndarray) -> np.ndarray:
    return np.where(v == np.floor(v), v + 0.5, v)


def _columns(table: Any) -> Mapping[str, list[Any]]:
    if hasattr(table, "to_pydict"):  # pyarrow.Table
        return dict(table.to_pydict())
    if hasattr(table, "to_dict") and hasattr(table, "columns"):  # pandas
        return {c: table[c].tolist() for c in table.columns}
    return {k: list(v) for k, v in dict(table).items()}


def read_clicks(uri: str, *, storage_options: storage.StorageLike = None) -> dict[str, Clicks]:
    """Read a Parquet or CSV click file (``image_id, x, y, label``) into per-image clicks."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    data = storage.read_bytes(uri, storage_options)
    if data[:4] == b"PAR1":
        table = pq.read_table(io.BytesIO(data))
    else:
        import pyarrow as pa

        table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
            column_types={"image_id": pa.string()}))
    return clicks_from_table(table)


def correct_image(
    predictor: RootSAMPredictor,
    *,
    image: np.ndarray,
    previous: np.ndarray,
    clicks: Clicks,
    parent_version: str | None = None,
) -> CorrectionResult:
    """Refine one image's mask with its clicks.

    Args:
        predictor: the RootSAM predictor (same model as the mask being corrected, ideally).
        image: the image (any form ``to_rgb8`` accepts).
        previous: the mask being corrected (bool ``(H, W)``) or its float logits.
        clicks: this image's clicks.
        parent_version: version of the mask being corrected (default: the predictor's).
    """
    if not len(clicks.labels):
        raise ValueError(f"{clicks.image_id}: no clicks")
    result, rerun = predictor.refine(image, points=clicks.points, labels=clicks.labels,
                                     previous=previous, key=clicks.image_id)
    parent = parent_version or predictor.version
    params = {**result.params, "parent_version": parent, "clicks_digest": clicks.digest,
              "n_positive_clicks": int((clicks.labels == 1).sum()),
              "n_negative_clicks": int((clicks.labels == 0).sum())}
    return CorrectionResult(
        image_id=clicks.image_id, mask=result.mask, mask_png=encode_png(result.mask),
        confidence=result.confidence, model_version=corrected_version(parent, clicks),
        parent_version=parent, params=params, tiles_rerun=rerun)


def correct_many(
    predictor: RootSAMPredictor,
    clicks: Mapping[str, Clicks],
    *,
    fetch: Callable[[str], tuple[np.ndarray, np.ndarray, str | None]],
    image_ids: Iterable[str] | None = None,
) -> Iterator[CorrectionResult]:
    """Correct every clicked image; ``fetch(image_id) -> (image, previous mask, version)``.

    ``fetch`` is where the job plugs in the lake (read the image URI and the stored mask PNG
    of the version being corrected); keeping I/O out of here keeps this testable without one.
    """
    for image_id in image_ids or sorted(clicks):
        image, previous, parent = fetch(image_id)
        yield correct_image(predictor, image=image, previous=previous, clicks=clicks[image_id],
                            parent_version=parent)
