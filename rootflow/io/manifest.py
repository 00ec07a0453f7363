"""The manifest: one validated row per image, the input of every processing run.

A manifest is a Parquet (or CSV) table with :data:`MANIFEST_SCHEMA`. It is built from an image
archive by :func:`build_manifest` (file names parsed by :mod:`rootflow.io.filenames`, depth from
the tube geometry of the per-experiment YAML) or supplied by a user and checked by
:func:`read_manifest`. Both paths end in the same validation, so every stage downstream can
trust the types, the nullability and the uniqueness of ``image_id``.

``image_id`` is stable: by default it is the first 20 hex digits (80 bits) of the SHA-256 of
the image's normalized URI (local paths made absolute, ``file://`` dropped), so building the
manifest of the same archive twice, anywhere, gives the same ids, and re-runs MERGE onto the
same lake rows. ``id_from="content"`` hashes the file bytes instead (ids survive moving the
archive to another bucket, at the price of reading every byte once); ``id_from="name"`` hashes
``experiment/stem`` (survives moves without reading, but two archives with identically named
files collide, which the duplicate check then refuses).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fnmatch
import hashlib
import io
import math
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import pyarrow as pa

from rootflow.io import storage as _storage
from rootflow.io.filenames import (
    DATE_ORDERS,
    MASK_SUFFIX,
    DateOrder,
    FilenameError,
    is_image_name,
    parse_name,
    stem_of,
)
from rootflow.io.storage import StorageLike

MANIFEST_SCHEMA_VERSION = 1

MANIFEST_SCHEMA = pa.schema([
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("file_name", pa.string(), nullable=False),
    pa.field("experiment", pa.string(), nullable=False),
    pa.field("tube", pa.int32(), nullable=False),
    pa.field("window", pa.int32(), nullable=False),
    pa.field("session", pa.int32(), nullable=False),
    pa.field("captured_at", pa.timestamp("us"), nullable=False),
    pa.field("year", pa.int32(), nullable=False),
    pa.field("operator", pa.string(), nullable=True),
    pa.field("dpi", pa.float64(), nullable=False),
    pa.field("depth_cm", pa.float64(), nullable=False),
    pa.field("depth", pa.int32(), nullable=False),
    pa.field("mask_uri", pa.string(), nullable=True),
    pa.field("species", pa.string(), nullable=True),
    pa.field("treatment", pa.string(), nullable=True),
    pa.field("tile", pa.string(), nullable=True),
])
"""One row per image (contracts.md). ``depth`` is the partition key (band lower bound, cm)."""

MANIFEST_COLUMNS: tuple[str, ...] = tuple(MANIFEST_SCHEMA.names)

BUILD_REJECTS_SCHEMA = pa.schema([
    pa.field("file_name", pa.string(), nullable=False),
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
])
"""Files found by :func:`build_manifest` that did not become manifest rows, with the reason."""

IdFrom = Literal["uri", "content", "name"]
_ID_HEX = 20

#: Longest ``image_id`` accepted (ids become file names: ``masks/.../<image_id>.png``).
MAX_IMAGE_ID_LEN = 128

_GEOMETRY_KEYS = ("frame_height_mm", "insertion_angle_deg", "surface_window", "surface_offset_cm")


class ManifestError(ValueError):
    """A manifest or experiment config that cannot be used; the message names what and where."""


# -- per-experiment settings ----------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ExperimentSettings:
    """Calibration and tube geometry of one experiment (one entry of the YAML ``experiments``)."""

    dpi: float | None = None
    frame_height_mm: float | None = None
    insertion_angle_deg: float | None = None
    surface_window: int | None = None
    surface_offset_cm: float | None = 0.0
    species: str | None = None
    treatment: str | None = None
    date_order: DateOrder | None = None

    def missing(self, *, need_geometry: bool = True) -> list[str]:
        """Names of the settings that are needed but not set."""
        keys = ("dpi", *(_GEOMETRY_KEYS if need_geometry else ()))
        return [k for k in keys if getattr(self, k) is None]


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The per-experiment YAML (contracts.md): date order, depth band and settings per name.

    ``experiments`` keys are matched against the parsed experiment name: exact name first, then
    glob patterns (``DOE.*``) in file order, then ``"*"`` as the default.
    """

    date_order: DateOrder | None = None
    depth_band_cm: float = 10.0
    experiments: Mapping[str, ExperimentSettings] = dataclasses.field(default_factory=dict)
    filename_pattern: str | None = None

    def settings_for(self, experiment: str) -> ExperimentSettings | None:
        if experiment in self.experiments:
            return self.experiments[experiment]
        for key, value in self.experiments.items():
            if key != "*" and fnmatch.fnmatchcase(experiment, key):
                return value
        return self.experiments.get("*")

    def date_order_for(self, experiment: str) -> DateOrder | None:
        s = self.settings_for(experiment)
        return (s.date_order if s and s.date_order else None) or self.date_order


