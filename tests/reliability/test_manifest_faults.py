"""Manifest-level faults and bad arguments: one line naming column and row, exit 2, no Ray.

Every case goes through the real commands (``rootflow manifest validate`` and ``rootflow
infer``); ``infer`` checks the manifest before it loads models or starts Ray, so none of these
start anything.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from rootflow.cli import app
from tests.lake._helpers import manifest
from tests.reliability._corpus import MANIFEST_KINDS


def _good_columns(root: Path) -> dict[str, list[Any]]:
    m = manifest(tubes=(1,), windows=(1, 2), sessions=(1, 2), root=str(root / "images"))
    cols = m.to_pydict()
    cols["captured_at"] = [t.isoformat() for t in cols["captured_at"]]
    return cols


def _write_csv(path: Path, cols: dict[str, list[Any]]) -> str:
    names = list(cols)
    n = len(next(iter(cols.values())))
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(names)
        for i in range(n):
            w.writerow(["" if cols[c][i] is None else cols[c][i] for c in names])
    return str(path)


def _one_line_error(res: Any, code: int = 2) -> str:
    assert res.exit_code == code, res.output
    err = res.stderr.strip()
    assert err and "\n" not in err, err  # one line
    assert "Traceback" not in res.output
    return err


def test_good_manifest_is_valid(tmp_path) -> None:
    """Guards the fixture itself: the unspoilt manifest passes, so each failure below is the
    fault's doing."""
    uri = _write_csv(tmp_path / "m.csv", _good_columns(tmp_path))
    res = CliRunner().invoke(app, ["manifest", "validate", uri])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("name,spoil,words", MANIFEST_KINDS, ids=[k[0] for k in MANIFEST_KINDS])
def test_manifest_fault_refused_by_validate_and_infer(tmp_path, name, spoil, words) -> None:
    """Guards against a broken manifest reaching the job (a traceback or exit 1 deep inside a
    run, or worse, rows written under a path-like image_id): both commands refuse it with one
    line naming the column (and row), exit 2."""
    cols = _good_columns(tmp_path)
    spoil(cols)
    uri = _write_csv(tmp_path / "m.csv", cols)
    runner = CliRunner()
    for args in (["manifest", "validate", uri],
                 ["infer", uri, str(tmp_path / "lake"), "--producers", "mask"]):
        err = _one_line_error(runner.invoke(app, args))
        for w in words:
            assert w in err, (args[0], err)
    assert not (tmp_path / "lake").exists()  # nothing was started


def test_missing_dpi_supplied_by_the_experiment_config(tmp_path) -> None:
    """Guards against refusing rows whose dpi the experiment config gives: empty dpi cells are
    filled from the config by ``manifest validate -e`` (and kept where given)."""
    import pyarrow.parquet as pq
    import yaml

    cols = _good_columns(tmp_path)
    cols["dpi"][0] = None
    cols["dpi"][1] = 300.0
    uri = _write_csv(tmp_path / "m.csv", cols)
    cfg = tmp_path / "experiment.yaml"
    cfg.write_text(yaml.safe_dump({"experiments": {"*": {"dpi": 150.0}}}))
    res = CliRunner().invoke(app, ["manifest", "validate", uri])
    assert "'dpi' row 0" in _one_line_error(res)
    out = tmp_path / "full.parquet"
    res = CliRunner().invoke(app, ["manifest", "validate", uri, "-e", str(cfg), "-o", str(out)])
    assert res.exit_code == 0, res.output
    dpi = pq.read_table(out)["dpi"].to_pylist()
    assert dpi[:2] == [150.0, 300.0] and dpi[2:] == cols["dpi"][2:]


