"""The notebooks run top to bottom against a lake the processing job wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from rootflow.inference.pipeline import InferConfig, run
from tests.pipeline._helpers import small_archive

pytestmark = [pytest.mark.slow, pytest.mark.ray]

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))


@pytest.fixture(scope="module")
def demo_lake(ray_local, tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("nb")
    arch = small_archive(str(root), n_images=4, bad=True)
    lake = str(root / "lake")
    cfg = InferConfig(producers=("mask", "rootsam", "rootquant"), rootsam={"variant": "test"},
                      rootquant={"backbone": "resnet10t"})
    run(arch.manifest_uri, lake, cfg, progress=False)
    return lake


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path: Path, demo_lake: str, monkeypatch) -> None:
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("ROOTFLOW_LAKE", demo_lake)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert any(c.get("outputs") for c in nb.cells if c.cell_type == "code")


def test_notebooks_hold_no_logic() -> None:
    """Notebooks call rootflow; they define no functions or classes of their own."""
    import nbformat

    assert NOTEBOOKS, "no notebooks found"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        src = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
        assert "def " not in src and "class " not in src, path.name
        assert "os.environ" in src  # the lake comes from ROOTFLOW_LAKE, not a hard-coded path


def test_report_on_demo_lake(demo_lake: str, tmp_path) -> None:
    """Guards ``rootflow report`` failing on a lake the processing job wrote (rather than on a
    hand-made test lake): the page and its runs, RLD and producers figures exist and are not
    blank (the demo lake has no dynamics table rows, so the season figure is skipped)."""
    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from rootflow.cli import app

    res = CliRunner().invoke(app, ["report", demo_lake, "--out", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    page = (tmp_path / "r" / "index.html").read_text()
    for name in ("runs", "rld_by_depth", "producers"):
        path = tmp_path / "r" / f"{name}.png"
        img = np.asarray(Image.open(path).convert("L"), dtype=float)
        assert f'src="{name}.png"' in page and img.std() > 10, name
    assert "skipped season" in res.output
