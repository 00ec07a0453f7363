"""RootQuant: root length (mm) and projected area (mm2) regressed straight from an image.

The fast path of rootflow: no mask, one calibrated number per trait per image. Three design
decisions shape this module; ``docs/rootquant.md`` gives the reasoning at more length.

**Calibration by construction (fixed input scale, tile and sum).** Every image is first
resampled to one physical scale, ``mm_per_px`` (from its own ``dpi``), then cut into
non-overlapping ``tile_px`` tiles. The network predicts each tile's length and area and the
image's value is the *sum* over tiles. Length and area are additive over disjoint regions, so
a scene photographed at 150 dpi and at 300 dpi reaches the network as (nearly) the same pixels
and gives the same millimetres, and an image twice as large gives twice the length. Tiles do
not overlap on purpose: overlap would count the roots in the shared strip twice. Partial tiles
at the border are padded with the normalisation mean (zero after normalising), which contains
no root, and the model is trained with exactly the same padding.

**Zero-inflated, noisy labels (a hurdle head per tile).** Many minirhizotron frames show no root
at all. Each tile gets three outputs: a presence logit ``z`` and the logs of the expected length
and area *given* presence, ``a_len`` and ``a_area``. The tile's expected value is
``sigmoid(z) * exp(a)`` (the hurdle model ``E[y] = P(y > 0) E[y | y > 0]``); the image's is the
sum over its tiles, and the image's presence probability is ``1 - prod(1 - sigmoid(z_t))``.
An empty image can then be predicted as (almost exactly) zero, which a plain regressor on
zero-inflated targets does badly.

**Loss on log1p targets.** Hand-traced lengths are noisy roughly in proportion to their size,
and per-image lengths span orders of magnitude; a Huber loss on ``log1p(y / scale)`` of the
summed prediction treats a 10 % error alike on small and large images and is robust to the odd
bad tracing, while BCE on the image presence trains the hurdle. Zeros need no special case:
``log1p(0) = 0``.

The network takes ``uint8`` tiles and normalises them itself, so a checkpoint carries
everything that defines its input (scale, tile size, mean/std) in its ``config``.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rootflow import config as _config
from rootflow.io import storage
from rootflow.models import checkpoint
from rootflow.models.registry import WeightSpec, register_model

CHECKPOINT_FORMAT = "rootflow.rootquant/1"
_LOG_MIN, _LOG_MAX = -12.0, 14.0  # clamp on the per-tile log-amounts: exp(14) mm is ~1.2 km


@dataclasses.dataclass(frozen=True)
class RootQuantConfig:
    """Everything that defines a RootQuant network and its input (saved in every checkpoint).

    Attributes:
        backbone: any timm model name (``inception_resnet_v2`` default; ``resnet10t`` or
            ``mobilenetv3_small_050`` for CPU tests). Always built with ``pretrained=False``.
        mm_per_px: the physical scale every image is resampled to before tiling. This is the
            calibration: outputs are in mm because inputs are in known mm per pixel.
        tile_px: side of the square tiles the network sees; ``None`` takes the backbone's
            default input size (299 for inception_resnet_v2).
        head_hidden: width of the head's hidden layer.
        dropout: dropout before the head's last layer.
        mean / std: input normalisation; ``None`` takes the backbone's pretrained config.
        length_scale_mm / area_scale_mm2: units of the log1p target transform (log1p(y/scale)).
        init_length_mm / init_area_mm2: the head's initial per-tile output given presence,
            so training starts from a plausible magnitude instead of exp(0) = 1.
        init_presence_logit: the head's initial per-tile presence logit. Positive (most
            tiles of a rooted archive hold some root) keeps the hurdle away from the "no root
            anywhere" start where sigmoid saturation starves every other gradient.
        backbone_weights_uri / backbone_weights_sha256: optional ImageNet (or user) weights
            for the backbone, read from a URI the user gives (``.pth``/``.pt`` through
            :func:`rootflow.models.checkpoint.load`, or ``.safetensors``), sha256-checked.
    """

    backbone: str = "inception_resnet_v2"
    mm_per_px: float = 0.1
    tile_px: int | None = None
    head_hidden: int = 256
    dropout: float = 0.1
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    length_scale_mm: float = 1.0
    area_scale_mm2: float = 1.0
    init_length_mm: float = 20.0
    init_area_mm2: float = 10.0
    init_presence_logit: float = 0.0
    backbone_weights_uri: str | None = None
    backbone_weights_sha256: str | None = None


@dataclasses.dataclass
class RootQuantOutput:
    """Per-image outputs of :meth:`RootQuant.forward` (all shape ``(B,)``)."""

    length_mm: torch.Tensor
    area_mm2: torch.Tensor
    presence_logit: torch.Tensor
    tile_raw: torch.Tensor  # (N_tiles, 3): presence logit, log length, log area per tile

    @property
    def presence(self) -> torch.Tensor:
        return torch.sigmoid(self.presence_logit)


# --------------------------------------------------------------------------------------------
# Input: calibration to a fixed scale, then tiles
# --------------------------------------------------------------------------------------------
def scale_factor(dpi: float, mm_per_px: float) -> float:
    """Resize factor that brings an image at ``dpi`` to ``mm_per_px`` (``> 1`` enlarges)."""
    if not (dpi and math.isfinite(dpi) and dpi > 0):
        raise ValueError(f"dpi must be a positive number, got {dpi!r}")
    return (25.4 / float(dpi)) / float(mm_per_px)


def to_model_scale(image: np.ndarray, *, dpi: float, mm_per_px: float) -> np.ndarray:
    """Resample a uint8 ``(H, W, 3)`` image taken at ``dpi`` to ``mm_per_px`` per pixel.

    ``INTER_AREA`` when shrinking (it averages, so thin roots fade rather than alias away) and
    ``INTER_LINEAR`` when enlarging. The output keeps at least one pixel per side.
    """
    import cv2

    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
    f = scale_factor(dpi, mm_per_px)
    h, w = image.shape[:2]
    nh, nw = max(1, round(h * f)), max(1, round(w * f))
    if (nh, nw) == (h, w):
        return np.ascontiguousarray(image)
    interp = cv2.INTER_AREA if f < 1 else cv2.INTER_LINEAR
    return cv2.resize(image, (nw, nh), interpolation=interp)


def tile_image(image: np.ndarray, *, tile_px: int, fill: Sequence[int] = (0, 0, 0),
               offset: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Cut a ``(H, W, 3)`` uint8 image into non-overlapping tiles ``(N, 3, tile_px, tile_px)``.

    Args:
        image: image already at the model scale.
        tile_px: tile side.
        fill: RGB value of the padding (the normalisation mean, so padding reads as "nothing").
        offset: ``(dy, dx)`` of padding added at the top/left before tiling; training draws it at
            random so the model does not learn where tile borders fall.
    """
    h, w = image.shape[:2]
    dy, dx = offset
    nty = max(1, math.ceil((h + dy) / tile_px))
    ntx = max(1, math.ceil((w + dx) / tile_px))
    canvas = np.empty((nty * tile_px, ntx * tile_px, 3), np.uint8)
    canvas[:] = np.asarray(fill, np.uint8)
    canvas[dy:dy + h, dx:dx + w] = image
    tiles = canvas.reshape(nty, tile_px, ntx, tile_px, 3).transpose(0, 2, 4, 1, 3)
    return np.ascontiguousarray(tiles.reshape(nty * ntx, 3, tile_px, tile_px))


