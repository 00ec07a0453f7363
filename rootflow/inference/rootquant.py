"""RootQuant inference: a pure-PyTorch predictor and the Ray Data model stage around it.

:class:`RootQuantPredictor` turns images (any size, any dpi) into calibrated length (mm), area
(mm2) and presence per image: each image is resampled to the model's ``mm_per_px``, cut into
tiles, the tiles of a whole batch of images go through the network in chunks of ``tile_batch``
(so a 2550 x 2273 scan and a 640 x 480 frame share GPU batches) and the cell maps are summed
per tile on the device (:meth:`~rootflow.models.rootquant.RootQuant.summarize`), then per image
(:func:`rootflow.models.rootquant.aggregate_tiles`).

:class:`RootQuantStage` is the callable class of the stage contract (``contracts.md``): loaded
once in ``__init__``, ``__call__(batch) -> batch`` under ``torch.inference_mode()``, rows with an
``error`` pass through untouched, a row that fails sets ``error`` to
``"rootquant: <Type>: <msg>"`` and NaN/None in its outputs, and nothing is raised.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from rootflow import config as _config
from rootflow.io import storage
from rootflow.models import checkpoint
from rootflow.models import rootquant as rq

STAGE = "rootquant"
OUTPUT_COLUMNS = ("rootquant_length_mm", "rootquant_area_mm2", "rootquant_presence",
                  "rootquant_model_version", "rootquant_params")


@dataclasses.dataclass(frozen=True)
class RootQuantInferenceConfig:
    """Settings of the RootQuant stage (``InferConfig.rootquant`` in the pipeline).

    Attributes:
        checkpoint: URI of a RootQuant checkpoint written by :func:`rootflow.models.rootquant.save`
            (training exports one). Without one the stage runs a *randomly initialised* model
            (seeded, so its version ``rootquant@random-<backbone>`` means something): only for
            demos and plumbing tests, its numbers are meaningless.
        sha256: expected digest of the checkpoint (the full 64-hex sha256), checked first.
        backbone / mm_per_px / tile_px: the random model's settings (ignored with a checkpoint,
            whose own config defines the model).
        device: ``auto`` = CUDA when available, else CPU.
        amp: bf16 autocast on CUDA (ignored on CPU, where it is slower and less exact).
        tile_batch: tiles per forward pass (across images).
        presence_threshold: images whose presence probability is below this get length and
            area 0 (the hurdle decision); ``None`` reports the expected value everywhere.
    """

    checkpoint: str | None = None
    sha256: str | None = None
    backbone: str = "inception_resnet_v2"
    mm_per_px: float = 0.1
    tile_px: int | None = None
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: bool = True
    tile_batch: int = 32
    presence_threshold: float | None = 0.5


@dataclasses.dataclass(frozen=True)
class RootQuantPrediction:
    """One image's prediction.

    Attributes:
        length_mm / area_mm2: calibrated totals over the image (0 when judged empty).
        presence: probability that the image shows any root.
        n_tiles: tiles the image was cut into at the model scale.
        mm_per_px: the model's input scale the image was resampled to.
    """

    length_mm: float
    area_mm2: float
    presence: float
    n_tiles: int
    mm_per_px: float


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but no CUDA device is visible")
    return torch.device(name)


class RootQuantPredictor:
    """Calibrated per-image length/area/presence from a :class:`~rootflow.models.rootquant.RootQuant`.

    Args:
        model: the network (its config carries the input scale and tile size).
        device: ``auto``, ``cpu`` or ``cuda``.
        amp: bf16 autocast on CUDA.
        tile_batch: tiles per forward pass.
        presence_threshold: see :class:`RootQuantInferenceConfig`.
    """

    def __init__(self, model: rq.RootQuant, *, device: Literal["auto", "cpu", "cuda"] = "auto",
                 amp: bool = True, tile_batch: int = 32,
                 presence_threshold: float | None = 0.5) -> None:
        self.device = _device(device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.amp = bool(amp) and self.device.type == "cuda"
        self.tile_batch = max(1, int(tile_batch))
        self.presence_threshold = presence_threshold

    @classmethod
    def from_checkpoint(cls, uri: str, *, sha256: str | None = None,
                        storage_options: storage.StorageLike = None,
                        **kwargs: Any) -> RootQuantPredictor:
        """Load a checkpoint (sha256-checked, ``weights_only``, strict) and wrap it."""
        return cls(rq.load(uri, sha256=sha256, storage_options=storage_options), **kwargs)

    @property
    def version(self) -> str:
        return self.model.version

    def params(self) -> dict[str, Any]:
        """Settings that define the outputs (JSON-able; stored with each row)."""
        return {**self.model.params(), "presence_threshold": self.presence_threshold}

    @torch.inference_mode()
    def predict(self, image: np.ndarray, *, dpi: float) -> RootQuantPrediction:
        """One uint8 ``(H, W, 3)`` image taken at ``dpi``."""
        return self.predict_many([image], dpis=[dpi])[0]

    @torch.inference_mode()
    def predict_many(self, images: Sequence[np.ndarray], *,
                     dpis: Sequence[float]) -> list[RootQuantPrediction]:
        """Several images; their tiles share forward passes. Raises on the first bad image
        (the stage wraps this per row)."""
        if len(images) != len(dpis):
            raise ValueError(f"{len(images)} images but {len(dpis)} dpi values")
        prepared = [self.model.prepare(np.asarray(im), dpi=float(d))
                    for im, d in zip(images, dpis, strict=True)]
        return self._predict_tiles([p[0] for p in prepared], [p[1] for p in prepared])

    def _predict_tiles(self, tiles: Sequence[np.ndarray],
                       areas_mm2: Sequence[float]) -> list[RootQuantPrediction]:
        """Tiles (with context) and model-scale areas of several images -> predictions."""
        if not tiles:
            return []
        counts = [len(t) for t in tiles]
        stacked = torch.from_numpy(np.concatenate(tiles, axis=0))
        summary = torch.empty((stacked.shape[0], 3), dtype=torch.float32)
        for s in range(0, stacked.shape[0], self.tile_batch):
            chunk = stacked[s:s + self.tile_batch].to(self.device, non_blocking=True)
            if self.device.type == "cuda":
                chunk = chunk.contiguous(memory_format=torch.channels_last)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.amp):
                cells = self.model.forward_tiles(chunk).float()
            summary[s:s + len(chunk)] = self.model.summarize(cells).cpu()
        index = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        out_img = self.model.images_from_summary(
            summary, index, len(counts), torch.tensor(list(areas_mm2), dtype=torch.float32))
        length, area = out_img.length_mm.detach(), out_img.area_mm2.detach()
        presence = torch.sigmoid(out_img.presence_logit.detach().cpu())
        out = []
        for i, n in enumerate(counts):
            p = float(presence[i])
            empty = self.presence_threshold is not None and p < self.presence_threshold
            out.append(RootQuantPrediction(
                length_mm=0.0 if empty else float(length[i]),
                area_mm2=0.0 if empty else float(area[i]),
                presence=p, n_tiles=n, mm_per_px=float(self.model.config.mm_per_px)))
        return out


def _as_config(config: RootQuantInferenceConfig | Mapping[str, Any] | None
               ) -> RootQuantInferenceConfig:
    if isinstance(config, RootQuantInferenceConfig):
        return config
    return _config.from_dict(RootQuantInferenceConfig, dict(config or {}))


def model_version(config: RootQuantInferenceConfig | Mapping[str, Any], *,
                  storage_options: storage.StorageLike = None) -> str:
    """The version string the stage will write, known without building the model.

    It is ``rootquant@<sha256[:12]>`` of the checkpoint file, the same string
    :func:`rootflow.models.rootquant.load` gives, so skip/resume logic can compare versions
    before any actor starts. Reads (and, when ``sha256`` is given, verifies) the file.
    """
    cfg = _as_config(config)
    if not cfg.checkpoint:
        return _random_version(cfg)
    data = checkpoint.read_verified(cfg.checkpoint, sha256=cfg.sha256,
                                    storage_options=storage_options)
    return rq.version_from_sha256(checkpoint.sha256_bytes(data))


def _random_version(cfg: RootQuantInferenceConfig) -> str:
    return f"rootquant@random-{cfg.backbone}-{cfg.mm_per_px:g}mmpx-{cfg.tile_px or 'default'}"


def _random_model(cfg: RootQuantInferenceConfig) -> rq.RootQuant:
    """Seeded random-init model (demo/plumbing only): same settings give the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = rq.RootQuant(rq.RootQuantConfig(backbone=cfg.backbone, mm_per_px=cfg.mm_per_px,
                                                tile_px=cfg.tile_px))
    model.meta = {"version": _random_version(cfg), "random_init": True}
    return model


