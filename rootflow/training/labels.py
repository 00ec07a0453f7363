"""Per-image length/area labels for RootQuant, from the three places they live.

1. **A table** (CSV or Parquet) such as a WinRHIZO Tron export: one row per image with its
   total root length and area. Column names and units differ between tools and labs, so the
   mapping is configuration (:class:`LabelColumns`): which column holds the image, the length,
   the area and (optionally) the dpi, and in which units. Relative image names are resolved
   against a base URI, or matched by file name against a manifest.
2. **The Delta ``traits`` table**: traits measured from given masks (``model_name == "mask"``).
3. **Masks**: a manifest with ``mask_uri`` and ``dpi``; labels are computed with
   :func:`rootflow.traits.measure`, the same code that measures RootSAM's masks.

All three return the same Arrow table (:data:`LABEL_SCHEMA`): ``image_uri``, ``length_mm``,
``area_mm2``, ``dpi`` (nullable until a manifest or default fills it). ``area_mm2`` is the
*projected* root area (root pixels x pixel area), the quantity a minirhizotron image shows.
"""

from __future__ import annotations

import dataclasses
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rootflow.io import storage

LABEL_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("length_mm", pa.float64(), nullable=False),
    pa.field("area_mm2", pa.float64(), nullable=False),
    pa.field("dpi", pa.float64()),
])

_LENGTH_TO_MM = {"mm": 1.0, "cm": 10.0, "m": 1000.0}
_AREA_TO_MM2 = {"mm2": 1.0, "cm2": 100.0, "m2": 1e6}


class LabelError(ValueError):
    """Labels that cannot be used; the message names the column, row or file."""


@dataclasses.dataclass(frozen=True)
class LabelColumns:
    """How a label table's columns map onto ``image_uri, length_mm, area_mm2, dpi``.

    Attributes:
        image: column with the image URI, path or bare file name.
        length / area: columns with the per-image totals.
        dpi: column with the image resolution (``None``: take dpi from a manifest or default).
        length_unit / area_unit: units of those columns (WinRHIZO reports cm and cm2).
        mask: optional column with a root-mask URI per image (relative names resolve like
            images). With masks, training supervises every tile, not only the image sum
            (:func:`density_maps`); the labels stay the per-image totals.
    """

    image: str = "image_uri"
    length: str = "length_mm"
    area: str = "area_mm2"
    dpi: str | None = "dpi"
    length_unit: Literal["mm", "cm", "m"] = "mm"
    area_unit: Literal["mm2", "cm2", "m2"] = "mm2"
    mask: str | None = None


def read_table(uri: str, *, storage_options: storage.StorageLike = None) -> pa.Table:
    """A CSV or Parquet file as an Arrow table (format from the extension)."""
    fs = storage.filesystem(uri, storage_options)
    path = storage.strip_protocol(uri)
    low = uri.lower()
    with fs.open(path, "rb") as f:
        if low.endswith((".parquet", ".pq")):
            import pyarrow.parquet as pq

            return pq.read_table(f)
        if low.endswith((".csv", ".tsv", ".txt")):
            import pyarrow.csv as pacsv

            delim = "\t" if low.endswith(".tsv") else ","
            return pacsv.read_csv(f, parse_options=pacsv.ParseOptions(delimiter=delim))
    raise LabelError(f"{uri}: unknown label file type (use .csv, .tsv or .parquet)")


def from_table(table: pa.Table, *, columns: LabelColumns = LabelColumns(),
               base_uri: str | None = None, source: str = "labels") -> pa.Table:
    """Map a raw table onto :data:`LABEL_SCHEMA` (units converted, names resolved, validated).

    Args:
        table: the raw table.
        columns: the column mapping.
        base_uri: folder that relative image names are resolved against (``None`` leaves them
            as they are, e.g. to be matched by file name with :func:`attach_manifest`).
        source: name used in error messages.

    Raises:
        LabelError: a mapped column is missing (the message lists the table's columns), or a
            value is missing, negative or not finite (the message names the first bad rows).
    """
    need = [columns.image, columns.length, columns.area]
    missing = [c for c in need if c not in table.column_names]
    if missing:
        raise LabelError(f"{source}: missing column(s) {missing}; the table has "
                         f"{table.column_names}. Map them with LabelColumns(image=..., "
                         f"length=..., area=...)")
    images = [None if v is None else str(v) for v in table[columns.image].to_pylist()]
    length = _floats(table, columns.length, source) * _LENGTH_TO_MM[columns.length_unit]
    area = _floats(table, columns.area, source) * _AREA_TO_MM2[columns.area_unit]
    if columns.dpi and columns.dpi in table.column_names:
        dpi = _floats(table, columns.dpi, source)
    else:
        dpi = np.full(table.num_rows, np.nan)
    bad_img = [i for i, v in enumerate(images) if not v]
    if bad_img:
        raise LabelError(f"{source}: empty {columns.image!r} in row(s) {bad_img[:10]}")
    for name, vals in (("length", length), ("area", area)):
        bad = np.flatnonzero(~np.isfinite(vals) | (vals < 0))
        if bad.size:
            col = getattr(columns, name)
            raise LabelError(f"{source}: column {col!r} has missing, negative or non-finite "
                             f"values in row(s) {bad[:10].tolist()} "
                             f"(e.g. {table[col][int(bad[0])].as_py()!r})")
    uris = [_resolve(v, base_uri) for v in images]  # type: ignore[arg-type]
    masks = None
    if columns.mask:
        if columns.mask not in table.column_names:
            raise LabelError(f"{source}: missing mask column {columns.mask!r}; the table has "
                             f"{table.column_names}")
        masks = [_resolve(str(v), base_uri) if v else None
                 for v in table[columns.mask].to_pylist()]
    return _label_table(uris, length, area, dpi, masks=masks)


