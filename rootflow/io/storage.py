"""One way in for every URI: fsspec filesystems and the storage options each library needs.

rootflow talks to object storage through three libraries that each spell credentials and
endpoints differently: s3fs (fsspec), pyarrow's ``S3FileSystem`` and delta-rs (``deltalake``).
:class:`StorageOptions` holds one neutral description (endpoint, region, keys, path style,
plain HTTP) and renders it for each of them, so a job takes one ``--storage-option`` set and
every stage agrees.

Credentials never leave this module in logs or tables: :meth:`StorageOptions.redacted` is what
gets recorded in the ``runs`` table and printed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import fsspec

_SECRET_KEYS = {"key", "secret", "token", "aws_access_key_id", "aws_secret_access_key",
                "aws_session_token", "password"}

#: Loggers whose DEBUG records dump signed requests: botocore's string-to-sign and request
#: headers carry the session token (``X-Amz-Security-Token``) and the access key id.
_CREDENTIAL_DUMPING_LOGGERS = ("botocore.auth", "botocore.endpoint", "aiobotocore.endpoint")


class _NoRequestDumps(logging.Filter):
    """Drops the DEBUG records of :data:`_CREDENTIAL_DUMPING_LOGGERS`: a process logging at
    DEBUG (a job run with verbose logs, pytest's ``caplog``) must not write credentials."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.DEBUG


for _name in _CREDENTIAL_DUMPING_LOGGERS:
    _logger = logging.getLogger(_name)
    if not any(isinstance(f, _NoRequestDumps) for f in _logger.filters):
        _logger.addFilter(_NoRequestDumps())


@dataclasses.dataclass(frozen=True)
class StorageOptions:
    """Neutral object-storage settings; empty fields fall back to the environment.

    Attributes:
        endpoint_url: S3-compatible endpoint (``http://127.0.0.1:9000`` for a local server).
        region: bucket region.
        key / secret / token: credentials (never logged: see :meth:`redacted`).
        allow_http: permit plain HTTP endpoints (loopback test servers, MinIO on a LAN).
        path_style: use path-style addressing (``endpoint/bucket/key``), needed by moto/MinIO.
    """

    endpoint_url: str | None = None
    region: str | None = None
    key: str | None = None
    secret: str | None = None
    token: str | None = None
    allow_http: bool = False
    path_style: bool = False

    @classmethod
    def from_env(cls) -> StorageOptions:
        """Read ``AWS_*`` variables (the usual way clusters inject credentials)."""
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return cls(
            endpoint_url=endpoint,
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            key=os.environ.get("AWS_ACCESS_KEY_ID"),
            secret=os.environ.get("AWS_SECRET_ACCESS_KEY"),
            token=os.environ.get("AWS_SESSION_TOKEN"),
            allow_http=bool(endpoint and endpoint.startswith("http://")),
            path_style=bool(endpoint and endpoint.startswith("http://")),
        )

    @classmethod
    def from_mapping(cls, opts: Mapping[str, Any] | StorageOptions | None) -> StorageOptions:
        """Accept a StorageOptions, a plain dict with our field names, or None (environment)."""
        if opts is None:
            return cls.from_env()
        if isinstance(opts, StorageOptions):
            return opts
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(opts) - known)
        if unknown:
            raise ValueError(f"unknown storage option(s) {unknown}; valid: {sorted(known)}")
        return cls(**{k: v for k, v in opts.items()})

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the neutral fields (picklable; pass this to Ray tasks)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, False)}

    def redacted(self) -> dict[str, Any]:
        """The same dict with credentials replaced by ``***``: safe to log or store."""
        return {k: ("***" if k in _SECRET_KEYS else v) for k, v in self.to_dict().items()}

    # -- renderings per library -------------------------------------------------------------
    def s3fs(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` / ``fsspec.filesystem('s3', ...)``."""
        out: dict[str, Any] = {}
        if self.key:
            out["key"] = self.key
        if self.secret:
            out["secret"] = self.secret
        if self.token:
            out["token"] = self.token
        client: dict[str, Any] = {}
        if self.endpoint_url:
            out["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            out["client_kwargs"] = client
        if self.path_style:
            out["config_kwargs"] = {"s3": {"addressing_style": "path"}}
        return out

    def deltalake(self) -> dict[str, str]:
        """``storage_options`` for ``deltalake`` (delta-rs object_store keys, strings only).

        Conditional put (``etag``) lets concurrent writers commit safely on S3-compatible
        stores without a DynamoDB lock; delta-rs uses it when ``conditional_put`` is set.
        """
        out: dict[str, str] = {}
        if self.endpoint_url:
            out["AWS_ENDPOINT_URL"] = self.endpoint_url
        if self.region:
            out["AWS_REGION"] = self.region
        elif self.endpoint_url:
            out["AWS_REGION"] = "us-east-1"
        if self.key:
            out["AWS_ACCESS_KEY_ID"] = self.key
        if self.secret:
            out["AWS_SECRET_ACCESS_KEY"] = self.secret
        if self.token:
            out["AWS_SESSION_TOKEN"] = self.token
        if self.allow_http:
            out["AWS_ALLOW_HTTP"] = "true"
        if self.path_style:
            out["AWS_VIRTUAL_HOSTED_STYLE_REQUEST"] = "false"
        out["conditional_put"] = "etag"
        return out

    def pyarrow(self) -> Any:
        """A ``pyarrow.fs.S3FileSystem`` configured for this endpoint."""
        from pyarrow import fs as pafs

        kw: dict[str, Any] = {}
        if self.endpoint_url:
            scheme, _, host = self.endpoint_url.partition("://")
            kw["endpoint_override"] = host or scheme
            kw["scheme"] = scheme if host else "https"
        if self.region:
            kw["region"] = self.region
        elif self.endpoint_url:
            kw["region"] = "us-east-1"
        if self.key:
            kw["access_key"] = self.key
        if self.secret:
            kw["secret_key"] = self.secret
        if self.token:
            kw["session_token"] = self.token
        if self.path_style:
            kw["force_virtual_addressing"] = False
        return pafs.S3FileSystem(**kw)


StorageLike = StorageOptions | Mapping[str, Any] | None


def protocol(uri: str) -> str:
    """URI scheme (``s3``, ``gs``, ``file``...); bare paths are ``file``."""
    return uri.split("://", 1)[0] if "://" in uri else "file"


def is_remote(uri: str) -> bool:
    return protocol(uri) not in ("file", "local")


#: Attempts inside s3fs and botocore for one :func:`read_bytes` (each layer; 2 x 2 requests at
#: most). Their defaults (5 x 5) make one object that keeps answering 503 take ~35 s to give
#: up; the pipeline retries reads itself with jittered backoff
#: (``stages.read_with_retries``), so the inner layers only smooth over a blip.
READ_INNER_ATTEMPTS = 2


def filesystem(uri: str, storage: StorageLike = None, *,
               inner_attempts: int | None = None) -> fsspec.AbstractFileSystem:
    """The fsspec filesystem for ``uri`` (s3fs for ``s3://``, local otherwise).

    ``inner_attempts`` caps s3fs's and botocore's own retries (default: theirs).
    """
    proto = protocol(uri)
    if proto in ("s3", "s3a"):
        opts = StorageOptions.from_mapping(storage)
        kw = opts.s3fs()
        if inner_attempts is None:
            return fsspec.filesystem("s3", **kw)
        config = dict(kw.get("config_kwargs", {}))
        config["retries"] = {"max_attempts": inner_attempts, "mode": "standard"}
        kw["config_kwargs"] = config
        fs = fsspec.filesystem("s3", **kw)  # cached per kwargs: this instance is ours alone
        fs.retries = inner_attempts  # s3fs's own retry loop (a class attribute, default 5)
        return fs
    return fsspec.filesystem(proto)


def strip_protocol(uri: str) -> str:
    """Path as the filesystem object expects it (bucket/key for s3, absolute path for local)."""
    if protocol(uri) == "file":
        return os.path.abspath(uri.removeprefix("file://"))
    return uri.split("://", 1)[1]


def join(base: str, *parts: str) -> str:
    """Join URI parts with ``/`` (``os.path.join`` would break ``s3://``)."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def normalize(uri: str) -> str:
    """Canonical form: local paths absolute without ``file://``, remote URIs unchanged."""
    return strip_protocol(uri) if protocol(uri) == "file" else uri


def read_bytes(uri: str, storage: StorageLike = None) -> bytes:
    """The object's bytes (a few quick inner retries: see :data:`READ_INNER_ATTEMPTS`)."""
    fs = filesystem(uri, storage, inner_attempts=READ_INNER_ATTEMPTS)
    with fs.open(strip_protocol(uri), "rb") as f:
        return f.read()


def write_bytes(uri: str, data: bytes, storage: StorageLike = None) -> None:
    fs = filesystem(uri, storage)
    path = strip_protocol(uri)
    if not is_remote(uri):
        fs.makedirs(os.path.dirname(path), exist_ok=True)
    with fs.open(path, "wb") as f:
        f.write(data)


def exists(uri: str, storage: StorageLike = None) -> bool:
    return bool(filesystem(uri, storage).exists(strip_protocol(uri)))


def to_uri(uri: str, path: str) -> str:
    """Turn a path returned by ``fs.find``/``fs.ls`` back into a URI of ``uri``'s scheme."""
    proto = protocol(uri)
    return path if proto == "file" else f"{proto}://{path}"


# -- which URIs a run may read ---------------------------------------------------------------------
def default_allowed_prefixes(uri: str) -> list[str]:
    """Where a manifest at ``uri`` may point by default: its own scheme and bucket for object
    storage (``s3://bucket/``), its own folder for a local file (the folder itself when ``uri``
    is a folder)."""
    proto = protocol(uri)
    if proto == "file":
        path = strip_protocol(uri)
        folder = path if os.path.isdir(path) else os.path.dirname(path)
        return [folder.rstrip("/") + "/"]
    bucket = uri.split("://", 1)[1].split("/", 1)[0]
    return [f"{proto}://{bucket}/"]


def _canonical(uri: str) -> tuple[str, str]:
    """``(scheme, path)`` with local paths resolved (``..``, symlinks) and ``s3a`` read as s3."""
    proto = protocol(uri)
    if proto == "file":
        return "file", os.path.realpath(strip_protocol(uri))
    return ("s3" if proto == "s3a" else proto), uri.split("://", 1)[1]


def uri_allowed(uri: str, prefixes: list[str] | tuple[str, ...]) -> bool:
    """True when ``uri`` lies under one of ``prefixes`` (same scheme; path inside the prefix).

    Local paths are compared after resolving ``..`` and symlinks, so ``/data/../etc/passwd``
    is not under ``/data/``; remote keys containing a ``..`` segment are never allowed.
    """
    return allowed_checker(prefixes)(uri)


def allowed_checker(prefixes: list[str] | tuple[str, ...]) -> Callable[[str], bool]:
    """:func:`uri_allowed` for many URIs: the prefixes are resolved once (a manifest of 100k
    local paths would otherwise resolve its prefix 100k times)."""
    canon = [_canonical(p) for p in prefixes]

    def check(uri: str) -> bool:
        scheme, path = _canonical(uri)
        if scheme != "file" and "/../" in f"/{path}/":
            return False
        for p_scheme, p_path in canon:
            if p_scheme != scheme:
                continue
            if scheme == "file":
                p_path = p_path.rstrip("/")
                if path == p_path or path.startswith(p_path + "/") or p_path == "":
                    return True
            elif path.startswith(p_path) and (p_path.endswith("/") or path == p_path
                                              or path[len(p_path):].startswith("/")):
                return True
        return False

    return check
