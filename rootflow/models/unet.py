"""A U-Net root segmenter trained from scratch, and its tiled whole-scan inference.

Why a plain PyTorch U-Net and not ``segmentation_models_pytorch``
-----------------------------------------------------------------
The two U-Nets with published minirhizotron numbers, RootPainter (Smith et al. 2022) and SegRoot
(Wang et al. 2019, Dice 0.644 on the soybean tubes in ``shared/data/real``), are plain U-Nets
trained **from scratch**; SegRoot's best network, SegRoot-(8,5), has 8 channels at full resolution
and 5 levels, which is exactly our default ``widths=(8, 16, 32, 64, 128)``. Minirhizotron roots
are thin bright curves on soil, far from ImageNet's objects, and a few dozen annotated scans
train such a net in minutes on CPU. ``segmentation_models_pytorch`` would add a dependency whose
defaults download ImageNet weights (not possible here, and untracked data in a model), and its
usual encoders (ResNet-18 and up) cost an order of magnitude more compute per pixel than
SegRoot's net (~12k multiply-adds per pixel), which matters when a 2550 x 2273 scan must segment
in under a minute on two cores and train in 20 minutes. When a user does have encoder weights (ImageNet, or
a previous rootflow run), ``encoder=<timm name>`` builds any timm backbone
(``timm.create_model(name, features_only=True, pretrained=False)``) under the same decoder, and
``encoder_weights=<uri>`` loads them through :mod:`rootflow.models.checkpoint` (sha256,
``weights_only=True``, named mismatches). None are needed.

Shape of the network
--------------------
``plain``: ``len(widths)`` levels of two 3x3 conv + norm + ReLU blocks, 2x max-pool between
levels; the decoder upsamples (bilinear after a 1x1 channel projection, or a 2x2 transposed conv),
concatenates the skip of the same level and applies another conv block; a 1x1 conv gives one
logit per pixel. A timm encoder gives feature maps at reductions such as 2..32; the decoder is the
same, with one extra full-resolution skip (a conv block on the input) because a 2-px root lives
below the coarsest encoder stride. Inputs of any size are padded (reflect) to a multiple of the
total stride and the logits cropped back, so odd sizes work.

Tiled inference and why the overlap is what it is
--------------------------------------------------
:class:`UNetSegmenter` cuts a scan into ``tile`` x ``tile`` squares with
:func:`rootflow.inference.tiling.make_grid` and blends the per-tile probabilities with its
cosine ramps. A pixel's logit depends on a window of the input; near a tile edge part of that
window is missing, so edge predictions differ from untiled ones. The *theoretical* receptive
field of the default 5-level net is ~200 px (two 3x3 convs per level at strides 1-16, both
ways), but its *effective* field, where the input still has a noticeable influence (Luo et al.
2016), is a few tens of px. The default overlap is ``tile // 4`` (256 px at 1024): the cosine
ramp gives a tile's outer 64 px less than 15 % of the blend, and the whole band is wider than
the theoretical field, so stitched and untiled probabilities agree to a few hundredths at worst
(``benchmarks/unet_speed.py --seams`` measures it on a real scan; the tests check a small
trained net). Two details make that hold: tiles start on multiples of the net's total stride
(max-pooling is equivariant only to such shifts), and the scan is reflect-padded to a multiple
of the stride exactly as an untiled forward pads it. 1024 px tiles cover a 2550 x 2273 scan
with 3 x 3 tiles (1.6 x its pixels, the same count as with a 128 px overlap); a frame that fits
in one tile is segmented whole, with no seam at all.

Normalisation (per-channel mean/std of the training images, or the timm encoder's own) and the
probability threshold (0.5, or the one maximising pooled Dice on the validation split) are saved
in the checkpoint next to the weights, so a saved model segments exactly as it was validated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rootflow import config as rf_config
from rootflow.io import storage
from rootflow.models import checkpoint as ckpt_io

log = logging.getLogger(__name__)

FORMAT = "rootflow.unet/1"
NormKind = Literal["batch", "group", "none"]
UpKind = Literal["bilinear", "transpose"]


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """Architecture and inference settings of a U-Net (saved in its checkpoint).

    Attributes:
        encoder: ``"plain"`` (own conv blocks) or any timm model name (``resnet10t``,
            ``efficientnet_b0``, ...), always built with ``pretrained=False``.
        widths: channels per level, full resolution first (``plain``: one entry per level,
            SegRoot-(8,5) is the default; timm: decoder channels, level 0 = full resolution,
            the last entry repeats for deeper levels).
        norm: ``"batch"`` (fast, folds away at inference), ``"group"`` (batch-size independent,
            as RootPainter) or ``"none"``.
        groups: GroupNorm groups (clamped to the channel count).
        up: decoder upsampling: ``"bilinear"`` (1x1 projection, then bilinear) or
            ``"transpose"`` (2x2 transposed conv).
        tile: inference tile side in px.
        overlap: tile overlap in px (None = ``tile // 4``; see the module docstring).
        batch_tiles: tiles per forward pass at inference.
    """

    encoder: str = "plain"
    widths: tuple[int, ...] = (8, 16, 32, 64, 128)
    norm: NormKind = "batch"
    groups: int = 8
    up: UpKind = "bilinear"
    tile: int = 1024
    overlap: int | None = None
    batch_tiles: int = 1

    def __post_init__(self) -> None:
        if not self.widths or any(int(w) < 1 for w in self.widths):
            raise ValueError(f"widths must be positive channel counts, got {self.widths}")
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; valid: {sorted(NORMS)}")
        if self.up not in ("bilinear", "transpose"):
            raise ValueError(f"unknown up {self.up!r}; valid: 'bilinear', 'transpose'")
        if self.tile < 16:
            raise ValueError(f"tile must be >= 16 px, got {self.tile}")
        if self.overlap is not None and not 0 <= self.overlap < self.tile:
            raise ValueError(f"overlap must be in [0, tile={self.tile}), got {self.overlap}")

    @property
    def resolved_overlap(self) -> int:
        return self.tile // 4 if self.overlap is None else int(self.overlap)


# -- building blocks ---------------------------------------------------------------------------
def _batch(c: int, groups: int) -> nn.Module:
    return nn.BatchNorm2d(c)


def _group(c: int, groups: int) -> nn.Module:
    return nn.GroupNorm(math.gcd(c, max(1, groups)), c)


def _none(c: int, groups: int) -> nn.Module:
    return nn.Identity()


#: Normalisation layers by name (``UNetConfig.norm``).
NORMS: dict[str, Callable[[int, int], nn.Module]] = {"batch": _batch, "group": _group,
                                                      "none": _none}


class _ConvBlock(nn.Sequential):
    """Two (3x3 conv, norm, ReLU), 'same' padding."""

    def __init__(self, c_in: int, c_out: int, cfg: UNetConfig) -> None:
        bias = cfg.norm == "none"
        norm = NORMS[cfg.norm]
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, padding=1, bias=bias), norm(c_out, cfg.groups),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=bias), norm(c_out, cfg.groups),
            nn.ReLU(inplace=True))


class _Up(nn.Module):
    """Upsample the deeper map to the skip's size, concatenate, conv block."""

    def __init__(self, c_deep: int, c_skip: int, c_out: int, cfg: UNetConfig) -> None:
        super().__init__()
        self.kind = cfg.up
        if cfg.up == "transpose":
            self.proj: nn.Module = nn.ConvTranspose2d(c_deep, c_out, 2, stride=2)
        else:  # project at the low resolution (cheap), then interpolate
            self.proj = nn.Conv2d(c_deep, c_out, 1)
        self.block = _ConvBlock(c_out + c_skip, c_out, cfg)

    def forward(self, deep: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = self.proj(deep)
        if x.shape[-2:] != skip.shape[-2:]:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        return self.block(torch.cat([x, skip], dim=1))


class _PlainEncoder(nn.Module):
    """Conv blocks at full, 1/2, 1/4 ... resolution (``widths`` channels)."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        ws = [int(w) for w in cfg.widths]
        self.levels = nn.ModuleList(
            [_ConvBlock(3, ws[0], cfg)] + [_ConvBlock(ws[i - 1], ws[i], cfg)
                                          for i in range(1, len(ws))])
        self.channels = ws
        self.reductions = [2**i for i in range(len(ws))]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, level in enumerate(self.levels):
            if i:
                x = F.max_pool2d(x, 2)
            x = level(x)
            feats.append(x)
        return feats


class _TimmEncoder(nn.Module):
    """A timm backbone's feature maps (``features_only``) plus a full-resolution conv block.

    ``self.body`` is timm's features model, so its state dict keys are timm's own (up to the
    ``stages.0`` -> ``stages_0`` renaming of timm's ``FeatureListNet``, which
    :func:`load_encoder_weights` maps back).
    """

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        import timm

        if not timm.is_model(cfg.encoder):
            raise ValueError(f"unknown encoder {cfg.encoder!r}: use 'plain' or a timm model "
                             f"name (timm.list_models(); e.g. resnet10t, efficientnet_b0)")
        self.body = timm.create_model(cfg.encoder, features_only=True, pretrained=False)
        info: Any = self.body.feature_info
        reds = [int(r) for r in info.reduction()]
        if reds != sorted(set(reds)) or reds[0] < 2:
            raise ValueError(f"encoder {cfg.encoder!r} gives feature maps at reductions {reds}; "
                             f"a U-Net needs strictly increasing ones (a CNN, not a ViT)")
        self.stem = _ConvBlock(3, _width(cfg, 0), cfg)
        self.channels = [_width(cfg, 0)] + [int(c) for c in info.channels()]
        self.reductions = [1, *reds]
        pcfg = dict(getattr(self.body, "pretrained_cfg", {}) or {})
        self.default_mean = tuple(float(v) for v in pcfg.get("mean", (0.485, 0.456, 0.406)))
        self.default_std = tuple(float(v) for v in pcfg.get("std", (0.229, 0.224, 0.225)))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.stem(x), *self.body(x)]


def _width(cfg: UNetConfig, level: int) -> int:
    return int(cfg.widths[min(level, len(cfg.widths) - 1)])


class UNet(nn.Module):
    """Encoder + U-Net decoder: normalised float ``(B, 3, H, W)`` -> logits ``(B, 1, H, W)``."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder: _PlainEncoder | _TimmEncoder = (
            _PlainEncoder(cfg) if cfg.encoder == "plain" else _TimmEncoder(cfg))
        ch = self.encoder.channels  # encoder channels per level, full resolution first
        n = len(ch)
        out = list(ch) if cfg.encoder == "plain" else [_width(cfg, i) for i in range(n)]
        # from the deepest map up: block for level i merges level i+1's output with skip i
        self.decoder = nn.ModuleList(
            [_Up(ch[-1] if i == n - 2 else out[i + 1], ch[i], out[i], cfg)
             for i in range(n - 2, -1, -1)])
        self.head = nn.Conv2d(out[0], 1, 1)
        self.stride = int(self.encoder.reductions[-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        s = self.stride
        ph, pw = (-h) % s, (-w) % s
        if ph or pw:  # reflect where the input is large enough (roots continue), else replicate
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        feats = self.encoder(x)
        y = feats[-1]
        for up, skip in zip(self.decoder, reversed(feats[:-1]), strict=True):
            y = up(y, skip)
        return self.head(y)[..., :h, :w]


def build_unet(cfg: UNetConfig, *, encoder_weights: str | None = None,
               encoder_sha256: str | None = None,
               storage_options: storage.StorageLike = None) -> torch.nn.Module:
    """Build a U-Net (random init), optionally loading encoder weights from a URI.

    Args:
        cfg: architecture.
        encoder_weights: a timm state-dict file (``.pt``/``.pth``/``.safetensors``; ImageNet or
            the user's) for a timm ``encoder``, or a rootflow ``unet.pt`` with the same encoder.
        encoder_sha256: expected sha256 of that file (checked before unpickling).

    Raises:
        ValueError: unknown encoder name.
        rootflow.models.checkpoint.CheckpointMismatchError: the weights do not fit (names keys).
    """
    model = UNet(cfg)
    if encoder_weights:
        load_encoder_weights(model, encoder_weights, sha256=encoder_sha256,
                             storage_options=storage_options)
    return model


def load_encoder_weights(model: UNet, uri: str, *, sha256: str | None = None,
                         storage_options: storage.StorageLike = None) -> list[str]:
    """Load encoder weights strictly; returns the file's keys the encoder does not use.

    Every encoder parameter/buffer must be in the file with the right shape (else
    :class:`~rootflow.models.checkpoint.CheckpointMismatchError` names the keys). Keys of the
    file that no encoder tensor maps to (a timm classifier, ``conv_head``) are dropped and
    returned: a features-only backbone legitimately has fewer tensors than the full model.
    """
    state = _read_weights(uri, sha256=sha256, storage_options=storage_options)
    if state.get("format") == FORMAT:  # a previous rootflow run: its encoder sub-tree
        enc = str(state.get("config", {}).get("encoder"))
        if enc != model.config.encoder:
            raise ckpt_io.CheckpointMismatchError(
                f"encoder {model.config.encoder!r} ({uri} holds a {enc!r} U-Net)", [], [])
        sd = {k.removeprefix("encoder."): v for k, v in state["state_dict"].items()
              if k.startswith("encoder.")}
        ckpt_io.load_state_dict_strict(model.encoder, sd, what=f"U-Net encoder from {uri}")
        return []
    target = model.encoder.state_dict()
    if model.config.encoder == "plain":
        sd = {k.removeprefix("encoder."): v for k, v in state.items()}
        ckpt_io.load_state_dict_strict(model.encoder, sd, what=f"plain U-Net encoder ({uri})")
        return []
    # timm file -> body.<features-model key>; FeatureListNet flattens one level ('stages.0'
    # becomes 'stages_0'), so try each '_' of the first component as the original '.'
    mapped: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for key in target:
        if not key.startswith("body."):
            continue
        k = key[len("body."):]
        for cand in _original_keys(k):
            if cand in state:
                mapped[key] = state[cand]
                used.add(cand)
                break
    missing = [k for k in target if k.startswith("body.") and k not in mapped]
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(target[k].shape)}" for k, v in mapped.items()
              if tuple(v.shape) != tuple(target[k].shape)]
    if missing or shapes:
        raise ckpt_io.CheckpointMismatchError(f"timm encoder {model.config.encoder!r} ({uri})",
                                              missing, [], shapes)
    body: Any = model.encoder.body
    body.load_state_dict({k[len("body."):]: v for k, v in mapped.items()}, strict=True)
    dropped = sorted(set(state) - used)
    if dropped:
        log.info("encoder weights %s: %d unused keys dropped (%s...)", uri, len(dropped),
                 ", ".join(dropped[:5]))
    return dropped


def _original_keys(key: str) -> list[str]:
    head, _, rest = key.partition(".")
    out = [key]
    for i, ch in enumerate(head):
        if ch == "_":
            out.append(f"{head[:i]}.{head[i + 1:]}" + (f".{rest}" if rest else ""))
    return out


def _read_weights(uri: str, *, sha256: str | None,
                  storage_options: storage.StorageLike) -> dict[str, Any]:
    if uri.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        data = ckpt_io.read_verified(uri, sha256=sha256, storage_options=storage_options)
        return dict(load_safetensors(data))
    obj = ckpt_io.load(uri, sha256=sha256, storage_options=storage_options)
    if isinstance(obj, Mapping) and obj.get("format") == FORMAT:
        return dict(obj)
    for key in ("state_dict", "model", "state_dict_ema"):  # common wrappers of timm/torch runs
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping):
        raise ValueError(f"{uri} does not hold a state dict (got {type(obj).__name__})")
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


