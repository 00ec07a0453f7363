#!/usr/bin/env python
"""How fast the lake takes the pipeline's batched commits, locally and on S3 (moto on loopback).

    .venv/bin/python benchmarks/lake_commit.py --images 20000 --batch 2000 [--s3]

Rows carry the real trait columns (``rootflow.traits.measure`` of one small mask, repeated),
spread over 2 years x 20 tubes x 10 depth bands like a field season. Measures: first commit of
every batch (MERGE inserting), the same batches again (MERGE updating: the idempotent re-run),
``done_image_ids`` (what a resumed run reads first), a DuckDB aggregate over the latest version,
and compaction. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rows(n: int) -> list[dict]:
    import numpy as np

    from rootflow.io.manifest import image_id_for
    from rootflow.traits import measure

    mask = np.zeros((256, 256), bool)
    mask[20:230, 100:104] = True
    mask[120:124, 30:220] = True
    traits = measure(mask, dpi=150.0)
    out = []
    for i in range(n):
        tube, window, session = i % 20 + 1, (i // 20) % 40 + 1, i // 800 + 1
        when = dt.datetime(2021 + session % 2, 5, 1) + dt.timedelta(days=session)
        uri = f"s3://lab/archive/EXP_T{tube:03d}_L{window:03d}_{when:%Y.%m.%d}_100000_{session:03d}_AB.jpg"
        depth_cm = window * 1.0
        out.append({"image_uri": uri, "image_id": image_id_for(uri), "file_name": uri.rsplit("/", 1)[1],
                    "experiment": "EXP", "tube": tube, "window": window, "session": session,
                    "captured_at": when, "year": when.year, "operator": "AB", "dpi": 150.0,
                    "depth_cm": depth_cm, "depth": int(depth_cm // 4 * 4), **traits,
                    "model_name": "rootsam", "model_version": "bench-v1", "run_id": "bench",
                    "processed_at": dt.datetime(2024, 1, 1), "confidence": 0.9,
                    "params": '{"prompts": "grid"}'})
    return out


def _moto() -> tuple[subprocess.Popen, dict]:
    import boto3

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    ep = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client = boto3.client("s3", endpoint_url=ep, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    for _ in range(150):
        try:
            client.list_buckets()
            break
        except Exception:
            time.sleep(0.2)
    client.create_bucket(Bucket="bench-lake")
    return proc, {"endpoint_url": ep, "region": "us-east-1", "key": "testing",
                  "secret": "testing", "allow_http": True, "path_style": True}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--s3", action="store_true", help="write to a moto S3 server on loopback")
    ap.add_argument("--order", choices=("manifest", "shuffled"), default="manifest",
                    help="manifest: rows in build_manifest order (sorted by file name, so a batch "
                    "touches few tubes); shuffled: every batch touches every partition")
    args = ap.parse_args()

    from rootflow.lake import Lake, maintenance, query

    rows = _rows(args.images)
    if args.order == "manifest":
        rows.sort(key=lambda r: r["image_uri"])
    else:
        import random

        random.Random(0).shuffle(rows)
    proc = None
    if args.s3:
        proc, so = _moto()
        uri = "s3://bench-lake/lake"
    else:
        so = None
        uri = os.path.join(tempfile.mkdtemp(prefix="rf-lake-bench-"), "lake")
    try:
        lake = Lake(uri, storage_options=so)
        batches = [rows[i:i + args.batch] for i in range(0, len(rows), args.batch)]
        res: dict = {"images": len(rows), "batch": args.batch, "order": args.order,
                     "store": "s3 (moto)" if args.s3 else "local",
                     "columns": len(lake.schema("traits"))}
        for label in ("insert", "update"):
            t0 = time.perf_counter()
            for b in batches:
                lake.commit_traits(b)
            dt_s = time.perf_counter() - t0
            res[f"{label}_s"] = round(dt_s, 2)
            res[f"{label}_rows_per_s"] = round(len(rows) / dt_s)
        assert lake.read("traits", columns=["image_id"]).num_rows == len(rows)
        t0 = time.perf_counter()
        done = lake.done_image_ids(model_name="rootsam", model_version="bench-v1")
        res["done_image_ids_s"] = round(time.perf_counter() - t0, 3)
        assert len(done) == len(rows)
        t0 = time.perf_counter()
        con = query.duckdb_connection(lake)
        agg = con.execute("SELECT tube, depth, SUM(length_mm) FROM traits GROUP BY ALL").fetchall()
        res["duckdb_agg_s"] = round(time.perf_counter() - t0, 3)
        assert len(agg) > 0
        res["files_before_compact"] = len(lake.delta_table("traits").file_uris())
        t0 = time.perf_counter()
        maintenance.compact(uri, storage_options=so, tables=("traits",))
        res["compact_s"] = round(time.perf_counter() - t0, 2)
        res["files_after_compact"] = len(lake.delta_table("traits").file_uris())
        print(json.dumps(res))
    finally:
        if proc is not None:
            proc.terminate()


if __name__ == "__main__":
    main()
