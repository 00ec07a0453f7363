"""RootSAM: SAM2.1 (sam2's own model code) with a root-tuned prompt encoder and mask decoder.

Three pieces of state, kept apart on purpose:

* the **SAM2.1 base** (``{"model": state_dict}``, Meta's release format) from a URI the user
  gives, sha256-checked, loaded strictly through :mod:`rootflow.models.checkpoint`;
* the **RootSAM checkpoint** (:class:`RootSAMCheckpoint`): only what fine-tuning changes
  (``sam_prompt_encoder.*`` and ``sam_mask_decoder.*``) plus the metadata needed to refuse a
  wrong base: the variant, the base checkpoint's sha256, the training config, validation
  metrics and a version string. It is small (~16 MB), so every fine-tuning run can be kept;
* no base at all: a randomly initialised model of the real architecture, for tests and the
  demo. It warns loudly and sets :attr:`RootSAM.random_init`: its masks are meaningless.
  Random init is seeded (``seed=0``) so two random-init builds of a variant are identical and
  a RootSAM checkpoint trained on one applies to the other.

Points given to :meth:`RootSAM.decode` are in pixels of the model input (``image_size`` square),
which for a tile of that size are the tile's own pixel coordinates (see
:mod:`rootflow.inference.prompts` for the pixel-centre convention).

Registered factories (``rootflow.models.registry.create_model``): ``rootsam_tiny``,
``rootsam_small``, ``rootsam_base_plus``, ``rootsam_large`` (the four SAM2.1 Hiera sizes) and
``rootsam_test`` (hiera-tiny shrunk to 256 px for CPU tests). All take the keyword arguments of
:func:`build_rootsam` except ``variant``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from rootflow.io import storage
from rootflow.models import checkpoint
from rootflow.models._sam2_configs import VARIANTS, SAM2Variant, compose_sam2, get_variant
from rootflow.models.registry import WeightSpec, register_model

log = logging.getLogger(__name__)

RANDOM_INIT = "random-init"
CHECKPOINT_FORMAT = "rootflow.rootsam/1"
TRAINABLE_PREFIXES = ("sam_prompt_encoder.", "sam_mask_decoder.")
# SAM2's input normalisation (sam2.utils.transforms.SAM2Transforms).
SAM2_WEIGHTS = WeightSpec(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


class RootSAMBaseMismatchError(ValueError):
    """A RootSAM checkpoint was fine-tuned on a different SAM2.1 base than the one loaded."""


@dataclasses.dataclass(frozen=True)
class ImageEmbeddings:
    """SAM2 image features of a batch of model-size inputs (what an embedding cache stores).

    Attributes:
        image_embed: ``(B, 256, S/16, S/16)`` lowest-resolution features (``no_mem_embed`` added,
            as ``SAM2ImagePredictor`` does for single images).
        high_res_feats: ``[(B, 32, S/4, S/4), (B, 64, S/8, S/8)]`` already projected by the
            decoder's ``conv_s0``/``conv_s1`` (sam2 does this in ``forward_image``).
    """

    image_embed: torch.Tensor
    high_res_feats: tuple[torch.Tensor, torch.Tensor]

    def __len__(self) -> int:
        return int(self.image_embed.shape[0])

    def index(self, idx: Any) -> ImageEmbeddings:
        """Select images (int, slice or index tensor), keeping the batch dimension."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return ImageEmbeddings(self.image_embed[idx],
                               (self.high_res_feats[0][idx], self.high_res_feats[1][idx]))

    def to(self, *args: Any, **kwargs: Any) -> ImageEmbeddings:
        return ImageEmbeddings(self.image_embed.to(*args, **kwargs),
                               (self.high_res_feats[0].to(*args, **kwargs),
                                self.high_res_feats[1].to(*args, **kwargs)))

    @staticmethod
    def cat(parts: Sequence[ImageEmbeddings]) -> ImageEmbeddings:
        return ImageEmbeddings(torch.cat([p.image_embed for p in parts]),
                               (torch.cat([p.high_res_feats[0] for p in parts]),
                                torch.cat([p.high_res_feats[1] for p in parts])))


