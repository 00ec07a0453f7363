"""Trained per-pixel segmenters (forest, U-Net) as producers of the processing job.

The model is loaded once per Ray actor through :func:`rootflow.models.segmenters.load_segmenter`
(the one way in for these models: kind sniffed from the file, sha256-checked, a wrong kind or a
corrupt file is a one-line :class:`~rootflow.models.segmenters.SegmenterLoadError`), then each
image of a batch is segmented on its own: a forest or a U-Net tiles internally, so batching
whole images would only add memory, and one image failing cannot take its neighbours with it.

Per image, :class:`SegmenterStage` adds ``<name>_mask_png`` (PNG 0/255, full size),
``<name>_confidence``, ``<name>_model_version`` and ``<name>_params`` (JSON), where ``<name>``
is the producer (``forest`` or ``unet``). The traits stage measures the mask exactly as it
measures RootSAM's and writes it beside RootSAM's under ``<lake>/masks/<name>/<version>/``.

Confidence is the **mean pixel certainty** ``mean(max(p, 1 - p))`` over the whole image, in
[0.5, 1]: 1 means every pixel was called with probability 0 or 1, 0.5 means the model could not
decide anywhere. It is defined for an image without roots (the mean probability inside the mask
is not), which is most frames early in a season.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from rootflow.inference.stages import _errors, _objects
from rootflow.io import storage
from rootflow.io.images import encode_png
from rootflow.models.segmenters import SEGMENTER_KINDS, Segmenter, SegmenterLoadError

_SHA256 = re.compile(r"[0-9a-f]{64}")

#: The CLI flag naming each kind's model, for error messages.
MODEL_FLAGS = {"forest": "--forest-model", "unet": "--unet-checkpoint"}


@dataclasses.dataclass(frozen=True)
class SegmenterInferenceConfig:
    """How the job loads one trained segmenter (``InferConfig.forest`` / ``InferConfig.unet``).

    Attributes:
        model: URI of the model file written by ``rootflow train forest|unet`` (or its output
            folder), local or on object storage.
        sha256: full 64-hex digest the file must have (None = not checked).
        num_threads: inference threads (LightGBM / torch); None = the library default, which
            follows the actor's ``OMP_NUM_THREADS`` (Ray sets it from the actor's ``num_cpus``).
        device: torch device for a U-Net (ignored by a forest).
        kind: the producer (``forest`` or ``unet``); the job fills it in, and a model file of
            the other kind is refused.
    """

    model: str | None = None
    sha256: str | None = None
    num_threads: int | None = None
    device: str = "cpu"
    kind: str | None = None

    def __post_init__(self) -> None:
        if self.kind is not None and self.kind not in SEGMENTER_KINDS:
            raise ValueError(f"unknown segmenter kind {self.kind!r}; choose from "
                             f"{list(SEGMENTER_KINDS)}")
        if self.sha256 is not None and not _SHA256.fullmatch(str(self.sha256).lower()):
            raise ValueError(f"{self.kind or 'segmenter'} sha256 must be the full 64-hex digest, "
                             f"got {self.sha256!r}")


def config_from(settings: Mapping[str, Any] | SegmenterInferenceConfig, *,
                kind: str) -> SegmenterInferenceConfig:
    """``InferConfig.forest``/``.unet`` (a plain dict) -> a checked config for producer ``kind``.

    Raises:
        ValueError: unknown keys, a malformed digest, or no model URI (naming the CLI flag).
    """
    from rootflow.config import from_dict

    if isinstance(settings, SegmenterInferenceConfig):
        cfg = dataclasses.replace(settings, kind=kind)
    else:
        cfg = from_dict(SegmenterInferenceConfig, {**settings, "kind": kind})
    if not cfg.model:
        raise ValueError(f"producer {kind!r} needs a model: pass {MODEL_FLAGS.get(kind, '')} URI "
                         f"(config key {kind}.model)")
    return cfg


def load(config: SegmenterInferenceConfig, *,
         storage_options: storage.StorageLike = None) -> Segmenter:
    """The segmenter ``config`` names (raises :class:`SegmenterLoadError` on any bad file)."""
    from rootflow.models.segmenters import load_segmenter

    if not config.model:
        raise SegmenterLoadError(f"no model URI given for {config.kind or 'the segmenter'}")
    return load_segmenter(config.model, sha256=config.sha256, kind=config.kind,
                          storage_options=storage_options, device=config.device,
                          num_threads=config.num_threads)


def model_version(config: SegmenterInferenceConfig, *,
                  storage_options: storage.StorageLike = None) -> str:
    """The version the job's actors will report, known on the driver before any starts.

    The model file is read once and loaded here, so its version comes from the segmenter's own
    logic (content hash of weights plus output-changing settings) and a corrupt or wrong-kind
    file fails before the run does any work.
    """
    return str(load(config, storage_options=storage_options).version)


def pixel_certainty(proba: np.ndarray) -> float:
    """``mean(max(p, 1 - p))`` in [0.5, 1] (see the module docstring)."""
    p = np.asarray(proba, dtype=np.float32)
    return float(np.mean(np.maximum(p, 1.0 - p))) if p.size else float("nan")


def segment_image(model: Segmenter, image: np.ndarray) -> tuple[np.ndarray, float]:
    """One uint8 RGB image -> (bool mask at full size, pixel certainty).

    Raises:
        ValueError: the image is not a non-empty uint8 ``(H, W, 3)`` array, or the model returned
            a probability map of another size.
    """
    img = np.asarray(image)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8 or 0 in img.shape:
        raise ValueError(f"expected a non-empty uint8 (H, W, 3) image, got {img.dtype} "
                         f"{img.shape}")
    proba = np.asarray(model.predict_proba(img))
    if proba.shape != img.shape[:2]:
        raise ValueError(f"model returned a {proba.shape} map for a {img.shape[:2]} image")
    return proba >= model.threshold, pixel_certainty(proba)


class SegmenterStage:
    """Ray Data model stage for a forest or U-Net; loads the model once in ``__init__``.

    Used through :class:`rootflow.inference.stages.ModelActor` (``run_guarded`` moves a row's
    failure here into ``<name>_error`` so the image's other producers still land). Rows whose
    ``error`` is set pass through; a row that fails gets ``error = "<name>: <Type>: <msg>"``
    and null outputs, and never fails the batch.

    Args:
        config: a :class:`SegmenterInferenceConfig` (or its dict) with ``kind`` set.
        storage_options: for ``s3://`` model URIs.
    """

    def __init__(self, config: SegmenterInferenceConfig | Mapping[str, Any], *,
                 storage_options: storage.StorageLike = None) -> None:
        if isinstance(config, Mapping):
            kind = str(config.get("kind") or "")
            config = config_from(config, kind=kind)
        if config.kind is None:
            raise ValueError("SegmenterStage needs config.kind ('forest' or 'unet')")
        self.name = config.kind
        self.model = load(config, storage_options=storage_options)
        self.version = str(self.model.version)
        self._params = json.dumps({**self.model.params(), "confidence": "mean max(p, 1-p)"},
                                  sort_keys=True, default=str)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ctx: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        if self.name == "unet":
            import torch

            ctx = torch.inference_mode()
        with ctx:
            return self._run(batch)

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        errors = _errors(batch)
        masks: list[bytes | None] = [None] * n
        conf = np.full(n, np.nan, np.float64)
        versions: list[str | None] = [None] * n
        params: list[str | None] = [None] * n
        for i in range(n):
            if errors[i] is not None:
                continue
            try:
                mask, c = segment_image(self.model, batch["image"][i])
                masks[i] = encode_png(mask)
            except Exception as e:
                msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
                errors[i] = f"{self.name}: {type(e).__name__}: {msg}"[:500]
                continue
            conf[i] = c
            versions[i] = self.version
            params[i] = self._params
        out = dict(batch)
        out["error"] = _objects(errors)
        out[f"{self.name}_mask_png"] = _objects(masks)
        out[f"{self.name}_confidence"] = conf
        out[f"{self.name}_model_version"] = _objects(versions)
        out[f"{self.name}_params"] = _objects(params)
        return out
