"""Run leases: at most one processing run works on a lake (or a named scope) at a time.

The ``runs`` table is the lock. A run appends its row (status ``running``, its ``scope``, and in
``config_json`` who its driver is) before it works, and a heartbeat thread refreshes
``heartbeat_at`` every ``heartbeat_s`` whatever the job is doing (actor start-up, a long model
batch), independent of commits. Among the ``running`` rows of a scope, the *live* ones are those
whose heartbeat is younger than ``ttl_s`` and whose driver is not provably dead; the holder is
the earliest-started live run (ties: smallest run id). Every run applies the same rule to the
same rows, so they agree on one holder.

Two runs that start together: a run's row can become visible to the others only after its
commit lands. A run therefore waits ``settle_s`` after its own ``started_at`` before it decides,
and a run whose own insert took longer than ``settle_s`` re-stamps ``started_at`` (it then loses
ties instead of winning them late). So by the time a run decides, every run that started before
it is visible.

A dead run (no heartbeat for ``ttl_s``, or its driver provably gone: its Ray job is dead on the
same cluster, or its process is gone on the same host) loses the lease; the run that takes over
marks its row ``dead: ...``. A run whose own row was marked dead (it stalled past the TTL) sees
``lost`` become true at its next heartbeat and must stop committing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from typing import Any

from rootflow.io import storage as _storage

log = logging.getLogger(__name__)

#: Default seconds between heartbeats, and after which a silent run is considered dead.
HEARTBEAT_S = 30.0
TTL_S = 120.0
SETTLE_S = 3.0


class LeaseHeld(RuntimeError):
    """Another live run holds the lease (the CLI exits with code 4)."""

    def __init__(self, holder: str, scope: str, age_s: float | None) -> None:
        self.holder, self.scope, self.age_s = holder, scope, age_s
        beat = f", last heartbeat {age_s:.0f} s ago" if age_s is not None else ""
        super().__init__(f"run {holder} holds the lease on {scope}{beat}; not starting "
                         "(wait with --wait-s, or let it finish)")


class LeaseLost(RuntimeError):
    """This run's row was marked dead by another run (it stalled past the lease TTL)."""


def lake_scope(lake_uri: str, name: str | None = None) -> str:
    """Default lease scope: the lake itself (``lake:<root>``); ``name`` narrows it (e.g. one
    experiment's archive) so that runs on disjoint archives of one lake may work together."""
    root = _storage.normalize(lake_uri).rstrip("/")
    return f"lake:{root}" + (f"#{name}" if name else "")


def driver_identity() -> dict[str, Any]:
    """Who this run's driver is, so another run can tell when it is provably dead."""
    ident: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid()}
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            ident["ray_job_id"] = ctx.get_job_id()
            ident["ray_gcs"] = ctx.gcs_address
    except Exception:  # pragma: no cover - identity is best effort
        pass
    return ident


def _driver_dead(driver: Mapping[str, Any] | None) -> str | None:
    """Why the driver described by ``driver`` is provably dead, or None when it may be alive."""
    if not driver:
        return None
    try:
        import ray

        if ray.is_initialized() and driver.get("ray_job_id") and \
                driver.get("ray_gcs") == ray.get_runtime_context().gcs_address:
            from ray._private.state import state

            for job in state.job_table():
                if job["JobID"] == driver["ray_job_id"] and job["IsDead"]:
                    return f"its Ray job {driver['ray_job_id']} is dead"
    except Exception:  # the check is an optimisation: the TTL still applies
        pass
    if driver.get("host") == socket.gethostname() and isinstance(driver.get("pid"), int):
        pid = int(driver["pid"])
        if pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"its driver process {pid} on {driver['host']} is gone"
            except PermissionError:
                pass
    return None


@dataclasses.dataclass
class _Row:
    run_id: str
    started_at: dt.datetime
    heartbeat_at: dt.datetime | None
    driver: dict[str, Any]