def parse_experiment_config(data: Mapping[str, Any]) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from parsed YAML, naming unknown or bad keys."""
    top = {f.name for f in dataclasses.fields(ExperimentConfig)}
    unknown = sorted(set(data) - top)
    if unknown:
        raise ManifestError(f"experiment config: unknown key(s) {unknown}; valid: {sorted(top)}")
    order = data.get("date_order")
    if order is not None and order not in DATE_ORDERS:
        raise ManifestError(f"experiment config: date_order must be one of {list(DATE_ORDERS)}, "
                            f"got {order!r}")
    band = float(data.get("depth_band_cm", 10.0))
    if not band > 0:
        raise ManifestError(f"experiment config: depth_band_cm must be > 0, got {band}")
    fields = {f.name for f in dataclasses.fields(ExperimentSettings)}
    experiments: dict[str, ExperimentSettings] = {}
    for name, raw in (data.get("experiments") or {}).items():
        raw = raw or {}
        bad = sorted(set(raw) - fields)
        if bad:
            raise ManifestError(f"experiment config: experiment {name!r} has unknown key(s) {bad}; "
                                f"valid: {sorted(fields)}")
        kw: dict[str, Any] = {}
        for key, value in raw.items():
            if value is None:
                kw[key] = None
            elif key in ("dpi", "frame_height_mm", "insertion_angle_deg", "surface_offset_cm"):
                kw[key] = _number(name, key, value, float)
            elif key == "surface_window":
                kw[key] = _number(name, key, value, int)
            elif key == "date_order":
                if value not in DATE_ORDERS:
                    raise ManifestError(f"experiment config: {name}.date_order must be one of "
                                        f"{list(DATE_ORDERS)}, got {value!r}")
                kw[key] = value
            else:
                kw[key] = str(value)
        s = ExperimentSettings(**kw)
        if s.dpi is not None and not s.dpi > 0:
            raise ManifestError(f"experiment config: {name}.dpi must be > 0, got {s.dpi}")
        if s.frame_height_mm is not None and not s.frame_height_mm > 0:
            raise ManifestError(f"experiment config: {name}.frame_height_mm must be > 0")
        experiments[str(name)] = s
    return ExperimentConfig(date_order=order, depth_band_cm=band, experiments=experiments,
                            filename_pattern=data.get("filename_pattern"))


def _number(exp: str, key: str, value: Any, kind: type) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ManifestError(f"experiment config: {exp}.{key} = {value!r} is not a number") from None


def load_experiment_config(
    source: str | Mapping[str, Any] | ExperimentConfig | None,
    *,
    storage_options: StorageLike = None,
) -> ExperimentConfig | None:
    """Load the YAML from a URI, or accept an already parsed mapping / config (or None)."""
    if source is None or isinstance(source, ExperimentConfig):
        return source
    if isinstance(source, Mapping):
        return parse_experiment_config(source)
    import yaml

    try:
        text = _storage.read_bytes(source, storage_options).decode()
    except FileNotFoundError:
        raise ManifestError(f"experiment config {source} does not exist") from None
    data = yaml.safe_load(text) or {}
    if not isinstance(data, Mapping):
        raise ManifestError(f"experiment config {source}: expected a mapping at the top level")
    return parse_experiment_config(data)


def window_depth_cm(window: int, settings: ExperimentSettings) -> float:
    """Vertical depth (cm) of the centre of window ``window`` below the soil surface.

    The tube runs at ``insertion_angle_deg`` to the surface, so a distance along the tube maps
    to ``sin(angle)`` times that distance in depth; the top edge of ``surface_window`` sits at
    the surface, each window is ``frame_height_mm`` long, and we take the window's centre.
    """
    missing = [k for k in _GEOMETRY_KEYS if getattr(settings, k) is None]
    if missing:
        raise ManifestError(f"tube geometry incomplete: missing {missing}")
    assert settings.frame_height_mm is not None and settings.insertion_angle_deg is not None
    assert settings.surface_window is not None and settings.surface_offset_cm is not None
    along_mm = (window - settings.surface_window) * settings.frame_height_mm + settings.frame_height_mm / 2
    return along_mm / 10.0 * math.sin(math.radians(settings.insertion_angle_deg)) + settings.surface_offset_cm


def depth_band(depth_cm: float, band_cm: float = 10.0) -> int:
    """Lower bound (whole cm) of the depth band holding ``depth_cm``: the partition key."""
    return int(math.floor(depth_cm / band_cm) * band_cm)


# -- ids -------------------------------------------------------------------------------------------
def image_id_for(uri: str) -> str:
    """Stable id of an image from its normalized URI (see the module docstring)."""
    return hashlib.sha256(_storage.normalize(uri).encode()).hexdigest()[:_ID_HEX]


def _image_id(uri: str, *, id_from: IdFrom, experiment: str, storage_options: StorageLike) -> str:
    if id_from == "uri":
        return image_id_for(uri)
    if id_from == "content":
        return hashlib.sha256(_storage.read_bytes(uri, storage_options)).hexdigest()[:_ID_HEX]
    if id_from == "name":
        key = f"{experiment}/{stem_of(uri)}"
        return hashlib.sha256(key.encode()).hexdigest()[:_ID_HEX]
    raise ValueError(f"id_from must be 'uri', 'content' or 'name', got {id_from!r}")


# -- building from an archive ------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ManifestBuild:
    """Result of :func:`build_manifest`: the valid rows and the files that did not make it."""

    table: pa.Table
    rejects: pa.Table

    def summary(self) -> str:
        return f"{self.table.num_rows} images, {self.rejects.num_rows} rejected"


def list_images(src_uri: str, *, storage_options: StorageLike = None) -> list[str]:
    """All image URIs (``.jpg .jpeg .png .tif .tiff``, masks included) under ``src_uri``, sorted."""
    fs = _storage.filesystem(src_uri, storage_options)
    root = _storage.strip_protocol(src_uri).rstrip("/")
    if not fs.exists(root):
        raise ManifestError(f"source {src_uri} does not exist")
    paths = fs.find(root) if fs.isdir(root) else [root]
    return sorted(_storage.to_uri(src_uri, p) for p in paths if is_image_name(p))


def build_manifest(
    src_uri: str,
    *,
    experiment_config: str | Mapping[str, Any] | ExperimentConfig | None = None,
    storage_options: StorageLike = None,
    date_order: DateOrder | None = None,
    filename_pattern: str | None = None,
    id_from: IdFrom = "uri",
) -> ManifestBuild:
    """List the images under ``src_uri`` and turn their names into manifest rows.

    Args:
        src_uri: folder (any fsspec URI) holding the archive; searched recursively.
        experiment_config: the per-experiment YAML (URI, mapping or parsed); by default
            ``<src_uri>/experiment.yaml`` when it exists.
        date_order: overrides the config's ``date_order`` for 2-digit-year dates.
        filename_pattern: regular expression with named groups replacing the ICAP pattern.
        id_from: how ``image_id`` is derived (module docstring).

    Returns:
        The manifest table and the rejects (file name, URI, reason): files whose names do not
        parse, masks with no image. Every image file found ends up in exactly one of the two.

    Raises:
        ManifestError: no experiment config, or an experiment without dpi/geometry settings
            (refused for the whole build: silently wrong depths are worse than no manifest).
    """
    default_cfg = _storage.join(src_uri, "experiment.yaml")
    if experiment_config is None and _storage.exists(default_cfg, storage_options):
        experiment_config = default_cfg
    cfg = load_experiment_config(experiment_config, storage_options=storage_options)
    if cfg is None:
        raise ManifestError(
            f"no experiment config: pass one (--experiment-config) or put experiment.yaml in "
            f"{src_uri}; it must give dpi and tube geometry ({', '.join(_GEOMETRY_KEYS)})")
    pattern = filename_pattern or cfg.filename_pattern

    uris = list_images(src_uri, storage_options=storage_options)
    masks = {}
    images = []
    for uri in uris:
        stem = stem_of(uri)
        if stem.endswith(MASK_SUFFIX):
            folder = uri.rsplit("/", 1)[0]
            masks[(folder, stem[: -len(MASK_SUFFIX)])] = uri
        else:
            images.append(uri)

    rows: list[dict[str, Any]] = []
    rejects: list[dict[str, str]] = []
    used_masks: set[str] = set()
    missing: dict[str, list[str]] = {}
    for uri in images:
        name = posixpath.basename(uri)
        if not _is_utf8(uri):
            shown = uri.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            rejects.append({"file_name": posixpath.basename(shown), "image_uri": shown,
                            "reason": "filename: not valid UTF-8 (rename the file)"})
            continue
        try:
            order = date_order
            if order is None:
                # The experiment decides the date order, so parse once to learn the experiment.
                order = _order_for_name(name, cfg, pattern)
            parsed = parse_name(name, date_order=order, pattern=pattern)
        except FilenameError as e:
            rejects.append({"file_name": name, "image_uri": uri, "reason": f"filename: {e}"})
            continue
        settings = cfg.settings_for(parsed.experiment)
        if settings is None:
            missing.setdefault(parsed.experiment, ["dpi", *_GEOMETRY_KEYS])
            continue
        lack = settings.missing()
        if lack:
            missing.setdefault(parsed.experiment, lack)
            continue
        assert settings.dpi is not None
        depth_cm = window_depth_cm(parsed.window, settings)
        folder = uri.rsplit("/", 1)[0]
        mask_uri = masks.get((folder, stem_of(uri)))
        if mask_uri:
            used_masks.add(mask_uri)
        rows.append({
            "image_uri": uri,
            "image_id": _image_id(uri, id_from=id_from, experiment=parsed.experiment,
                                  storage_options=storage_options),
            "file_name": name,
            "experiment": parsed.experiment,
            "tube": parsed.tube,
            "window": parsed.window,
            "session": parsed.session,
            "captured_at": parsed.captured_at,
            "year": parsed.captured_at.year,
            "operator": parsed.operator,
            "dpi": float(settings.dpi),
            "depth_cm": depth_cm,
            "depth": depth_band(depth_cm, cfg.depth_band_cm),
            "mask_uri": mask_uri,
            "species": settings.species,
            "treatment": settings.treatment,
            "tile": parsed.tile,
        })
    if missing:
        detail = "; ".join(f"{exp!r}: {', '.join(keys)}" for exp, keys in sorted(missing.items()))
        known = sorted(cfg.experiments) or ["(none)"]
        raise ManifestError(
            f"experiment config lacks settings for experiment(s) {detail} "
            f"(config has: {', '.join(known)}); add them under 'experiments:' or a '*' default")
    seen: dict[str, str] = {}
    unique_rows = []
    for row in rows:  # id_from="content"/"name" can map two files to one id: keep the first
        first = seen.setdefault(row["image_id"], row["image_uri"])
        if first != row["image_uri"]:
            rejects.append({"file_name": row["file_name"], "image_uri": row["image_uri"],
                            "reason": f"duplicate image_id {row['image_id']} (id_from={id_from}) "
                                      f"of {first}"})
        else:
            unique_rows.append(row)
    rows = unique_rows
    for mask_uri in sorted(set(masks.values()) - used_masks):
        mask_uri = mask_uri.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        rejects.append({"file_name": posixpath.basename(mask_uri), "image_uri": mask_uri,
                        "reason": "mask without an image of the same stem in its folder"})
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    table = validate_manifest(table, source=src_uri)
    return ManifestBuild(table=table,
                         rejects=pa.Table.from_pylist(rejects, schema=BUILD_REJECTS_SCHEMA))


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes of a local name, kept as surrogates
        return False
    return True


def _order_for_name(name: str, cfg: ExperimentConfig, pattern: str | None) -> DateOrder | None:
    if cfg.date_order is not None and not any(s.date_order for s in cfg.experiments.values()):
        return cfg.date_order
    # Parse with any order just to learn the experiment name (dates may be ambiguous).
    orders: tuple[DateOrder, ...] = ("DMY", "YMD", "MDY")
    for order in orders:
        try:
            exp = parse_name(name, date_order=order, pattern=pattern).experiment
        except FilenameError:
            continue
        return cfg.date_order_for(exp)
    return cfg.date_order


# -- reading / validating a given manifest ------------------------------------------------------
def read_manifest(
    uri: str,
    *,
    storage_options: StorageLike = None,
    experiment_config: str | Mapping[str, Any] | ExperimentConfig | None = None,
    allow_prefixes: Sequence[str] | None = None,
) -> pa.Table:
    """Read a manifest (Parquet, or CSV by extension) and validate it.

    ``allow_prefixes`` (when given) limits where ``image_uri`` and ``mask_uri`` may point
    (:func:`check_allowed_uris`); ``"default"`` as its only element means
    :func:`rootflow.io.storage.default_allowed_prefixes` of the manifest's own URI.

    A user-supplied manifest need not spell out what can be derived: ``image_id`` (from
    ``image_uri``), ``file_name``, ``year`` (from ``captured_at``), ``depth`` (band of
    ``depth_cm``), the name fields (parsed from ``file_name``), ``depth_cm`` and ``dpi`` (from
    ``experiment_config``). Columns beyond the schema are kept, after the schema's columns.

    Raises:
        ManifestError: unreadable file, a missing required column (named), a value of the wrong
            type (column, row and value named), a null where none is allowed, duplicate ids.
    """
    try:
        data = _storage.read_bytes(uri, storage_options)
    except FileNotFoundError:
        raise ManifestError(f"manifest {uri} does not exist") from None
    if uri.lower().endswith((".csv", ".csv.gz", ".tsv")) or not data.startswith(b"PAR1"):
        import pyarrow.csv as pacsv

        try:
            delim = "\t" if uri.lower().endswith(".tsv") else ","
            table = pacsv.read_csv(
                io.BytesIO(data),
                parse_options=pacsv.ParseOptions(delimiter=delim),
                convert_options=pacsv.ConvertOptions(strings_can_be_null=True),
            )
        except pa.ArrowInvalid as e:
            raise ManifestError(f"manifest {uri}: not a readable CSV or Parquet file ({e})") from None
    else:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(data))
        except (pa.ArrowInvalid, OSError) as e:
            first = str(e).strip().splitlines()[0]
            raise ManifestError(f"manifest {uri}: not a readable Parquet file ({first})") from None
    cfg = load_experiment_config(experiment_config, storage_options=storage_options)
    out = validate_manifest(table, source=uri, experiment_config=cfg)
    if allow_prefixes is not None:
        prefixes = list(allow_prefixes)
        if prefixes == ["default"]:
            prefixes = _storage.default_allowed_prefixes(uri)
        check_allowed_uris(out, prefixes, source=uri)
    return out


def check_allowed_uris(table: pa.Table, prefixes: Sequence[str], *, source: str = "manifest") -> None:
    """Refuse a manifest whose ``image_uri``/``mask_uri`` point outside ``prefixes``, naming
    the column, row and URI (a manifest in a bucket must not make the job read
    ``file:///etc/passwd`` or another tenant's bucket)."""
    allowed = list(prefixes)
    ok = _storage.allowed_checker(allowed)
    for col in ("image_uri", "mask_uri"):
        if col not in table.column_names:
            continue
        for i, u in enumerate(table.column(col).to_pylist()):
            if u is not None and not ok(u):
                raise ManifestError(
                    f"{source}: column {col!r} row {i}: {u} is outside the allowed prefixes "
                    f"{allowed} (add one with --allow-prefix)")


def validate_manifest(
    table: pa.Table,
    *,
    source: str = "manifest",
    experiment_config: ExperimentConfig | None = None,
) -> pa.Table:
    """Fill derivable columns, cast to :data:`MANIFEST_SCHEMA` and check it (see read_manifest)."""
    cols: dict[str, pa.ChunkedArray | pa.Array] = {n: table.column(n) for n in table.column_names}
    n = table.num_rows
    if "image_uri" not in cols:
        raise ManifestError(f"{source}: missing required column 'image_uri'")
    cols["image_uri"] = _cast(cols["image_uri"], MANIFEST_SCHEMA.field("image_uri"), source)
    uris = cols["image_uri"].to_pylist()
    _check_not_null(uris, "image_uri", source)
    if "file_name" not in cols:
        cols["file_name"] = pa.array([posixpath.basename(u) for u in uris], pa.string())
    cols["file_name"] = _cast(cols["file_name"], MANIFEST_SCHEMA.field("file_name"), source)

    name_fields = ("experiment", "tube", "window", "session", "captured_at", "operator", "tile")
    need_names = [c for c in name_fields if c not in cols]
    if need_names and n:
        parsed = []
        for i, name in enumerate(cols["file_name"].to_pylist()):
            try:
                pattern = experiment_config.filename_pattern if experiment_config else None
                order = (_order_for_name(name, experiment_config, pattern)
                         if experiment_config else None)
                parsed.append(parse_name(name, date_order=order, pattern=pattern))
            except FilenameError as e:
                required = [c for c in need_names if c not in ("operator", "tile")]
                raise ManifestError(
                    f"{source}: missing column(s) {required or need_names} and row {i} "
                    f"file_name cannot supply them: {e}") from None
        for c in need_names:
            cols[c] = pa.array([getattr(p, c) for p in parsed],
                               MANIFEST_SCHEMA.field(c).type)
    elif need_names:
        for c in need_names:
            cols[c] = pa.nulls(0, MANIFEST_SCHEMA.field(c).type)

    for c in ("experiment", "tube", "window", "session", "captured_at"):
        cols[c] = _cast(cols[c], MANIFEST_SCHEMA.field(c), source)

    if "image_id" not in cols:
        cols["image_id"] = pa.array([image_id_for(u) for u in uris], pa.string())
    if "year" not in cols:
        cols["year"] = pa.array([t.year if t else None for t in cols["captured_at"].to_pylist()],
                                pa.int32())

    settings = None
    if "dpi" in cols and experiment_config is not None:
        cols["dpi"] = _cast(cols["dpi"], MANIFEST_SCHEMA.field("dpi"), source)
        if cols["dpi"].null_count:  # rows without dpi take their experiment's from the config
            given = cols["dpi"].to_pylist()
            exps = cols["experiment"].to_pylist()
            filled = []
            for d, exp in zip(given, exps, strict=True):
                st = experiment_config.settings_for(exp) if d is None else None
                filled.append(st.dpi if st is not None and st.dpi is not None else d)
            cols["dpi"] = pa.chunked_array([pa.array(filled, pa.float64())])
    if ("dpi" not in cols or "depth_cm" not in cols) and experiment_config is not None:
        settings = [experiment_config.settings_for(e) for e in cols["experiment"].to_pylist()]
    if "dpi" not in cols:
        if settings is None:
            raise ManifestError(f"{source}: missing required column 'dpi' (or give an experiment "
                                "config with dpi per experiment)")
        for i, s in enumerate(settings):
            if s is None or s.dpi is None:
                exp = cols["experiment"][i].as_py()
                raise ManifestError(f"{source}: missing column 'dpi' and the experiment config "
                                    f"gives no dpi for experiment {exp!r} (row {i})")
        cols["dpi"] = pa.array([s.dpi for s in settings], pa.float64())  # type: ignore[union-attr]
    if "depth_cm" not in cols:
        if settings is None:
            raise ManifestError(
                f"{source}: missing required column 'depth_cm' (or give an experiment config with "
                f"tube geometry: {', '.join(_GEOMETRY_KEYS)})")
        windows = cols["window"].to_pylist()
        values = []
        for i, (s, w) in enumerate(zip(settings, windows, strict=True)):
            lack = ["experiment settings"] if s is None else s.missing()
            if lack or s is None:
                exp = cols["experiment"][i].as_py()
                raise ManifestError(f"{source}: row {i} (experiment {exp!r}) needs depth_cm but the "
                                    f"experiment config lacks {', '.join(lack)}")
            values.append(window_depth_cm(w, s))
        cols["depth_cm"] = pa.array(values, pa.float64())
    cols["depth_cm"] = _cast(cols["depth_cm"], MANIFEST_SCHEMA.field("depth_cm"), source)
    if "depth" not in cols:
        band = experiment_config.depth_band_cm if experiment_config else 10.0
        cols["depth"] = pa.array([None if d is None else depth_band(d, band)
                                  for d in cols["depth_cm"].to_pylist()], pa.int32())
    for c in ("mask_uri", "species", "treatment"):
        if c not in cols:
            s_attr = c if c in ("species", "treatment") else None
            if s_attr and settings is not None:
                cols[c] = pa.array([getattr(s, s_attr) if s else None for s in settings], pa.string())
            else:
                cols[c] = pa.nulls(n, pa.string())

    arrays = [_cast(cols[f.name], f, source) for f in MANIFEST_SCHEMA]
    extra = [c for c in table.column_names if c not in MANIFEST_SCHEMA.names]
    out = pa.Table.from_arrays(arrays, schema=MANIFEST_SCHEMA)
    for f in MANIFEST_SCHEMA:
        if not f.nullable:
            _check_not_null(out.column(f.name).to_pylist(), f.name, source)
    for c in extra:
        out = out.append_column(c, table.column(c))
    _check_ranges(out, source)
    ids = out.column("image_id").to_pylist()
    _check_ids(ids, source)
    _check_unique(ids, source)
    return out


def image_id_problem(image_id: str) -> str | None:
    """Why ``image_id`` cannot be used (it names files under the lake), or None when it can.

    Refused: empty, longer than :data:`MAX_IMAGE_ID_LEN`, a path separator (``/`` or
    ``\\``), ``..``, a leading ``.``, or control characters.
    """
    if not image_id:
        return "is empty"
    if len(image_id) > MAX_IMAGE_ID_LEN:
        return f"is {len(image_id)} characters long (at most {MAX_IMAGE_ID_LEN})"
    if "/" in image_id or "\\" in image_id:
        return "contains a path separator"
    if ".." in image_id or image_id.startswith("."):
        return "contains '..' or starts with '.'"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in image_id):
        return "contains control characters"
    return None


