"""Child-process writers for the concurrent-commit tests (importable by ``spawn``)."""

from __future__ import annotations

import time
from typing import Any


def synchronized_writer(args: tuple[str, dict[str, Any], int, int, float]) -> tuple[int, int]:
    """:func:`tests.lake._helpers.concurrent_writer`, but starting at wall-clock ``start_at`` so
    that every writer's first MERGE overlaps the others' (process start-up takes seconds and
    would otherwise serialize them). Returns (rows committed, conflicts retried)."""
    from tests.lake._helpers import concurrent_writer

    uri, storage_options, writer, n, start_at = args
    from rootflow.lake import Lake  # noqa: F401  (imported before the start line, not after)

    time.sleep(max(0.0, start_at - time.time()))
    return concurrent_writer((uri, storage_options, writer, n))