def read_labels(uri: str, *, columns: LabelColumns = LabelColumns(),
                base_uri: str | None = None,
                storage_options: storage.StorageLike = None) -> pa.Table:
    """Labels from a CSV/Parquet file; relative image names resolve against ``base_uri``
    (default: the label file's own folder)."""
    table = read_table(uri, storage_options=storage_options)
    base = base_uri if base_uri is not None else posixpath.dirname(storage.normalize(uri))
    return from_table(table, columns=columns, base_uri=base, source=uri)


def from_traits_table(uri: str, *, model_name: str = "mask", model_version: str | None = None,
                      length_column: str = "length_mm", area_column: str = "projected_area_mm2",
                      storage_options: storage.StorageLike = None) -> pa.Table:
    """Labels from the Delta ``traits`` table: traits of given masks (``model_name="mask"``).

    The latest row per image wins when several model versions are present and
    ``model_version`` is not given.
    """
    import deltalake

    opts = storage.StorageOptions.from_mapping(storage_options)
    dt = deltalake.DeltaTable(storage.normalize(uri),
                              storage_options=opts.deltalake() if storage.is_remote(uri) else None)
    table = dt.to_pyarrow_table()
    mask = pc.equal(table["model_name"], model_name)
    if model_version is not None:
        mask = pc.and_(mask, pc.equal(table["model_version"], model_version))
    table = table.filter(mask)
    if "processed_at" in table.column_names and table.num_rows:
        table = table.sort_by([("processed_at", "descending")])
    if table.num_rows:
        _, first = np.unique(np.asarray(table["image_uri"].to_pylist(), dtype=object),
                             return_index=True)
        table = table.take(pa.array(np.sort(first)))
    return from_table(table, columns=LabelColumns(image="image_uri", length=length_column,
                                                  area=area_column, dpi="dpi"),
                      source=f"{uri} (model_name={model_name!r})")


def from_masks(rows: pa.Table, *, length_key: str = "length_mm",
               area_key: str = "projected_area_mm2", measure_kwargs: Mapping[str, Any] | None = None,
               storage_options: storage.StorageLike = None) -> pa.Table:
    """Labels computed from masks with :func:`rootflow.traits.measure`.

    Args:
        rows: a manifest (or any table) with ``image_uri``, ``mask_uri`` and ``dpi``; rows
            without a mask are skipped.
        length_key / area_key: keys of ``measure``'s result used as length and area.
        measure_kwargs: extra keyword arguments for ``measure``.
    """
    from rootflow import traits
    from rootflow.io import images

    for col in ("image_uri", "mask_uri", "dpi"):
        if col not in rows.column_names:
            raise LabelError(f"mask labels need column {col!r}; got {rows.column_names}")
    uris, lengths, areas, dpis, masks = [], [], [], [], []
    kw = dict(measure_kwargs or {})
    for rec in rows.select(["image_uri", "mask_uri", "dpi"]).to_pylist():
        if not rec["mask_uri"]:
            continue
        mask = images.decode_mask(storage.read_bytes(rec["mask_uri"], storage_options))
        res = traits.measure(mask, dpi=float(rec["dpi"]), **kw)
        for key in (length_key, area_key):
            if key not in res:
                raise LabelError(f"rootflow.traits.measure has no key {key!r}; it returns "
                                 f"{list(res)}")
        uris.append(rec["image_uri"])
        lengths.append(float(res[length_key]))
        areas.append(float(res[area_key]))
        dpis.append(float(rec["dpi"]))
        masks.append(rec["mask_uri"])
    return _label_table(uris, np.asarray(lengths, float), np.asarray(areas, float),
                        np.asarray(dpis, float), masks=masks)