def _check_ids(ids: Sequence[str], source: str) -> None:
    for i, v in enumerate(ids):
        why = image_id_problem(v)
        if why:
            shown = v if len(v) <= 40 else v[:37] + "..."
            raise ManifestError(f"{source}: column 'image_id' row {i}: {shown!r} {why}")


def _cast(col: Any, field: pa.Field, source: str) -> pa.ChunkedArray:
    col = col if isinstance(col, pa.ChunkedArray) else pa.chunked_array([col])
    target = field.type
    if col.type == target:
        return col
    if pa.types.is_timestamp(target) and pa.types.is_timestamp(col.type) and col.type.tz:
        col = col.cast(pa.timestamp(col.type.unit, tz="UTC"))
        col = pa.chunked_array([c.cast(pa.timestamp(col.type.unit)) for c in col.chunks],
                               pa.timestamp(col.type.unit))
    try:
        if pa.types.is_timestamp(target) and pa.types.is_string(col.type):
            return pa.chunked_array([_parse_times(c.to_pylist()) for c in col.chunks], target)
        return col.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
        pass
    values = col.to_pylist()
    for i, v in enumerate(values):
        if v is None:
            continue
        try:
            pa.array([v], col.type).cast(target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            raise ManifestError(f"{source}: column {field.name!r} row {i}: value {v!r} is not "
                                f"{target}") from None
    raise ManifestError(f"{source}: column {field.name!r} of type {col.type} cannot be read "
                        f"as {target}")


def _parse_times(values: Sequence[str | None]) -> pa.Array:
    out: list[dt.datetime | None] = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        t = dt.datetime.fromisoformat(v)
        if t.tzinfo is not None:
            t = t.astimezone(dt.timezone.utc).replace(tzinfo=None)
        out.append(t)
    return pa.array(out, pa.timestamp("us"))


def _check_not_null(values: Iterable[Any], name: str, source: str) -> None:
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and math.isnan(v)):
            raise ManifestError(f"{source}: column {name!r} row {i} is empty (required)")


