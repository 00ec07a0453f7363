"""One way to load and run any trained per-pixel segmenter (forest, U-Net) from a URI.

The processing job, ``rootflow segment`` and the evaluation code never branch on the model
kind themselves: they call :func:`load_segmenter` and use the :class:`Segmenter` protocol.
The kind is read from the file itself (a forest is a JSON document whose ``format`` starts with
``rootflow.forest/``; a U-Net is a ``torch.save`` zip whose ``format`` is ``rootflow.unet/...``),
so a model of the wrong kind, or a corrupt file, fails with a one-line
:class:`SegmenterLoadError` naming the URI instead of a traceback.

Every segmenter:

* takes a uint8 RGB image ``(H, W, 3)`` of any size (tiling is its own business, so a
  2550 x 2273 scan never holds all features or activations at once);
* returns a float32 root probability ``(H, W)`` in ``[0, 1]`` and thresholds it at its own
  ``threshold`` (saved with the model, chosen at training time);
* has a ``version``: a content hash of its weights plus every setting that changes the output
  (threshold, tile size, features), so the lake's ``model_version`` changes when the masks can.
"""

from __future__ import annotations

from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np

from rootflow.io import storage

SegmenterKind = Literal["forest", "unet"]
SEGMENTER_KINDS: tuple[str, ...] = ("forest", "unet")


class SegmenterLoadError(ValueError):
    """A model file cannot be used: unreadable, corrupt, or of another kind (names the URI)."""


@runtime_checkable
class Segmenter(Protocol):
    """What the job, the CLI and the evaluation need from a trained segmenter."""

    kind: str
    threshold: float

    @property
    def version(self) -> str:
        """``<kind>-<12 hex>``: hash of weights + output-changing settings."""
        ...

    def params(self) -> dict[str, Any]:
        """Settings recorded in each traits row's ``params`` (JSON-able)."""
        ...

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB ``(H, W, 3)`` -> float32 root probability ``(H, W)``."""
        ...

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Bool root mask ``(H, W)``: ``predict_proba(image) >= threshold``."""
        ...


def sniff_kind(data: bytes, *, uri: str = "<bytes>") -> str:
    """The segmenter kind of a model file's bytes ("forest" or "unet").

    Raises:
        SegmenterLoadError: the bytes are neither a rootflow forest nor a rootflow U-Net.
    """
    head = data[:4096].lstrip()
    if head.startswith(b"{"):
        import json

        try:
            fmt = str(json.loads(data.decode("utf-8")).get("format", ""))
        except (UnicodeDecodeError, ValueError, AttributeError) as e:
            raise SegmenterLoadError(f"{uri}: not a rootflow model (unreadable JSON: {e})") from None
        if fmt.startswith("rootflow.forest/"):
            return "forest"
        raise SegmenterLoadError(f"{uri}: JSON with format {fmt!r}, not a rootflow forest")
    if data[:2] == b"PK":  # torch.save zip
        return "unet"
    raise SegmenterLoadError(f"{uri}: not a rootflow forest (JSON) or U-Net (torch zip) file")


#: File names ``rootflow train forest|unet --out DIR`` gives the model inside ``DIR``.
MODEL_FILES = {"forest": "forest.json", "unet": "unet.pt"}


def resolve_model_uri(uri: str, *, storage_options: storage.StorageLike = None) -> str:
    """``uri`` itself, or the one model file inside it when ``uri`` is a training output folder.

    Raises:
        SegmenterLoadError: a folder with no model file, or with both kinds.
    """
    try:
        fs = storage.filesystem(uri, storage_options)
        path = storage.strip_protocol(uri).rstrip("/")
        if not fs.isdir(path):
            return uri
    except (OSError, ValueError):
        return uri
    found = [storage.join(uri, name) for name in MODEL_FILES.values()
             if fs.exists(f"{path}/{name}")]
    if len(found) != 1:
        raise SegmenterLoadError(f"{uri}: a folder with {len(found)} model files; expected one of "
                                 f"{sorted(MODEL_FILES.values())}")
    return found[0]


def load_segmenter(uri: str, *, sha256: str | None = None, kind: str | None = None,
                   storage_options: storage.StorageLike = None, device: str = "cpu",
                   num_threads: int | None = None) -> Segmenter:
    """Load a forest or U-Net from ``uri`` (local or object storage), verified by ``sha256``.

    Args:
        uri: the model file written by ``rootflow train forest|unet``.
        sha256: full 64-hex digest to check before parsing (None = do not check).
        kind: expected kind; a file of another kind is refused with a clear error.
        device: torch device for a U-Net.
        num_threads: threads for inference (LightGBM / torch); None = library default.

    Raises:
        SegmenterLoadError: unreadable, corrupt, wrong kind, or a digest mismatch.
    """
    from rootflow.models import checkpoint as ckptlib

    uri = resolve_model_uri(uri, storage_options=storage_options)
    try:
        data = ckptlib.read_verified(uri, sha256=sha256, storage_options=storage_options)
    except ckptlib.ChecksumError as e:
        raise SegmenterLoadError(str(e)) from None
    except (OSError, FileNotFoundError) as e:
        raise SegmenterLoadError(f"{uri}: cannot read model file ({e})") from None
    found = sniff_kind(data, uri=uri)
    if kind is not None and kind != found:
        raise SegmenterLoadError(f"{uri}: is a {found} model, expected a {kind} model")
    try:
        if found == "forest":
            from rootflow.models.forest import ForestSegmenter

            return ForestSegmenter.from_bytes(data, uri=uri, num_threads=num_threads)
        from rootflow.models.unet import UNetSegmenter

        return UNetSegmenter.from_bytes(data, uri=uri, device=device, num_threads=num_threads)
    except SegmenterLoadError:
        raise
    except Exception as e:  # corrupt content behind a valid header
        raise SegmenterLoadError(f"{uri}: corrupt or incompatible {found} model "
                                 f"({type(e).__name__}: {e})") from None
