"""Checkpoint I/O. Checkpoints are untrusted input: every load in rootflow goes through here.

* bytes come from a URI (local path or object storage) through :mod:`rootflow.io.storage`;
* the sha256 is checked when the caller knows it, *before* unpickling anything;
* ``torch.load(weights_only=True)`` (no arbitrary code);
* keys are matched strictly and a mismatch names the missing and unexpected keys (sam2's own
  ``_load_checkpoint`` raises a bare ``RuntimeError``; ours says what is wrong).
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from rootflow.io import storage

if TYPE_CHECKING:  # torch is imported where it is used: a forest needs only read_verified,
    import torch  # and importing torch costs seconds of actor start-up


class ChecksumError(ValueError):
    """The bytes at a URI do not have the sha256 the caller expected."""


class CheckpointMismatchError(RuntimeError):
    """A state dict does not fit the module it is loaded into."""

    def __init__(self, what: str, missing: Iterable[str], unexpected: Iterable[str],
                 shape_mismatch: Iterable[str] = ()) -> None:
        self.missing = sorted(missing)
        self.unexpected = sorted(unexpected)
        self.shape_mismatch = sorted(shape_mismatch)
        parts = [f"checkpoint does not fit {what}:"]
        for label, keys in (("missing keys", self.missing), ("unexpected keys", self.unexpected),
                            ("shape mismatches", self.shape_mismatch)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... (+{len(keys) - 12} more)" if len(keys) > 12 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        super().__init__(" ".join(parts))


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_sha256(digest: str) -> str:
    """``digest`` lower-cased if it is a full sha256 (64 hex digits), else ``ValueError``.

    A prefix is never accepted: 8 hex digits are 32 bits, which a forged checkpoint can match
    by brute force in minutes.
    """
    d = str(digest).strip().lower()
    if len(d) != 64 or any(c not in "0123456789abcdef" for c in d):
        raise ValueError(f"sha256 must be the full 64-hex digest (as printed by sha256sum), "
                         f"got {digest!r} ({len(d)} characters)")
    return d


def read_verified(uri: str, *, sha256: str | None = None,
                  storage_options: storage.StorageLike = None) -> bytes:
    """Read a file and check its sha256 (the full 64-hex digest; see :func:`check_sha256`).

    Raises:
        ValueError: ``sha256`` is given but is not a full 64-hex digest (checked before any
            byte is read).
        ChecksumError: the file's digest differs.
    """
    want = check_sha256(sha256) if sha256 else None
    data = storage.read_bytes(uri, storage_options)
    if want is not None:
        got = sha256_bytes(data)
        if got != want:
            raise ChecksumError(f"sha256 mismatch for {uri}: expected {want}, got {got}")
    return data


def load(uri: str, *, sha256: str | None = None,
         storage_options: storage.StorageLike = None) -> Any:
    """Load a checkpoint object with ``weights_only=True`` after an optional sha256 check."""
    data = read_verified(uri, sha256=sha256, storage_options=storage_options)
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def save(obj: Any, uri: str, *, storage_options: storage.StorageLike = None) -> str:
    """Save ``obj`` (tensors, plain containers, str/int/float) to ``uri``; returns its sha256."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    storage.write_bytes(uri, data, storage_options)
    return sha256_bytes(data)


def load_state_dict_strict(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *,
                           what: str | None = None, prefix: str = "") -> None:
    """Load ``state`` into ``module`` (or its sub-tree at ``prefix``), strictly.

    Raises:
        CheckpointMismatchError: naming missing, unexpected and wrongly shaped keys.
    """
    target = {k: v for k, v in module.state_dict().items() if k.startswith(prefix)}
    missing = set(target) - set(state)
    unexpected = set(state) - set(target)
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
              for k in set(target) & set(state)
              if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(target[k].shape)]
    if missing or unexpected or shapes:
        raise CheckpointMismatchError(what or type(module).__name__, missing, unexpected, shapes)
    module.load_state_dict(dict(state), strict=not prefix)