# --------------------------------------------------------------------------------------------
# Head, aggregation, target transform, loss
# --------------------------------------------------------------------------------------------
class HurdleHead(nn.Module):
    """Features ``(N, C)`` -> ``(N, 3)``: presence logit, log length|presence, log area|presence."""

    def __init__(self, in_features: int, *, hidden: int = 256, dropout: float = 0.1,
                 init_length: float = 20.0, init_area: float = 10.0,
                 init_presence: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, 3)
        with torch.no_grad():
            self.fc2.weight.mul_(0.1)
            self.fc2.bias.copy_(torch.tensor([float(init_presence), math.log(init_length),
                                            math.log(init_area)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(F.gelu(self.fc1(x))))


def aggregate_tiles(tile_raw: torch.Tensor, image_index: torch.Tensor, n_images: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum tile hurdle outputs into images.

    Args:
        tile_raw: ``(N, 3)`` head outputs (presence logit, log length, log area) per tile.
        image_index: ``(N,)`` int64, the image each tile belongs to (``0 <= i < n_images``).
        n_images: B.

    Returns:
        ``(length (B,), area (B,), presence_logit (B,))`` in the units of the head (mm, mm2).
        The image presence logit is ``logit(1 - prod_t (1 - p_t))``, computed in log space.
        An image with no tiles gets length 0 and a very negative logit.
    """
    z = tile_raw[:, 0]
    amounts = torch.exp(tile_raw[:, 1:].clamp(_LOG_MIN, _LOG_MAX)) * torch.sigmoid(z)[:, None]
    sums = tile_raw.new_zeros((n_images, 2)).index_add(0, image_index, amounts)
    log_none = tile_raw.new_zeros(n_images).index_add(0, image_index, F.logsigmoid(-z))
    log_none = log_none.clamp(max=-1e-6)  # log P(no root in any tile) < 0
    presence_logit = torch.log(-torch.expm1(log_none)) - log_none
    return sums[:, 0], sums[:, 1], presence_logit


def target_transform(y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``log1p(y / scale)``: the space the regression loss lives in (zero stays zero)."""
    return torch.log1p(y.clamp(min=0) / scale)


def inverse_target_transform(t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Inverse of :func:`target_transform` (``expm1(t) * scale``)."""
    return torch.expm1(t) * scale


def rootquant_loss(out: RootQuantOutput, length_mm: torch.Tensor, area_mm2: torch.Tensor, *,
                   huber_delta: float = 1.0, area_weight: float = 1.0,
                   presence_weight: float = 1.0, presence_min_length_mm: float = 0.0,
                   length_scale_mm: float = 1.0, area_scale_mm2: float = 1.0
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Huber on log1p targets for length and area + BCE on presence.

    Args:
        out: model outputs for B images.
        length_mm / area_mm2: ``(B,)`` labels (>= 0; zeros are images without roots).
        huber_delta: Huber transition point, in log1p units (1.0 ~ a factor e).
        presence_min_length_mm: a label counts as "root present" when its length exceeds this
            (tracers leave specks on empty frames; this keeps them from flipping the label).

    Returns:
        ``(scalar loss, {"loss_length", "loss_area", "loss_presence"} as floats)``. An empty
        batch gives a zero loss that still has a graph.
    """
    if length_mm.numel() == 0:
        zero = out.tile_raw.sum() * 0.0
        return zero, {"loss_length": 0.0, "loss_area": 0.0, "loss_presence": 0.0}
    t_len = target_transform(length_mm, length_scale_mm)
    t_area = target_transform(area_mm2, area_scale_mm2)
    p_len = target_transform(out.length_mm, length_scale_mm)
    p_area = target_transform(out.area_mm2, area_scale_mm2)
    l_len = F.huber_loss(p_len, t_len, delta=huber_delta)
    l_area = F.huber_loss(p_area, t_area, delta=huber_delta)
    present = (length_mm > presence_min_length_mm).to(out.presence_logit.dtype)
    l_pres = F.binary_cross_entropy_with_logits(out.presence_logit, present)
    loss = l_len + area_weight * l_area + presence_weight * l_pres
    return loss, {"loss_length": float(l_len.detach()), "loss_area": float(l_area.detach()),
                  "loss_presence": float(l_pres.detach())}


def tile_loss(tile_raw: torch.Tensor, tile_length_mm: torch.Tensor, tile_area_mm2: torch.Tensor,
              *, huber_delta: float = 1.0, area_weight: float = 1.0,
              presence_weight: float = 1.0, presence_min_length_mm: float = 0.5,
              length_scale_mm: float = 1.0, area_scale_mm2: float = 1.0
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """Dense supervision: the hurdle loss of every tile whose own length/area are known.

    Tile labels come from masks (:func:`rootflow.training.labels.density_maps`). The same
    loss as :func:`rootquant_loss`, per tile instead of per image: Huber on ``log1p`` of the
    tile's expected value ``sigmoid(z) exp(a)`` and BCE of ``z`` against "this tile holds more
    than ``presence_min_length_mm`` of root" (a root clipping a tile's corner is not a
    presence call worth forcing).

    Args:
        tile_raw: ``(N, 3)`` head outputs.
        tile_length_mm / tile_area_mm2: ``(N,)`` tile labels; NaN where unknown (an image
            without a usable mask): those tiles are left out.

    Returns:
        ``(scalar loss, {"tile_loss_length", "tile_loss_area", "tile_loss_presence"})``; zero
        (with a graph) when no tile has a label.
    """
    known = torch.isfinite(tile_length_mm) & torch.isfinite(tile_area_mm2)
    if not bool(known.any()):
        zero = tile_raw.sum() * 0.0
        return zero, {"tile_loss_length": 0.0, "tile_loss_area": 0.0, "tile_loss_presence": 0.0}
    raw, y_len, y_area = tile_raw[known], tile_length_mm[known], tile_area_mm2[known]
    z = raw[:, 0]
    expected = torch.exp(raw[:, 1:].clamp(_LOG_MIN, _LOG_MAX)) * torch.sigmoid(z)[:, None]
    l_len = F.huber_loss(target_transform(expected[:, 0], length_scale_mm),
                         target_transform(y_len, length_scale_mm), delta=huber_delta)
    l_area = F.huber_loss(target_transform(expected[:, 1], area_scale_mm2),
                          target_transform(y_area, area_scale_mm2), delta=huber_delta)
    present = (y_len > presence_min_length_mm).to(z.dtype)
    l_pres = F.binary_cross_entropy_with_logits(z, present)
    loss = l_len + area_weight * l_area + presence_weight * l_pres
    return loss, {"tile_loss_length": float(l_len.detach()),
                  "tile_loss_area": float(l_area.detach()),
                  "tile_loss_presence": float(l_pres.detach())}


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
class RootQuant(nn.Module):
    """timm backbone (pooled features) + :class:`HurdleHead`, applied per tile, summed per image."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: RootQuantConfig | None = None) -> None:
        super().__init__()
        import timm

        cfg = config or RootQuantConfig()
        # pretrained=False always: weights only ever come from a URI the user gives.
        self.backbone = timm.create_model(cfg.backbone, pretrained=False, num_classes=0)
        pcfg = dict(getattr(self.backbone, "pretrained_cfg", {}) or {})
        tile_px = cfg.tile_px or int(pcfg.get("input_size", (3, 224, 224))[-1])
        mean = _rgb(cfg.mean or pcfg.get("mean", (0.485, 0.456, 0.406)))
        std = _rgb(cfg.std or pcfg.get("std", (0.229, 0.224, 0.225)))
        self.config = dataclasses.replace(cfg, tile_px=tile_px, mean=mean, std=std)  # resolved
        # Pooled feature width: ``head_hidden_size`` where timm has a pre-logits stage
        # (MobileNetV3's conv_head), ``num_features`` otherwise.
        backbone: Any = self.backbone
        width = getattr(backbone, "head_hidden_size", None) or backbone.num_features
        self.head = HurdleHead(int(width), hidden=cfg.head_hidden,
                               dropout=cfg.dropout, init_length=cfg.init_length_mm,
                               init_area=cfg.init_area_mm2,
                               init_presence=cfg.init_presence_logit)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.meta: dict[str, Any] = {}

    # -- input ---------------------------------------------------------------------------------
    @property
    def tile_px(self) -> int:
        return int(self.config.tile_px or 0)

    @property
    def fill(self) -> tuple[int, int, int]:
        """Padding colour: the normalisation mean, i.e. zero input after normalising."""
        m = self.config.mean or (0.0, 0.0, 0.0)
        return (round(m[0] * 255), round(m[1] * 255), round(m[2] * 255))

    def tiles_for(self, image: np.ndarray, *, dpi: float,
                  offset: tuple[int, int] = (0, 0)) -> np.ndarray:
        """uint8 ``(N, 3, t, t)`` tiles of ``image`` at this model's calibrated input scale."""
        scaled = to_model_scale(image, dpi=dpi, mm_per_px=self.config.mm_per_px)
        return tile_image(scaled, tile_px=self.tile_px, fill=self.fill, offset=offset)

    # -- forward -------------------------------------------------------------------------------
    def forward_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 or float-in-[0, 255] ``(N, 3, t, t)`` -> raw head outputs ``(N, 3)``."""
        x = (tiles.to(self.mean.dtype) / 255.0 - self.mean) / self.std
        return self.head(self.backbone(x)).float()

    def forward(self, tiles: torch.Tensor, image_index: torch.Tensor,
                n_images: int) -> RootQuantOutput:
        """Tiles of B images -> per-image :class:`RootQuantOutput` (tile predictions summed)."""
        raw = self.forward_tiles(tiles)
        length, area, logit = aggregate_tiles(raw, image_index.to(raw.device), n_images)
        return RootQuantOutput(length_mm=length, area_mm2=area, presence_logit=logit,
                               tile_raw=raw)

    # -- fine-tuning helpers -------------------------------------------------------------------
    def set_backbone_trainable(self, trainable: bool) -> None:
        """Freeze (head-only fine-tuning) or unfreeze the backbone."""
        for p in self.backbone.parameters():
            p.requires_grad_(trainable)

    def load_backbone_weights(self, uri: str, *, sha256: str | None = None,
                              storage_options: storage.StorageLike = None) -> list[str]:
        """Load ImageNet/user weights into the backbone strictly, minus its classifier.

        timm checkpoints carry the 1000-class classifier that ``num_classes=0`` removed; those
        keys (named by the backbone's ``pretrained_cfg['classifier']``) are dropped and
        returned. Anything else that does not fit raises
        :class:`~rootflow.models.checkpoint.CheckpointMismatchError` naming the keys.
        """
        state = _read_state_dict(uri, sha256=sha256, storage_options=storage_options)
        classifier = (getattr(self.backbone, "pretrained_cfg", {}) or {}).get("classifier")
        names = [classifier] if isinstance(classifier, str) else list(classifier or [])
        dropped = sorted(k for k in state if any(k == n or k.startswith(n + ".") for n in names))
        state = {k: v for k, v in state.items() if k not in set(dropped)}
        checkpoint.load_state_dict_strict(self.backbone, state,
                                          what=f"timm backbone {self.config.backbone!r}")
        return dropped

    @property
    def version(self) -> str:
        """``rootquant@<sha256[:12]>`` once loaded from a checkpoint; the model version in rows."""
        return str(self.meta.get("version") or "rootquant@unsaved")

    def params(self) -> dict[str, Any]:
        """What defines this model's outputs (recorded with every prediction)."""
        c = self.config
        return {"backbone": c.backbone, "mm_per_px": c.mm_per_px, "tile_px": c.tile_px,
                "aggregation": "sum_of_tiles", "head": "hurdle",
                "sha256": self.meta.get("sha256")}


def _rgb(values: Sequence[float]) -> tuple[float, float, float]:
    r, g, b = (float(v) for v in values)
    return (r, g, b)


def _read_state_dict(uri: str, *, sha256: str | None,
                     storage_options: storage.StorageLike) -> dict[str, torch.Tensor]:
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        data = checkpoint.read_verified(uri, sha256=sha256, storage_options=storage_options)
        return dict(load_safetensors(data))
    obj = checkpoint.load(uri, sha256=sha256, storage_options=storage_options)
    for key in ("state_dict", "model", "state_dict_ema"):  # common wrappers of timm/torch runs
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{uri} does not hold a state dict (got {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------
def build(config: RootQuantConfig | Mapping[str, Any] | None = None, *,
          storage_options: storage.StorageLike = None) -> RootQuant:
    """Build a RootQuant from a config, loading backbone weights when the config names them."""
    if config is None:
        cfg = RootQuantConfig()
    elif isinstance(config, RootQuantConfig):
        cfg = config
    else:
        cfg = _config.from_dict(RootQuantConfig, config)
    model = RootQuant(cfg)
    if cfg.backbone_weights_uri:
        model.load_backbone_weights(cfg.backbone_weights_uri, sha256=cfg.backbone_weights_sha256,
                                    storage_options=storage_options)
    return model


def save(model: RootQuant, uri: str, *, meta: Mapping[str, Any] | None = None,
         storage_options: storage.StorageLike = None) -> str:
    """Write a self-describing RootQuant checkpoint; returns its sha256.

    The file holds ``{"format", "config", "state_dict", "meta"}``: the resolved config (input
    scale, tile size, normalisation) travels with the weights, so a predictor never has to be
    told how the model was trained. ``meta`` must be JSON-able (it is stored as a JSON string,
    since ``weights_only`` unpickling accepts plain containers only).
    """
    cfg = _config.to_dict(model.config)
    cfg["backbone_weights_uri"] = None  # the weights are in this file now
    cfg["backbone_weights_sha256"] = None
    obj = {"format": CHECKPOINT_FORMAT, "config": cfg,
           "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
           "meta": json.dumps(dict(meta or {}), sort_keys=True, default=str)}
    return checkpoint.save(obj, uri, storage_options=storage_options)


def load(uri: str, *, sha256: str | None = None,
         storage_options: storage.StorageLike = None) -> RootQuant:
    """Load a RootQuant checkpoint (sha256 checked before unpickling, ``weights_only``, strict).

    The model's :attr:`RootQuant.version` becomes ``rootquant@<sha256[:12]>`` of the file's
    bytes, so every output row names exactly the weights that produced it.
    """
    data = checkpoint.read_verified(uri, sha256=sha256, storage_options=storage_options)
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping) or obj.get("format") != CHECKPOINT_FORMAT:
        got = obj.get("format") if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(f"{uri} is not a RootQuant checkpoint (format {got!r}, "
                         f"expected {CHECKPOINT_FORMAT!r})")
    cfg = _config.from_dict(RootQuantConfig, obj["config"])
    model = RootQuant(cfg)
    checkpoint.load_state_dict_strict(model, obj["state_dict"], what=f"RootQuant({cfg.backbone})")
    digest = checkpoint.sha256_bytes(data)
    model.meta = {**json.loads(obj.get("meta") or "{}"), "sha256": digest, "uri": uri,
                  "version": version_from_sha256(digest)}
    return model


def version_from_sha256(digest: str) -> str:
    """``rootquant@<sha256[:12]>``: the model version written with every prediction.

    Derived from the checkpoint's bytes alone, so the pipeline knows it before loading anything.
    """
    return f"rootquant@{digest[:12]}"


# --------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------
#: Preset weight specs: where the user keeps the ImageNet weights is theirs to say (no hub).
WEIGHTS: dict[str, WeightSpec] = {
    "inception_resnet_v2": WeightSpec(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                                      input_size=(299, 299),
                                      meta={"timm_tag": "inception_resnet_v2.tf_in1k"}),
    "resnet10t": WeightSpec(input_size=(176, 176), meta={"timm_tag": "resnet10t.c3_in1k"}),
}


@register_model("rootquant")
def rootquant(*, storage_options: storage.StorageLike = None, **kwargs: Any) -> RootQuant:
    """RootQuant with any timm backbone (default inception_resnet_v2, 299 px tiles)."""
    return build(RootQuantConfig(**kwargs), storage_options=storage_options)


@register_model("rootquant_small")
def rootquant_small(*, storage_options: storage.StorageLike = None, **kwargs: Any) -> RootQuant:
    """CPU-sized RootQuant: resnet10t backbone, 128 px tiles, narrow head."""
    kw: dict[str, Any] = {"backbone": "resnet10t", "tile_px": 128, "head_hidden": 128}
    kw.update(kwargs)
    return build(RootQuantConfig(**kw), storage_options=storage_options)
