"""A model actor with its own memory limit meeting images too big for it (issue #18)."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from rootflow.cli import app
from rootflow.io import storage
from rootflow.io.images import MAX_PIXELS
from rootflow.io.manifest import write_manifest
from rootflow.lake import Lake
from tests.inference._segment_helpers import tiny_forest
from tests.pipeline._helpers import Archive, accounting, small_archive

#: The actors' memory for their work (MB beyond their loaded models): the small images need a
#: few MB, the two big ones below need more.
LIMIT_MB = 200


def _big_rows(root: Path, template: dict) -> list[dict]:
    """Two valid images, both far under the decompression-bomb limit:

    * ``decode-oom``: a 9000x9000 grey PNG (~100 kB on disk) whose RGB pixels alone are
      243 MB, so decoding it in the actor runs out of the limit;
    * ``model-oom``: a 2000x2000 JPEG that decodes to 12 MB, but the forest's per-pixel
      features need ~290 MB (measured with tracemalloc), so the model stage runs out.
    """
    grey = np.full((9000, 9000), 110, np.uint8)
    grey[::97, :] = 220
    jpeg = np.full((2000, 2000, 3), 120, np.uint8)
    cv2.line(jpeg, (0, 0), (1999, 1999), (230, 225, 215), 9)
    rows = []
    for image_id, name, enc in (("decode-oom", "big.png", cv2.imencode(".png", grey)[1]),
                                ("model-oom", "medium.jpg", cv2.imencode(".jpg", jpeg)[1])):
        uri = storage.join(str(root), "big", name)
        storage.write_bytes(uri, bytes(enc))
        rows.append(dict(template, image_id=image_id, image_uri=uri, file_name=name,
                         mask_uri=None))
    assert MAX_PIXELS > 9000 * 9000
    return rows


@pytest.mark.ray
@pytest.mark.slow
def test_actor_memory_limit_rejects_only_the_image_that_needs_more(ray_local, tmp_path) -> None:
    """Guards against an image that is valid but too big for a model actor's memory limit
    taking the actor down (or the batch, or the run with it): under
    ``resources.actor_memory_mb`` the image whose decode and the one whose model work exceed
    the limit end as ``rejects`` rows saying "out of memory", every other image of the same
    batches gets its traits, one actor process does all the work (it was never restarted),
    nothing is lost or duplicated, and the ``runs`` row records the limit and the counts."""
    forest = tiny_forest(tmp_path / "forest")
    small = small_archive(str(tmp_path / "a"), n_images=3, bad=False)
    table = pq.read_table(small.manifest_uri)
    big = _big_rows(tmp_path, table.slice(0, 1).to_pylist()[0])
    # The big images first, so the small ones share their batches and come after them.
    table = pa.concat_tables([pa.Table.from_pylist(big, schema=table.schema), table])
    manifest = str(tmp_path / "manifest.parquet")
    write_manifest(table, manifest)
    arch = Archive(root=str(tmp_path), manifest_uri=manifest, n_rows=table.num_rows, bad_ids={})
    lake_uri = str(tmp_path / "lake")

    res = CliRunner().invoke(app, [
        "infer", manifest, lake_uri, "--producers", "forest", "--forest-model", forest.folder,
        "--actors", "1", "--batch-size", "2",
        "--set", f"resources.actor_memory_mb={LIMIT_MB}",
        "--summary-json", str(tmp_path / "s.json")])
    assert res.exit_code == 3, res.output  # finished, with rejects
    summary = json.loads((tmp_path / "s.json").read_text())

    lake = Lake(lake_uri)
    accounting(lake, summary["run_id"], ("forest",), arch)  # 0 lost, 0 duplicated
    rejects = {r["image_id"]: r for r in lake.read("rejects").to_pylist()}
    assert set(rejects) == {"decode-oom", "model-oom"}, rejects
    assert rejects["decode-oom"]["stage"] == "decode"
    assert rejects["model-oom"]["stage"] == "forest"
    for r in rejects.values():
        assert r["reason"].startswith(f"{r['stage']}: out of memory: "), r["reason"]
        assert f"actor_memory_mb={LIMIT_MB}" in r["reason"], r["reason"]
        assert "\n" not in r["reason"]
    ok = {r["image_id"] for r in lake.read("traits").to_pylist()}
    print("FIGURES actor memory:", json.dumps({  # the docs' figures (docs/reliability.md)
        "images": table.num_rows, "traits": len(ok), "rejects": {
            k: r["reason"] for k, r in rejects.items()}, "actors": summary["actors"],
        "wall_s": summary["wall_s"]}))
    assert ok == set(table["image_id"].to_pylist()) - set(rejects)

    # One actor did every image, the two after the failures included: it was never replaced.
    assert len(summary["actors"]) == 1 and \
        sum(summary["actors"].values()) == pytest.approx(table.num_rows), summary["actors"]

    run = next(r for r in lake.read("runs").to_pylist() if r["run_id"] == summary["run_id"])
    assert run["status"] == "ok_with_rejects"
    assert (run["n_ok"], run["n_rejected"]) == (3, 2)
    assert json.loads(run["config_json"])["infer"]["resources"]["actor_memory_mb"] == LIMIT_MB

    # An out-of-memory reject is not a verdict on the file: the next run tries it again (under
    # the same limit it is rejected again, still without a duplicate traits row).
    res2 = CliRunner().invoke(app, [
        "infer", manifest, lake_uri, "--producers", "forest", "--forest-model", forest.folder,
        "--actors", "1", "--set", f"resources.actor_memory_mb={LIMIT_MB}",
        "--summary-json", str(tmp_path / "s2.json")])
    assert res2.exit_code == 3, res2.output
    s2 = json.loads((tmp_path / "s2.json").read_text())
    assert (s2["n_images"], s2["n_images_rejected"]) == (2, 2), s2
    accounting(lake, s2["run_id"], ("forest",), arch)
    traits = lake.read("traits")["image_id"].to_pylist()
    assert sorted(traits) == sorted(ok)