def test_manifest_cannot_point_outside_its_folder(tmp_path) -> None:
    """Guards against a manifest making the job read any file the worker can (``/etc/passwd``,
    another bucket): URIs outside the manifest's own folder (local) or bucket (s3), or outside
    ``--allow-prefix``, are refused before anything runs."""
    from rootflow.io import storage

    cols = _good_columns(tmp_path)
    cols["image_uri"][1] = "file:///etc/passwd"
    uri = _write_csv(tmp_path / "m.csv", cols)
    err = _one_line_error(CliRunner().invoke(app, ["infer", uri, str(tmp_path / "lake"),
                                                   "--producers", "mask"]))
    assert "'image_uri' row 1" in err and "/etc/passwd" in err and "allowed" in err
    # ".." does not escape the folder either
    cols["image_uri"][1] = str(tmp_path / "images" / ".." / ".." / "etc" / "passwd")
    uri = _write_csv(tmp_path / "m.csv", cols)
    err = _one_line_error(CliRunner().invoke(app, ["infer", uri, str(tmp_path / "lake"),
                                                   "--producers", "mask"]))
    assert "allowed" in err
    # the rule itself, for object storage
    assert storage.default_allowed_prefixes("s3://b/x/m.parquet") == ["s3://b/"]
    assert storage.uri_allowed("s3://b/img/a.jpg", ["s3://b/"])
    assert not storage.uri_allowed("s3://other/a.jpg", ["s3://b/"])
    assert not storage.uri_allowed("s3://bb/a.jpg", ["s3://b"])
    assert not storage.uri_allowed("file:///etc/passwd", ["s3://b/"])
    assert not storage.uri_allowed("s3://b/x/../../c/a.jpg", ["s3://b/x/"])
    assert storage.uri_allowed("/etc/passwd", ["/etc"])  # allowed when the run says so


@pytest.mark.parametrize("args,words", [
    (["--producers", "mask,nosuch"], "nosuch"),
    (["--producers", "mask", "--storage-option", "colour=blue"], "colour"),
    (["--producers", "mask", "--storage-option", "novalue"], "key=value"),
    (["--producers", "mask", "--rootquant-sha256", "abc123"], "64"),
    (["--producers", "mask", "--base-sha256", "0" * 63], "64"),
])
def test_bad_arguments_are_one_line(tmp_path, args, words) -> None:
    """Guards against a typo answered by a traceback (or a usage box): one line, exit 2."""
    uri = _write_csv(tmp_path / "m.csv", _good_columns(tmp_path))
    err = _one_line_error(CliRunner().invoke(app, ["infer", uri, str(tmp_path / "lake"), *args]))
    assert words in err


def test_manifest_that_is_not_a_table(tmp_path) -> None:
    """Guards against a garbage or missing manifest file surfacing as a parser traceback."""
    bad = tmp_path / "m.parquet"
    bad.write_bytes(b"PAR1\x00\x01garbage")
    for target in (str(bad), str(tmp_path / "absent.csv")):
        for args in (["manifest", "validate", target],
                     ["infer", target, str(tmp_path / "lake"), "--producers", "mask"]):
            _one_line_error(CliRunner().invoke(app, args))


def test_build_rejects_undecodable_and_overlong_file_names(tmp_path) -> None:
    """Guards against one badly named file breaking ``manifest build`` for the whole archive
    (a non-UTF-8 name cannot go into an Arrow string column; a 200-character name does not
    parse): both land in the build's rejects with a reason, the good file in the manifest."""
    import os

    from rootflow.io.manifest import build_manifest
    from tests.reliability._corpus import _cv2_bytes, base_image

    img, _ = base_image()
    png = _cv2_bytes(".png", img)
    root = tmp_path / "archive"
    root.mkdir()
    (root / "EXP_T001_L001_2021.06.01_100000_001_AB.png").write_bytes(png)
    (root / ("EXP_T001_L002_" + "x" * 190 + ".png")).write_bytes(png)
    with open(os.path.join(os.fsencode(root), b"Wurzel_\xe4_T001_L003.png"), "wb") as f:
        f.write(png)
    (root / "experiment.yaml").write_text(
        "date_order: YMD\nexperiments:\n  '*': {dpi: 100, frame_height_mm: 20, "
        "insertion_angle_deg: 45, surface_window: 1}\n")
    built = build_manifest(str(root))
    assert built.table.num_rows == 1
    reasons = sorted(built.rejects.column("reason").to_pylist())
    assert len(reasons) == 2 and all(r.startswith("filename:") for r in reasons)
    assert any("not valid UTF-8" in r for r in reasons)
