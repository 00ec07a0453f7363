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

    # Through the job's command line: one line, exit 2, before any work. (Only the U-Net and
    # forest are loaded on the driver before the run; RootSAM and RootQuant checkpoints are
    # first loaded in the model actors, where the same weights-only load refuses them.)
    from tests.reliability.test_manifest_faults import _good_columns, _write_csv

    manifest = _write_csv(tmp_path / "m.csv", _good_columns(tmp_path))
    for flag, producer in (("--unet-checkpoint", "unet"),):
        res = CliRunner().invoke(app, ["infer", manifest, str(tmp_path / "lake"),
                                       "--producers", producer, flag, evil])
        assert res.exit_code == 2, res.output
        assert "\n" not in res.stderr.strip() and "Traceback" not in res.output
        assert not marker.exists()


CANARY_ENV = "canary-env-7f3a9c1e5b"
CANARY_OPT = "canary-opt-2d8e4b6a0c"


@pytest.mark.ray
def test_canary_secret_never_leaks(ray_local, tmp_path, monkeypatch, caplog) -> None:
    """Guards against credentials reaching logs, the runs table, reject reasons, the summary
    file or error messages: a canary secret given through the environment and another
    through ``--storage-option`` appear in none of them after a run and after a failing one."""
    from rootflow.lake import Lake
    from tests.pipeline._helpers import small_archive

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CANARY_ENV)
    monkeypatch.setenv("AWS_SESSION_TOKEN", CANARY_ENV + "-token")
    caplog.set_level(logging.DEBUG)
    arch = small_archive(str(tmp_path / "a"), n_images=2)
    lake_uri = str(tmp_path / "lake")
    summary = tmp_path / "summary.json"
    res = CliRunner().invoke(app, ["infer", arch.manifest_uri, lake_uri, "--producers", "mask",
                                   "--storage-option", f"secret={CANARY_OPT}",
                                   "--summary-json", str(summary)])
    assert res.exit_code == 3, res.output
    lake = Lake(lake_uri)
    runs = lake.read("runs").to_pylist()
    assert runs and json.loads(runs[-1]["config_json"])["storage"]["secret"] == "***"
    texts = {
        "command output": res.output,
        "runs table": json.dumps(runs, default=str),
        "rejects table": json.dumps(lake.read("rejects").to_pylist(), default=str),
        "summary file": summary.read_text(),
        "logs": caplog.text,
    }
    # A run that fails on storage (a manifest on an endpoint that refuses the canary key).
    bad = CliRunner().invoke(app, ["infer", "s3://nobucket/m.parquet", lake_uri,
                                   "--producers", "mask",
                                   "--storage-option", "endpoint_url=http://127.0.0.1:9",
                                   "--storage-option", f"secret={CANARY_OPT}"])
    assert bad.exit_code == 2 and "\n" not in bad.stderr.strip(), bad.output
    texts["error message"] = bad.output
    for what, text in texts.items():
        for canary in (CANARY_ENV, CANARY_OPT):
            assert canary not in text, f"{canary} leaked into the {what}"
