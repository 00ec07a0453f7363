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

**Zero-inflated, noisy labels (a hurdle density map).** Many minirhizotron frames show no root
at all, and in those that do most of the area is soil. The head predicts, on a grid of small
cells (``cell_px``, 8 px = 1.6 mm at 0.2 mm/px), three maps: a presence logit ``z`` and the
amounts of length and area *given* presence, ``softplus(a) * unit``. A cell's expected value is
``sigmoid(z) * softplus(a) * unit`` (the hurdle model ``E[y] = P(y > 0) E[y | y > 0]``), a
tile's is the sum of its cells and an image's the sum of its tiles: the density-map regression
of object counting, so length and area are additive at every scale, from a cell to an archive.
An empty cell is predicted as (almost exactly) zero, which a plain regressor on zero-inflated
targets does badly. The image's presence comes from its predicted length per mm2 (an intensive
quantity, so it does not drift with image size: :func:`presence_from_density`).

**Geometry.** Tiles are cut with real image context around them, measured per backbone
(:func:`feature_geometry`), so the stride-``cell_px`` feature read for cell ``j`` is centred in
cell ``j`` (no resampling of valid-padded maps). ``head="pooled"`` is the seed's model instead:
global pooling, two outputs per tile (its Huber loss: ``huber_delta=1``).

**Loss.** Per image: squared error on ``log1p(y / scale)`` of the summed prediction (per-image
lengths span orders of magnitude; a 10 % error costs alike on small and large images) + BCE on
the image presence. Where a mask shows *where* the root is, every cell is supervised too
(:func:`cell_loss`): squared error on the cell amounts in units, on the tile sums, and BCE on
cell presence. Measured on the synthetic archive, this dense signal is what makes a small
network learn in minutes on CPU (docs/rootquant.md). The seed's Huber (``huber_delta=1``) is one
argument away; squared error is the default on measurement (:func:`regression_loss`).

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

# /3: head option (dense | pooled), aligned context tiles, size-free image presence.
# /2 (dense head stretched onto the cell grid, max-cell presence) and /1 (one output per
# tile) are refused with RootQuantFormatError: their geometry and presence differ.
CHECKPOINT_FORMAT = "rootflow.rootquant/3"
OLD_FORMATS = ("rootflow.rootquant/1", "rootflow.rootquant/2")
HEADS = ("dense", "pooled")
_POOLED_PRESENCE = 20.0  # the pooled head has no presence map: its one cell is always "present"
_DENSITY_EPS = 1e-6  # mm / mm2, keeps log(density) finite on empty images


class RootQuantFormatError(ValueError):
    """A file is not a RootQuant checkpoint of the format this code reads (named in the message)."""


@dataclasses.dataclass(frozen=True)
class RootQuantConfig:
    """Everything that defines a RootQuant network and its input (saved in every checkpoint).

    Attributes:
        backbone: any timm model name (``inception_resnet_v2`` default; ``resnet10t`` or
            ``mobilenetv3_small_050`` for CPU tests). Always built with ``pretrained=False``.
        mm_per_px: the physical scale every image is resampled to before tiling. This is the
            calibration: outputs are in mm because inputs are in known mm per pixel.
        tile_px: side of the square tiles the network sees; ``None`` takes the backbone's
            default input size rounded to a multiple of ``cell_px`` (296 for
            inception_resnet_v2). Must be a multiple of ``cell_px``.
        cell_px: side of the output cells, in input pixels: one of the backbone's feature
            reductions (8 by default: the density map is read from the stride-8 features, with
            the stride-32 features added for context).
        head_hidden: channels of the head's convolutions.
        dropout: channel dropout before the head's last convolution.
        mean / std: input normalisation; ``None`` takes the backbone's pretrained config.
        length_scale_mm / area_scale_mm2: units of the image-level log1p target transform
            (``log1p(y / scale)``).
        init_presence_logit: the head's initial cell presence logit (about the logit of the
            share of cells that hold root; -2 = 12 %).
        backbone_weights_uri / backbone_weights_sha256: optional ImageNet (or user) weights
            for the backbone, read from a URI the user gives (``.pth``/``.pt`` through
            :func:`rootflow.models.checkpoint.load`, or ``.safetensors``), sha256-checked.
        head: ``dense`` (hurdle density map over ``cell_px`` cells, :class:`DensityHead`) or
            ``pooled`` (the seed's model: global average pooling of the last features, two
            outputs per tile, :class:`PooledHead`). Both are summed over tiles per image.
        context_px / feature_offset: geometry of the dense head, resolved at construction
            (``None`` = measure it on the backbone, :func:`feature_geometry`): each tile is cut
            with ``context_px = (before, after)`` pixels of real image around it, and the
            stride-``cell_px`` feature map is read from index ``feature_offset`` on, so feature
            ``j`` is centred in cell ``j`` (within half a pixel). ``(0, 0)`` / ``0`` for pooled.
    """

    backbone: str = "inception_resnet_v2"
    mm_per_px: float = 0.1
    tile_px: int | None = None
    cell_px: int = 8
    head_hidden: int = 256
    dropout: float = 0.0
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    length_scale_mm: float = 1.0
    area_scale_mm2: float = 1.0
    init_presence_logit: float = -2.0
    backbone_weights_uri: str | None = None
    backbone_weights_sha256: str | None = None
    head: str = "dense"
    context_px: tuple[int, int] | None = None
    feature_offset: int | None = None


