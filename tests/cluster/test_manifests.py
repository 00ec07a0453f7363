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


# -- Kubernetes-native files, the job's flags and the image (no schema here: checked by hand) --
K8S = ROOT / "cluster" / "k8s"


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _pod_specs(doc: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of every pod template in a KubeRay resource."""
    spec = doc["spec"]
    if doc["kind"] == "RayJob":
        spec = spec["rayClusterSpec"]
    elif doc["kind"] == "RayCronJob":
        spec = spec["jobTemplate"]["rayClusterSpec"]
    out = [("head", spec["headGroupSpec"]["template"]["spec"])]
    out += [(g["groupName"], g["template"]["spec"]) for g in spec.get("workerGroupSpecs", [])]
    return out


def _entrypoint(doc: dict) -> str:
    if doc["kind"] == "RayJob":
        return doc["spec"]["entrypoint"]
    if doc["kind"] == "RayCronJob":
        return doc["spec"]["jobTemplate"]["entrypoint"]
    c = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    return " ".join([*c.get("command", []), *c.get("args", [])])


def _commands() -> list[tuple[str, list[str]]]:
    """Every ``python jobs/<x>.py ARGS`` written in cluster/ and the README, split into words
    (up to the first shell separator)."""
    import re
    import shlex

    out = []
    texts = [p.read_text() for p in (ROOT / "cluster").rglob("*") if p.is_file()]
    texts.append((ROOT / "README.md").read_text())
    for text in texts:
        flat = re.sub(r"\\\n\s*", " ", text)
        flat = re.sub(r"\n\s+(?=--|s3://)", " ", flat)  # YAML folded (>-) continuation lines
        for m in re.finditer(r"jobs/(\w+)\.py([^;\n`\"']*)", flat):
            words = [w for w in shlex.split(m.group(2).replace("#", " # ")) if w]
            if "#" in words:
                words = words[:words.index("#")]
            out.append((m.group(1), [w for w in words if w not in ("...", "ARGS")]))
    return out


def test_every_job_command_in_cluster_files_and_readme_uses_real_flags() -> None:
    """Guards against docs and manifests passing flags the jobs no longer have (e.g. the old
    ``--gpus 1``, which silently ran one actor on a 16-GPU cluster): every option written after
    ``jobs/<x>.py`` must be an option of that command."""
    import typer.main

    from rootflow.cli import app

    cmds = {c.name: c for c in typer.main.get_command(app).commands.values()}
    found = _commands()
    assert {"infer", "reprocess"} <= {job for job, _ in found}
    for job, words in found:
        if job not in cmds:
            continue  # jobs/maintain.py and the training jobs have their own parsers
        names = {o for p in cmds[job].params for o in getattr(p, "opts", [])}
        names |= {o for p in cmds[job].params for o in getattr(p, "secondary_opts", [])}
        for w in words:
            if w.startswith("--"):
                assert w.split("=")[0] in names, f"jobs/{job}.py has no option {w}"
        assert "--gpus" not in words


def test_scheduled_jobs_forbid_overlap_and_map_exit_codes() -> None:
    """Guards against two nightly runs started by the scheduler at once, and against exit 3
    (done with rejects) failing a job and re-running it on the same bad images: the default
    schedule is a CronJob with concurrencyPolicy Forbid, and every scheduled or one-off job
    maps 3 and 4 to success while 1 still fails it."""
    crons = [d for p in K8S.glob("*.yaml") for d in _docs(p) if d["kind"] == "CronJob"]
    assert {c["metadata"]["name"] for c in crons} >= {"rootflow-reprocess-nightly",
                                                        "rootflow-maintain-weekly"}
    schedules = set()
    for c in crons:
        assert c["apiVersion"] == "batch/v1"
        assert c["spec"]["concurrencyPolicy"] == "Forbid"
        assert len(c["spec"]["schedule"].split()) == 5
        schedules.add(c["spec"]["schedule"])
        pod = c["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        assert pod["restartPolicy"] in {"Never", "OnFailure"}
        text = _entrypoint(c)
        job = next(j for j in ("reprocess", "maintain") if f"jobs/{j}.py" in text)
        assert (ROOT / "jobs" / f"{job}.py").is_file()
    assert len(schedules) == len(crons), "maintenance must have its own schedule"
    jobs = [*[d for p in KUBERAY.glob("ray*job*.yaml") for d in _docs(p)],
            *[c for c in crons if "reprocess" in _entrypoint(c)]]
    assert jobs
    for d in jobs:
        text = _entrypoint(d)
        assert "-eq 3" in text and "-eq 4" in text and "exit $rc" in text, d["metadata"]["name"]


def test_service_accounts_use_workload_identity_and_no_keys() -> None:
    """Guards against credentials in cluster files (keys in env vars, secrets mounted into
    pods, keys passed as arguments): pods run as a service account annotated with a
    workload-identity role, and no file names an access key."""
    sas = {d["metadata"]["name"]: d for d in _docs(K8S / "serviceaccount.yaml")
           if d["kind"] == "ServiceAccount"}
    ann = sas["rootflow"]["metadata"]["annotations"]
    assert "eks.amazonaws.com/role-arn" in ann or "iam.gke.io/gcp-service-account" in ann
    for p in [*KUBERAY.glob("*.yaml")]:
        for d in _docs(p):
            for _, pod in _pod_specs(d):
                assert pod["serviceAccountName"] == "rootflow"
    for p in K8S.glob("cronjob-*.yaml"):
        for d in _docs(p):
            pod = d["spec"]["jobTemplate"]["spec"]["template"]["spec"]
            assert pod["serviceAccountName"] in sas
    banned = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "secretkeyref",
              "secret_access_key", "--storage-option secret", "kind: secret")
    for p in (ROOT / "cluster").rglob("*"):
        if p.is_file():
            low = p.read_text().lower()
            assert not [b for b in banned if b in low], p


def test_pods_have_shm_and_gpu_groups_select_gpu_nodes() -> None:
    """Guards against Ray's object store falling back to a 64 MB /dev/shm (a container's
    default) and GPU pods landing on nodes without GPUs: every pod mounts a memory-backed
    /dev/shm, and GPU groups select and tolerate GPU nodes with Ray told as many GPUs as the
    container gets."""
    for p in KUBERAY.glob("*.yaml"):
        doc = yaml.safe_load(p.read_text())
        groups = {}
        spec = doc["spec"].get("rayClusterSpec") or doc["spec"].get("jobTemplate", {}).get(
            "rayClusterSpec") or doc["spec"]
        for g in spec.get("workerGroupSpecs", []):
            groups[g["groupName"]] = g
        for name, pod in _pod_specs(doc):
            vols = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
                assert "/dev/shm" in mounts, (p.name, name)
                assert vols[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
                gpus = c["resources"].get("limits", {}).get("nvidia.com/gpu")
                if gpus:
                    assert c["resources"]["requests"]["nvidia.com/gpu"] == gpus
                    assert pod.get("nodeSelector"), (p.name, name)
                    assert any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
                    assert groups[name]["rayStartParams"].get("num-gpus") == str(gpus)


def _gpu_capacity(doc: dict) -> tuple[float, float, float]:
    """(GPUs per GPU pod, max GPUs of the job's cluster, CPUs per GPU pod)."""
    spec = doc["spec"].get("rayClusterSpec") or doc["spec"]["jobTemplate"]["rayClusterSpec"]
    per_pod = total = cpus = 0.0
    for g in spec["workerGroupSpecs"]:
        c = g["template"]["spec"]["containers"][0]["resources"]
        n = float(c["limits"].get("nvidia.com/gpu", 0))
        if n:
            per_pod = max(per_pod, n)
            total += n * g["maxReplicas"]
            cpus = float(c["requests"]["cpu"])
    return per_pod, total, cpus


def test_job_resources_fit_the_worker_groups() -> None:
    """Guards against a job asking for more than its cluster can give (an actor that needs
    2 GPUs on 1-GPU pods, a minimum pool larger than the groups can scale to, more CPUs per
    actor than a GPU pod has): such a job waits forever for resources."""
    from rootflow.inference.pipeline import Resources, parse_actors

    for p in KUBERAY.glob("ray*job*.yaml"):
        doc = yaml.safe_load(p.read_text())
        words = _entrypoint(doc).split()
        flag = {w: words[i + 1] for i, w in enumerate(words[:-1]) if w.startswith("--")}
        per_actor = float(flag.get("--gpus-per-actor", 1.0))
        lo, hi = parse_actors(flag.get("--actors", "1:0"))
        per_pod, total, cpus = _gpu_capacity(doc)
        assert per_actor <= per_pod, p.name
        assert lo * per_actor <= total and (hi == 0 or hi * per_actor <= total), p.name
        assert Resources.gpu(per_actor).model_num_cpus <= cpus, p.name


def test_dockerfile_installs_as_the_user_that_runs_it() -> None:
    """Guards against an image that installs as ``ray`` into a root-owned folder (pip -e
    fails to write its metadata, or the app runs as root): the app folder is handed to the
    run user before use, every later step runs as that user, and copied files belong to it."""
    lines = [ln.strip() for ln in (ROOT / "cluster" / "Dockerfile").read_text().splitlines()
             if ln.strip() and not ln.strip().startswith("#")]
    users = [ln.split()[1] for ln in lines if ln.startswith("USER ")]
    assert users and users[-1] == "ray"
    run_user = users[-1]
    workdir = next(ln.split()[1] for ln in lines if ln.startswith("WORKDIR "))
    user = "root"  # the base image's steps before any USER line are its own
    owned = False
    for ln in lines:
        if ln.startswith("USER "):
            user = ln.split()[1]
        elif ln.startswith("RUN ") and f"chown {run_user}" in ln and workdir in ln:
            assert user == "root"
            owned = True
        elif ln.startswith("WORKDIR "):
            assert owned and user == run_user, "WORKDIR used before it belongs to the run user"
        elif ln.startswith("COPY "):
            assert f"--chown={run_user}" in ln and user == run_user, ln
        elif ln.startswith("RUN ") and "pip install" in ln:
            assert user == run_user and "--user" not in ln and "sudo" not in ln, ln
