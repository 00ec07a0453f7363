"""Injected object-storage faults during a real run: nothing lost, nothing duplicated.

The job runs against the SeaweedFS test server through :class:`FaultProxy`, which answers a
seeded share of image reads and ``_delta_log`` commit puts with a 503, a dropped connection or
a slow answer. Run with ``-s`` to print the figures quoted in docs/reliability.md.
"""

from __future__ import annotations

import dataclasses
import json

import pyarrow.compute as pc
import pytest

from rootflow.inference.pipeline import InferConfig, run
from rootflow.io.manifest import read_manifest, write_manifest
from rootflow.lake import Lake
from tests.pipeline._helpers import small_archive
from tests.reliability._faultproxy import FaultProxyProcess

pytestmark = [pytest.mark.s3, pytest.mark.ray, pytest.mark.slow]

SEED, RATE = 18, 0.25


def _rows_per_image(lake: Lake, producer: str, run_id: str) -> tuple[dict[str, int],
                                                                    dict[str, int]]:
    """Rows per image: traits (one per image and version) and the rejects of ``run_id``
    (rejects are kept per run: the table is the history of what each run refused)."""
    def count(t):
        t = t.filter(pc.equal(t["model_name"], producer))
        out: dict[str, int] = {}
        for i in t["image_id"].to_pylist():
            out[i] = out.get(i, 0) + 1
        return out

    rejects = lake.read("rejects")
    return count(lake.read("traits")), count(rejects.filter(pc.equal(rejects["run_id"], run_id)))


def test_storage_faults_lose_and_duplicate_nothing(ray_local, s3) -> None:
    """Guards against a transient storage error losing a row, duplicating one, leaving a
    half-written or unreadable Delta table, or (for an object that stays unreadable) killing
    the run instead of rejecting that one image; and checks that faults were really injected
    on both image reads and ``_delta_log`` commits (a proxy that injected nothing would make
    this test pass vacuously)."""
    prefix = s3.fresh_prefix("faults")
    direct = s3.storage.to_dict()
    arch = small_archive(prefix, n_images=8, storage_options=direct, bad=False,
                         height=96, width=128)
    manifest = read_manifest(arch.manifest_uri, storage_options=direct)
    dead = manifest["image_uri"][0].as_py()  # stays unreadable: 503 on every attempt
    dead_id = manifest["image_id"][0].as_py()
    dead_key = "/" + dead.split("://", 1)[1]
    again_uri = write_manifest(manifest.filter(pc.not_equal(manifest["image_id"], dead_id)),
                               prefix + "/again.parquet", storage_options=direct)
    lake_uri = prefix + "/lake"
    cfg = InferConfig(producers=("mask",), commit_every=2)
    with FaultProxyProcess(s3.endpoint_url, rules=["delta_commit", "image_read"], rate=RATE,
                           seed=SEED, always_fail=(dead_key,), slow_s=1.0) as proxy:
        via_proxy = dataclasses.replace(s3.storage, endpoint_url=proxy.endpoint_url).to_dict()
        s1 = run(arch.manifest_uri, lake_uri, cfg, storage_options=via_proxy, progress=False)
        # every image processed again under faults (idempotency: MERGE, no new rows); the
        # dead one left out this time (its ~20 s of retries are checked once above)
        s2 = run(again_uri, lake_uri, dataclasses.replace(cfg, skip_done=False),
                 storage_options=via_proxy, progress=False)
        stats = proxy.stats()
    injected, seen = stats["injected"], stats["seen"]

    def total(rule: str) -> int:
        return sum(n for k, n in injected.items() if k.startswith(rule + "/"))

    assert total("delta_commit") > 0, stats
    assert total("image_read") > 0, stats

    # Read back directly (no proxy): the table is whole and readable at every version.
    lake = Lake(lake_uri, storage_options=direct)
    dt = lake.delta_table("traits")
    for v in range(dt.version() + 1):
        Lake(lake_uri, storage_options=direct).delta_table("traits", version=v)
    ids = set(manifest["image_id"].to_pylist())
    lost = duplicated = 0
    both: set[str] = set()
    for s, run_ids in ((s1, ids), (s2, ids - {dead_id})):  # every row: exactly one row
        ok, bad = _rows_per_image(lake, "mask", s.run_id)
        lost += len(run_ids - set(ok) - set(bad))
        duplicated += sum(n - 1 for n in ok.values()) + sum(n - 1 for n in bad.values())
        both |= set(ok) & set(bad)
    figures = {"images": len(ids), "faults_injected": injected,
               "requests_seen": seen, "rows_lost": lost, "rows_duplicated": duplicated,
               "traits_rows": len(ok),
               "rejected_run1": len(_rows_per_image(lake, "mask", s1.run_id)[1]),
               "runs": [s1.status, s2.status], "seed": SEED, "rate": RATE}
    print("FIGURES " + json.dumps(figures))
    assert lost == 0 and duplicated == 0 and not both
    _, bad1 = _rows_per_image(lake, "mask", s1.run_id)
    assert set(bad1) == {dead_id}  # only the object that never came back
    reason = next(r["reason"] for r in lake.read("rejects").to_pylist()
                  if r["image_id"] == dead_id)
    assert reason.startswith("read:") and "\n" not in reason
    assert s1.n_images_rejected == 1 and s1.exit_code == 3
    assert s2.n_images == len(ids) - 1 and s2.n_images_rejected == 0 and s2.exit_code == 0
