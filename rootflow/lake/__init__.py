"""Delta tables of rootflow: ``traits``, ``runs``, ``rejects`` (writes, schemas, queries, upkeep).

Every Delta write goes through :class:`Lake` (see :mod:`rootflow.lake.tables`); analysts read
with :mod:`rootflow.lake.query`; ``rootflow lake compact|vacuum|show`` live in
:mod:`rootflow.lake.maintenance`. Names are imported lazily so that ``rootflow --help`` (which
imports :mod:`rootflow.lake._cli`) does not load pyarrow and deltalake.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rootflow.lake.schema import SCHEMA_VERSION
    from rootflow.lake.tables import Lake, LakeError

__all__ = ["SCHEMA_VERSION", "Lake", "LakeError"]


def __getattr__(name: str) -> Any:
    if name in ("Lake", "LakeError"):
        from rootflow.lake import tables

        return getattr(tables, name)
    if name == "SCHEMA_VERSION":
        from rootflow.lake import schema

        return schema.SCHEMA_VERSION
    raise AttributeError(f"module 'rootflow.lake' has no attribute {name!r}")
