"""Arrow schemas of the lake's Delta tables (``traits``, ``runs``, ``rejects``, ``versions`` and
the :data:`EXTRA_TABLES`). One place, versioned.

Rule for changes (why: readers in notebooks and dashboards outlive any one run of the code):
schemas only grow. A new column is nullable and appended; nothing is renamed, retyped or
dropped. Bump :data:`SCHEMA_VERSION` when a column is added; the writer adds it to an existing
table through Delta schema evolution (``merge_schema`` / ``schema_mode="merge"``), old rows
read it as null. A change that is not additive needs a new table, not a new version.

The trait columns are not listed here: they come from :func:`rootflow.traits.trait_schema`
(whatever :func:`rootflow.traits.measure` returns), so the traits code and the table cannot
drift apart.
"""

from __future__ import annotations

import pyarrow as pa

from rootflow.io.manifest import MANIFEST_SCHEMA

SCHEMA_VERSION = 2
"""2: ``rejects`` gained ``model_version`` and ``source_fingerprint`` (a reject is retried only
for a new reason: a changed file or model version, see docs/pipeline.md)."""

TRAITS_PARTITION_BY: tuple[str, ...] = ("year", "tube", "depth")
TRAITS_KEY: tuple[str, ...] = ("image_id", "model_name", "model_version")
REJECTS_KEY: tuple[str, ...] = ("run_id", "image_id", "model_name")
RUNS_KEY: tuple[str, ...] = ("run_id",)
VERSIONS_KEY: tuple[str, ...] = ("model_name", "model_version")

MODEL_NAMES: tuple[str, ...] = ("mask", "forest", "unet", "rootsam", "rootquant")
"""Producers of traits rows: traits of given masks, of forest / U-Net / RootSAM masks, and
RootQuant regressions (the job's ``PRODUCERS``)."""

PRODUCER_FIELDS: tuple[pa.Field, ...] = (
    pa.field("rootquant_length_mm", pa.float64()),
    pa.field("rootquant_area_mm2", pa.float64()),
    pa.field("rootquant_presence", pa.float64()),
    pa.field("confidence", pa.float64()),
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("processed_at", pa.timestamp("us"), nullable=False),
    pa.field("params", pa.string()),
)

RUNS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("job_kind", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("started_at", pa.timestamp("us"), nullable=False),
    pa.field("heartbeat_at", pa.timestamp("us")),
    pa.field("finished_at", pa.timestamp("us")),
    pa.field("manifest_uri", pa.string()),
    pa.field("scope", pa.string()),
    pa.field("config_json", pa.string()),
    pa.field("model_versions_json", pa.string()),
    pa.field("code_version", pa.string()),
    pa.field("n_ok", pa.int64()),
    pa.field("n_rejected", pa.int64()),
    pa.field("schema_version", pa.int32()),
])
"""One row per run. ``config_json`` holds the resolved config with credentials redacted."""

VERSIONS_SCHEMA = pa.schema([
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("first_committed_at", pa.timestamp("us"), nullable=False),
    pa.field("first_run_id", pa.string()),
]).with_metadata({"rootflow.schema_version": str(SCHEMA_VERSION)})
"""One row per producer and model version: when the version first wrote traits into the lake.

Written insert-only (a re-run never changes it), so it orders versions for "latest": model
versions are content hashes and have no order of their own."""

_REJECT_FIELDS: tuple[pa.Field, ...] = (
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("stage", pa.string(), nullable=False),
    pa.field("reason", pa.string(), nullable=False),
    pa.field("at", pa.timestamp("us"), nullable=False),
    # schema 2: what the reject was for, so a nightly run retries it only for a new reason
    pa.field("model_version", pa.string()),
    pa.field("source_fingerprint", pa.string()),
)


def _relaxed(field: pa.Field, keep_required: frozenset[str]) -> pa.Field:
    return field if field.name in keep_required else field.with_nullable(True)


def trait_fields(trait_schema: pa.Schema | None = None) -> list[pa.Field]:
    """Trait columns (all nullable: a trait may be undefined, e.g. diameter of an empty mask)."""
    if trait_schema is None:
        from rootflow.traits import trait_schema as _trait_schema

        trait_schema = _trait_schema()
    clash = [f.name for f in trait_schema if f.name in MANIFEST_SCHEMA.names
             or f.name in {p.name for p in PRODUCER_FIELDS}]
    if clash:
        raise ValueError(f"trait columns {clash} clash with manifest/producer columns")
    return [f.with_nullable(True) for f in trait_schema]


