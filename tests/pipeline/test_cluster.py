"""Real cluster behaviour on this machine: a head and two worker nodes started with ``ray start``
on loopback (each worker declaring two logical GPUs), the job submitted through the Job
Submission API, a worker node killed mid-run, a driver killed mid-run then re-run, and the
default model pool putting an actor on every declared GPU slot.

Each node is a ``ray start --block`` process in its own process group, so killing the group is a
node dying (raylet, object store and workers at once), not a polite shutdown.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow.compute as pc
import pytest

from rootflow.lake import Lake
from tests.pipeline._helpers import counts_by_image, direct_archive, small_archive

pytestmark = [pytest.mark.slow, pytest.mark.ray]

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


#: every port handed out in this session: a probed port is free again once its socket closes,
#: so two probes can return the same number; Ray refuses a node whose components share a port
#: ("Ray component dashboard_agent_grpc is trying to use a port number ... used by other
#: components"), which failed the whole module once in a loaded run.
_USED_PORTS: set[int] = set()


def _ports(n: int) -> list[int]:
    """``n`` free loopback ports, distinct from each other and from every earlier one."""
    socks: list[socket.socket] = []
    out: list[int] = []
    try:
        while len(out) < n:
            s = socket.socket()
            socks.append(s)  # held open until all n are chosen: the OS cannot repeat one
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
            if port not in _USED_PORTS:
                _USED_PORTS.add(port)
                out.append(port)
    finally:
        for s in socks:
            s.close()
    return out


def _port() -> int:
    return _ports(1)[0]


def _node_ports() -> list[str]:
    """Per-node agent ports: several raylets on one machine must not share them."""
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "node-manager-port", "object-manager-port")
    return [f"--{name}={port}" for name, port in zip(names, _ports(len(names)), strict=True)]


def test_ports_are_never_handed_out_twice() -> None:
    """Guards the flake above: many probes in a row, every port distinct."""
    got = _ports(40) + [_port() for _ in range(40)]
    assert len(set(got)) == len(got)


@dataclasses.dataclass
class LocalCluster:
    gcs_address: str
    dashboard_url: str
    head: subprocess.Popen
    workers: list[subprocess.Popen]
    temp_dir: str

    def kill_node(self, proc: subprocess.Popen) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)

    def worker_of_node(self, node_id: str) -> subprocess.Popen | None:
        """The ``ray start`` process of a worker node (workers declare ``node_w<i>``)."""
        from ray.util.state import list_nodes

        for n in list_nodes(address=self.dashboard_url, raise_on_missing_output=False):
            if n.node_id == node_id:
                for i, proc in enumerate(self.workers):
                    if f"node_w{i}" in (n.resources_total or {}):
                        return proc
        return None

    def alive_nodes(self) -> int:
        from ray.util.state import list_nodes

        return sum(1 for n in list_nodes(address=self.dashboard_url, raise_on_missing_output=False)
                   if n.state == "ALIVE")


#: Ray 2.60 turns on token authentication for `ray start --head`; this loopback test cluster
#: runs without it (every node, the driver and the job client must agree).
CLUSTER_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1", "RAY_AUTH_MODE": "disabled"}


def _env() -> dict[str, str]:
    env = dict(os.environ, **CLUSTER_ENV)
    env.pop("RAY_ADDRESS", None)
    return env


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = _env()
    return subprocess.Popen([RAY, "start", "--block", *args], stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _wait_nodes(cl: LocalCluster, n: int, tmp: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cl.alive_nodes() >= n:
                return
        except Exception:
            pass
        dead = [p for p in [cl.head, *cl.workers] if p.poll() is not None]
        if time.monotonic() > deadline or dead:
            logs = "\n".join(p.read_text()[-2000:] for p in Path(tmp).glob("*.log"))
            for p in [cl.head, *cl.workers]:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            raise RuntimeError(f"local cluster did not reach {n} nodes:\n{logs}")
        time.sleep(1)


WORKER_GPUS = 2


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with local_cluster() as cl:
        yield cl


@contextlib.contextmanager
def local_cluster() -> Iterator[LocalCluster]:
    """A head (no CPUs: it only runs drivers) and two worker nodes on loopback, each with 4 CPUs
    and 2 logical GPUs (``ray start --num-gpus``: slots for actors, no CUDA behind them)."""
    tmp = tempfile.mkdtemp(prefix="rf-cl-", dir="/tmp")
    gcs_port, dash_port = _port(), _port()
    head = _start(["--head", f"--port={gcs_port}", "--node-ip-address=127.0.0.1",
                   f"--dashboard-port={dash_port}", "--dashboard-host=127.0.0.1",
                   "--include-dashboard=true", f"--ray-client-server-port={_port()}",
                   "--num-cpus=0", "--object-store-memory=200000000", f"--temp-dir={tmp}",
                   *_node_ports()], Path(tmp) / "head.log")
    gcs = f"127.0.0.1:{gcs_port}"
    cl = LocalCluster(gcs_address=gcs, dashboard_url=f"http://127.0.0.1:{dash_port}", head=head,
                      workers=[], temp_dir=tmp)
    # Nodes join one at a time: a node picks the first free socket name in the shared session
    # dir (plasma_store.1, .2, ...), so two nodes starting at once would race for the same one.
    for i in range(3):
        if i:
            cl.workers.append(_start([f"--address={gcs}", "--node-ip-address=127.0.0.1",
                                      "--num-cpus=4", f"--num-gpus={WORKER_GPUS}",
                                      f'--resources={{"node_w{i - 1}": 1}}',
                                      "--object-store-memory=200000000",
                                      *_node_ports()], Path(tmp) / f"worker{i - 1}.log"))
        _wait_nodes(cl, i + 1, tmp)
    workers = cl.workers
    try:
        yield cl
    finally:
        for p in [*workers, head]:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in [*workers, head]:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)


def _wait_rows(lake_uri: str, n: int, timeout: float,
               alive: Callable[[], str | None] = lambda: None) -> int:
    """Wait until the traits table has at least ``n`` rows; return the count.

    ``alive()`` returns an error text when the producer died (then we stop waiting).
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        problem = alive()
        if problem:
            raise AssertionError(problem)
        try:
            rows = Lake(lake_uri).read("traits").num_rows
            if rows >= n:
                return rows
        except Exception:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"traits table at {lake_uri} did not reach {n} rows in {timeout:.0f} s")


