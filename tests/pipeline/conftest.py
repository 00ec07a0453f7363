"""Pipeline tests run many short jobs on fresh lakes: the lease's settle pause (3 s by default,
there so that runs starting together agree on one holder) is shortened to keep them quick.
Tests of concurrent runs set ``lease_settle_s`` themselves."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _short_lease_settle(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("rootflow.lake.lease.SETTLE_S", 0.2)