def traits_schema(trait_schema: pa.Schema | None = None) -> pa.Schema:
    """Manifest columns + trait columns + producer columns (contracts.md).

    ``mask_uri`` is the manifest's column reused: in a traits row it is the mask the traits
    were measured on (the given mask, or the RootSAM mask written by the pipeline).
    """
    required = frozenset({"image_id", "image_uri", "file_name", "experiment", "tube", "window",
                          "session", "captured_at", "year", "dpi", "depth_cm", "depth"})
    fields = [_relaxed(f, required) for f in MANIFEST_SCHEMA]
    fields += trait_fields(trait_schema)
    fields += list(PRODUCER_FIELDS)
    schema = pa.schema(fields)
    return schema.with_metadata({"rootflow.schema_version": str(SCHEMA_VERSION)})


def rejects_schema() -> pa.Schema:
    """Manifest columns (all nullable: a reject may come from a half-read row) + reject fields."""
    fields = [_relaxed(f, frozenset({"image_id"})) for f in MANIFEST_SCHEMA]
    return pa.schema(fields + list(_REJECT_FIELDS)).with_metadata(
        {"rootflow.schema_version": str(SCHEMA_VERSION)})


# -- root dynamics (rootflow.dynamics) ------------------------------------------------------
DYNAMICS_PARTITION_BY: tuple[str, ...] = TRAITS_PARTITION_BY
DYNAMICS_KEY: tuple[str, ...] = ("experiment", "tube", "window", "session_from", "session_to",
                                 "model_name", "model_version")
"""A pair of consecutive sessions of one window, for one producer and model version (the
experiment too: tube numbers repeat across experiments)."""

ALIGNMENTS_KEY: tuple[str, ...] = ("experiment", "tube", "window", "session_from", "session_to",
                                   "method")
"""Alignment depends on the images only, so it is shared by every producer of the pair."""

_PAIR_FIELDS: tuple[pa.Field, ...] = (
    pa.field("experiment", pa.string(), nullable=False),
    pa.field("tube", pa.int32(), nullable=False),
    pa.field("window", pa.int32(), nullable=False),
    pa.field("year", pa.int32(), nullable=False),
    pa.field("depth", pa.int32(), nullable=False),
    pa.field("depth_cm", pa.float64()),
    pa.field("session_from", pa.int32(), nullable=False),
    pa.field("session_to", pa.int32(), nullable=False),
    pa.field("captured_from", pa.timestamp("us"), nullable=False),
    pa.field("captured_to", pa.timestamp("us"), nullable=False),
    pa.field("days", pa.float64()),
    pa.field("image_id_from", pa.string()),
    pa.field("image_id_to", pa.string()),
)

_ALIGN_FIELDS: tuple[pa.Field, ...] = (
    pa.field("align_ok", pa.bool_()),
    pa.field("align_dx", pa.float64()),
    pa.field("align_dy", pa.float64()),
    pa.field("align_angle_deg", pa.float64()),
    pa.field("align_quality", pa.float64()),
    pa.field("align_overlap", pa.float64()),
    pa.field("align_reason", pa.string()),
)

ALIGNMENTS_SCHEMA = pa.schema([
    *_PAIR_FIELDS,
    pa.field("method", pa.string(), nullable=False),
    *_ALIGN_FIELDS,
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("processed_at", pa.timestamp("us"), nullable=False),
]).with_metadata({"rootflow.schema_version": str(SCHEMA_VERSION)})
"""One row per consecutive pair of sessions of a window and alignment method."""