@dataclasses.dataclass
class RootQuantOutput:
    """Per-image outputs of :meth:`RootQuant.forward` (all shape ``(B,)``)."""

    length_mm: torch.Tensor
    area_mm2: torch.Tensor
    presence_logit: torch.Tensor
    tile_raw: torch.Tensor  # (N_tiles, 3, g, g): cell maps (presence logit, length, area)

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
               offset: tuple[int, int] = (0, 0),
               context: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Cut a ``(H, W, 3)`` uint8 image into non-overlapping tiles ``(N, 3, tile_px, tile_px)``.

    With ``context = (before, after)`` every tile comes with that many pixels of the image
    around it (``(N, 3, before + tile_px + after, ...)``): the *cores* still do not overlap
    (each pixel is counted in exactly one tile), the context only feeds the receptive fields of
    the border cells. Outside the image the context is ``fill``.

    Args:
        image: image already at the model scale.
        tile_px: tile side.
        fill: RGB value of the padding (the normalisation mean, so padding reads as "nothing").
        offset: ``(dy, dx)`` of padding added at the top/left before tiling; training draws it at
            random so the model does not learn where tile borders fall.
    """
    h, w = image.shape[:2]
    dy, dx = offset
    before, after = (int(c) for c in context)
    nty = max(1, math.ceil((h + dy) / tile_px))
    ntx = max(1, math.ceil((w + dx) / tile_px))
    canvas = np.empty((before + nty * tile_px + after, before + ntx * tile_px + after, 3),
                      np.uint8)
    canvas[:] = np.asarray(fill, np.uint8)
    canvas[before + dy:before + dy + h, before + dx:before + dx + w] = image
    if before == 0 and after == 0:
        tiles = canvas.reshape(nty, tile_px, ntx, tile_px, 3).transpose(0, 2, 4, 1, 3)
        return np.ascontiguousarray(tiles.reshape(nty * ntx, 3, tile_px, tile_px))
    side = before + tile_px + after
    out = np.empty((nty * ntx, 3, side, side), np.uint8)
    for i in range(nty):
        for j in range(ntx):
            win = canvas[i * tile_px:i * tile_px + side, j * tile_px:j * tile_px + side]
            out[i * ntx + j] = win.transpose(2, 0, 1)
    return out


def image_area_mm2(shape: Sequence[int], mm_per_px: float) -> float:
    """Area in mm2 of an image of ``shape`` (H, W, ...) at the model scale."""
    return float(shape[0]) * float(shape[1]) * float(mm_per_px) ** 2


_GEOMETRY: dict[tuple[Any, ...], tuple[int, int, int]] = {}


def _receptive_field(backbone: nn.Module, sub: nn.Module, size: int) -> tuple[int, int, int]:
    """Rows ``[lo, hi]`` of a ``size`` px input that the middle feature ``j`` of ``sub`` depends
    on (non-zero input gradient), and ``j``."""
    bb: Any = backbone
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        x = torch.randn(1, 3, size, size, requires_grad=True)
    p0 = [p.requires_grad for p in backbone.parameters()]
    for p in backbone.parameters():
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            bb.forward_features(x)
            fmap = _take_output(sub)
            j = int(fmap.shape[-1]) // 2
            fmap[0, :, j, j].sum().backward()
    finally:
        for p, r in zip(backbone.parameters(), p0, strict=True):
            p.requires_grad_(r)
        for m in backbone.modules():
            m.__dict__.pop("_rootquant_output", None)
    grad = x.grad[0].abs().sum(dim=(0, 2)) if x.grad is not None else torch.zeros(size)
    nz = torch.nonzero(grad > 0).flatten()
    if len(nz) == 0:
        raise ValueError("cannot locate the backbone's features: zero input gradient")
    return int(nz.min()), int(nz.max()), j


def feature_geometry(backbone: nn.Module, module: str, *, cell_px: int, tile_px: int,
                     key: tuple[Any, ...] | None = None) -> tuple[int, int, int]:
    """Where the stride-``cell_px`` features of ``backbone`` sit in the input, measured.

    The gradient of one interior feature (summed over channels) with respect to the input is
    non-zero exactly on its receptive field; on a probe input large enough to hold all of it
    (doubled until it does: 592 px for inception_resnet_v2, whose stride-8 features see 383 px),
    the midpoint of that support, minus ``cell_px`` times the feature's index, is the input
    position ``a0`` the first feature is centred on.
    Cell ``j`` of a tile is centred at ``(j + 0.5) * cell_px - 0.5``, so a tile cut with
    ``before`` pixels of context and features read from index ``k`` on line up when
    ``a0 + cell_px * k - before`` is that centre (to the nearest pixel), with at least one cell
    of real context before the tile; ``after`` is the least context that leaves ``k + g + 1``
    features (one spare cell after it). The receptive fields of border cells reach past the
    context into padding, so their gradient's weighted centre is pulled inward by a few pixels:
    measured on inception_resnet_v2 it stays inside the cell, corners included
    (``test_inception_cell_features_are_centred_in_their_cells``). Returns ``(before, after, k)``; ``(0, 0, 0)``-like
    for 'same'-padded backbones, a real margin for 'valid' ones (inception_resnet_v2).
    Cached per ``key`` (the result does not depend on the weights).
    """
    if key is not None and key in _GEOMETRY:
        return _GEOMETRY[key]
    sub = backbone.get_submodule(module)
    bb: Any = backbone
    was_training = backbone.training
    backbone.eval()
    try:
        size, a0 = tile_px, None
        while a0 is None:  # grow the probe until the receptive field fits inside it
            lo, hi, j = _receptive_field(backbone, sub, size)
            if (lo > 0 and hi < size - 1) or size >= 4096:
                a0 = (lo + hi) / 2.0 - cell_px * j
            size *= 2
        centre = (cell_px - 1) / 2.0
        k = 0
        while round(a0 + cell_px * k - centre) < cell_px:  # at least one cell of context
            k += 1
        before = int(round(a0 + cell_px * k - centre))
        g = tile_px // cell_px
        after = 0
        with torch.no_grad():
            for _ in range(8):
                side = before + tile_px + after
                bb.forward_features(torch.zeros(1, 3, side, side))
                have = int(_take_output(sub).shape[-1])
                if have >= k + g + 1:  # and one spare feature after the last cell
                    break
                after += cell_px * (k + g + 1 - have)
            else:  # pragma: no cover - a backbone whose map does not grow with its input
                raise ValueError(f"{module!r} does not give {k + g} features for any context")
    finally:
        backbone.train(was_training)
        for m in backbone.modules():
            m.__dict__.pop("_rootquant_output", None)
    out = (before, after, k)
    if key is not None:
        _GEOMETRY[key] = out
    return out


# --------------------------------------------------------------------------------------------
# Head, aggregation, target transform, loss
# --------------------------------------------------------------------------------------------
class DensityHead(nn.Module):
    """Two feature maps (fine: stride ``cell_px``; coarse: the backbone's last) -> cell maps
    ``(N, 3, h, w)``: presence logit, raw length, raw area per cell.

    The coarse map is projected, upsampled and added to the projected fine map (an FPN-style
    merge: the fine map says where thin structures are, the coarse one what they are), then a
    3x3 convolution and a 1x1 convolution give the three maps.
    """

    def __init__(self, fine_channels: int, coarse_channels: int, *, hidden: int = 256,
                 dropout: float = 0.0, init_presence: float = -2.0) -> None:
        super().__init__()
        self.fine = nn.Conv2d(fine_channels, hidden, 1)
        self.coarse = nn.Conv2d(coarse_channels, hidden, 1)
        self.mix = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Conv2d(hidden, 3, 1, bias=True)
        bias = self.out.bias
        assert bias is not None  # bias=True
        with torch.no_grad():
            self.out.weight.mul_(0.1)
            bias.copy_(torch.tensor([float(init_presence), 0.0, 0.0]))

    def forward(self, fine: torch.Tensor, coarse: torch.Tensor) -> torch.Tensor:
        x = self.fine(fine)
        c = self.coarse(coarse)
        if c.shape[-2:] != x.shape[-2:]:
            c = F.interpolate(c, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.out(self.drop(F.gelu(self.mix(F.gelu(x + c)))))


class PooledHead(nn.Module):
    """The seed's head: global average pooling of the last feature map, then a small MLP with
    two outputs per tile (raw length, raw area). Returned as ``(N, 3, 1, 1)`` maps of one cell
    per tile whose presence logit is a constant "present", so the hurdle algebra, the tile sums
    and the losses are shared with the dense head (amount = ``softplus(a) * unit``, unit from
    the whole tile: :func:`cell_units`)."""

    def __init__(self, channels: int, *, hidden: int = 256, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, hidden)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.out = nn.Linear(hidden, 2)
        with torch.no_grad():
            self.out.weight.mul_(0.1)
            self.out.bias.zero_()

    def forward(self, coarse: torch.Tensor) -> torch.Tensor:
        a = self.out(self.drop(F.gelu(self.fc(coarse.mean(dim=(2, 3))))))
        z = a.new_full((a.shape[0], 1), _POOLED_PRESENCE)
        return torch.cat([z, a], dim=1)[:, :, None, None]


def cell_units(config: RootQuantConfig) -> tuple[float, float]:
    """Units of the cell amounts ``(mm, mm2)``: half a cell side of length and a fifth of a
    cell of area, so a typical rooted cell holds 1-2 units at any ``mm_per_px``. For the pooled
    head the "cell" is the whole tile."""
    side_px = config.cell_px if config.head == "dense" else int(config.tile_px or config.cell_px)
    side_mm = side_px * config.mm_per_px
    return 0.5 * side_mm, 0.2 * side_mm * side_mm


def presence_from_density(length_mm: torch.Tensor, image_area_mm2: torch.Tensor,
                          calib: torch.Tensor) -> torch.Tensor:
    """Image presence logit from the predicted root length *per mm2 of image*:
    ``exp(calib[0]) * (log(length / area + eps) - calib[1])``.

    An intensive quantity, so the same scene statistics give the same presence on a 224 x 256
    frame and on a 56-tile scan (the maximum over cells grew with the number of cells). It
    agrees with the amounts by construction: presence > 0.5 iff the length density exceeds
    ``exp(calib[1])``; both calibration numbers are learnt by the presence loss.
    """
    density = length_mm.clamp(min=0) / image_area_mm2.clamp(min=1e-9)
    return torch.exp(calib[0]) * (torch.log(density + _DENSITY_EPS) - calib[1])


def cell_amounts(cell_raw: torch.Tensor, units: tuple[float, float]) -> torch.Tensor:
    """``(N, 3, h, w)`` raw maps -> expected ``(N, 2, h, w)`` length (mm) and area (mm2) per cell:
    ``sigmoid(z) * softplus(a) * unit``."""
    scale = cell_raw.new_tensor(units).view(1, 2, 1, 1)
    return torch.sigmoid(cell_raw[:, :1]) * F.softplus(cell_raw[:, 1:]) * scale


def summarize_tiles(cell_raw: torch.Tensor, units: tuple[float, float]) -> torch.Tensor:
    """``(N, 3, h, w)`` raw maps -> ``(N, 3)``: each tile's length, area and its highest cell
    presence logit. Small enough to keep for every tile of an archive."""
    sums = cell_amounts(cell_raw, units).sum(dim=(2, 3))
    return torch.cat([sums, cell_raw[:, 0].amax(dim=(1, 2))[:, None]], dim=1)


def aggregate_tiles(tile_summary: torch.Tensor, image_index: torch.Tensor, n_images: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum per-tile summaries (:func:`summarize_tiles`) into images.

    Args:
        tile_summary: ``(N, 3)``: length, area, highest cell presence logit per tile.
        image_index: ``(N,)`` int64, the image each tile belongs to (``0 <= i < n_images``).
        n_images: B.

    Returns:
        ``(length (B,), area (B,), presence_logit (B,))`` in mm and mm2. The image's presence
        logit is its most certain cell's (the max over its tiles; kept for diagnostics: the
        model's image presence is :meth:`RootQuant.image_presence_logit`). An image with no tiles gets
        length 0 and a very negative logit.
    """
    sums = tile_summary.new_zeros((n_images, 2)).index_add(0, image_index, tile_summary[:, :2])
    logit = tile_summary.new_full((n_images,), -30.0).scatter_reduce(
        0, image_index, tile_summary[:, 2], reduce="amax", include_self=True)
    return sums[:, 0], sums[:, 1], logit


def target_transform(y: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``log1p(y / scale)``: the space the regression loss lives in (zero stays zero)."""
    return torch.log1p(y.clamp(min=0) / scale)


def inverse_target_transform(t: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Inverse of :func:`target_transform` (``expm1(t) * scale``)."""
    return torch.expm1(t) * scale


def regression_loss(pred: torch.Tensor, target: torch.Tensor, delta: float | None, *,
                    reduction: str = "mean") -> torch.Tensor:
    """Squared error ``0.5 * e**2`` (``delta=None``: the default) or Huber with transition
    ``delta`` (the seed's loss; equal to squared error for ``|e| < delta``).

    Squared error is the default on measurement (docs/rootquant.md, noisy-label study, 3 seeds
    each, 810 steps): with 30 % of the per-image totals corrupted, Huber (delta 1) plus the
    presence term never left "predict no root" (length R² −0.24 ± 0.02) while squared error
    plus the presence term learnt in every seed (0.52 ± 0.06); on clean labels 0.66 ± 0.04
    against Huber's 0.38 ± 0.31 (0.51, 0.60, 0.04). A likely reason (not measured): Huber
    caps the gradient of every far-off cell at ``delta``, and a model stuck at zero learns
    from exactly those cells.
    """
    if delta is None:
        e = 0.5 * (pred - target) ** 2
        return e.mean() if reduction == "mean" else e
    return F.huber_loss(pred, target, delta=delta, reduction=reduction)


def rootquant_loss(out: RootQuantOutput, length_mm: torch.Tensor, area_mm2: torch.Tensor, *,
                   huber_delta: float | None = None, area_weight: float = 1.0,
                   presence_weight: float = 1.0, presence_min_length_mm: float = 0.0,
                   length_scale_mm: float = 1.0, area_scale_mm2: float = 1.0
                   ) -> tuple[torch.Tensor, dict[str, float]]:
    """Squared error (or Huber) on log1p targets for length and area + BCE on presence.

    Args:
        out: model outputs for B images.
        length_mm / area_mm2: ``(B,)`` labels (>= 0; zeros are images without roots).
        huber_delta: None = squared error (default); else the Huber transition point, in
            log1p units (1.0 ~ a factor e). See :func:`regression_loss`.
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
    l_len = regression_loss(p_len, t_len, huber_delta)
    l_area = regression_loss(p_area, t_area, huber_delta)
    present = (length_mm > presence_min_length_mm).to(out.presence_logit.dtype)
    l_pres = F.binary_cross_entropy_with_logits(out.presence_logit, present)
    loss = l_len + area_weight * l_area + presence_weight * l_pres
    return loss, {"loss_length": float(l_len.detach()), "loss_area": float(l_area.detach()),
                  "loss_presence": float(l_pres.detach())}


def cell_loss(cell_raw: torch.Tensor, cell_labels: torch.Tensor, units: tuple[float, float], *,
              huber_delta: float | None = None, area_weight: float = 1.0,
              presence_weight: float = 1.0, presence_min_length_mm: float = 0.05
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """Dense supervision: every cell whose own length/area are known (from a mask).

    Cell labels come from :func:`rootflow.training.labels.cell_sums` of the mask's density maps.
    Three terms, each for length and area (area weighted by ``area_weight``):

    * squared error (Huber with ``huber_delta``, :func:`regression_loss`) on the cell amounts
      in units (:func:`cell_units`), summed over a tile's cells and averaged over tiles: where
      the root is;
    * the same on the tile sums in units / ``g`` (a g x g grid; independent cell errors add up
      to ~g times a cell's): how much, without the cell terms' noise about exact borders;
    * BCE of the cell presence logit against "this cell holds more than
      ``presence_min_length_mm`` of root".

    Args:
        cell_raw: ``(N, 3, g, g)`` head outputs for N tiles.
        cell_labels: ``(N, 2, g, g)`` cell length/area; NaN for tiles without a mask (left out).

    Returns:
        ``(scalar loss, {"cell_loss_amount", "cell_loss_tile", "cell_loss_presence"})``; zero
        (with a graph) when no tile has labels.
    """
    names = ("cell_loss_amount", "cell_loss_tile", "cell_loss_presence")
    if cell_labels.shape[-2:] != cell_raw.shape[-2:] or cell_labels.shape[:2] != (
            cell_raw.shape[0], 2):
        raise ValueError(f"cell labels {tuple(cell_labels.shape)} do not fit the head's maps "
                         f"{tuple(cell_raw.shape)}")
    known = torch.isfinite(cell_labels).flatten(1).all(dim=1)
    if not bool(known.any()):
        return cell_raw.sum() * 0.0, dict.fromkeys(names, 0.0)
    raw, y = cell_raw[known], cell_labels[known]
    scale = raw.new_tensor(units).view(1, 2, 1, 1)
    e = cell_amounts(raw, units) / scale
    y = y / scale
    w = raw.new_tensor([1.0, area_weight])
    n, g = len(raw), raw.shape[-1]
    l_cell = (regression_loss(e, y, huber_delta, reduction="none").sum(dim=(2, 3)) * w
              ).sum() / n
    l_tile = (regression_loss(e.sum(dim=(2, 3)) / g, y.sum(dim=(2, 3)) / g, huber_delta,
                              reduction="none") * w).sum() / n
    present = (y[:, 0] * units[0] > presence_min_length_mm).to(raw.dtype)
    l_pres = F.binary_cross_entropy_with_logits(raw[:, 0], present)
    loss = l_cell + l_tile + presence_weight * l_pres
    return loss, {names[0]: float(l_cell.detach()), names[1]: float(l_tile.detach()),
                  names[2]: float(l_pres.detach())}


# --------------------------------------------------------------------------------------------
# The network
# --------------------------------------------------------------------------------------------
class RootQuant(nn.Module):
    """timm backbone + :class:`DensityHead`: per-tile cell maps, summed per tile and per image.

    The backbone is timm's full model (``num_classes=0``, so its state dict is timm's own
    minus the classifier and ImageNet weights load as they are); forward hooks on the modules
    of its ``feature_info`` collect the stride-``cell_px`` and the last feature maps.
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, config: RootQuantConfig | None = None) -> None:
        super().__init__()
        import timm

        cfg = config or RootQuantConfig()
        if cfg.head not in HEADS:
            raise ValueError(f"model.head must be one of {', '.join(HEADS)}; got {cfg.head!r}")
        # pretrained=False always: weights only ever come from a URI the user gives.
        self.backbone = timm.create_model(cfg.backbone, pretrained=False, num_classes=0)
        pcfg = dict(getattr(self.backbone, "pretrained_cfg", {}) or {})
        info = [dict(f) for f in getattr(self.backbone, "feature_info", None) or []]
        fine = [f for f in info if int(f["reduction"]) == cfg.cell_px]
        if not fine:
            raise ValueError(f"{cfg.backbone!r} has no feature map at reduction "
                             f"cell_px={cfg.cell_px}; it has "
                             f"{sorted({int(f['reduction']) for f in info})}")
        self._feature_modules = (str(fine[-1]["module"]), str(info[-1]["module"]))
        if cfg.tile_px is None:
            default = int(pcfg.get("input_size", (3, 224, 224))[-1])
            tile_px = max(cfg.cell_px, cfg.cell_px * round(default / cfg.cell_px))
        else:
            tile_px = int(cfg.tile_px)
        if tile_px % cfg.cell_px:
            raise ValueError(f"tile_px={tile_px} must be a multiple of cell_px={cfg.cell_px}")
        mean = _rgb(cfg.mean or pcfg.get("mean", (0.485, 0.456, 0.406)))
        std = _rgb(cfg.std or pcfg.get("std", (0.229, 0.224, 0.225)))
        for name in self._feature_modules:
            self.backbone.get_submodule(name).register_forward_hook(_keep_output)
        if cfg.head == "pooled":
            context, offset = (0, 0), 0
        elif cfg.context_px is not None and cfg.feature_offset is not None:
            context, offset = (int(cfg.context_px[0]), int(cfg.context_px[1])), int(cfg.feature_offset)
        else:
            before, after, offset = feature_geometry(
                self.backbone, self._feature_modules[0], cell_px=cfg.cell_px, tile_px=tile_px,
                key=(cfg.backbone, self._feature_modules[0], cfg.cell_px, tile_px))
            context = (before, after)
        self.config = dataclasses.replace(cfg, tile_px=tile_px, mean=mean, std=std,
                                          context_px=context, feature_offset=offset)  # resolved
        self.units = cell_units(self.config)
        self.head: nn.Module
        if cfg.head == "pooled":
            self.head = PooledHead(int(info[-1]["num_chs"]), hidden=cfg.head_hidden,
                                   dropout=cfg.dropout)
        else:
            self.head = DensityHead(int(fine[-1]["num_chs"]), int(info[-1]["num_chs"]),
                                    hidden=cfg.head_hidden, dropout=cfg.dropout,
                                    init_presence=cfg.init_presence_logit)
        # image presence from the length density: [log scale, log threshold density (mm/mm2)]
        self.presence_calib = nn.Parameter(torch.tensor([math.log(2.0), math.log(1e-3)]))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.meta: dict[str, Any] = {}

    @property
    def grid(self) -> int:
        """Cells per tile side (``tile_px // cell_px``; 1 for the pooled head)."""
        return self.tile_px // self.config.cell_px if self.config.head == "dense" else 1

    @property
    def label_cell_px(self) -> int:
        """Side of the cells the head's outputs cover (``cell_px``, or the tile when pooled)."""
        return self.config.cell_px if self.config.head == "dense" else self.tile_px

    @property
    def context(self) -> tuple[int, int]:
        """Pixels of image cut around every tile ``(before, after)`` (see :func:`tile_image`)."""
        c = self.config.context_px or (0, 0)
        return int(c[0]), int(c[1])

    @property
    def input_px(self) -> int:
        """Side of the network's input per tile: the tile plus its context."""
        return self.tile_px + sum(self.context)

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
        """uint8 ``(N, 3, s, s)`` tiles (with context, ``s = input_px``) of ``image`` at this
        model's calibrated input scale."""
        return self.prepare(image, dpi=dpi, offset=offset)[0]

    def prepare(self, image: np.ndarray, *, dpi: float,
                offset: tuple[int, int] = (0, 0)) -> tuple[np.ndarray, float]:
        """``(tiles, image area in mm2)``: what :meth:`forward` needs for one image."""
        scaled = to_model_scale(image, dpi=dpi, mm_per_px=self.config.mm_per_px)
        return self.tiles_of_scaled(scaled, offset=offset), image_area_mm2(
            scaled.shape, self.config.mm_per_px)

    def tiles_of_scaled(self, scaled: np.ndarray, *,
                        offset: tuple[int, int] = (0, 0)) -> np.ndarray:
        """Tiles (with context) of an image already at the model scale."""
        return tile_image(scaled, tile_px=self.tile_px, fill=self.fill, offset=offset,
                          context=self.context)

    def image_presence_logit(self, length_mm: torch.Tensor,
                             image_area_mm2: torch.Tensor) -> torch.Tensor:
        """Per-image presence logit from summed length and image area
        (:func:`presence_from_density`)."""
        return presence_from_density(length_mm, image_area_mm2.to(length_mm),
                                     self.presence_calib.float().to(length_mm.device))

    # -- forward -------------------------------------------------------------------------------
    def forward_tiles(self, tiles: torch.Tensor) -> torch.Tensor:
        """uint8 or float-in-[0, 255] ``(N, 3, t, t)`` -> raw cell maps ``(N, 3, g, g)``
        (presence logit, raw length, raw area; :func:`cell_amounts` turns them into mm/mm2)."""
        if tiles.shape[-1] != self.input_px or tiles.shape[-2] != self.input_px:
            raise ValueError(f"tiles of {tuple(tiles.shape[-2:])} px do not fit this model "
                             f"(tile {self.tile_px} px + context {self.context} = "
                             f"{self.input_px} px); cut them with tiles_for()")
        x = (tiles.to(self.mean.dtype) / 255.0 - self.mean) / self.std
        backbone: Any = self.backbone  # a timm model: forward_features is not on nn.Module
        backbone.forward_features(x)
        fine, coarse = (_take_output(backbone.get_submodule(n))
                        for n in self._feature_modules)
        if self.config.head == "pooled":
            return self.head(coarse).float()
        raw = self.head(fine, coarse).float()
        g, k = self.grid, int(self.config.feature_offset or 0)
        if raw.shape[-1] < k + g or raw.shape[-2] < k + g:
            raise ValueError(f"the backbone gave a {tuple(raw.shape[-2:])} feature map; "
                             f"cells {k}..{k + g - 1} were expected")
        return raw[:, :, k:k + g, k:k + g]  # feature j is centred in cell j (feature_geometry)

    def summarize(self, cell_raw: torch.Tensor) -> torch.Tensor:
        """Raw cell maps -> ``(N, 3)`` tile length, area, highest presence logit."""
        return summarize_tiles(cell_raw, self.units)

    def forward(self, tiles: torch.Tensor, image_index: torch.Tensor | None = None,
                n_images: int = 0, image_area_mm2: torch.Tensor | None = None) -> Any:
        """Tiles of B images -> per-image :class:`RootQuantOutput` (cells and tiles summed).

        ``image_area_mm2`` (B,) is each image's area at the model scale (``prepare``); without
        it an image counts as the area of its tiles (padding included). Without
        ``image_index`` it returns the raw cell maps of the tiles (:meth:`forward_tiles`): the
        micro-batches of training go through ``forward`` so DDP sees every pass."""
        raw = self.forward_tiles(tiles)
        if image_index is None:
            return raw
        return self.images_from_summary(self.summarize(raw), image_index.to(raw.device),
                                        n_images, image_area_mm2, tile_raw=raw)

    def images_from_summary(self, summary: torch.Tensor, image_index: torch.Tensor,
                            n_images: int, image_area_mm2: torch.Tensor | None = None, *,
                            tile_raw: torch.Tensor | None = None) -> RootQuantOutput:
        """Per-tile summaries -> per-image outputs (sums, and presence from the density)."""
        length, area, _ = aggregate_tiles(summary, image_index, n_images)
        if image_area_mm2 is None:
            tile_mm2 = (self.tile_px * self.config.mm_per_px) ** 2
            image_area_mm2 = summary.new_zeros(n_images).index_add(
                0, image_index, summary.new_full((len(summary),), tile_mm2))
        logit = self.image_presence_logit(length, image_area_mm2)
        return RootQuantOutput(length_mm=length, area_mm2=area, presence_logit=logit,
                               tile_raw=summary if tile_raw is None else tile_raw)

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
                "cell_px": c.cell_px, "aggregation": "sum_of_cells_and_tiles",
                "head": c.head, "context_px": list(self.context),
                "presence": "length_density",
                "sha256": self.meta.get("sha256")}