def attach_manifest(labels: pa.Table, manifest: pa.Table, *,
                    on: Literal["auto", "image_uri", "file_name"] = "auto") -> pa.Table:
    """Fill ``dpi`` and canonical ``image_uri`` from a manifest.

    ``auto`` matches on the full URI first and falls back to the file name (a WinRHIZO export
    names files, not URIs); ambiguous file names are an error. Labels whose image is not in the
    manifest raise, naming the first few, since a silently smaller training set is worse.
    """
    m_uri = [storage.normalize(u) for u in manifest["image_uri"].to_pylist()]
    m_dpi = manifest["dpi"].to_pylist()
    m_mask = (manifest["mask_uri"].to_pylist() if "mask_uri" in manifest.column_names
              else [None] * len(m_uri))
    l_mask = (labels["mask_uri"].to_pylist() if "mask_uri" in labels.column_names
              else [None] * labels.num_rows)
    by_uri = dict(zip(m_uri, m_dpi, strict=True))
    index_of = {u: i for i, u in enumerate(m_uri)}
    by_name: dict[str, list[int]] = {}
    for i, u in enumerate(m_uri):
        by_name.setdefault(posixpath.basename(u), []).append(i)
    out_uri, out_dpi, out_mask, missing = [], [], [], []
    for u, d, mk in zip(labels["image_uri"].to_pylist(), labels["dpi"].to_pylist(), l_mask,
                        strict=True):
        nu = storage.normalize(u)
        if on in ("auto", "image_uri") and nu in by_uri:
            out_uri.append(nu)
            out_dpi.append(d if d is not None and np.isfinite(d) else by_uri[nu])
            out_mask.append(mk or m_mask[index_of[nu]])
            continue
        if on in ("auto", "file_name"):
            hits = by_name.get(posixpath.basename(nu), [])
            if len(hits) > 1:
                raise LabelError(f"file name {posixpath.basename(nu)!r} is ambiguous in the "
                                 f"manifest ({len(hits)} images); give full URIs")
            if hits:
                out_uri.append(m_uri[hits[0]])
                out_dpi.append(d if d is not None and np.isfinite(d) else m_dpi[hits[0]])
                out_mask.append(mk or m_mask[hits[0]])
                continue
        missing.append(u)
    if missing:
        raise LabelError(f"{len(missing)} labelled image(s) are not in the manifest, e.g. "
                         f"{missing[:3]}")
    return _label_table(out_uri, labels["length_mm"].to_numpy(), labels["area_mm2"].to_numpy(),
                        np.asarray(out_dpi, dtype=float),
                        masks=out_mask if any(out_mask) else None)


def fill_dpi(labels: pa.Table, dpi: float) -> pa.Table:
    """Use ``dpi`` where a label has none (one camera, one resolution)."""
    d = labels["dpi"].to_numpy(zero_copy_only=False).astype(float)
    d = np.where(np.isfinite(d), d, float(dpi))
    return labels.set_column(labels.schema.get_field_index("dpi"), "dpi", pa.array(d, pa.float64()))


def require_dpi(labels: pa.Table) -> None:
    """Raise unless every label has a positive dpi (calibration needs it)."""
    d = labels["dpi"].to_numpy(zero_copy_only=False).astype(float)
    bad = np.flatnonzero(~np.isfinite(d) | (d <= 0))
    if bad.size:
        raise LabelError(f"{bad.size} label(s) have no dpi, e.g. "
                         f"{labels['image_uri'][int(bad[0])].as_py()!r}: give a dpi column, "
                         f"a manifest, or a default dpi")