def _check_ranges(table: pa.Table, source: str) -> None:
    for i, d in enumerate(table.column("dpi").to_pylist()):
        if not d > 0:
            raise ManifestError(f"{source}: column 'dpi' row {i}: {d} is not > 0")
    for c in ("tube", "window", "session"):
        for i, v in enumerate(table.column(c).to_pylist()):
            if v < 0:
                raise ManifestError(f"{source}: column {c!r} row {i}: {v} is negative")


def _check_unique(ids: Sequence[str], source: str) -> None:
    seen: dict[str, int] = {}
    dups: list[str] = []
    for i, v in enumerate(ids):
        if v in seen:
            dups.append(f"{v!r} (rows {seen[v]} and {i})")
        else:
            seen[v] = i
    if dups:
        more = f" and {len(dups) - 5} more" if len(dups) > 5 else ""
        raise ManifestError(f"{source}: duplicate image_id {', '.join(dups[:5])}{more}")


# -- writing -------------------------------------------------------------------------------------
def write_manifest(
    table: pa.Table,
    uri: str,
    *,
    storage_options: StorageLike = None,
    format: Literal["parquet", "csv"] | None = None,
) -> str:
    """Validate and write a manifest (Parquet unless ``uri`` ends in ``.csv``); returns ``uri``."""
    table = validate_manifest(table, source=uri)
    write_table(table, uri, storage_options=storage_options, format=format)
    return uri


def write_table(
    table: pa.Table,
    uri: str,
    *,
    storage_options: StorageLike = None,
    format: Literal["parquet", "csv"] | None = None,
) -> None:
    """Write any Arrow table to ``uri`` as Parquet or CSV through the storage helpers."""
    fmt = format or ("csv" if uri.lower().endswith(".csv") else "parquet")
    buf = io.BytesIO()
    if fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, buf)
    else:
        import pyarrow.parquet as pq

        meta = dict(table.schema.metadata or {})
        meta[b"rootflow.manifest_schema_version"] = str(MANIFEST_SCHEMA_VERSION).encode()
        pq.write_table(table.replace_schema_metadata(meta), buf)
    _storage.write_bytes(uri, buf.getvalue(), storage_options)
