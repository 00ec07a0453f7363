"""Root traits from binary masks, in mm, RhizoVision Explorer compatible (pure numpy/numba).

``measure(mask, dpi=...)`` is the whole API most callers need; ``trait_schema()`` gives the
Arrow schema of its output for the Delta ``traits`` table. See ``docs/traits.md``.
"""

from rootflow.traits.binary import MaskError, as_binary
from rootflow.traits.length import kimura_length_px, rve_length_px
from rootflow.traits.measure import (
    DEFAULT_DIAMETER_EDGES_MM,
    DEFAULT_MIN_COMPONENT_PX,
    DEFAULT_PRUNE_PX,
    class_suffixes,
    measure,
    trait_schema,
)
from rootflow.traits.skeleton import skeletonize

TRAITS_VERSION = "1.0"
"""Bumped whenever a trait's definition or estimator changes (part of ``model_version``)."""

__all__ = [
    "DEFAULT_DIAMETER_EDGES_MM",
    "DEFAULT_MIN_COMPONENT_PX",
    "DEFAULT_PRUNE_PX",
    "MaskError",
    "TRAITS_VERSION",
    "as_binary",
    "class_suffixes",
    "kimura_length_px",
    "measure",
    "rve_length_px",
    "skeletonize",
    "trait_schema",
]
