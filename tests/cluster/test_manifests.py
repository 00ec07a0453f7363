"""Cluster manifests validate against the KubeRay CRD schemas and the launcher/runtime files parse."""

from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
        "RayCronJob": "ray.io_raycronjobs.yaml"}


def _schema_dir() -> Path:
    real = os.environ.get("ROOTFLOW_REAL_DATA")
    candidates = [ROOT.parent / "shared" / "schemas" / "kuberay"]
    if real:
        candidates.insert(0, Path(real).resolve().parents[1] / "schemas" / "kuberay")
    for c in candidates:
        if c.is_dir():
            return c
    pytest.skip("KubeRay CRD schemas not found beside the repo (../shared/schemas/kuberay)")


@functools.cache
def _crd_schema(kind: str, version: str) -> dict:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB each
    crd = yaml.load((_schema_dir() / CRDS[kind]).read_text(), Loader=loader)
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"{kind} has no version {version}")


@pytest.mark.parametrize("path", sorted(KUBERAY.glob("*.yaml")), ids=lambda p: p.name)
def test_kuberay_manifest_matches_crd(path: Path) -> None:
    import jsonschema

    doc = yaml.safe_load(path.read_text())
    group, version = doc["apiVersion"].split("/")
    assert group == "ray.io"
    schema = _crd_schema(doc["kind"], version)
    jsonschema.validate(doc, schema)
    # The entrypoints must name jobs that exist in the repo.
    text = path.read_text()
    for job in ("jobs/infer.py", "jobs/reprocess.py"):
        if job in text:
            assert (ROOT / job).is_file()


def test_kuberay_schema_rejects_a_broken_manifest() -> None:
    import jsonschema

    doc = yaml.safe_load((KUBERAY / "rayjob-infer.yaml").read_text())
    doc["spec"]["shutdownAfterJobFinishes"] = "yes please"  # must be a boolean
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, _crd_schema("RayJob", "v1"))


def test_launcher_and_runtime_env_parse() -> None:
    cluster = yaml.safe_load((ROOT / "cluster" / "cluster.yaml").read_text())
    assert cluster["head_node_type"] in cluster["available_node_types"]
    env = yaml.safe_load((ROOT / "cluster" / "runtime_env.yaml").read_text())
    assert set(env) <= {"env_vars", "excludes", "pip", "py_modules", "working_dir"}
    assert ".venv/" in env["excludes"]
