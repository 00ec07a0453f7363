"""Annotated images for segmentation training: manifest -> (image, mask) pairs -> patches.

Flow: :func:`read_annotated_manifest` (or :func:`pairs_manifest` for a folder of
``<stem>.<ext>`` + ``<stem>_mask.png`` files, as the synthetic archives and
``shared/data/real`` are laid out) -> :func:`split_table` (a ``split`` column, or whole tubes/windows held out by
:mod:`rootflow.training.splits`, the same on every worker and every rerun) -> :func:`load_pairs`
(bytes through :mod:`rootflow.io.storage`, decoded by :mod:`rootflow.io.images`) ->
:class:`PatchDataset` (random patches of ``patch_size`` from the whole images, a configurable
share of them root-free, with EDT-weighted point prompts and augmentation).

An annotated manifest needs only ``image_uri`` and ``mask_uri``; ``image_id`` (default: the
lake's :func:`rootflow.io.manifest.image_id_for` of the URI), ``split`` (``train``/``val``) and
any other column are optional, so a full processing manifest with ``mask_uri`` filled works too.

Patches are drawn afresh every epoch from ``(seed, epoch, index)``: the same on every worker and
every rerun (a resumed run sees the patches it would have seen), different between epochs.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from rootflow.inference.prompts import PromptPolicy
from rootflow.io import storage
from rootflow.training.augment import augment as _augment
from rootflow.training.losses import signed_distance_map

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".tif", ".tiff")


class AnnotationError(ValueError):
    """An annotated manifest or pair is unusable (message names the file/column)."""


# -- manifests ---------------------------------------------------------------------------------
def _image_id_for(uri: str) -> str:
    from rootflow.io.manifest import image_id_for

    return image_id_for(uri)


def read_annotated_manifest(uri: str, *, storage_options: storage.StorageLike = None) -> pa.Table:
    """Read a CSV or Parquet manifest of annotated images (rows without ``mask_uri`` dropped).

    Returns:
        A table with at least ``image_id``, ``image_uri``, ``mask_uri`` (strings).

    Raises:
        AnnotationError: unreadable, a required column missing, or no annotated rows.
    """
    data = storage.read_bytes(uri, storage_options)
    if data.startswith(b"PAR1"):
        import pyarrow.parquet as pq

        table = pq.read_table(io.BytesIO(data))
    else:
        import pyarrow.csv as pacsv

        try:
            table = pacsv.read_csv(io.BytesIO(data), convert_options=pacsv.ConvertOptions(
                strings_can_be_null=True))
        except pa.ArrowInvalid as e:
            raise AnnotationError(f"{uri}: not a readable CSV or Parquet manifest ({e})") from None
    missing = [c for c in ("image_uri", "mask_uri") if c not in table.column_names]
    if missing:
        raise AnnotationError(f"{uri}: annotated manifest lacks column(s) {missing}; "
                              f"has {table.column_names}")
    import pyarrow.compute as pc

    table = table.filter(pc.is_valid(table["mask_uri"]))
    if table.num_rows == 0:
        raise AnnotationError(f"{uri}: no row has a mask_uri")
    if "image_id" not in table.column_names:
        ids = [_image_id_for(u) for u in table["image_uri"].to_pylist()]
        table = table.append_column("image_id", pa.array(ids, pa.string()))
    return table


def pairs_manifest(folder_uri: str, *, storage_options: storage.StorageLike = None) -> pa.Table:
    """Annotated manifest of a folder tree: every image with a ``<stem>_mask.png`` beside it.

    Sorted by ``image_uri`` so the table (and the hash split) never depends on listing order.
    A studio ``annotations`` Delta table (``<lake>/annotations``) is read as the manifest of
    its latest accepted mask per image (:func:`rootflow.studio.annotations.annotations_manifest`).
    """
    from rootflow.studio.annotations import annotations_manifest, is_annotations_table

    if is_annotations_table(folder_uri, storage_options):
        return annotations_manifest(folder_uri, storage_options=storage_options)
    fs = storage.filesystem(folder_uri, storage_options)
    root = storage.strip_protocol(folder_uri).rstrip("/")
    paths = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTS))
    present = set(paths)
    rows: list[tuple[str, str]] = []
    for p in paths:
        stem, _, _ = p.rpartition(".")
        if stem.endswith("_mask"):
            continue
        mask = f"{stem}_mask.png"
        if mask in present:
            rows.append((storage.to_uri(folder_uri, p), storage.to_uri(folder_uri, mask)))
    if not rows:
        raise AnnotationError(f"{folder_uri}: no image with a <stem>_mask.png beside it")
    image_uris = [r[0] for r in rows]
    return pa.table({"image_id": [_image_id_for(u) for u in image_uris],
                     "image_uri": image_uris, "mask_uri": [r[1] for r in rows]})


def split_table(table: pa.Table, *, val_fraction: float, seed: int = 0,
                by: str = "auto") -> tuple[pa.Table, pa.Table]:
    """``(train, val)`` rows: the ``split`` column when present, else whole tubes/windows.

    Without a ``split`` column, :func:`rootflow.training.splits.grouped_split` holds out whole
    groups (tubes, or windows of a single tube; ``by``), about ``val_fraction`` of the images:
    sessions of one window never land on both sides. With a single group nothing can be held
    out without leaking, and the validation side is empty (callers raise).
    """
    if "split" in table.column_names:
        split = [str(s).lower() if s is not None else "train" for s in table["split"].to_pylist()]
        is_val = np.array([s in ("val", "valid", "validation", "test") for s in split])
        idx = np.arange(table.num_rows)
        return table.take(pa.array(idx[~is_val])), table.take(pa.array(idx[is_val]))
    from rootflow.training.splits import grouped_split

    return grouped_split(table, val_fraction=val_fraction, seed=seed, by=by)  # type: ignore[arg-type]


# -- pairs -------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AnnotatedImage:
    """One decoded training pair: uint8 RGB ``(H, W, 3)`` and a bool mask ``(H, W)``."""

    image_id: str
    image: np.ndarray
    mask: np.ndarray


def load_pairs(table: pa.Table, *, storage_options: storage.StorageLike = None,
               ) -> list[AnnotatedImage]:
    """Read and decode every (image, mask) row; sizes must agree.

    Raises:
        AnnotationError: a file cannot be decoded or its mask has another size.
    """
    from rootflow.io.images import ImageDecodeError, decode, decode_mask

    out = []
    for image_id, image_uri, mask_uri in zip(table["image_id"].to_pylist(),
                                             table["image_uri"].to_pylist(),
                                             table["mask_uri"].to_pylist(), strict=True):
        try:
            image, _bits = decode(storage.read_bytes(image_uri, storage_options))
            mask = decode_mask(storage.read_bytes(mask_uri, storage_options))
        except (ImageDecodeError, OSError) as e:
            raise AnnotationError(f"{image_uri}: {e}") from e
        if mask.shape != image.shape[:2]:
            raise AnnotationError(f"{mask_uri}: mask is {mask.shape}, image is "
                                  f"{image.shape[:2]} ({image_uri})")
        out.append(AnnotatedImage(str(image_id), image, mask))
    return out


# -- patches -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PatchConfig:
    """How training/validation patches and their prompts are drawn.

    Attributes:
        patch_size: side in px (RootSAM: 512 in stage 1, 1024 in stage 2).
        patches_per_image: patches per image per epoch (dataset length = images x this).
        empty_fraction: share of patches drawn to contain no root at all (when the image
            has root-free areas of that size); the rest are centred near a root pixel.
        n_pos / n_neg: EDT points when the dataset is given no :class:`PromptPolicy`
            (RootSAM passes its policy, which decides the prompts; U-Net sets both to 0).
    """

    patch_size: int = 512
    patches_per_image: int = 8
    empty_fraction: float = 0.1
    n_pos: int = 5
    n_neg: int = 5


class _Source:
    """An image padded to at least the patch size, with an integral image of its mask."""

    def __init__(self, pair: AnnotatedImage, patch: int) -> None:
        img, mask = pair.image, pair.mask
        h, w = mask.shape
        ph, pw = max(0, patch - h), max(0, patch - w)
        if ph or pw:  # reflect: the padding looks like data and the mask follows the image
            pad = ((0, ph), (0, pw))
            img = np.pad(img, (*pad, (0, 0)), mode="reflect" if min(h, w) > 1 else "edge")
            mask = np.pad(mask, pad, mode="reflect" if min(h, w) > 1 else "edge")
        self.image, self.mask = img, mask
        self.integral = np.pad(mask.astype(np.int32).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
        self.root_rc = np.argwhere(mask)

    def roots_in(self, y: int, x: int, p: int) -> int:
        s = self.integral
        return int(s[y + p, x + p] - s[y, x + p] - s[y + p, x] + s[y, x])


class PatchDataset:
    """Map-style dataset of random patches with prompts (a ``torch.utils.data.Dataset``).

    Item ``i`` comes from image ``i % n_images``; its patch and augmentation are drawn from
    ``np.random.default_rng([seed, epoch, i])``, its prompts from ``policy.training_prompts``
    on the augmented mask with ``np.random.default_rng([seed, epoch, i, 1])`` (the policy
    inference uses, labelled by the ground truth). Call :meth:`set_epoch` each epoch (the
    RootSAM task does), or keep ``epoch`` fixed for a fixed validation set.

    Items are dicts of numpy arrays: ``image`` uint8 ``(P, P, 3)``, ``mask`` bool ``(P, P)``,
    ``sdm`` float32 ``(P, P)`` (signed distance map for the boundary loss), ``points`` float32
    ``(N, 2)`` xy in patch pixels, ``labels`` int32 ``(N,)``, ``index`` int64.
    """

    def __init__(self, pairs: Sequence[AnnotatedImage], cfg: PatchConfig, *, seed: int = 0,
                 transform: Any = None, epoch: int = 0,
                 policy: PromptPolicy | None = None) -> None:
        if not pairs:
            raise AnnotationError("PatchDataset needs at least one annotated image")
        self.cfg = cfg
        if policy is None and cfg.n_pos + cfg.n_neg > 0:
            policy = PromptPolicy(mode="edt", n_pos=cfg.n_pos, n_neg=cfg.n_neg)
        self.policy = policy
        self.seed = seed
        self.transform = transform
        self.epoch = epoch
        self._sources = [_Source(p, cfg.patch_size) for p in pairs]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._sources) * self.cfg.patches_per_image

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.item(index, epoch=self.epoch)

    def item(self, index: int, *, epoch: int) -> dict[str, Any]:
        """Item ``index`` as drawn in ``epoch`` (the embedding cache draws its views so)."""
        cfg = self.cfg
        rng = np.random.default_rng([self.seed, epoch, index])
        src = self._sources[index % len(self._sources)]
        y, x = self._origin(src, rng)
        p = cfg.patch_size
        image = src.image[y:y + p, x:x + p]
        mask = src.mask[y:y + p, x:x + p]
        image, mask, _, _ = _augment(self.transform, np.ascontiguousarray(image),
                                     np.ascontiguousarray(mask), np.zeros((0, 2), np.float32),
                                     n_pos=0, n_neg=0, rng=rng)
        if self.policy is None:
            points, labels = np.zeros((0, 2), np.float32), np.zeros(0, np.int32)
        else:  # drawn on the augmented mask: no keypoint bookkeeping, labels exact
            points, labels = self.policy.training_prompts(
                mask, rng=np.random.default_rng([self.seed, epoch, index, 1]))
        return {"image": image, "mask": mask, "sdm": signed_distance_map(mask),
                "points": points, "labels": labels, "index": np.int64(index)}

    def _origin(self, src: _Source, rng: np.random.Generator) -> tuple[int, int]:
        p = self.cfg.patch_size
        h, w = src.mask.shape
        want_empty = rng.random() < self.cfg.empty_fraction or len(src.root_rc) == 0
        if want_empty:
            best, best_roots = (0, 0), None
            for _ in range(16):  # look for a root-free window; keep the emptiest seen
                y, x = int(rng.integers(0, h - p + 1)), int(rng.integers(0, w - p + 1))
                n = src.roots_in(y, x, p)
                if best_roots is None or n < best_roots:
                    best, best_roots = (y, x), n
                if n == 0:
                    break
            return best
        r, c = src.root_rc[int(rng.integers(len(src.root_rc)))]
        jitter = rng.integers(-p // 4, p // 4 + 1, size=2)
        y = int(np.clip(r - p // 2 + jitter[0], 0, h - p))
        x = int(np.clip(c - p // 2 + jitter[1], 0, w - p))
        return y, x

