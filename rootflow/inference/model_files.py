"""Driver-side pre-flight of the RootSAM and RootQuant checkpoints a run is given.

The model actors load these files; without a check on the driver, a malicious pickle or a
wrong file would be refused in every actor and every image rejected, after Ray's start-up.
:func:`check_checkpoints` opens each file the way the actors will (``torch.load`` with
``weights_only=True``, after the sha256 check when a digest is given), with ``mmap=True`` for
local files so the tensors are mapped rather than read, and checks it with the loaders' own
validation:

* RootQuant: :func:`rootflow.models.rootquant.check_checkpoint` (format), its
  ``RootQuantConfig`` (unknown keys), and the state dict's keys and shapes against the model
  that config builds (:func:`rootflow.models.checkpoint.load_state_dict_strict` into a model
  built on the ``meta`` device: no memory, no weights);
* RootSAM: :meth:`rootflow.models.rootsam.RootSAMCheckpoint.from_dict` (format and fields), its
  SAM2.1 variant against the run's, and its base digest against the run's when the run's base
  is known without reading it (``--base-sha256``, or no base = random init). The delta's keys
  are checked in the actors, against the SAM2 model they build (too big to build here).

Every refusal is a :class:`ModelFileError` (a ``ValueError``): one line, exit 2 in the CLI.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import warnings
from typing import Any

from rootflow.io import storage

log = logging.getLogger(__name__)


class ModelFileError(ValueError):
    """A model file the run must not start with (unsafe, wrong kind, or not fitting)."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _refused_pickle(uri: str, e: BaseException) -> ModelFileError:
    """torch's weights-only refusal says which global the file wanted to run; keep that."""
    detail = next((ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln
                   or "Unsupported operand" in ln), _first_line(e))
    detail = detail.removeprefix("WeightsUnpickler error: ").split(" Please use", 1)[0]
    return ModelFileError(
        f"{uri} refused: it is not a plain weights file ({detail}); a checkpoint that needs "
        "full unpickling can run code and is never loaded")


def load_weights_only(uri: str, *, sha256: str | None = None,
                      storage_options: storage.StorageLike = None) -> Any:
    """``torch.load(weights_only=True, map_location="cpu")`` of a checkpoint, after its sha256
    check; a local file is memory-mapped (``mmap=True``), so its tensors are not read."""
    import torch

    from rootflow.models import checkpoint

    try:
        if not storage.is_remote(uri):
            path = storage.strip_protocol(uri)
            if sha256:
                want = checkpoint.check_sha256(sha256)
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 22), b""):
                        h.update(chunk)
                if h.hexdigest() != want:
                    raise checkpoint.ChecksumError(
                        f"sha256 mismatch for {uri}: expected {want}, got {h.hexdigest()}")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        data = checkpoint.read_verified(uri, sha256=sha256, storage_options=storage_options)
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refused_pickle(uri, e) from None
    except RuntimeError as e:  # not a torch file at all (zip or legacy format errors)
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise _refused_pickle(uri, e) from None
        raise ModelFileError(f"{uri} is not a checkpoint torch can read: {_first_line(e)}") \
            from None


def check_rootquant(uri: str, *, sha256: str | None = None,
                    storage_options: storage.StorageLike = None) -> None:
    """Refuse a RootQuant checkpoint the actors would refuse (see the module docstring)."""
    import torch

    from rootflow import config as _config
    from rootflow.models import checkpoint
    from rootflow.models import rootquant as rq

    obj = rq.check_checkpoint(load_weights_only(uri, sha256=sha256,
                                                storage_options=storage_options), uri)
    try:
        cfg = _config.from_dict(rq.RootQuantConfig, obj["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ModelFileError(f"{uri}: its RootQuant config is not usable: {_first_line(e)}") \
            from None
    try:
        with torch.device("meta"):
            model = rq.RootQuant(cfg)
    except Exception as e:  # a backbone that cannot be built without memory: the actors check
        log.debug("RootQuant %s: no meta-device model (%s); keys checked in the actors", uri, e)
        return
    state = obj.get("state_dict")
    if not isinstance(state, dict):
        raise ModelFileError(f"{uri}: RootQuant checkpoint without a state dict")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op"
        try:
            checkpoint.load_state_dict_strict(model, state, what=f"RootQuant({cfg.backbone})")
        except checkpoint.CheckpointMismatchError as e:
            raise ModelFileError(f"{uri}: {e}") from None


def check_rootsam(uri: str, *, variant: str, base_checkpoint: str | None,
                  base_sha256: str | None, sha256: str | None = None,
                  storage_options: storage.StorageLike = None) -> None:
    """Refuse a RootSAM checkpoint the actors would refuse (see the module docstring)."""
    from rootflow.models._sam2_configs import get_variant
    from rootflow.models.rootsam import RANDOM_INIT, RootSAMCheckpoint

    obj = load_weights_only(uri, sha256=sha256, storage_options=storage_options)
    ckpt = RootSAMCheckpoint.from_dict(obj, source=uri)
    try:
        trained_on, run = get_variant(ckpt.variant).name, get_variant(variant).name
    except KeyError as e:
        raise ModelFileError(f"{uri}: {str(e).strip(chr(34) + chr(39))}") from None
    if trained_on != run:
        raise ModelFileError(f"{uri} ({ckpt.version}) was fine-tuned on SAM2.1 {trained_on}, "
                             f"but the run builds SAM2.1 {run}: pass the matching variant")
    base = RANDOM_INIT if not base_checkpoint else (base_sha256 or "").lower() or None
    if base is not None and ckpt.base_sha256 != base and ckpt.base_sha256 == RANDOM_INIT:
        raise ModelFileError(f"{uri} ({ckpt.version}) was fine-tuned on a random-init SAM2.1 "
                             "(no base checkpoint), but the run loads a base: run it without "
                             "--base-checkpoint")
    if base is not None and ckpt.base_sha256 != base:
        raise ModelFileError(
            f"{uri} ({ckpt.version}) was fine-tuned on base {ckpt.base_sha256[:16]}, but the "
            f"run's base is {base[:16]}: pass the base it was trained on "
            f"(--base-checkpoint <uri> --base-sha256 {ckpt.base_sha256})")


def check_checkpoints(cfg: Any, storage_options: storage.StorageLike = None) -> None:
    """Check every RootSAM and RootQuant checkpoint of an ``InferConfig`` before the run.

    Raises:
        ModelFileError: a file that is unsafe (not weights-only), of the wrong kind or format,
            or that does not fit the model or the run's SAM2.1 base.
        ValueError / OSError: a missing file, a malformed or mismatching digest.
    """
    from rootflow.inference.pipeline import rootquant_config, rootsam_config

    if "rootquant" in cfg.producers:
        rq = rootquant_config(cfg)
        if rq.checkpoint:
            check_rootquant(rq.checkpoint, sha256=rq.sha256, storage_options=storage_options)
    if "rootsam" in cfg.producers:
        rs = rootsam_config(cfg)
        if rs.rootsam_checkpoint:
            check_rootsam(rs.rootsam_checkpoint, variant=rs.variant,
                          base_checkpoint=rs.base_checkpoint, base_sha256=rs.base_sha256,
                          sha256=rs.rootsam_sha256, storage_options=storage_options)