class RunLease:
    """The lease of one run over ``scope`` (the run's ``runs`` row must already exist).

    Args:
        lake: :class:`rootflow.lake.Lake`.
        run_id / scope: this run and what it covers.
        ttl_s: a run silent this long is dead. heartbeat_s: seconds between heartbeats.
        settle_s: wait after ``started_at`` before deciding (see the module docstring).
    """

    def __init__(self, lake: Any, run_id: str, scope: str, *, ttl_s: float = TTL_S,
                 heartbeat_s: float = HEARTBEAT_S, settle_s: float = SETTLE_S) -> None:
        if heartbeat_s >= ttl_s:
            raise ValueError(f"lease heartbeat ({heartbeat_s} s) must be shorter than its "
                             f"ttl ({ttl_s} s)")
        self.lake, self.run_id, self.scope = lake, run_id, scope
        self.ttl_s, self.heartbeat_s, self.settle_s = ttl_s, heartbeat_s, settle_s
        self.lost = False
        self.beats = 0
        self.taken_over: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- heartbeat ---------------------------------------------------------------------------
    def start_heartbeat(self) -> None:
        """Beat every ``heartbeat_s`` in a daemon thread until :meth:`stop`."""
        if self._thread is not None:
            return
        from rootflow.lake import Lake

        own = Lake(self.lake.uri, storage_options=self.lake.storage)  # not shared across threads

        def loop() -> None:
            while not self._stop.wait(self.heartbeat_s):
                try:
                    own.heartbeat(self.run_id)
                    self.beats += 1
                    status = _status(own, self.run_id)
                    if status is not None and status != "running":
                        self.lost = True
                        log.error("run %s: lease lost (its row was marked %r)", self.run_id,
                                  status)
                        return
                except Exception as e:  # a missed beat is survivable within the TTL
                    log.warning("run %s: heartbeat failed: %s", self.run_id,
                                str(e).splitlines()[0] if str(e) else type(e).__name__)

        self._thread = threading.Thread(target=loop, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def check(self) -> None:
        """Raise :class:`LeaseLost` when another run has taken this run's lease."""
        if self.lost:
            raise LeaseLost(f"run {self.run_id} lost its lease on {self.scope} (another run "
                            "marked it dead after no heartbeat for the TTL); stopping")

    # -- acquire -----------------------------------------------------------------------------
    def acquire(self, *, wait_s: float = 0.0, poll_s: float | None = None) -> None:
        """Return once this run holds the lease; raise :class:`LeaseHeld` after ``wait_s``.

        Dead runs of the scope found on the way are marked ``dead: ...`` by the run that takes
        the lease over.
        """
        me = self._own_row()
        if me is None:
            raise RuntimeError(f"run {self.run_id} is not in the runs table")
        now = _utcnow()
        if (now - me.started_at).total_seconds() > self.settle_s:
            # Our row became visible late: stamp a later start so runs that already decided
            # without seeing us keep the lease.
            self.lake._update_run(self.run_id, {"started_at": _utcnow()})
            me = self._own_row() or me
        pause = (me.started_at + dt.timedelta(seconds=self.settle_s) - _utcnow()).total_seconds()
        if pause > 0:
            time.sleep(pause)
        deadline = time.monotonic() + max(0.0, wait_s)
        poll = poll_s if poll_s is not None else min(10.0, max(0.5, self.ttl_s / 10))
        while True:
            live, dead = self._classify()
            holder = _earliest(live)
            if holder is None or holder.run_id == self.run_id:
                for row, why in dead:
                    self._mark_dead(row, why)
                return
            if time.monotonic() >= deadline:
                age = None
                if holder.heartbeat_at is not None:
                    age = (_utcnow() - holder.heartbeat_at).total_seconds()
                raise LeaseHeld(holder.run_id, self.scope, age)
            time.sleep(poll)

    def holder(self) -> str | None:
        """The run holding the scope now (None when no run is live)."""
        holder = _earliest(self._classify()[0])
        return holder.run_id if holder else None

    # -- internals ---------------------------------------------------------------------------
    def _rows(self) -> list[_Row]:
        from rootflow.lake.tables import string_field

        if not self.lake.exists("runs"):
            return []
        expr = (string_field("scope") == self.scope) & (string_field("status") == "running")
        t = self.lake.dataset("runs").to_table(
            columns=["run_id", "started_at", "heartbeat_at", "config_json"], filter=expr)
        out = []
        for r in t.to_pylist():
            try:
                driver = json.loads(r["config_json"] or "{}").get("driver") or {}
            except (ValueError, AttributeError):
                driver = {}
            out.append(_Row(r["run_id"], r["started_at"], r["heartbeat_at"], driver))
        return out

    def _own_row(self) -> _Row | None:
        from rootflow.lake.tables import string_field

        t = self.lake.dataset("runs").to_table(
            columns=["run_id", "started_at", "heartbeat_at"],
            filter=string_field("run_id") == self.run_id)
        if not t.num_rows:
            return None
        r = t.to_pylist()[0]
        return _Row(r["run_id"], r["started_at"], r["heartbeat_at"], {})

    def _classify(self) -> tuple[list[_Row], list[tuple[_Row, str]]]:
        cutoff = _utcnow() - dt.timedelta(seconds=self.ttl_s)
        live: list[_Row] = []
        dead: list[tuple[_Row, str]] = []
        for r in self._rows():
            if r.run_id == self.run_id:
                live.append(r)
                continue
            beat = r.heartbeat_at or r.started_at
            if beat < cutoff:
                dead.append((r, f"no heartbeat since {beat:%Y-%m-%dT%H:%M:%S}Z "
                                f"(lease ttl {self.ttl_s:g} s)"))
                continue
            why = _driver_dead(r.driver)
            if why:
                dead.append((r, why))
            else:
                live.append(r)
        return live, dead

    def _mark_dead(self, row: _Row, why: str) -> None:
        status = f"dead: {why}; lease taken over by run {self.run_id}"
        log.warning("run %s: %s", row.run_id, status)
        self.lake._update_run(row.run_id, {"status": status, "finished_at": _utcnow()})
        self.taken_over.append(row.run_id)


def _earliest(live: list[_Row]) -> _Row | None:
    """The lease rule: the earliest-started live run holds it (ties: smallest run id)."""
    return min(live, key=lambda r: (r.started_at, r.run_id)) if live else None


def _status(lake: Any, run_id: str) -> str | None:
    from rootflow.lake.tables import string_field

    t = lake.dataset("runs").to_table(columns=["status"], filter=string_field("run_id") == run_id)
    return str(t.column("status")[0]) if t.num_rows else None


def _utcnow() -> dt.datetime:
    from rootflow.lake.tables import utcnow

    return utcnow()


__all__ = ["HEARTBEAT_S", "SETTLE_S", "TTL_S", "LeaseHeld", "LeaseLost", "RunLease",
           "driver_identity", "lake_scope"]
