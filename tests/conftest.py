"""Shared fixtures: a local Ray of our own, an S3 server on loopback, real data.

* ``ray_local`` starts one Ray instance for the whole session (``address="local"``, its own temp
  dir, never attaching to another Ray on the machine). Starting Ray costs tens of seconds on two
  cores, so every test shares it. It advertises more logical CPUs than the machine has: on two
  cores an actor pool would otherwise hold every CPU slot and starve the read tasks feeding it.
* ``s3`` runs moto's server **as a separate process** (delta-rs holds the GIL while it waits on
  HTTP, which deadlocks an in-process threaded moto) on 127.0.0.1 and a free port, creates a
  bucket, and hands back the endpoint and a :class:`~rootflow.io.storage.StorageOptions` that
  renders the settings s3fs, pyarrow and deltalake each need.
* ``real_data`` is ``$ROOTFLOW_REAL_DATA`` (``.ci/run`` points it at ``../shared/data/real``);
  tests using it skip with the reason when it is missing.
"""

from __future__ import annotations

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

    def uri(self, *parts: str) -> str:
        """``s3://bucket/<parts>``."""
        return "s3://" + "/".join([self.bucket, *[p.strip("/") for p in parts]])

    def fresh_prefix(self, name: str = "t") -> str:
        """A unique ``s3://bucket/<name>-<uuid>`` prefix so tests never see each other's keys."""
        return self.uri(f"{name}-{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def s3() -> Iterator[S3Server]:
    """moto's S3 server as a child process on loopback, with one bucket."""
    pytest.importorskip("moto")
    import boto3

    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # Kept open for the server's lifetime (its stdout); closed in the finally below.
    log = tempfile.NamedTemporaryFile(prefix="rf-moto-", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log, stderr=subprocess.STDOUT,
    )
    storage = StorageOptions(endpoint_url=endpoint, region="us-east-1", key="testing",
                             secret="testing", allow_http=True, path_style=True)
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    deadline = time.monotonic() + 60
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited early; see {log.name}")
        try:
            client.list_buckets()
            break
        except Exception:
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"moto server did not answer on {endpoint}; see {log.name}") from None
            time.sleep(0.2)
    bucket = "rootflow-test"
    client.create_bucket(Bucket=bucket)
    try:
        yield S3Server(endpoint_url=endpoint, bucket=bucket, storage=storage)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


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