# -- checkpoint ----------------------------------------------------------------------------------
def _plain_meta(meta: Mapping[str, Any] | None) -> dict[str, Any]:
    """JSON round trip: only str/int/float/bool/None/list/dict reach ``torch.save``."""
    return dict(json.loads(json.dumps(dict(meta or {}), default=str)))


def checkpoint_dict(model: nn.Module, cfg: UNetConfig, *, threshold: float = 0.5,
                    mean: Sequence[float] = (0.5, 0.5, 0.5),
                    std: Sequence[float] = (0.25, 0.25, 0.25),
                    meta: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The object :func:`save_unet` writes (plain types + CPU tensors only)."""
    module = getattr(model, "module", model)
    return {
        "format": FORMAT,
        "config": rf_config.to_dict(cfg),
        "state_dict": {k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        "threshold": float(threshold),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "train": _plain_meta(meta),
    }


def save_unet(model: nn.Module, cfg: UNetConfig, uri: str, *, threshold: float = 0.5,
              meta: Mapping[str, Any] | None = None, mean: Sequence[float] | None = None,
              std: Sequence[float] | None = None,
              storage_options: storage.StorageLike = None) -> str:
    """Write a U-Net checkpoint to ``uri`` (local or object storage); returns its sha256.

    ``mean``/``std`` (0-1 RGB) default to the encoder's own (timm) or 0.5/0.25 (plain).
    """
    enc = getattr(getattr(model, "module", model), "encoder", None)
    m = mean if mean is not None else getattr(enc, "default_mean", (0.5, 0.5, 0.5))
    s = std if std is not None else getattr(enc, "default_std", (0.25, 0.25, 0.25))
    obj = checkpoint_dict(model, cfg, threshold=threshold, mean=m, std=s, meta=meta)
    return ckpt_io.save(obj, uri, storage_options=storage_options)


# -- inference -----------------------------------------------------------------------------------
def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An eval-mode copy with every BatchNorm of our conv blocks folded into its conv.

    Same outputs up to float rounding, less time on CPU (BatchNorm is a separate memory-bound
    pass over full-resolution activations). Always a copy, so the caller's model is never
    touched (validation wraps the live model during training) and may change layout freely.
    """
    import copy

    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    for block in fused.modules():
        if not isinstance(block, _ConvBlock):
            continue
        for i in range(len(block) - 1):
            conv, bn = block[i], block[i + 1]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                block[i] = fuse_conv_bn_eval(conv, bn)
                block[i + 1] = nn.Identity()
    return fused


class UNetSegmenter:
    """A trained U-Net as a :class:`rootflow.models.segmenters.Segmenter` (tiled, any size)."""

    kind = "unet"

    def __init__(self, model: nn.Module, cfg: UNetConfig, *, threshold: float = 0.5,
                 mean: Sequence[float] = (0.5, 0.5, 0.5),
                 std: Sequence[float] = (0.25, 0.25, 0.25), sha256: str | None = None,
                 device: str | torch.device = "cpu", train: Mapping[str, Any] | None = None,
                 ) -> None:
        self.cfg = cfg
        self.threshold = float(threshold)
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.sha256 = sha256
        self.device = torch.device(device)
        self.train_info = dict(train or {})
        self.model = getattr(model, "module", model).to(self.device).eval()
        # channels-last: oneDNN's fast CPU convolution layout (~2x here on 8-16 channel maps)
        self._net = fuse_for_inference(self.model).to(memory_format=torch.channels_last)
        # Tiles start on multiples of the net's total stride (max-pooling is only equivariant
        # to such shifts), so a pixel sees the same pooling grid in every tile and untiled.
        s = int(getattr(self.model, "stride", 1))
        self.tile = max(s, cfg.tile - cfg.tile % s)
        self.overlap = self.tile - max(s, (self.tile - cfg.resolved_overlap) // s * s)
        self.stride = s
        self._mean_t = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1) * 255.0
        self._std_t = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1) * 255.0
        self._version: str | None = None

    # -- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes, *, uri: str = "<bytes>", device: str = "cpu",
                   num_threads: int | None = None) -> UNetSegmenter:
        """Load a checkpoint written by :func:`save_unet` (``weights_only=True``, strict keys).

        ``num_threads`` sets torch's intra-op threads for this process (a global setting).

        Raises:
            SegmenterLoadError: not a rootflow U-Net, corrupt, or keys that do not fit
                (the message names the URI and the keys).
        """
        from rootflow.models.segmenters import SegmenterLoadError

        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise SegmenterLoadError(f"{uri}: not a readable U-Net checkpoint "
                                     f"({type(e).__name__}: {e})") from None
        if not isinstance(obj, Mapping) or obj.get("format") != FORMAT:
            fmt = obj.get("format") if isinstance(obj, Mapping) else type(obj).__name__
            raise SegmenterLoadError(f"{uri}: format {fmt!r} is not {FORMAT!r}")
        try:
            cfg = rf_config.from_dict(UNetConfig, obj["config"])
            model = UNet(cfg)
            ckpt_io.load_state_dict_strict(model, obj["state_dict"], what=f"U-Net ({uri})")
        except ckpt_io.CheckpointMismatchError as e:
            raise SegmenterLoadError(f"{uri}: {e}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise SegmenterLoadError(f"{uri}: corrupt U-Net checkpoint ({type(e).__name__}: "
                                     f"{e})") from None
        if num_threads:
            torch.set_num_threads(int(num_threads))
        return cls(model, cfg, threshold=float(obj.get("threshold", 0.5)),
                   mean=obj.get("mean", (0.5,) * 3), std=obj.get("std", (0.25,) * 3),
                   sha256=ckpt_io.sha256_bytes(data), device=device, train=obj.get("train"))

    @classmethod
    def load(cls, uri: str, *, sha256: str | None = None,
             storage_options: storage.StorageLike = None, device: str = "cpu",
             num_threads: int | None = None) -> UNetSegmenter:
        """Load from a URI (a ``unet.pt`` or a training output folder holding one)."""
        from rootflow.models.segmenters import load_segmenter

        seg = load_segmenter(uri, sha256=sha256, kind="unet", storage_options=storage_options,
                             device=device, num_threads=num_threads)
        assert isinstance(seg, UNetSegmenter)
        return seg

    # -- Segmenter protocol ------------------------------------------------------------------------
    @property
    def version(self) -> str:
        """``unet-<12 hex>``: the checkpoint file's sha256, or a hash of weights + settings."""
        if self.sha256:
            return f"unet-{self.sha256[:12]}"
        if self._version is None:
            h = hashlib.sha256()
            for k, v in sorted(self.model.state_dict().items()):
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
            h.update(json.dumps(self.params(include_version=False), sort_keys=True).encode())
            self._version = f"unet-{h.hexdigest()[:12]}"
        return self._version

    def params(self, *, include_version: bool = True) -> dict[str, Any]:
        """Everything that changes the masks (JSON-able), recorded in each traits row."""
        c = self.cfg
        out: dict[str, Any] = {"kind": self.kind, "encoder": c.encoder, "widths": list(c.widths),
                               "norm": c.norm, "up": c.up, "tile": self.tile,
                               "overlap": self.overlap, "threshold": self.threshold,
                               "mean": list(self.mean), "std": list(self.std)}
        if include_version:
            out["sha256"] = self.sha256
        return out

    def logits_tiles(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 ``(B, h, w, 3)`` -> float32 probabilities ``(B, h, w)``."""
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(tiles)).to(self.device)
            x = (x.permute(0, 3, 1, 2).float() - self._mean_t) / self._std_t
            x = x.contiguous(memory_format=torch.channels_last)
            p = torch.sigmoid(self._net(x)[:, 0].float())
        return p.cpu().numpy()

    def predict_proba(self, image: np.ndarray) -> np.ndarray:
        """uint8 RGB ``(H, W, 3)`` -> float32 root probability ``(H, W)`` (tiled, stitched)."""
        from rootflow.inference.tiling import apply_tiled

        img = np.asarray(image)
        if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
            raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {img.dtype} "
                             f"{img.shape}")
        h, w = img.shape[:2]
        t, s = self.tile, self.stride
        if h <= t and w <= t:  # one tile: the net pads to its stride itself
            return self.logits_tiles(img[None])[0]
        # Pad (reflect, as the net pads an untiled input) to a multiple of the stride and at
        # least a tile: the clamped last tile then also starts on the stride grid, and no tile
        # is padded with black by the tiler.
        ph = max(t, -(-h // s) * s) - h
        pw = max(t, -(-w // s) * s) - w
        if ph or pw:
            img = np.pad(img, ((0, ph), (0, pw), (0, 0)),
                         mode="reflect" if ph < h and pw < w else "edge")
        out = apply_tiled(self.logits_tiles, img, tile=t, overlap=self.overlap,
                          batch_size=max(1, self.cfg.batch_tiles))
        return out[:h, :w]

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Bool root mask ``(H, W)``: ``predict_proba(image) >= threshold``."""
        return self.predict_proba(image) >= self.threshold