DYNAMICS_SCHEMA = pa.schema([
    *_PAIR_FIELDS,
    pa.field("model_name", pa.string(), nullable=False),
    pa.field("model_version", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("align_method", pa.string()),
    *_ALIGN_FIELDS,
    pa.field("dpi", pa.float64()),
    pa.field("k_px", pa.int32()),
    pa.field("k_mm", pa.float64()),
    pa.field("overlap_fraction", pa.float64()),
    pa.field("overlap_area_cm2", pa.float64()),
    pa.field("length_from_mm", pa.float64()),
    pa.field("length_to_mm", pa.float64()),
    pa.field("area_from_mm2", pa.float64()),
    pa.field("area_to_mm2", pa.float64()),
    pa.field("persisting_mm", pa.float64()),
    pa.field("persisting_from_mm", pa.float64()),
    pa.field("produced_mm", pa.float64()),
    pa.field("lost_mm", pa.float64()),
    pa.field("produced_area_mm2", pa.float64()),
    pa.field("lost_area_mm2", pa.float64()),
    pa.field("bookkeeping_residual_mm", pa.float64()),
    pa.field("produced_mm_per_day", pa.float64()),
    pa.field("lost_mm_per_day", pa.float64()),
    pa.field("rld_from_mm_per_cm2", pa.float64()),
    pa.field("rld_to_mm_per_cm2", pa.float64()),
    pa.field("cum_produced_mm", pa.float64()),
    pa.field("cum_lost_mm", pa.float64()),
    pa.field("dynamics_version", pa.string()),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("processed_at", pa.timestamp("us"), nullable=False),
]).with_metadata({"rootflow.schema_version": str(SCHEMA_VERSION)})
"""One row per consecutive pair of sessions of a window, producer and model version.

``status``: ``ok`` (numbers measured on the aligned overlap), ``flagged`` (the pair could not
be aligned: numbers null, ``reason`` says why) or ``error`` (bad input: a missing mask, images of
different sizes...). Lengths in mm measured by the traits code on the overlap of both frames.
"""

# -- correction studio (rootflow.studio) ------------------------------------------------------
ANNOTATIONS_KEY: tuple[str, ...] = ("annotation_id",)

ANNOTATIONS_SCHEMA = pa.schema([
    pa.field("annotation_id", pa.string(), nullable=False),
    pa.field("image_id", pa.string(), nullable=False),
    pa.field("image_uri", pa.string(), nullable=False),
    pa.field("mask_uri", pa.string(), nullable=False),
    pa.field("width", pa.int32()),
    pa.field("height", pa.int32()),
    pa.field("proposed_by", pa.string()),
    pa.field("proposed_version", pa.string()),
    pa.field("proposal_mask_uri", pa.string()),
    pa.field("engine", pa.string()),
    pa.field("engine_version", pa.string()),
    pa.field("clicks_json", pa.string()),
    pa.field("strokes_json", pa.string()),
    pa.field("n_clicks", pa.int32()),
    pa.field("n_strokes", pa.int32()),
    pa.field("iou_proposed_accepted", pa.float64()),
    pa.field("root_fraction", pa.float64()),
    pa.field("person", pa.string(), nullable=False),
    pa.field("started_at", pa.timestamp("us"), nullable=False),
    pa.field("ended_at", pa.timestamp("us"), nullable=False),
    pa.field("active_seconds", pa.float64()),
    pa.field("processed_at", pa.timestamp("us"), nullable=False),
]).with_metadata({"rootflow.schema_version": str(SCHEMA_VERSION)})
"""One row per mask accepted in the correction studio: the proposal (producer, version, mask),
the clicks (``[{"x", "y", "label"}]``, image px) and strokes (``[{"mode", "radius", "points"}]``)
as JSON, the accepted mask's URI, who and when (``active_seconds``: time spent interacting)."""

EXTRA_TABLES: dict[str, tuple[pa.Schema, tuple[str, ...], tuple[str, ...]]] = {
    "dynamics": (DYNAMICS_SCHEMA, DYNAMICS_KEY, DYNAMICS_PARTITION_BY),
    "alignments": (ALIGNMENTS_SCHEMA, ALIGNMENTS_KEY, DYNAMICS_PARTITION_BY),
    "annotations": (ANNOTATIONS_SCHEMA, ANNOTATIONS_KEY, ()),
}
"""Tables written through :meth:`rootflow.lake.Lake.commit_rows`: (schema, key, partitions)."""

CORE_TABLES: tuple[str, ...] = ("traits", "runs", "rejects", "versions")
"""Tables every lake has from its first write (created empty where nothing is written yet)."""

ALL_TABLES: tuple[str, ...] = (*CORE_TABLES, *EXTRA_TABLES)
"""Every table of a lake, in the order ``rootflow lake show`` lists them."""