# -- per-tile labels from masks ---------------------------------------------------------------
def density_maps(mask: np.ndarray, *, dpi: float, mm_per_px: float, length_mm: float,
                 area_mm2: float) -> np.ndarray | None:
    """Where in the image the label's length and area lie: ``(H', W', 2)`` float32 maps at the
    model scale (``mm_per_px``) whose sums are exactly ``length_mm`` and ``area_mm2``.

    Per-image labels alone (the sum over ~10-50 tiles) are a weak signal for a small network
    trained from scratch: measured here, it collapsed to "no root everywhere". A mask says
    which tile holds how much root, so every tile can be supervised directly. The *amounts*
    still come from the label (exact synthetic truth, a WinRHIZO total, or ``measure``); the
    mask only distributes them: length along the mask's skeleton (one unit per skeleton pixel,
    a few % error between diagonal and straight runs, then renormalised), area over the mask's
    pixels. Summing the maps over a tile gives that tile's length and area; flips, 90-degree
    turns and grid offsets move map and image together. The maps are resampled with the same
    size rule as :func:`rootflow.models.rootquant.to_model_scale` (so they stay aligned with
    the image), then renormalised so their sums equal the labels.

    Args:
        mask: ``(H, W)`` root mask at the image's own resolution (anything
            :func:`rootflow.traits.binary.as_binary` accepts).
        dpi: the image's resolution; mm_per_px: the model's input scale.
        length_mm / area_mm2: the image's labels.

    Returns:
        The maps, or ``None`` when the mask cannot distribute the label (an empty mask under a
        positive label): such an image is then trained on its image-level label only.
    """
    import cv2
    from skimage.morphology import skeletonize

    from rootflow.models.rootquant import scale_factor
    from rootflow.traits.binary import as_binary

    fg = as_binary(np.asarray(mask))
    dens: np.ndarray = np.zeros(fg.shape + (2,), np.float32)
    dens[..., 0] = skeletonize(fg)
    dens[..., 1] = fg
    f = scale_factor(dpi, mm_per_px)
    h, w = fg.shape
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    if (nh, nw) != (h, w):
        interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
        dens = cv2.resize(dens, (nw, nh), interpolation=interp)
    totals = dens.reshape(-1, 2).sum(axis=0, dtype=np.float64)
    out = np.zeros((nh, nw, 2), np.float32)
    for c, target in enumerate((float(length_mm), float(area_mm2))):
        if target <= 0:
            continue
        if totals[c] <= 0:
            return None
        out[..., c] = dens[..., c] * np.float32(target / totals[c])
    return out


def cell_sums(density: np.ndarray, *, tile_px: int, cell_px: int,
              offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Per-cell sums ``(N, C, g, g)`` of ``(H, W, C)`` maps (``g = tile_px // cell_px``), tiled
    exactly like :func:`rootflow.models.rootquant.tile_image` (same grid, offset, tile order):
    the labels of RootQuant's cell maps."""
    if tile_px % cell_px:
        raise ValueError(f"tile_px={tile_px} must be a multiple of cell_px={cell_px}")
    h, w, c = density.shape
    dy, dx = offset
    nty = max(1, -(-(h + dy) // tile_px))
    ntx = max(1, -(-(w + dx) // tile_px))
    g = tile_px // cell_px
    canvas = np.zeros((nty * tile_px, ntx * tile_px, c), np.float32)
    canvas[dy:dy + h, dx:dx + w] = density
    cells = canvas.reshape(nty, g, cell_px, ntx, g, cell_px, c).sum(axis=(2, 5), dtype=np.float64)
    # (nty, g, ntx, g, c) -> (tiles, c, g, g) in tile_image's row-major tile order
    return cells.transpose(0, 2, 4, 1, 3).reshape(nty * ntx, c, g, g)


# -- helpers ----------------------------------------------------------------------------------
def _floats(table: pa.Table, col: str, source: str) -> np.ndarray:
    """A column as float64 with nulls as NaN."""
    arr = table[col]
    try:
        vals = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
        raise LabelError(f"{source}: column {col!r} is not numeric ({arr.type}): {e}") from e
    return np.asarray(vals, dtype=float)


def _resolve(name: str, base_uri: str | None) -> str:
    """Absolute URIs/paths stay; relative names join ``base_uri`` (or stay relative without)."""
    if "://" in name:
        return storage.normalize(name)
    if name.startswith("/") or base_uri is None:
        return name
    return storage.normalize(storage.join(base_uri, name))


def _label_table(uris: Sequence[str], length: np.ndarray, area: np.ndarray,
                 dpi: np.ndarray, *, masks: Sequence[str | None] | None = None) -> pa.Table:
    """:data:`LABEL_SCHEMA`, plus a nullable ``mask_uri`` column when masks are known."""
    dpi = np.asarray(dpi, dtype=float)
    table = pa.table({
        "image_uri": pa.array(list(uris), pa.string()),
        "length_mm": pa.array(np.asarray(length, float), pa.float64()),
        "area_mm2": pa.array(np.asarray(area, float), pa.float64()),
        "dpi": pa.array(dpi, pa.float64(), mask=~np.isfinite(dpi)),
    }, schema=LABEL_SCHEMA)
    if masks is not None:
        table = table.append_column("mask_uri", pa.array(list(masks), pa.string()))
    return table