def _assert_complete(lake_uri: str, n_images: int, producers: tuple[str, ...]) -> None:
    traits = Lake(lake_uri).read("traits")
    for p in producers:
        counts = counts_by_image(traits, p)
        assert len(counts) == n_images, (p, len(counts), n_images)
        assert set(counts.values()) == {1}, f"duplicate rows for {p}"


INFER_ARGS = ["--producers", "mask,rootsam", "--rootsam-config", "test",
              "--set", "rootsam.prompt_mode=lattice", "--set", "rootsam.lattice_points_per_side=4",
              "--set", "commit_every=4", "--set", "resources.block_rows=2",
              "--set", "resources.model_batch_size=1", "--gpus-per-actor", "0", "--actors", "1"]


def test_default_pool_runs_an_actor_on_every_gpu_slot(cluster: LocalCluster, tmp_path) -> None:
    """Guards against a GPU cluster running one model actor (the old fixed ``--gpus 1`` pool),
    and against the default pool (no --actors) leaving GPU slots idle: it autoscales between 1
    and the cluster's 4 declared GPUs and starts with every free one, so one one-GPU actor
    starts on every GPU slot of both nodes, and every actor that is up while work remains does
    work (a small forest stands in for the GPU model). Also guards against the actors' log
    lines (where each runs) not reaching the driver's output, which is what ``ray job logs``
    shows.

    That an actor starts on every slot is deterministic; that each gets work depends on its
    start-up time against the work left (on two loaded cores one node's actors took 90-105 s
    to load their model, the other's 30 s, and 2 actors had done 1,000 images by then), so an
    actor counts as idle only when it was ready well before the job ended."""
    import datetime as dt

    from tests.inference._segment_helpers import tiny_forest

    forest = tiny_forest(tmp_path / "forest")
    n_rows = 1000  # ~0.1 s an image
    manifest = direct_archive(tmp_path, n_rows, 128, 160)
    lake_uri = str(tmp_path / "lake")
    # First in this module: the node-kill test below leaves one worker.
    assert cluster.alive_nodes() == 1 + len(cluster.workers)
    slots = WORKER_GPUS * len(cluster.workers)
    cmd = [sys.executable, str(ROOT / "jobs" / "infer.py"), manifest, lake_uri,
           "--producers", "forest", "--forest-model", forest.uri,
           "--set", "resources.block_rows=1", "--set", "resources.model_batch_size=1",
           "--set", "resources.model_num_cpus=0.5", "--set", "commit_every=1000",
           "--address", cluster.gcs_address, "--summary-json", str(tmp_path / "s.json")]
    # (Ray folds log lines that differ only in numbers into one: keep each actor's line.)
    done = subprocess.run(cmd, env=dict(_env(), RAY_DEDUP_LOGS="0"), capture_output=True,
                          text=True, timeout=600)
    t_end = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    s = json.loads((tmp_path / "s.json").read_text())
    assert s["resources"]["model_num_gpus"] == 1.0
    assert s["resources"]["model_actors"] == [1, slots]  # the default: 1 .. cluster GPUs
    assert s["resources"]["initial_actors"] == slots  # all free at the start
    _assert_complete(lake_uri, n_rows, ("forest",))
    logs = done.stdout + done.stderr
    ready: dict[str, dt.datetime] = {}
    for slot, at in re.findall(r"model actor (\w+/gpu\d+)/pid\d+ ready: forest loaded in "
                               r"[\d.]+ s, at (\S+) UTC", logs):
        t = dt.datetime.fromisoformat(at)
        ready[slot] = min(t, ready.get(slot, t))
    assert len(ready) == slots, ready  # an actor started on every (node, GPU id) ...
    used = {a.split("/pid")[0]: n for a, n in s["actors"].items()}
    assert set(used) <= set(ready) and sum(used.values()) == n_rows
    idle = [k for k, t in ready.items() if k not in used and t < t_end - dt.timedelta(seconds=30)]
    assert not idle, (idle, ready, s["actors"])  # ... and each one up while work remained worked
    assert len(used) >= 2, (ready, s["actors"], t_end)
    for ident in s["actors"]:
        assert f"model actor {ident} ready: forest" in logs, (ident, logs[-3000:])


