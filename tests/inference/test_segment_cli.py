"""``rootflow segment``: masks beside images for any model kind, with honest exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from rootflow.cli import app
from rootflow.io.images import decode, decode_mask
from tests.inference._segment_helpers import TinyModel, tiny_forest, tiny_unet


@pytest.fixture(scope="module")
def forest(tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return tiny_forest(tmp_path_factory.mktemp("forest"))


@pytest.fixture(scope="module")
def pairs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of image / ``*_mask.png`` pairs (plus the archive's parquet and yaml)."""
    from rootflow.synth import SynthConfig, generate_archive

    root = tmp_path_factory.mktemp("pairs") / "archive"
    generate_archive(str(root), config=SynthConfig(n_images=3, seed=21, height=80, width=112))
    return root


def _invoke(args: list[str]):
    return CliRunner().invoke(app, ["segment", *args])


def _summary(res) -> dict:
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_segment_glob_over_pairs_writes_one_mask_per_image(forest, pairs_dir, tmp_path) -> None:
    """Guards against masks of masks (``*_mask_mask.png``) from a glob over a folder of pairs,
    masks of the wrong size or values, and a summary that is not one JSON line on stdout."""
    images = sorted(pairs_dir.glob("*.jpg"))
    out = tmp_path / "out"
    pairs = sorted([*pairs_dir.glob("*.jpg"), *pairs_dir.glob("*.png")])  # DIR/*.{jpg,png}
    assert any(p.name.endswith("_mask.png") for p in pairs)
    res = _invoke(["--model", forest.folder, "--out", str(out), *map(str, pairs)])
    assert res.exit_code == 0, res.output
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(f"{p.stem}_mask.png" for p in images)
    for p in images:
        m = (out / f"{p.stem}_mask.png").read_bytes()
        rgb = decode(p.read_bytes())[0]
        import cv2

        raw = cv2.imdecode(np.frombuffer(m, np.uint8), cv2.IMREAD_UNCHANGED)
        assert raw.shape == rgb.shape[:2] and set(np.unique(raw)) <= {0, 255}
        np.testing.assert_array_equal(decode_mask(m), forest.model.predict(rgb))
    s = _summary(res)
    assert s["n_images"] == len(images) and s["failed"] == [] and s["out"] == str(out)
    assert s["model_version"] == forest.model.version and s["seconds"] >= 0

    # A folder given as IMAGE expands to the same images.
    out2 = tmp_path / "out2"
    res = _invoke(["--model", forest.uri, "--out", str(out2), "--no-progress", str(pairs_dir)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in out2.iterdir()) == written


def test_unreadable_image_is_named_and_the_rest_written(forest, pairs_dir, tmp_path) -> None:
    """Guards against one unreadable image aborting the others, a traceback instead of one
    line naming the file, and exit 0 when something failed (1: some, 2: none processed)."""
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    good = sorted(pairs_dir.glob("*.jpg"))[:2]
    out = tmp_path / "out"
    res = _invoke(["--model", forest.uri, "--out", str(out), str(broken), *map(str, good)])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    err_lines = [ln for ln in res.stderr.splitlines() if "broken.jpg" in ln]
    assert len(err_lines) == 1
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{p.stem}_mask.png" for p in good)
    s = _summary(res)
    assert s["n_images"] == 2 and [f["image"] for f in s["failed"]] == [str(broken)]

    res = _invoke(["--model", forest.uri, "--out", str(tmp_path / "none"), str(broken),
                   str(tmp_path / "missing.png")])
    assert res.exit_code == 2 and _summary(res)["n_images"] == 0


@pytest.mark.parametrize("content", [b"not a model at all", b'{"format": "something/else"}',
                                     b'{"format": "rootflow.forest/1", "trees"'])
def test_bad_model_is_one_line_and_exit_2(content, pairs_dir, tmp_path) -> None:
    """Guards against a corrupt or wrong-kind model file ending in a traceback (or exit 1,
    which would read as 'some images failed') instead of one line and exit 2."""
    model = tmp_path / "model.bin"
    model.write_bytes(content)
    res = _invoke(["--model", str(model), "--out", str(tmp_path / "o"), str(pairs_dir)])
    assert res.exit_code == 2
    assert "Traceback" not in res.output and res.stdout == ""
    assert len(res.stderr.strip().splitlines()) == 1 and str(model) in res.stderr
    assert not (tmp_path / "o").exists()


def test_no_model_or_two_models_is_exit_2(forest, pairs_dir, tmp_path) -> None:
    """Guards against guessing a model when none (or two) were named."""
    res = _invoke(["--out", str(tmp_path / "o"), str(pairs_dir)])
    assert res.exit_code == 2 and "--model" in res.stderr
    res = _invoke(["--model", forest.uri, "--rootsam-config", "test", "--out",
                   str(tmp_path / "o"), str(pairs_dir)])
    assert res.exit_code == 2 and "not both" in res.stderr


def test_unet_and_rootsam_models_write_the_same_kind_of_output(pairs_dir, tmp_path) -> None:
    """Guards against the command working only for forests: a U-Net file (kind read from the
    file) and RootSAM (its own flags) give full-size 0/255 masks too."""
    unet = tiny_unet(tmp_path)
    img = sorted(pairs_dir.glob("*.jpg"))[0]
    h, w = decode(img.read_bytes())[0].shape[:2]
    for name, args in (("unet", ["--model", unet.uri]),
                       ("rootsam", ["--rootsam-config", "test"])):
        out = tmp_path / name
        res = _invoke([*args, "--out", str(out), "--no-progress", str(img)])
        assert res.exit_code == 0, res.output
        assert decode_mask((out / f"{img.stem}_mask.png").read_bytes()).shape == (h, w)
    assert "random weights" in res.stderr