def _keep_output(module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
    """Forward hook: park a feature module's output on the module itself (not in a closure
    over the model, so a deep copy of the model hooks its own modules)."""
    module.__dict__["_rootquant_output"] = out


def _take_output(module: nn.Module) -> torch.Tensor:
    """The output :func:`_keep_output` parked in this forward pass, released from the module."""
    return module.__dict__.pop("_rootquant_output")


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


def _checked(data: bytes, uri: str) -> Mapping[str, Any]:
    obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return check_checkpoint(obj, uri)


def check_checkpoint(obj: Any, uri: str) -> Mapping[str, Any]:
    """``obj`` (a weights-only loaded file) if it is a RootQuant checkpoint this code reads;
    :class:`RootQuantFormatError` naming the format otherwise (also used by the job's
    driver-side pre-flight, ``rootflow.inference.model_files``)."""
    got = obj.get("format") if isinstance(obj, Mapping) else type(obj).__name__
    if got in OLD_FORMATS:
        raise RootQuantFormatError(
            f"{uri} is a RootQuant checkpoint of the old format {got!r}; this rootflow reads "
            f"{CHECKPOINT_FORMAT!r} (tiles with context, head option, density presence). "
            f"Retrain it with `rootflow train rootquant` (--head pooled for the seed's model)")
    if not isinstance(obj, Mapping) or got != CHECKPOINT_FORMAT:
        raise RootQuantFormatError(f"{uri} is not a RootQuant checkpoint (format {got!r}, "
                                   f"expected {CHECKPOINT_FORMAT!r})")
    return obj


def checkpoint_format(uri: str, *, sha256: str | None = None,
                      storage_options: storage.StorageLike = None) -> str:
    """The file's format if this code reads it; :class:`RootQuantFormatError` otherwise."""
    data = checkpoint.read_verified(uri, sha256=sha256, storage_options=storage_options)
    return str(_checked(data, uri)["format"])


def load(uri: str, *, sha256: str | None = None,
         storage_options: storage.StorageLike = None) -> RootQuant:
    """Load a RootQuant checkpoint (sha256 checked before unpickling, ``weights_only``, strict).

    The model's :attr:`RootQuant.version` becomes ``rootquant@<sha256[:12]>`` of the file's
    bytes, so every output row names exactly the weights that produced it.
    """
    data = checkpoint.read_verified(uri, sha256=sha256, storage_options=storage_options)
    obj = _checked(data, uri)
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
    """RootQuant with any timm backbone (default inception_resnet_v2, 296 px tiles of 8 px cells)."""
    return build(RootQuantConfig(**kwargs), storage_options=storage_options)


@register_model("rootquant_small")
def rootquant_small(*, storage_options: storage.StorageLike = None, **kwargs: Any) -> RootQuant:
    """CPU-sized RootQuant: resnet10t backbone, 128 px tiles, narrow head."""
    kw: dict[str, Any] = {"backbone": "resnet10t", "tile_px": 128, "head_hidden": 64}
    kw.update(kwargs)
    return build(RootQuantConfig(**kw), storage_options=storage_options)
