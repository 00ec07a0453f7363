#!/usr/bin/env python
"""Files per partition and analyst query times before and after compaction (docs/lake.md).

    nice -n 5 .venv/bin/python benchmarks/lake_files.py --sessions 63      # 100 800 trait rows

A season as the pipeline writes it: 2 years x 20 tubes x 40 windows (10 depth bands of 4 cm);
each imaging session is one run that processes that session's 800 new images with two
producers (``rootsam`` and ``rootquant``) and commits them in batches of 2000 rows (the job's
``commit_every``), so every run adds one small file to each partition of its year. Measures,
on that lake as written (no compaction), after ``maintenance.compact`` and after Z-order
(``compact(zorder=True)``): data files, files per partition, bytes per file, and three analyst
queries through ``duckdb_connection`` (timed including the connection, i.e. building the
datasets): one tube's season, all tubes at one depth band, a model comparison. Then the same
season written with the post-run ``compact_touched`` the job now calls. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TUBES, WINDOWS = 20, 40


def _session_rows(session: int, traits: dict, rng) -> list[dict]:
    from rootflow.io.manifest import image_id_for

    year = 2021 if session % 2 else 2022
    when = dt.datetime(year, 5, 1) + dt.timedelta(days=7 * (session // 2))
    out = []
    for tube in range(1, TUBES + 1):
        for window in range(1, WINDOWS + 1):
            uri = (f"s3://lab/archive/EXP_T{tube:03d}_L{window:03d}_{when:%Y.%m.%d}_100000_"
                   f"{session:03d}_AB.jpg")
            base = {"image_uri": uri, "image_id": image_id_for(uri),
                    "file_name": uri.rsplit("/", 1)[1], "experiment": "EXP", "tube": tube,
                    "window": window, "session": session, "captured_at": when, "year": year,
                    "operator": "AB", "dpi": 150.0, "depth_cm": window * 1.0,
                    "depth": int(window // 4 * 4), **traits, "run_id": f"s{session}",
                    "processed_at": dt.datetime(2024, 1, 1), "params": "{}"}
            length = float(rng.gamma(2.0, 20.0))
            out.append({**base, "length_mm": length, "model_name": "rootsam",
                        "model_version": "sam-v1", "confidence": 0.9})
            out.append({**base, "length_mm": length, "model_name": "rootquant",
                        "model_version": "rq-v1",
                        "rootquant_length_mm": length * 0.95 + float(rng.normal(0, 3))})
    return out


def _write(uri: str, sessions: int, batch: int, post_run: bool) -> dict:
    import numpy as np

    from rootflow.lake import Lake, maintenance
    from rootflow.traits import measure

    mask = np.zeros((256, 256), bool)
    mask[20:230, 100:104] = True
    traits = measure(mask, dpi=150.0)
    rng = np.random.default_rng(0)
    lake = Lake(uri)
    t0 = time.perf_counter()
    n = 0
    for s in range(1, sessions + 1):
        rows = _session_rows(s, traits, rng)
        rows.sort(key=lambda r: r["image_uri"])  # manifest order
        for i in range(0, len(rows), batch):
            n += lake.commit_traits(rows[i:i + batch])
        if post_run:
            maintenance.compact_touched(lake)
    return {"rows": n, "write_s": round(time.perf_counter() - t0, 1)}


def _files(uri: str) -> dict:
    from rootflow.lake import Lake

    lake = Lake(uri)
    import pyarrow as pa

    add = pa.table(lake.delta_table("traits").get_add_actions(flatten=True)).to_pydict()
    sizes = add["size_bytes"]
    per: dict[tuple, int] = {}
    for y, t, d in zip(add["partition.year"], add["partition.tube"], add["partition.depth"],
                       strict=True):
        per[(y, t, d)] = per.get((y, t, d), 0) + 1
    counts = sorted(per.values())
    return {"files": len(sizes), "partitions": len(per),
            "files_per_partition_median": statistics.median(counts),
            "files_per_partition_max": counts[-1],
            "bytes_per_file_median": int(statistics.median(sizes)),
            "bytes_total": int(sum(sizes))}


QUERIES = {
    "one_tube_season": """
        SELECT depth, CAST(captured_at AS DATE) AS date, SUM(length_mm) AS length_mm
        FROM traits WHERE tube = 7 AND model_name = 'rootsam' GROUP BY ALL""",
    "one_depth_band_all_tubes": """
        SELECT tube, CAST(captured_at AS DATE) AS date, SUM(length_mm) AS length_mm
        FROM traits WHERE depth = 20 AND model_name = 'rootsam' GROUP BY ALL""",
    "model_comparison": """
        SELECT a.tube, corr(a.length_mm, b.rootquant_length_mm) AS r,
               AVG(b.rootquant_length_mm - a.length_mm) AS bias_mm, COUNT(*) AS n
        FROM traits a JOIN traits b USING (image_id)
        WHERE a.model_name = 'rootsam' AND b.model_name = 'rootquant' GROUP BY a.tube""",
}


def _queries(uri: str, repeat: int) -> dict:
    from rootflow.lake import query

    out = {}
    for name, sql in QUERIES.items():
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            con = query.duckdb_connection(uri)
            res = con.execute(sql).fetchall()
            times.append(time.perf_counter() - t0)
            assert res
        out[name + "_s"] = round(min(times), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=63, help="63 -> 100 800 trait rows")
    ap.add_argument("--batch", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=2, help="runs per query (best is kept)")
    ap.add_argument("--no-post-run", action="store_true",
                    help="skip the second lake written with post-run compaction")
    args = ap.parse_args()

    from rootflow.lake import maintenance

    root = tempfile.mkdtemp(prefix="rf-lake-files-")
    res: dict = {"sessions": args.sessions, "batch": args.batch}
    try:
        uri = os.path.join(root, "lake")
        res["written"] = _write(uri, args.sessions, args.batch, post_run=False)
        res["as_written"] = {**_files(uri), **_queries(uri, args.repeat)}
        t0 = time.perf_counter()
        maintenance.compact(uri, tables=("traits",))
        res["compact_s"] = round(time.perf_counter() - t0, 1)
        res["compacted"] = {**_files(uri), **_queries(uri, args.repeat)}
        t0 = time.perf_counter()
        maintenance.compact(uri, tables=("traits",), zorder=True)
        res["zorder_s"] = round(time.perf_counter() - t0, 1)
        res["z_ordered"] = {**_files(uri), **_queries(uri, args.repeat)}
        print(json.dumps(res), flush=True)
        if not args.no_post_run:
            uri2 = os.path.join(root, "lake_post_run")
            res["post_run_compaction"] = {**_write(uri2, args.sessions, args.batch, True),
                                          **_files(uri2), **_queries(uri2, args.repeat)}
        print(json.dumps(res), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