@dataclasses.dataclass(frozen=True)
class RootSAMCheckpoint:
    """The RootSAM fine-tuning delta (format ``rootflow.rootsam/1``), stored as a plain dict.

    Attributes:
        state_dict: ``sam_prompt_encoder.*`` and ``sam_mask_decoder.*`` tensors (keys as in
            ``SAM2Base.state_dict()``).
        variant: SAM2.1 variant name (``hiera_base_plus`` ...); see ``_sam2_configs.VARIANTS``.
        base_sha256: sha256 of the SAM2.1 base checkpoint it was trained on, or
            ``"random-init"``.
        version: the model version written next to every output (e.g. ``rootsam-b+-2025.06``).
        train_config: the resolved training config (JSON-safe plain data).
        metrics: validation metrics (name -> float).
        created_at: ISO-8601 UTC time of saving.
        format: format tag, checked on load.
    """

    state_dict: dict[str, torch.Tensor]
    variant: str
    base_sha256: str
    version: str
    train_config: dict[str, Any] = dataclasses.field(default_factory=dict)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    created_at: str = ""
    format: str = CHECKPOINT_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "checkpoint") -> RootSAMCheckpoint:
        if not isinstance(data, Mapping) or data.get("format") != CHECKPOINT_FORMAT:
            got = data.get("format") if isinstance(data, Mapping) else type(data).__name__
            hint = (" (this looks like a SAM2.1 base checkpoint: pass it as the base checkpoint)"
                    if isinstance(data, Mapping) and "model" in data else "")
            raise ValueError(f"{source} is not a RootSAM checkpoint: format {got!r}, "
                             f"expected {CHECKPOINT_FORMAT!r}{hint}")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(n for n in ("state_dict", "variant", "base_sha256", "version")
                         if n not in data)
        if missing:
            raise ValueError(f"{source}: RootSAM checkpoint lacks {missing}")
        return cls(**{k: v for k, v in data.items() if k in names})