def test_submit_job_and_survive_a_dead_worker_node(cluster: LocalCluster, tmp_path) -> None:
    from ray.job_submission import JobStatus, JobSubmissionClient

    arch = small_archive(str(tmp_path), n_images=32, bad=False, height=224, width=256)
    lake_uri = str(tmp_path / "lake")
    summary = tmp_path / "summary.json"
    client = JobSubmissionClient(cluster.dashboard_url)
    job = client.submit_job(
        entrypoint=" ".join([sys.executable, "jobs/infer.py", arch.manifest_uri, lake_uri, *INFER_ARGS,
                             "--summary-json", str(summary)]),
        runtime_env={"working_dir": str(ROOT),
                     "excludes": [".venv/", ".git/", "demo-output/", "**/__pycache__/"]},
    )
    def job_alive() -> str | None:
        status = client.get_job_status(job)
        if status in {JobStatus.FAILED, JobStatus.STOPPED, JobStatus.SUCCEEDED}:
            return f"job {status} before the node was killed:\n{client.get_job_logs(job)[-4000:]}"
        return None

    # The node we kill must provably be doing the job's work: it hosts the live model actor
    # while the job runs and rows are still missing. (Looked up as soon as the actor exists:
    # the state API is slow on two busy cores, and the job must not finish meanwhile.)
    from ray.util.state import list_actors

    seen: list[str] = []
    model_actors: list = []
    deadline = time.monotonic() + 400
    while not model_actors:
        problem = job_alive()
        assert problem is None, problem
        assert time.monotonic() < deadline, f"no live model actor while the job runs: {seen}"
        actors = list_actors(address=cluster.dashboard_url, raise_on_missing_output=False,
                             timeout=60)
        seen = [f"{a.class_name}:{a.state}" for a in actors]
        model_actors = [a for a in actors if a.state == "ALIVE"
                        and "ModelActor" in (a.class_name or "")]
        if not model_actors:
            time.sleep(1)
    victim = cluster.worker_of_node(model_actors[0].node_id)
    assert victim is not None, "the model actor is not on a worker node"
    rows_at_kill = Lake(lake_uri).read("traits").num_rows if Lake(lake_uri).exists() else 0
    assert rows_at_kill < 2 * arch.n_rows, "the job had finished its rows before the kill"
    assert client.get_job_status(job) == JobStatus.RUNNING, "job ended before the node was killed"
    cluster.kill_node(victim)
    deadline = time.monotonic() + 420
    while client.get_job_status(job) not in {JobStatus.SUCCEEDED, JobStatus.FAILED,
                                             JobStatus.STOPPED}:
        assert time.monotonic() < deadline, client.get_job_logs(job)[-3000:]
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert client.get_job_status(job) == JobStatus.SUCCEEDED, logs[-3000:]
    # A line logged inside a model actor on a worker node reached `ray job logs` (guards
    # against worker log lines, warnings included, being lost to the job's logs).
    assert re.search(r"model actor \w+/gpu-/pid\d+ ready: rootsam", logs), logs[-3000:]
    s = json.loads(summary.read_text())
    assert s["n_images"] == arch.n_rows and s["n_images_rejected"] == 0
    _assert_complete(lake_uri, arch.n_rows, ("mask", "rootsam"))
    assert cluster.alive_nodes() == 2


