"""Untrusted inputs: checkpoints that carry code, credentials that must not leak."""

from __future__ import annotations

import json
import logging
import pathlib
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from rootflow.cli import app


class _Payload:
    """Unpickling this calls ``Path(marker).write_text("pwned")``: code run by a checkpoint."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "pwned"))


def _evil_checkpoint(path: Path, marker: Path) -> str:
    torch.save({"state_dict": _Payload(str(marker)), "config": {}, "model": _Payload(str(marker))},
               path)
    return str(path)


def test_malicious_pickle_checkpoint_is_refused(tmp_path) -> None:
    """Guards against loading a checkpoint with pickle's full power: the payload would write
    a file; every model loader refuses the checkpoint and the file is never written."""
    from rootflow.models import checkpoint, rootquant
    from rootflow.models.unet import UNetSegmenter

    # The payload is live: an unsafe load does run it (so the refusals below mean something).
    proof = tmp_path / "proof"
    torch.load(_evil_checkpoint(tmp_path / "proof.pt", proof), weights_only=False)
    assert proof.read_text() == "pwned"

    marker = tmp_path / "marker"
    evil = _evil_checkpoint(tmp_path / "evil.pt", marker)
    for load in (checkpoint.load, rootquant.load, UNetSegmenter.load):
        with pytest.raises(Exception):  # noqa: B017  (any refusal; what matters is the marker)
            load(evil)
        assert not marker.exists(), load

    # Through the job's command line: one line, exit 2, before any work, for every model file
    # the job takes (U-Net and forest are loaded on the driver; RootSAM and RootQuant
    # checkpoints are opened weights-only by the driver's pre-flight before Ray starts).
    from tests.reliability.test_manifest_faults import _good_columns, _write_csv

    manifest = _write_csv(tmp_path / "m.csv", _good_columns(tmp_path))
    for flag, producer in (("--unet-checkpoint", "unet"), ("--rootsam-checkpoint", "rootsam"),
                           ("--rootquant-checkpoint", "rootquant")):
        res = CliRunner().invoke(app, ["infer", manifest, str(tmp_path / "lake"),
                                       "--producers", producer, flag, evil])
        assert res.exit_code == 2, (flag, res.output)
        assert "\n" not in res.stderr.strip() and "Traceback" not in res.output, res.output
        assert not marker.exists(), flag
        assert not (tmp_path / "lake").exists(), flag  # refused before the run started


def test_wrong_rootsam_and_rootquant_checkpoints_are_refused_before_the_run(tmp_path) -> None:
    """Guards against a run that starts with a model file its actors will refuse (every image
    rejected after Ray's start-up): a RootQuant checkpoint given as RootSAM's and the reverse,
    a RootQuant checkpoint missing a weight, a RootSAM checkpoint fine-tuned on another SAM2.1
    variant or base, and an unknown variant (a traceback before) are each one line and exit 2
    before anything runs; the valid files pass the same pre-flight."""
    from rootflow.inference.model_files import check_checkpoints
    from rootflow.inference.pipeline import InferConfig
    from rootflow.models import rootquant as rq
    from rootflow.models.rootsam import build_rootsam, save_rootsam_checkpoint
    from tests.reliability.test_manifest_faults import _good_columns, _write_csv

    quant = str(tmp_path / "rq.pt")
    rq.save(rq.RootQuant(rq.RootQuantConfig(backbone="resnet10t", tile_px=64, mm_per_px=0.5,
                                            head_hidden=32)), quant)
    sam = str(tmp_path / "rs.pt")
    save_rootsam_checkpoint(build_rootsam("test"), sam, version="rs-test")
    obj = torch.load(quant, weights_only=True)
    dropped = sorted(obj["state_dict"])[0]
    del obj["state_dict"][dropped]
    short = str(tmp_path / "rq-short.pt")
    torch.save(obj, short)

    # The valid files pass (a check that refused everything would pass the cases below).
    check_checkpoints(InferConfig(producers=("rootquant", "rootsam"),
                                  rootquant={"checkpoint": quant},
                                  rootsam={"variant": "test", "rootsam_checkpoint": sam}))

    manifest = _write_csv(tmp_path / "m.csv", _good_columns(tmp_path))
    cases = [
        (["--producers", "rootsam", "--rootsam-config", "test", "--rootsam-checkpoint", quant],
         "not a RootSAM checkpoint"),
        (["--producers", "rootquant", "--rootquant-checkpoint", sam], "not a RootQuant checkpoint"),
        (["--producers", "rootquant", "--rootquant-checkpoint", short], dropped),
        (["--producers", "rootsam", "--rootsam-config", "hiera_tiny", "--rootsam-checkpoint", sam],
         "fine-tuned on SAM2.1 test"),
        (["--producers", "rootsam", "--rootsam-config", "test", "--rootsam-checkpoint", sam,
          "--base-checkpoint", quant, "--base-sha256", "ab" * 32], "random-init SAM2.1"),
        (["--producers", "rootsam", "--rootsam-config", "bogus"], "unknown SAM2.1 variant"),
    ]
    for args, words in cases:
        res = CliRunner().invoke(app, ["infer", manifest, str(tmp_path / "lake"), *args])
        assert res.exit_code == 2, (args, res.output)
        assert words in res.stderr and "\n" not in res.stderr.strip(), (args, res.stderr)
        assert "Traceback" not in res.output
    assert not (tmp_path / "lake").exists()


CANARY_ENV = "canary-env-7f3a9c1e5b"
CANARY_OPT = "canary-opt-2d8e4b6a0c"
CANARY_CFG = "canary-cfg-9b1f6d3e7a"


def _config(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


@pytest.mark.ray
def test_canary_secret_never_leaks(ray_local, tmp_path, monkeypatch, caplog) -> None:
    """Guards against credentials reaching logs, the runs table, reject reasons, the summary
    file or error messages: a canary secret in the environment, another offered as a
    ``--storage-option`` and a third written in an infer config file (in the places a config
    can hold one, and in the places it cannot) appear in none of them, after a run and after
    refused or failing ones. The logs are captured at DEBUG, where botocore dumps each signed
    request with its session token unless rootflow.io.storage drops those records."""
    from rootflow.lake import Lake
    from tests.pipeline._helpers import small_archive

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_ENV)
    monkeypatch.setenv("AWS_SESSION_TOKEN", CANARY_ENV + "-token")
    caplog.set_level(logging.DEBUG)
    arch = small_archive(str(tmp_path / "a"), n_images=2)
    lake_uri = str(tmp_path / "lake")
    summary = tmp_path / "summary.json"
    # An infer config holds no storage settings; its free-form model sections (here of models
    # this run does not use) are the only place a secret can ride along, and the run records
    # them redacted.
    cfg = _config(tmp_path / "infer.yaml", f"commit_every: 50\nrootsam:\n  password: {CANARY_CFG}\n"
                  f"rootquant:\n  access_token: {CANARY_CFG}\n")
    res = CliRunner().invoke(app, ["infer", arch.manifest_uri, lake_uri, "--producers", "mask",
                                   "--config", cfg, "--summary-json", str(summary)])
    assert res.exit_code == 3, res.output
    lake = Lake(lake_uri)
    runs = lake.read("runs").to_pylist()
    recorded = json.loads(runs[-1]["config_json"])
    assert recorded["infer"]["rootsam"]["password"] == "***"
    assert recorded["infer"]["rootquant"]["access_token"] == "***"
    assert recorded["infer"]["commit_every"] == 50  # the file was read
    texts = {
        "command output": res.output,
        "runs table": json.dumps(runs, default=str),
        "rejects table": json.dumps(lake.read("rejects").to_pylist(), default=str),
        "summary file": summary.read_text(),
    }
    # Refused before anything runs, one line, exit 2, the secret not repeated: a credential as
    # a storage option; a config that tries to carry storage settings, one whose secret sits
    # where a number belongs, one that is not valid YAML on the secret's own line.
    refused = {
        "storage option": ["--storage-option", f"secret={CANARY_OPT}"],
        "config storage section": ["--config", _config(
            tmp_path / "c1.yaml", f"storage:\n  secret: {CANARY_CFG}\n")],
        "config wrong type": ["--config", _config(
            tmp_path / "c2.yaml", f"commit_every: {CANARY_CFG}\n")],
        "config bad YAML": ["--config", _config(
            tmp_path / "c3.yaml", f"commit_every: 5\nrootsam: {{token: {CANARY_CFG}\n")],
    }
    for what, args in refused.items():
        bad = CliRunner().invoke(app, ["infer", arch.manifest_uri, lake_uri,
                                       "--producers", "mask", *args])
        assert bad.exit_code == 2, (what, bad.output)
        assert "\n" not in bad.stderr.strip() and "Traceback" not in bad.output, bad.output
        texts[f"error message ({what})"] = bad.output
    # A run that fails on storage (a manifest on an endpoint that refuses the canary key).
    bad = CliRunner().invoke(app, ["infer", "s3://nobucket/m.parquet", lake_uri,
                                   "--producers", "mask",
                                   "--storage-option", "endpoint_url=http://127.0.0.1:9"])
    assert bad.exit_code == 2 and "\n" not in bad.stderr.strip(), bad.output
    texts["error message (storage)"] = bad.output
    texts["logs"] = caplog.text
    assert len(lake.read("runs").to_pylist()) == len(runs)  # nothing refused was recorded
    for what, text in texts.items():
        for canary in (CANARY_ENV, CANARY_OPT, CANARY_CFG):
            assert canary not in text, f"{canary} leaked into the {what}"


def _commands_with_storage_option() -> list[tuple[list[str], list[str]]]:
    """(command path, its required arguments filled with placeholders) of every command of
    the ``rootflow`` CLI that takes ``--storage-option``, found by walking the CLI itself."""
    import typer.main

    def walk(cmd, path):  # type: ignore[no-untyped-def]
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                yield from walk(sub, [*path, name])
        else:
            yield path, cmd

    out = []
    for path, cmd in walk(typer.main.get_command(app), []):
        if not any("--storage-option" in getattr(p, "opts", []) for p in cmd.params):
            continue
        args: list[str] = []
        for p in cmd.params:
            if p.required:
                args += ["placeholder"] if p.param_type_name == "argument" else \
                    [p.opts[0], "placeholder"]
        out.append((path, args))
    return out


def test_credentials_on_the_command_line_are_refused_by_every_command(tmp_path) -> None:
    """Guards against a command accepting ``--storage-option key=/secret=/token=``: a
    credential on a command line is readable by every user (``ps``) and is stored in a RayJob's
    or a submitted job's entry point. Every command that takes the option (found by walking the
    CLI, plus ``jobs/maintain.py``) refuses it with one line and exit 2, before doing anything,
    without repeating the value, and says where credentials come from."""
    import importlib.util

    import typer

    cmds = _commands_with_storage_option()
    names = {" ".join(p) for p, _ in cmds}
    assert {"infer", "reprocess", "manifest build", "lake vacuum", "synth"} <= names, names
    spec = importlib.util.spec_from_file_location(
        "maintain_job", Path(__file__).resolve().parents[2] / "jobs" / "maintain.py")
    assert spec and spec.loader
    maintain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(maintain)
    maintain_app = typer.Typer()
    maintain_app.command()(maintain.main)
    # ``train rootsam`` checks that it has data before it reads its storage options.
    extra = {"train rootsam": ["--data", "placeholder"]}
    runs = [(app, [*path, *args, *extra.get(" ".join(path), [])]) for path, args in cmds]
    runs.append((maintain_app, [str(tmp_path / "lake")]))
    for key in ("key", "secret", "token", "AWS_SECRET_ACCESS_KEY"):
        for cli, argv in runs:
            res = CliRunner().invoke(cli, [*argv, "--storage-option", f"{key}={CANARY_OPT}"])
            where = f"{' '.join(argv)} --storage-option {key}=..."
            assert res.exit_code == 2, (where, res.output)
            assert "refused: credentials on a command line" in res.stderr, (where, res.output)
            assert "AWS_SECRET_ACCESS_KEY" in res.stderr and "\n" not in res.stderr.strip()
            assert CANARY_OPT not in res.output, where
    assert not (tmp_path / "lake").exists()


def test_job_entry_points_and_documented_commands_carry_no_credentials() -> None:
    """Guards against documentation or cluster files that put credentials where they are
    stored and shown (a RayJob's ``entrypoint``, ``ray job submit`` arguments, a runtime env,
    a CronJob's command): every ``jobs/<x>.py`` entry point written in ``cluster/`` and the
    README, and every ``ray job submit`` / ``rootflow`` command in the README and ``docs/``,
    passes no credential option (each ``--storage-option`` key checked against the list the
    CLI refuses), no ``AWS_*`` key variable and no ``user:password@`` in a URI."""
    import re

    from rootflow.io._cli import CREDENTIAL_OPTIONS
    from tests.cluster.test_manifests import _commands

    root = Path(__file__).resolve().parents[2]
    entry_points = _commands()
    assert {"infer", "reprocess"} <= {job for job, _ in entry_points}
    lines: list[str] = []
    for p in [root / "README.md", *sorted((root / "docs").glob("*.md")),
              *sorted(p for p in (root / "cluster").rglob("*") if p.is_file())]:
        flat = re.sub(r"\\\n\s*", " ", p.read_text())
        lines += [f"{p.name}: {ln}" for ln in flat.splitlines()
                  if p.relative_to(root).parts[0] == "cluster" or  # all of a cluster file
                  re.search(r"ray job submit|rootflow \w|jobs/\w+\.py|entrypoint|env_vars", ln)]
    assert any("ray job submit" in ln for ln in lines)
    banned = re.compile(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)\s*[=:]\s*\S|"
                        r"[a-z0-9]+://[^/\s:@]+:[^/\s@]+@", re.IGNORECASE)
    for ln in lines:
        assert not banned.search(ln), ln
        for m in re.finditer(r"(?:--storage-option|-s)[ =]+([^\s=]+)=", ln):
            assert m.group(1).lower() not in CREDENTIAL_OPTIONS, ln
    for job, words in entry_points:
        for flag, value in zip(words, [*words[1:], ""], strict=False):
            if flag == "--storage-option":
                assert value.split("=", 1)[0].lower() not in CREDENTIAL_OPTIONS, (job, words)