class RootSAM(nn.Module):
    """SAM2.1 wrapped for root segmentation: image encoder + prompt encoder + mask decoder.

    Build it with :func:`build_rootsam` (or ``create_model("rootsam_...")``). ``sam`` is the
    ``sam2.modeling.sam2_base.SAM2Base`` itself; the memory modules are unused (single images)
    but kept so Meta's checkpoints load strictly.

    Attributes:
        sam: the SAM2Base.
        variant: the :class:`SAM2Variant` it was built from.
        base_sha256: sha256 of the base checkpoint, or ``"random-init"``.
        random_init: True when no base checkpoint was loaded (masks are meaningless).
        rootsam_version: version of the loaded RootSAM checkpoint, or None.
    """

    def __init__(self, sam: nn.Module, *, variant: SAM2Variant, base_sha256: str) -> None:
        super().__init__()
        self.sam: Any = sam  # SAM2Base (untyped upstream)
        self.variant = variant
        self.base_sha256 = base_sha256
        self.random_init = base_sha256 == RANDOM_INIT
        self.rootsam_version: str | None = None
        self.rootsam_metrics: dict[str, float] = {}
        mean = torch.tensor(SAM2_WEIGHTS.mean).view(1, 3, 1, 1)
        std = torch.tensor(SAM2_WEIGHTS.std).view(1, 3, 1, 1)
        self.pixel_mean: torch.Tensor
        self.pixel_std: torch.Tensor
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    # ----------------------------------------------------------------- description
    @property
    def image_size(self) -> int:
        return int(self.sam.image_size)

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's mask logits (``image_size / 4``)."""
        return 4 * int(self.sam.sam_image_embedding_size)

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    @property
    def version(self) -> str:
        """What produced the masks: the RootSAM checkpoint's version, or SAM2.1 base/random."""
        if self.rootsam_version:
            return self.rootsam_version
        base = RANDOM_INIT if self.random_init else self.base_sha256[:12]
        return f"sam2.1_{self.variant.name}@{base}"

    # ----------------------------------------------------------------- state
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Prompt encoder + mask decoder tensors (what a RootSAM checkpoint holds), on CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.sam.state_dict().items()
                if k.startswith(TRAINABLE_PREFIXES)}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.sam.named_parameters() if n.startswith(TRAINABLE_PREFIXES)]

    def freeze_image_encoder(self) -> None:
        """Freeze everything but the prompt encoder and mask decoder (RootSAM's recipe)."""
        for n, p in self.sam.named_parameters():
            p.requires_grad_(n.startswith(TRAINABLE_PREFIXES))

    # ----------------------------------------------------------------- forward pieces
    def preprocess(self, images: torch.Tensor | np.ndarray) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` (or float in [0, 1] ``(B, 3, H, W)``) -> normalised
        ``(B, 3, H, W)`` float on the model's device. No resizing: callers tile to
        ``image_size`` (resizing a 2550 px scan to 1024 px would erase fine roots)."""
        x = torch.as_tensor(images)
        if x.dtype == torch.uint8:
            if x.ndim != 4 or x.shape[-1] != 3:
                raise ValueError(f"uint8 images must be (B, H, W, 3), got {tuple(x.shape)}")
            x = x.to(self.device).permute(0, 3, 1, 2).float().div_(255.0)
        else:
            x = x.to(self.device, torch.float32)
        return (x - self.pixel_mean) / self.pixel_std

    def encode(self, images: torch.Tensor) -> ImageEmbeddings:
        """Run the image encoder on normalised ``(B, 3, S, S)`` inputs (``S = image_size``)."""
        s = self.image_size
        if images.ndim != 4 or tuple(images.shape[-2:]) != (s, s):
            raise ValueError(f"encode expects (B, 3, {s}, {s}), got {tuple(images.shape)}")
        sam = self.sam
        backbone_out = sam.forward_image(images)
        _, feats, _, sizes = sam._prepare_backbone_features(backbone_out)
        if sam.directly_add_no_mem_embed:
            feats[-1] = feats[-1] + sam.no_mem_embed
        b = images.shape[0]
        maps = [f.permute(1, 2, 0).reshape(b, -1, h, w) for f, (h, w) in zip(feats, sizes,
                                                                             strict=True)]
        return ImageEmbeddings(maps[-1], (maps[0], maps[1]))

    def decode(
        self,
        emb: ImageEmbeddings,
        *,
        points: torch.Tensor | None,
        labels: torch.Tensor | None,
        mask_input: torch.Tensor | None = None,
        multimask_output: bool = False,
        repeat_image: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prompt encoder + mask decoder.

        Args:
            emb: embeddings of ``B`` images (``B = 1`` with ``repeat_image``).
            points: ``(P, N, 2)`` continuous xy in model-input pixels (pixel centre =
                ``col + 0.5``, :mod:`rootflow.inference.prompts`); ``P = B`` or, with
                ``repeat_image``, any number of prompt sets on the single image.
            labels: ``(P, N)`` int (1 pos, 0 neg, -1 padding).
            mask_input: ``(P, 1, S/4, S/4)`` previous logits as a dense prompt, or None.
            multimask_output: return SAM's 3 masks instead of the single-mask token.
            repeat_image: decode ``P`` prompt sets against one image's embedding.

        Returns:
            ``logits (P, C, S/4, S/4)``, ``iou_pred (P, C)`` and ``object_score_logits (P, 1)``,
            with ``C = 3`` for multimask output else 1.
        """
        sam = self.sam
        pts = None
        if points is not None:
            if labels is None:
                raise ValueError("labels are required with points")
            # rootflow points are continuous (pixel centre = col + 0.5); SAM2's prompt encoder
            # takes integer pixel indices and adds 0.5 itself, so hand it ``x - 0.5``: the
            # coordinate it embeds is then exactly the pixel centre we were given.
            pts = (points.to(self.device, torch.float32) - 0.5,
                   labels.to(self.device, torch.int32))
        sparse, dense = sam.sam_prompt_encoder(points=pts, boxes=None,
                                               masks=None if mask_input is None
                                               else mask_input.to(self.device))
        logits, iou, _, obj = sam.sam_mask_decoder(
            image_embeddings=emb.image_embed,
            image_pe=sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=repeat_image,
            high_res_features=list(emb.high_res_feats),
        )
        return logits, iou, obj

    def upscale(self, logits: torch.Tensor, size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """Bilinear ``(P, C, S/4, S/4)`` logits -> ``(P, C, size)`` (default: the input size)."""
        size = size or self.image_size
        hw = (size, size) if isinstance(size, int) else size
        return nn.functional.interpolate(logits.float(), size=hw, mode="bilinear",
                                         align_corners=False)

    def forward(self, images: torch.Tensor, points: torch.Tensor | None,
                labels: torch.Tensor | None, mask_input: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt set per image: normalised ``(B, 3, S, S)`` -> full-size logits
        ``(B, 1, S, S)`` and predicted IoU ``(B, 1)`` (the training forward)."""
        logits, iou, _ = self.decode(self.encode(images), points=points, labels=labels,
                                     mask_input=mask_input)
        return self.upscale(logits), iou


# --------------------------------------------------------------------------- build / load
def build_rootsam(
    variant: str | SAM2Variant = "hiera_base_plus",
    *,
    base_checkpoint: str | None = None,
    base_sha256: str | None = None,
    rootsam_checkpoint: str | None = None,
    rootsam_sha256: str | None = None,
    storage_options: storage.StorageLike = None,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> RootSAM:
    """Build RootSAM from sam2's SAM2.1 config, a base checkpoint and a RootSAM checkpoint.

    Args:
        variant: ``hiera_tiny|hiera_small|hiera_base_plus|hiera_large|test`` (or ``t s b+ l``).
        base_checkpoint: URI of Meta's SAM2.1 ``.pt`` for this variant (local or ``s3://``).
            None builds a random-init model and warns that its masks are meaningless.
        base_sha256: expected digest of the base (checked before unpickling when given; it
            is computed and recorded either way).
        rootsam_checkpoint: URI of a RootSAM checkpoint (:func:`save_rootsam_checkpoint`).
        rootsam_sha256: its expected digest.
        storage_options: for ``s3://`` URIs (see :mod:`rootflow.io.storage`).
        device: where the model lives; it is returned in eval mode.
        seed: random-init seed (only used without a base checkpoint).

    Raises:
        checkpoint.ChecksumError: a digest does not match.
        checkpoint.CheckpointMismatchError: the base does not fit the variant (names keys).
        RootSAMBaseMismatchError: the RootSAM checkpoint was trained on another base/variant.
    """
    var = variant if isinstance(variant, SAM2Variant) else get_variant(variant)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sam = compose_sam2(var)
    if base_checkpoint:
        data = checkpoint.read_verified(base_checkpoint, sha256=base_sha256,
                                        storage_options=storage_options)
        digest = checkpoint.sha256_bytes(data)
        import io

        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        del data
        if not isinstance(obj, Mapping) or "model" not in obj:
            keys = list(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
            raise ValueError(f"{base_checkpoint} is not a SAM2.1 checkpoint "
                             f"({{'model': state_dict}}); got {keys}")
        checkpoint.load_state_dict_strict(
            sam, obj["model"], what=f"SAM2.1 {var.name} ({var.config})")
        model = RootSAM(sam, variant=var, base_sha256=digest)
    else:
        log.warning(
            "RootSAM %s built WITHOUT a SAM2.1 base checkpoint: random weights, masks are "
            "meaningless. Pass base_checkpoint=<uri of %s> (and base_sha256) for real use.",
            var.name, var.checkpoint_file or "a SAM2.1 checkpoint")
        model = RootSAM(sam, variant=var, base_sha256=RANDOM_INIT)
    if rootsam_checkpoint:
        ckpt = load_rootsam_checkpoint(rootsam_checkpoint, sha256=rootsam_sha256,
                                       storage_options=storage_options)
        apply_rootsam_checkpoint(model, ckpt, source=rootsam_checkpoint)
    return model.to(device).eval()


def apply_rootsam_checkpoint(model: RootSAM, ckpt: RootSAMCheckpoint, *,
                             source: str = "RootSAM checkpoint") -> None:
    """Load a RootSAM delta into ``model`` after checking it was trained on the same base.

    Raises:
        RootSAMBaseMismatchError: other variant or other base sha256.
        checkpoint.CheckpointMismatchError: the delta's keys/shapes do not fit.
    """
    if get_variant(ckpt.variant).name != model.variant.name:
        raise RootSAMBaseMismatchError(
            f"{source} ({ckpt.version}) was fine-tuned on SAM2.1 {ckpt.variant}, but the model "
            f"is SAM2.1 {model.variant.name}: build the matching variant")
    if ckpt.base_sha256 != model.base_sha256:
        raise RootSAMBaseMismatchError(
            f"{source} ({ckpt.version}) was fine-tuned on base checkpoint "
            f"{_short(ckpt.base_sha256)}, but the model was built from "
            f"{_short(model.base_sha256)}: pass the base it was trained on "
            f"(--base-checkpoint <uri> --base-sha256 {ckpt.base_sha256})")
    _load_delta_strict(model.sam, ckpt.state_dict,
                       what=f"the prompt encoder + mask decoder of SAM2.1 {model.variant.name}")
    model.rootsam_version = ckpt.version
    model.rootsam_metrics = dict(ckpt.metrics)


def _load_delta_strict(sam: nn.Module, state: Mapping[str, torch.Tensor], *, what: str) -> None:
    """Strict load of exactly the ``TRAINABLE_PREFIXES`` keys, naming any misfit key."""
    target = {k: v for k, v in sam.state_dict().items() if k.startswith(TRAINABLE_PREFIXES)}
    missing = set(target) - set(state)
    unexpected = set(state) - set(target)
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
              for k in set(target) & set(state)
              if tuple(getattr(state[k], "shape", ())) != tuple(target[k].shape)]
    if missing or unexpected or shapes:
        raise checkpoint.CheckpointMismatchError(what, missing, unexpected, shapes)
    sam.load_state_dict(dict(state), strict=False)


def _short(sha: str) -> str:
    return sha if sha == RANDOM_INIT else f"sha256 {sha[:16]}..."


def save_rootsam_checkpoint(
    model: RootSAM,
    uri: str,
    *,
    version: str,
    train_config: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
    storage_options: storage.StorageLike = None,
) -> str:
    """Write ``model``'s prompt encoder + mask decoder and metadata to ``uri``; returns sha256.

    Call it on rank 0 only. ``train_config`` must be plain data (``rootflow.config.to_dict``).
    """
    ckpt = RootSAMCheckpoint(
        state_dict=model.trainable_state_dict(),
        variant=model.variant.name,
        base_sha256=model.base_sha256,
        version=version,
        train_config=dict(train_config or {}),
        metrics={k: float(v) for k, v in (metrics or {}).items()},
        created_at=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
    return checkpoint.save(ckpt.to_dict(), uri, storage_options=storage_options)


def load_rootsam_checkpoint(uri: str, *, sha256: str | None = None,
                            storage_options: storage.StorageLike = None) -> RootSAMCheckpoint:
    """Read a RootSAM checkpoint (sha256-checked, ``weights_only``) without building a model."""
    obj = checkpoint.load(uri, sha256=sha256, storage_options=storage_options)
    return RootSAMCheckpoint.from_dict(obj, source=uri)


def save_base_checkpoint(model: RootSAM, uri: str, *,
                         storage_options: storage.StorageLike = None) -> str:
    """Write the whole SAM2 state in Meta's format (``{"model": state_dict}``); returns sha256.

    For tests and demos (a random-init "base" that can then be loaded by URI like a real one).
    """
    state = {k: v.detach().cpu() for k, v in model.sam.state_dict().items()}
    return checkpoint.save({"model": state}, uri, storage_options=storage_options)


# --------------------------------------------------------------------------- registry
def _factory(variant: str) -> Callable[..., RootSAM]:
    def make(**kwargs: Any) -> RootSAM:
        return build_rootsam(variant, **kwargs)

    make.__name__ = f"rootsam_{variant}"
    make.__doc__ = f"RootSAM on SAM2.1 {variant} (see :func:`build_rootsam`)."
    return make


for _name, _variant in (("rootsam_tiny", "hiera_tiny"), ("rootsam_small", "hiera_small"),
                        ("rootsam_base_plus", "hiera_base_plus"),
                        ("rootsam_large", "hiera_large"), ("rootsam_test", "test")):
    register_model(_name)(_factory(_variant))

__all__ = [
    "RANDOM_INIT", "VARIANTS", "ImageEmbeddings", "RootSAM", "RootSAMBaseMismatchError",
    "RootSAMCheckpoint", "apply_rootsam_checkpoint", "build_rootsam", "load_rootsam_checkpoint",
    "save_base_checkpoint", "save_rootsam_checkpoint",
]