def test_killed_driver_rerun_finishes_without_duplicates(cluster: LocalCluster, tmp_path) -> None:
    arch = small_archive(str(tmp_path), n_images=16, bad=False, height=224, width=256)
    lake_uri = str(tmp_path / "lake")
    # The default lease (heartbeat 30 s, expiry 120 s): the re-run must not wait for the TTL,
    # because the dead driver's Ray job is provably dead.
    cmd = [sys.executable, str(ROOT / "jobs" / "infer.py"), arch.manifest_uri, lake_uri,
           *INFER_ARGS, "--address", cluster.gcs_address]
    env = _env()
    log = (tmp_path / "driver1.log").open("w")
    first = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
    try:
        rows_at_kill = _wait_rows(
            lake_uri, 4, timeout=400,
            alive=lambda: None if first.poll() is None else
            f"driver exited {first.returncode}:\n{(tmp_path / 'driver1.log').read_text()[-4000:]}")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(30)
    assert rows_at_kill < 2 * arch.n_rows, "driver finished before it was killed"
    runs = Lake(lake_uri).read("runs").to_pylist()
    assert [r["status"] for r in runs] == ["running"]  # it never got to say otherwise

    first_id = runs[0]["run_id"]
    t0 = time.monotonic()
    second = subprocess.run([*cmd, "--summary-json", str(tmp_path / "s2.json")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert time.monotonic() - t0 < 300
    s2 = json.loads((tmp_path / "s2.json").read_text())
    assert s2["taken_over"] == [first_id]
    assert s2["n_skipped"] >= 1, "the re-run did not resume: it redid finished images"
    assert s2["n_images"] + s2["n_skipped"] == arch.n_rows
    _assert_complete(lake_uri, arch.n_rows, ("mask", "rootsam"))
    runs = Lake(lake_uri).read("runs")
    done = runs.filter(pc.equal(runs["run_id"], s2["run_id"])).to_pylist()
    assert done[0]["status"] == "ok"
    dead = runs.filter(pc.equal(runs["run_id"], first_id)).to_pylist()
    assert dead[0]["status"].startswith("dead: ") and s2["run_id"] in dead[0]["status"]
