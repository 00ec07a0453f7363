"""Small archives with known bad rows, for pipeline and job tests."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from rootflow.io import storage


@dataclasses.dataclass(frozen=True)
class Archive:
    root: str
    manifest_uri: str
    n_rows: int
    bad_ids: dict[str, str]  # image_id -> stage expected in its reject


def small_archive(root: str, *, n_images: int = 6, seed: int = 3, bad: bool = True,
                  storage_options: Any = None, height: int = 256, width: int = 320) -> Archive:
    """Synthesise ``n_images`` images, build their manifest, and (``bad``) add three bad rows:
    a missing file, a corrupt JPEG and a mask of the wrong size."""
    from rootflow.io.manifest import build_manifest, write_manifest
    from rootflow.synth import SynthConfig, generate_archive

    arch = storage.join(root, "archive")
    generate_archive(arch, config=SynthConfig(n_images=n_images, seed=seed, height=height,
                                               width=width),
                     storage_options=storage_options)
    built = build_manifest(arch, experiment_config=storage.join(arch, "experiment.yaml"),
                           storage_options=storage_options)
    table = built.table
    bad_ids: dict[str, str] = {}
    if bad:
        template = table.slice(0, 1).to_pylist()[0]
        extra = []
        missing = dict(template, image_id="missing-0001",
                       image_uri=storage.join(arch, "does_not_exist.jpg"),
                       file_name="does_not_exist.jpg", mask_uri=None)
        extra.append(missing)
        bad_ids["missing-0001"] = "read"
        corrupt_uri = storage.join(root, "corrupt", "corrupt.jpg")
        storage.write_bytes(corrupt_uri, b"\xff\xd8\xff\xe0 this is not really a jpeg",
                            storage_options)
        extra.append(dict(template, image_id="corrupt-0001", image_uri=corrupt_uri,
                          file_name="corrupt.jpg", mask_uri=None))
        bad_ids["corrupt-0001"] = "decode"
        import cv2
        import numpy as np

        ok, png = cv2.imencode(".png", np.zeros((10, 12), np.uint8))
        wrong_mask = storage.join(root, "corrupt", "wrong_size_mask.png")
        storage.write_bytes(wrong_mask, bytes(png), storage_options)
        extra.append(dict(template, image_id="wrongmask-0001", mask_uri=wrong_mask))
        bad_ids["wrongmask-0001"] = "decode_mask"
        table = pa.concat_tables([table, pa.Table.from_pylist(extra, schema=table.schema)])
    manifest_uri = storage.join(root, "manifest.parquet")
    write_manifest(table, manifest_uri, storage_options=storage_options)
    return Archive(root=root, manifest_uri=manifest_uri, n_rows=table.num_rows, bad_ids=bad_ids)


def counts_by_image(table: pa.Table, model_name: str) -> dict[str, int]:
    t = table.filter(pc.equal(table["model_name"], model_name))
    out: dict[str, int] = {}
    for i in t["image_id"].to_pylist():
        out[i] = out.get(i, 0) + 1
    return out


def accounting(lake: Any, run_id: str, producers: tuple[str, ...], arch: Archive) -> None:
    """Every manifest row ends, per producer, as exactly one traits row or one rejects row."""
    traits = lake.read("traits")
    rejects = lake.read("rejects")
    rejects = rejects.filter(pc.equal(rejects["run_id"], run_id))
    for p in producers:
        ok = counts_by_image(traits, p)
        bad = counts_by_image(rejects, p)
        assert all(v == 1 for v in ok.values()), f"duplicate traits rows for {p}"
        assert all(v == 1 for v in bad.values()), f"duplicate rejects rows for {p}"
        assert not set(ok) & set(bad), f"an image is both ok and rejected for {p}"
        assert len(ok) + len(bad) == arch.n_rows, (p, len(ok), len(bad), arch.n_rows)


def direct_archive(root: Path, n: int, height: int, width: int, seed: int = 0) -> str:
    """``n`` JPEGs with bright 'roots' drawn on soil-like noise, and their manifest (returned
    URI), written straight from the rows: ~1 ms an image, for scale tests and benchmarks (the
    synthetic archive costs ~0.1 CPU-s an image and caps n by its tube grid)."""
    import datetime as dt

    import cv2
    import numpy as np
    import pyarrow as pa

    from rootflow.io.manifest import MANIFEST_SCHEMA, write_manifest

    rng = np.random.default_rng(seed)
    img_dir = root / "archive"
    img_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    t0 = dt.datetime(2024, 5, 1)
    for i in range(n):
        img = rng.integers(90, 140, size=(height, width, 3), dtype=np.uint8)
        for _ in range(int(rng.integers(0, 4))):
            p1 = tuple(int(v) for v in rng.integers(0, (width, height)))
            p2 = tuple(int(v) for v in rng.integers(0, (width, height)))
            cv2.line(img, p1, p2, (230, 225, 215), int(rng.integers(1, 4)))
        name = f"T{i // 400:03d}_W{i % 20:02d}_S{i // 20 % 20:02d}.jpg"
        path = img_dir / f"{i:06d}_{name}"
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        path.write_bytes(bytes(buf))
        rows.append({
            "image_uri": str(path), "image_id": hashlib.sha256(str(path).encode()).hexdigest()[:20],
            "file_name": path.name, "experiment": "scale", "tube": i // 400, "window": i % 20,
            "session": i // 20 % 20, "captured_at": t0 + dt.timedelta(days=i // 8000),
            "year": 2024, "operator": None, "dpi": 100.0, "depth_cm": float(i % 20) * 1.35,
            "depth": int(i % 20 * 1.35 // 10 * 10), "mask_uri": None, "species": None,
            "treatment": None, "tile": None,
        })
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    uri = str(root / "manifest.parquet")
    write_manifest(table, uri)
    return uri


#: The job's per-commit progress line (rootflow.inference.pipeline.Progress.commit).
COMMIT_LINE = re.compile(
    r"commit (\d+): (\d+) rows so far; (\d+)/(\d+) images \((\d+)%\), ([\d.]+) images/s, "
    r"elapsed ((?:\d+:)?\d+:\d\d), left ((?:\d+:)?\d+:\d\d|\?)")


def _seconds(hms: str) -> int:
    s = 0
    for part in hms.split(":"):
        s = 60 * s + int(part)
    return s


def check_commit_lines(text: str, *, images: int, rows: int, commits: int,
                       min_lines: int = 2) -> list[tuple[int, ...]]:
    """The per-commit progress lines in ``text`` tell the truth: commit numbers and rows so
    far grow to the run's totals, images done never go back and reach the total, and the
    percentage, rate and time left agree with the other figures. Returns ``(commit, rows,
    done, total)`` per line."""
    lines = COMMIT_LINE.findall(text)
    assert len(lines) >= min_lines, f"{len(lines)} commit lines in:\n{text[-3000:]}"
    out = []
    for n, r, d, t, pct, rate, el, left in lines:
        n_, r_, d_, t_, rate_ = int(n), int(r), int(d), int(t), float(rate)
        assert t_ == images, (t_, images)
        assert 0 < d_ <= t_ and int(pct) == round(100 * d_ / t_), (d_, t_, pct)
        # rate = done / elapsed (elapsed printed to the second)
        assert abs(rate_ * _seconds(el) - d_) <= 0.5 * rate_ + 0.005 * _seconds(el) + 1e-6, \
            (rate, el, d)
        out.append((n_, r_, d_, t_))
        if d_ == t_:
            assert left == "0:00", left
    assert all(a[0] < b[0] and a[1] < b[1] and a[2] <= b[2]
               for a, b in zip(out, out[1:], strict=False)), out
    assert out[-1][0] == commits and out[-1][1] == rows and out[-1][2] == images, out
    return out