def _fail(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{STAGE}: {type(exc).__name__}: {msg}"[:500]


def _objects(values: Sequence[Any]) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = list(values)
    return out


class RootQuantStage:
    """Ray Data model stage: adds ``rootquant_length_mm``, ``rootquant_area_mm2``,
    ``rootquant_presence`` (float64), ``rootquant_model_version`` and ``rootquant_params`` (str).

    ``rootquant_params`` is a JSON string of the settings that define the numbers (backbone,
    ``mm_per_px``, tile size, presence threshold, checkpoint sha256): the calibration travels
    with every row.

    Args:
        config: a :class:`RootQuantInferenceConfig` or a mapping of its fields.
        storage_options: plain dict / :class:`~rootflow.io.storage.StorageOptions` for the
            checkpoint URI.
    """

    def __init__(self, config: RootQuantInferenceConfig | Mapping[str, Any], *,
                 storage_options: storage.StorageLike = None) -> None:
        cfg = _as_config(config)
        self.config = cfg
        kw: dict[str, Any] = {"device": cfg.device, "amp": cfg.amp, "tile_batch": cfg.tile_batch,
                              "presence_threshold": cfg.presence_threshold}
        if cfg.checkpoint:
            self.predictor = RootQuantPredictor.from_checkpoint(
                cfg.checkpoint, sha256=cfg.sha256, storage_options=storage_options, **kw)
        else:
            self.predictor = RootQuantPredictor(_random_model(cfg), **kw)
        self._params = json.dumps(self.predictor.params(), sort_keys=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            return self._run(batch)

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image"])
        errors: list[Any] = list(batch["error"]) if "error" in batch else [None] * n
        dpis = np.asarray(batch["dpi"], dtype=np.float64) if "dpi" in batch else np.full(n, np.nan)
        length = np.full(n, np.nan)
        area = np.full(n, np.nan)
        presence = np.full(n, np.nan)
        versions: list[str | None] = [None] * n
        params: list[str | None] = [None] * n

        todo: list[int] = []
        tiles: list[np.ndarray] = []
        areas: list[float] = []
        for i in range(n):
            if isinstance(errors[i], str) and errors[i]:
                continue
            try:
                d = float(dpis[i])
                if not (math.isfinite(d) and d > 0):
                    raise ValueError(f"dpi must be a positive number, got {d}")
                t, a = self.predictor.model.prepare(np.asarray(batch["image"][i]), dpi=d)
                tiles.append(t)
                areas.append(a)
                todo.append(i)
            except Exception as e:  # a bad row never fails the batch
                errors[i] = _fail(e)
        preds: list[RootQuantPrediction | BaseException] = []
        try:
            preds = list(self.predictor._predict_tiles(tiles, areas))
        except Exception:  # e.g. out of memory on the whole batch: retry one image at a time
            for t, a in zip(tiles, areas, strict=True):
                try:
                    preds.append(self.predictor._predict_tiles([t], [a])[0])
                except Exception as e:
                    preds.append(e)
        for i, p in zip(todo, preds, strict=True):
            if isinstance(p, BaseException):
                errors[i] = _fail(p)
                continue
            length[i], area[i], presence[i] = p.length_mm, p.area_mm2, p.presence
            versions[i] = self.predictor.version
            params[i] = self._params

        out = dict(batch)
        out["error"] = _objects(errors)
        out["rootquant_length_mm"] = length
        out["rootquant_area_mm2"] = area
        out["rootquant_presence"] = presence
        out["rootquant_model_version"] = _objects(versions)
        out["rootquant_params"] = _objects(params)
        return out
