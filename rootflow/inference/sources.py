"""Where a job's rows come from: a manifest URI, or an archive prefix listed afresh."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from rootflow.io import storage

MANIFEST_SUFFIXES = (".parquet", ".pq", ".csv")


def manifest_for_source(source: str, lake_uri: str, *, experiment_config: str | None = None,
                        storage_options: storage.StorageLike = None) -> str:
    """Return a manifest URI for ``source``.

    A manifest (``.parquet``/``.csv``) is used as is. An archive prefix is listed again (so images
    added since the last run are found) into ``<lake>/manifests/<source hash>/<time>.parquet``;
    its unparseable files are written beside it as ``<time>.rejects.parquet`` and counted.
    """
    if source.lower().endswith(MANIFEST_SUFFIXES):
        return source
    from rootflow.io.manifest import build_manifest, write_manifest

    built = build_manifest(source, experiment_config=experiment_config,
                           storage_options=storage_options)
    tag = hashlib.sha1(storage.normalize(source).encode()).hexdigest()[:12]
    stamp = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}"
    uri = storage.join(lake_uri, "manifests", tag, f"{stamp}.parquet")
    write_manifest(built.table, uri, storage_options=storage_options)
    rejects: Any = getattr(built, "rejects", None)
    if rejects is not None and len(rejects):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = rejects if isinstance(rejects, pa.Table) else pa.Table.from_pylist(list(rejects))
        fs = storage.filesystem(uri, storage_options)
        with fs.open(storage.strip_protocol(uri.replace(".parquet", ".rejects.parquet")), "wb") as f:
            pq.write_table(table, f)
    return uri
