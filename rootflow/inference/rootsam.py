"""RootSAM inference: a pure-PyTorch predictor over whole scans, and its Ray Data stage.

Flow per batch of images (read top to bottom in :meth:`RootSAMPredictor.predict`):

1. every image -> uint8 RGB (:func:`rootflow.io.images.to_rgb8`: grey, RGBA, 16-bit) -> tiles
   of the model's input size (:mod:`rootflow.inference.tiling`);
2. tiles of *all* images in the batch go through the image encoder ``tile_batch_size`` at a
   time (one big scan does not leave the accelerator idle between small ones);
3. each tile is prompted without a human by the one :class:`~rootflow.inference.prompts.PromptPolicy`
   that training uses (:func:`deployed_decode`): a prompt-free decoder pass gives a first
   probability map (or a prior mask from the forest/U-Net segmenter is given); the policy
   draws its points from that map (``lattice``: fixed points labelled by the map; ``auto``:
   lattice plus EDT-weighted points; ``edt``: EDT points only) and the decoder is run again
   with those points and the first pass's logits as mask prompt. Training draws the same
   prompts from the ground truth and runs the same two passes, so the decoder is asked about
   prompts of the kind it was trained on;

4. per-tile logits are upsampled to tile size and stitched with smooth blending, thresholded
   at full image resolution.

Confidence (for QC) is the mean predicted IoU of the prompted pass over the tiles.

The prompt policy, tiling and model identity go into ``params`` (JSON in ``rootsam_params``)
with every output, so a mask in the lake can always be traced to how it was made.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from rootflow.inference.prompts import PromptPolicy, paint_clicks
from rootflow.inference.stages import _errors, _objects, _opt
from rootflow.inference.tiling import BlendKind, Stitcher, TileGrid, extract_tiles, make_grid
from rootflow.io import storage
from rootflow.io.images import encode_png, to_rgb8
from rootflow.models.rootsam import ImageEmbeddings, RootSAM, build_rootsam

log = logging.getLogger(__name__)

STAGE = "rootsam"
PromptMode = Literal["lattice", "auto", "edt"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
_LOGIT_CLAMP = 32.0  # as SAM2ImagePredictor clamps low-res logits
_PSEUDO_LOGIT = 10.0  # |logit| given to a binary previous mask used as a mask prompt

# Rough peak memory per 1024 px tile through the encoder (fp32, GiB), for automatic batch
# sizes on CUDA. Halved under bf16/fp16 autocast. Conservative on purpose.
_GIB_PER_TILE = {"hiera_tiny": 0.6, "hiera_small": 0.7, "hiera_base_plus": 1.0,
                 "hiera_large": 2.0, "test": 0.05}


@dataclasses.dataclass(frozen=True)
class RootSAMInferenceConfig:
    """Everything that decides a RootSAM mask (recorded with each output).

    Attributes:
        variant: SAM2.1 variant (``hiera_tiny|hiera_small|hiera_base_plus|hiera_large|test``).
        base_checkpoint / base_sha256: URI and digest of Meta's SAM2.1 weights for ``variant``.
            None = random init (loud warning; masks are meaningless).
        rootsam_checkpoint / rootsam_sha256: the fine-tuned decoder (RootSAM checkpoint).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``.
        precision: ``auto`` = bf16 autocast on CUDA (fp16 where bf16 is unsupported), fp32 on
            CPU; or force ``fp32|bf16|fp16``.
        compile: ``torch.compile`` the image encoder (CUDA only; slow first batch).
        tile_overlap: px between tiles; None = ``image_size // 8``.
        tile_batch_size: tiles per encoder call; 0 = automatic (2 on CPU, from free memory on
            CUDA).
        prompt_mode: the policy's mode, ``auto``, ``lattice`` or ``edt`` (see
            :class:`~rootflow.inference.prompts.PromptPolicy`).
        lattice_points_per_side: lattice is ``n x n`` points per tile.
        iou_threshold: kept for config compatibility; unused since the policy decodes one
            prompt set per tile (no per-point masks to filter).
        point_batch_size: kept for config compatibility; unused (see ``iou_threshold``).
        auto_n_pos / auto_n_neg / auto_threshold: EDT points and the label-map threshold of
            the policy. Train and infer with the same values (the RootSAM checkpoint records
            the training policy in ``train_config.task.prompts``).
        mask_threshold: logit threshold of the final mask.
        blend: stitch weights (``cosine`` or ``linear``).
        seed: seeds the auto-mode point sampling (results do not depend on batch order).
        embedding_cache_tiles: tile embeddings kept for :meth:`RootSAMPredictor.refine`.
        policy_source: ``checkpoint`` (default): when ``rootsam_checkpoint`` records the
            prompt policy it was trained with (``train_config.task.prompts``), infer with that
            policy and ignore ``prompt_mode`` / ``lattice_points_per_side`` / ``auto_*``;
            ``config``: use those fields (the explicit override, e.g. ``--set
            policy_source=config --set prompt_mode=lattice``). A checkpoint without a recorded
            policy, or no checkpoint, always uses the fields.
        prior: producer whose mask labels the policy's points instead of the prompt-free
            pass (``forest`` or ``unet``; None = no prior). In the processing job that
            producer runs on every image RootSAM runs on, in the same actor chain
            (``--set rootsam.prior=forest``; docs/rootsam.md, "Priors from the segmenters").
    """

    variant: str = "hiera_base_plus"
    base_checkpoint: str | None = None
    base_sha256: str | None = None
    rootsam_checkpoint: str | None = None
    rootsam_sha256: str | None = None
    device: str = "auto"
    precision: Precision = "auto"
    compile: bool = False
    tile_overlap: int | None = None
    tile_batch_size: int = 0
    prompt_mode: PromptMode = "auto"
    lattice_points_per_side: int = 4
    iou_threshold: float = 0.5
    point_batch_size: int = 32
    auto_n_pos: int = 4
    auto_n_neg: int = 4
    auto_threshold: float = 0.5
    mask_threshold: float = 0.0
    blend: BlendKind = "cosine"
    seed: int = 0
    embedding_cache_tiles: int = 64
    policy_source: Literal["checkpoint", "config"] = "checkpoint"
    prior: str | None = None

    def __post_init__(self) -> None:
        if self.prior is not None and self.prior not in PRIOR_PRODUCERS:
            raise ValueError(f"rootsam.prior must be one of {list(PRIOR_PRODUCERS)} (or unset), "
                             f"got {self.prior!r}")


#: Producers whose mask can serve as RootSAM's prior (``RootSAMInferenceConfig.prior``).
PRIOR_PRODUCERS = ("forest", "unet")


@dataclasses.dataclass
class RootSAMResult:
    """One image's RootSAM output.

    Attributes:
        mask: bool ``(H, W)`` at the input image's resolution.
        confidence: QC score in [0, 1] (see the module docstring).
        version: model version that produced it.
        params: prompt policy, tiling and model identity (JSON-safe).
        n_tiles: tiles the image was cut into.
        n_masks: masks that made the output (one per tile).
        logits: float32 ``(H, W)`` stitched logits when asked for (a better mask prompt for
            :meth:`RootSAMPredictor.refine` than the binary mask).
    """

    mask: np.ndarray
    confidence: float
    version: str
    params: dict[str, Any]
    n_tiles: int
    n_masks: int
    logits: np.ndarray | None = None
    tile_prompts: dict[int, tuple[np.ndarray, np.ndarray]] | None = None


@dataclasses.dataclass
class _Prepared:
    rgb: np.ndarray
    grid: TileGrid
    tiles: np.ndarray


def policy_of(config: RootSAMInferenceConfig) -> PromptPolicy:
    """The :class:`PromptPolicy` an inference config's fields ask for."""
    return PromptPolicy(mode=config.prompt_mode, lattice_per_side=config.lattice_points_per_side,
                        n_pos=config.auto_n_pos, n_neg=config.auto_n_neg,
                        threshold=config.auto_threshold)


def trained_policy(train_config: Mapping[str, Any] | None) -> PromptPolicy | None:
    """The prompt policy a RootSAM checkpoint's ``train_config`` records
    (``task.prompts``), or None when it records none."""
    from rootflow.config import from_dict

    prompts = ((train_config or {}).get("task") or {}).get("prompts")
    if not isinstance(prompts, Mapping):
        return None
    return from_dict(PromptPolicy, prompts)


def resolve_policy(config: RootSAMInferenceConfig, *,
                   storage_options: storage.StorageLike = None) -> tuple[PromptPolicy, str]:
    """The policy inference runs with, and where it came from (``checkpoint`` or ``config``):
    the RootSAM checkpoint's training policy unless ``policy_source="config"`` or the
    checkpoint records none (see :class:`RootSAMInferenceConfig`)."""
    if config.policy_source not in ("checkpoint", "config"):
        raise ValueError(f"policy_source must be checkpoint|config, got {config.policy_source!r}")
    if config.policy_source == "checkpoint" and config.rootsam_checkpoint:
        from rootflow.models.rootsam import load_rootsam_checkpoint

        ckpt = load_rootsam_checkpoint(config.rootsam_checkpoint, sha256=config.rootsam_sha256,
                                       storage_options=storage_options)
        found = trained_policy(ckpt.train_config)
        if found is not None:
            return found, "checkpoint"
    return policy_of(config), "config"


@dataclasses.dataclass
class DeployedOutput:
    """What :func:`deployed_decode` returns for ``B`` images.

    Attributes:
        logits: ``(B, 1, S/4, S/4)`` logits of the prompted pass (the output).
        iou: ``(B, 1)`` its predicted IoU.
        first_logits: ``(B, 1, S/4, S/4)`` logits of the prompt-free pass (its mask prompt).
        points: ``(B, N, 2)`` float32 prompts in ``size`` px; labels ``(B, N)`` int32.
    """

    logits: torch.Tensor
    iou: torch.Tensor
    first_logits: torch.Tensor
    points: np.ndarray
    labels: np.ndarray


def prompt_free_decode(model: RootSAM, emb: ImageEmbeddings,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The first pass of the policy: the decoder with no point (one padding point, label -1)
    and no mask prompt. Returns ``logits (B, 1, S/4, S/4)`` and ``iou (B, 1)``."""
    b = len(emb)
    logits, iou, _ = model.decode(emb, points=torch.zeros(b, 1, 2),
                                  labels=torch.full((b, 1), -1, dtype=torch.int32))
    return logits, iou


def deployed_decode(model: RootSAM, emb: ImageEmbeddings, policy: PromptPolicy, *,
                    size: int, rngs: Sequence[np.random.Generator],
                    valid_hw: Sequence[tuple[int, int]] | None = None,
                    priors: Sequence[np.ndarray] | None = None) -> DeployedOutput:
    """The deployed prompt policy on ``B`` embedded tiles/patches (inference, validation and
    ``rootflow evaluate rootsam`` all run this function).

    1. prompt-free pass (:func:`prompt_free_decode`);
    2. the rule map: ``priors`` (a forest/U-Net mask or probabilities at ``size`` px) when
       given, else the sigmoid of the first pass upscaled to ``size``;
    3. ``policy.inference_prompts`` on the rule map (points in ``size`` px, scaled to the
       model input), decoded with the first pass's logits as mask prompt.

    Args:
        size: side in px of the patch/tile the embeddings were made from (equal to the model's
            input side at inference; a training patch may be resized to it).
        rngs: one generator per item (EDT draw).
        valid_hw: image part of each tile (padding excluded), default the whole ``size``.
        priors: optional ``(size, size)`` label maps, one per item.
    """
    b = len(emb)
    first, _ = prompt_free_decode(model, emb)
    if priors is None:
        rule = torch.sigmoid(model.upscale(first.float(), size))[:, 0].cpu().numpy()
    else:
        rule = np.stack([np.asarray(pr, np.float32) for pr in priors])
    pts, labs = [], []
    for i in range(b):
        hw = valid_hw[i] if valid_hw is not None else None
        p, lab = policy.inference_prompts(rule[i], rng=rngs[i], valid_hw=hw)
        pts.append(p)
        labs.append(lab)
    points = np.stack(pts)
    labels = np.stack(labs)
    scale = model.image_size / size
    logits, iou, _ = model.decode(emb, points=torch.from_numpy(points) * scale,
                                  labels=torch.from_numpy(labels), mask_input=first)
    return DeployedOutput(logits, iou, first, points, labels)


def _prior_float(prior: np.ndarray, grid: TileGrid) -> np.ndarray:
    arr = np.asarray(prior)
    if arr.shape != (grid.height, grid.width):
        raise ValueError(f"prior is {arr.shape}, image is {(grid.height, grid.width)}")
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if arr.dtype == np.uint8 and arr.size and int(arr.max()) > 1:
        return arr.astype(np.float32) / 255.0
    return np.nan_to_num(arr.astype(np.float32))


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available")
    return dev


def _resolve_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class RootSAMPredictor:
    """RootSAM over whole images: tiling, automatic prompts, stitching, refinement by clicks.

    Args:
        config: the inference config.
        model: an already built :class:`RootSAM` (tests, notebooks); otherwise one is built
            from ``config`` (base + RootSAM checkpoints, sha256-checked).
        storage_options: for ``s3://`` checkpoint URIs.
    """

    def __init__(self, config: RootSAMInferenceConfig | None = None, *,
                 model: RootSAM | None = None,
                 storage_options: storage.StorageLike = None) -> None:
        self.config = cfg = config or RootSAMInferenceConfig()
        self.device = _resolve_device(cfg.device)
        if model is None:
            model = build_rootsam(cfg.variant, base_checkpoint=cfg.base_checkpoint,
                                  base_sha256=cfg.base_sha256,
                                  rootsam_checkpoint=cfg.rootsam_checkpoint,
                                  rootsam_sha256=cfg.rootsam_sha256,
                                  storage_options=storage_options, device=self.device)
        self.model = model.to(self.device).eval()
        self.dtype = _resolve_dtype(cfg.precision, self.device)
        if cfg.compile and self.device.type == "cuda":
            self.model.sam.image_encoder = torch.compile(self.model.sam.image_encoder)
        self.tile = self.model.image_size
        self.overlap = cfg.tile_overlap
        self.tile_batch_size = cfg.tile_batch_size or self._auto_tile_batch()
        self._cache: OrderedDict[tuple[str, int], ImageEmbeddings] = OrderedDict()
        self._prompt_cache: OrderedDict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = (
            OrderedDict())
        self.policy, self.policy_source = resolve_policy(cfg, storage_options=storage_options)
        if self.model.random_init:
            log.warning("RootSAMPredictor: random-init model (%s): outputs are NOT root masks",
                        self.model.version)

    # ----------------------------------------------------------------- identity
    @property
    def version(self) -> str:
        return self.model.version

    @property
    def params(self) -> dict[str, Any]:
        """JSON-safe description of how masks are made (stored as ``rootsam_params``)."""
        c = self.config
        pol = self.policy
        p: dict[str, Any] = {
            "prompt_mode": pol.mode,
            "lattice_points_per_side": pol.lattice_per_side,
            "policy_source": self.policy_source,
            "mask_threshold": c.mask_threshold,
            "tile_px": self.tile,
            "tile_overlap_px": self._grid_overlap(),
            "blend": c.blend,
            "variant": self.model.variant.name,
            "base_sha256": self.model.base_sha256,
            "rootsam_version": self.model.rootsam_version,
            "random_init": self.model.random_init,
            "precision": str(self.dtype).removeprefix("torch."),
        }
        if pol.mode in ("auto", "edt"):
            p.update(auto_n_pos=pol.n_pos, auto_n_neg=pol.n_neg, auto_threshold=pol.threshold,
                     seed=c.seed)
        return p

    # ----------------------------------------------------------------- main path
    @torch.inference_mode()
    def predict(self, images: Sequence[np.ndarray], *, return_logits: bool = False,
                priors: Sequence[np.ndarray | None] | None = None) -> list[RootSAMResult]:
        """Segment roots in each image (any size; grey/RGB/RGBA, 8/16-bit).

        Args:
            images: the images.
            return_logits: also return the stitched logits and each tile's prompts (what
                :meth:`refine` and the correction studio want).
            priors: optional prior masks/probabilities ``(H, W)`` per image (forest or U-Net
                output); the policy then labels its points from the prior instead of the
                prompt-free pass.
        """
        prepared = [self._prepare(img) for img in images]
        if priors is not None and len(priors) != len(prepared):
            raise ValueError(f"{len(priors)} priors for {len(prepared)} images")
        prior_tiles = [None if prior is None else
                       extract_tiles(_prior_float(prior, p.grid), p.grid, pad_value=0.0)
                       for prior, p in zip(priors if priors is not None
                                           else [None] * len(prepared), prepared, strict=True)]
        stitchers = [Stitcher(p.grid, kind=self.config.blend) for p in prepared]
        ious: list[list[float]] = [[] for _ in prepared]
        prompts: list[dict[int, tuple[np.ndarray, np.ndarray]]] = [{} for _ in prepared]
        jobs = [(i, k) for i, p in enumerate(prepared) for k in range(len(p.grid))]
        # the studio path (return_logits) keeps the tile embeddings for refine's clicks
        keys = ([self.image_key(p.rgb) for p in prepared]
                if return_logits and self.config.embedding_cache_tiles > 0 else None)
        for b0 in range(0, len(jobs), self.tile_batch_size):
            chunk = jobs[b0:b0 + self.tile_batch_size]
            emb = self._encode(np.stack([prepared[i].tiles[k] for i, k in chunk]))
            for j, (i, k) in enumerate(chunk):
                g = prepared[i].grid
                valid = (min(g.tile, g.height - g.origins()[k][0]),
                         min(g.tile, g.width - g.origins()[k][1]))
                if keys is not None:
                    self._remember(keys[i], k, emb.index(j))
                pt = prior_tiles[i]
                logits, tile_ious, pts, labs = self._segment_tile(
                    emb.index(j), valid_hw=valid, seed=(g.height, g.width, k),
                    prior=None if pt is None else pt[k])
                stitchers[i].add(k, self._upscale(logits))
                ious[i].extend(tile_ious)
                prompts[i][k] = (pts, labs)
        out = []
        for p, st, iou, pr, pt in zip(prepared, stitchers, ious, prompts, prior_tiles,
                                      strict=True):
            full = st.result()
            params = self.params
            if pt is not None:  # how many of the policy's points the prior labelled, and how
                tile_labels = [lab for _, lab in pr.values()]  # many of them as root
                params = {**params,
                          "prior_points": int(sum(int((lab >= 0).sum()) for lab in tile_labels)),
                          "prior_positive": int(sum(int((lab == 1).sum())
                                                    for lab in tile_labels))}
            out.append(RootSAMResult(
                mask=full > self.config.mask_threshold,
                confidence=float(np.mean(iou)) if iou else 0.0,
                version=self.version, params=params, n_tiles=len(p.grid),
                n_masks=len(iou), logits=full if return_logits else None,
                tile_prompts=pr if return_logits else None))
        return out

    def _prepare(self, image: np.ndarray) -> _Prepared:
        rgb, _ = to_rgb8(np.asarray(image))
        grid = make_grid(rgb.shape[0], rgb.shape[1], tile=self.tile, overlap=self.overlap)
        return _Prepared(rgb, grid, extract_tiles(rgb, grid))

    def _grid_overlap(self) -> int:
        return make_grid(1, 1, tile=self.tile, overlap=self.overlap).overlap

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _encode(self, tiles: np.ndarray) -> ImageEmbeddings:
        with self._autocast():
            return self.model.encode(self.model.preprocess(torch.from_numpy(tiles)))

    def _decode(self, emb: ImageEmbeddings, points: np.ndarray, labels: np.ndarray, *,
                repeat_image: bool, mask_input: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, torch.Tensor]:
        with self._autocast():
            logits, iou, _ = self.model.decode(
                emb, points=torch.from_numpy(points), labels=torch.from_numpy(labels),
                mask_input=mask_input, repeat_image=repeat_image)
        return logits.float().clamp_(-_LOGIT_CLAMP, _LOGIT_CLAMP), iou.float()

    def _upscale(self, logits: torch.Tensor) -> np.ndarray:
        """``(S/4, S/4)`` logits -> float32 numpy ``(S, S)``."""
        return self.model.upscale(logits[None, None])[0, 0].cpu().numpy()

    def _segment_tile(self, emb: ImageEmbeddings, *, valid_hw: tuple[int, int],
                      seed: tuple[int, ...], prior: np.ndarray | None = None,
                      ) -> tuple[torch.Tensor, list[float], np.ndarray, np.ndarray]:
        """Prompt one tile by the policy (:func:`deployed_decode`).

        Returns:
            low-res logits ``(S/4, S/4)``, ``[predicted IoU]``, and the tile's prompts (points
            in tile px, labels).
        """
        rng = np.random.default_rng([self.config.seed, *seed])
        with self._autocast():
            out = deployed_decode(self.model, emb, self.policy, size=self.tile, rngs=[rng],
                                  valid_hw=[valid_hw],
                                  priors=None if prior is None else [prior])
        logits = out.logits.float().clamp_(-_LOGIT_CLAMP, _LOGIT_CLAMP)
        return logits[0, 0], [float(out.iou[0, 0])], out.points[0], out.labels[0]

    def _auto_tile_batch(self) -> int:
        if self.device.type != "cuda":
            return 2
        free, _ = torch.cuda.mem_get_info(self.device)
        scale = (self.tile / 1024) ** 2 * (0.5 if self.dtype != torch.float32 else 1.0)
        per_tile = _GIB_PER_TILE.get(self.model.variant.name, 2.0) * scale * 2**30
        return int(max(1, min(32, (0.6 * free) // per_tile)))

    # ----------------------------------------------------------------- refinement
    def image_key(self, rgb: np.ndarray) -> str:
        """Content key of an image for the embedding cache."""
        h = hashlib.sha1(rgb.tobytes(), usedforsecurity=False)
        return f"{rgb.shape}-{h.hexdigest()[:16]}"

    def _tile_embedding(self, key: str, prep: _Prepared, k: int) -> ImageEmbeddings:
        ck = (key, k)
        if ck in self._cache:
            self._cache.move_to_end(ck)
            return self._cache[ck]
        emb = self._encode(prep.tiles[k:k + 1])
        self._remember(key, k, emb)
        return emb

    def _remember(self, key: str, k: int, emb: ImageEmbeddings) -> None:
        if self.config.embedding_cache_tiles > 0:
            self._cache[(key, k)] = emb
            self._cache.move_to_end((key, k))
            while len(self._cache) > self.config.embedding_cache_tiles:
                self._cache.popitem(last=False)

    @torch.inference_mode()
    def refine(
        self,
        image: np.ndarray,
        *,
        points: np.ndarray,
        labels: np.ndarray,
        previous: np.ndarray,
        key: str | None = None,
        prompts: Mapping[int, tuple[np.ndarray, np.ndarray]] | None = None,
        keep_prompts: bool = True,
    ) -> tuple[RootSAMResult, list[int]]:
        """Refine a previous mask with clicks; only tiles containing a click are re-run.

        Public API (the correction studio and :func:`rootflow.inference.correct.correct_image`
        call it). Each re-run tile is decoded with its *original prompts* (the policy's points
        of :meth:`predict` for that tile) plus all clicks that fall in it (tile coordinates),
        and the previous logits of that tile, with those clicks written in
        (:func:`~rootflow.inference.prompts.paint_clicks`), as SAM's mask prompt: the same
        inputs as the click rounds of training. Other tiles keep the previous logits and the
        stitch blends the two smoothly. Tile embeddings (and recomputed original prompts) are cached (LRU of
        ``embedding_cache_tiles``), so a second round of clicks on the same image skips the
        encoder.

        Args:
            image: the image (any form :func:`to_rgb8` accepts).
            points: ``(N, 2)`` xy clicks in image pixels (pixel centres: ``col + 0.5``).
            labels: ``(N,)`` 1 = root here, 0 = not root.
            previous: bool mask (``(H, W)``) or float logits (``RootSAMResult.logits``).
            key: embedding-cache key (default: a hash of the image content).
            prompts: the original prompts per tile (``RootSAMResult.tile_prompts`` of
                ``predict(..., return_logits=True)``); None recomputes them with the policy
                (deterministic: identical to ``predict``'s unless ``predict`` had a prior).
            keep_prompts: False decodes the clicks alone (the pre-policy behaviour).

        Returns:
            The refined result (with ``logits`` and ``tile_prompts`` = original prompts plus
            clicks of the re-run tiles) and the indices of the re-run tiles.
        """
        prep = self._prepare(image)
        g = prep.grid
        pts = np.asarray(points, np.float32).reshape(-1, 2)
        labs = np.asarray(labels, np.int32).reshape(-1)
        if len(pts) != len(labs):
            raise ValueError(f"{len(pts)} points but {len(labs)} labels")
        prev = np.asarray(previous)
        if prev.shape != (g.height, g.width):
            raise ValueError(f"previous mask is {prev.shape}, image is {(g.height, g.width)}")
        if prev.dtype == np.bool_ or np.issubdtype(prev.dtype, np.integer):
            prev_logits = np.where(prev > 0, _PSEUDO_LOGIT, -_PSEUDO_LOGIT).astype(np.float32)
        else:
            prev_logits = prev.astype(np.float32)
        prev_tiles = extract_tiles(prev_logits, g, pad_value=-_PSEUDO_LOGIT)
        inside = [(x, y) for x, y in pts if 0 <= x < g.width and 0 <= y < g.height]
        if len(inside) != len(pts):
            raise ValueError(f"{len(pts) - len(inside)} click(s) fall outside the "
                             f"{g.width}x{g.height} image")
        rerun = sorted({t for x, y in pts for t in g.tiles_containing(float(x), float(y))})
        key = key or self.image_key(prep.rgb)
        st = Stitcher(g, kind=self.config.blend)
        ious: list[float] = []
        used: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        s4 = self.model.low_res_size
        for k, (y0, x0) in enumerate(g.origins()):
            if k not in rerun:
                st.add(k, prev_tiles[k])
                continue
            sel = [i for i, (x, y) in enumerate(pts) if k in g.tiles_containing(float(x),
                                                                                float(y))]
            cp = pts[sel] - np.array([x0, y0], np.float32)
            cl = labs[sel]
            tp, tl = cp, cl
            emb = self._tile_embedding(key, prep, k)
            if keep_prompts:
                op, ol = self._original_prompts(key, g, k, emb, prompts)
                tp, tl = np.concatenate([op, tp]), np.concatenate([ol, tl])
            mask_in = torch.from_numpy(prev_tiles[k])[None, None].to(self.device)
            mask_in = torch.nn.functional.interpolate(mask_in, size=(s4, s4), mode="bilinear",
                                                      antialias=True, align_corners=False)
            # the clicks written into the mask prompt, as in training's click rounds
            mask_in = paint_clicks(mask_in, cp[None], cl[None], image_size=self.tile)
            logits, iou = self._decode(emb, tp[None], tl[None], repeat_image=False,
                                       mask_input=mask_in)
            st.add(k, self._upscale(logits[0, 0]))
            ious.append(float(iou[0, 0]))
            used[k] = (tp.astype(np.float32), tl.astype(np.int32))
        full = st.result()
        params = {**self.params, "refined_tiles": rerun, "n_clicks": len(pts),
                  "kept_prompts": keep_prompts}
        res = RootSAMResult(mask=full > self.config.mask_threshold,
                            confidence=float(np.mean(ious)) if ious else math.nan,
                            version=self.version, params=params, n_tiles=len(g),
                            n_masks=len(ious), logits=full, tile_prompts=used)
        return res, rerun

    def _original_prompts(self, key: str, g: TileGrid, k: int, emb: ImageEmbeddings,
                          given: Mapping[int, tuple[np.ndarray, np.ndarray]] | None,
                          ) -> tuple[np.ndarray, np.ndarray]:
        if given is not None and k in given:
            p, lab = given[k]
            return np.asarray(p, np.float32).reshape(-1, 2), np.asarray(lab, np.int32).ravel()
        ck = (key, k)
        if ck in self._prompt_cache:
            self._prompt_cache.move_to_end(ck)
            return self._prompt_cache[ck]
        y0, x0 = g.origins()[k]
        valid = (min(g.tile, g.height - y0), min(g.tile, g.width - x0))
        _, _, p, lab = self._segment_tile(emb, valid_hw=valid, seed=(g.height, g.width, k))
        self._prompt_cache[ck] = (p, lab)
        while len(self._prompt_cache) > max(1, self.config.embedding_cache_tiles):
            self._prompt_cache.popitem(last=False)
        return p, lab


def model_version(config: RootSAMInferenceConfig | Mapping[str, Any], *,
                  storage_options: storage.StorageLike = None) -> str:
    """The version a :class:`RootSAMPredictor` built from ``config`` will report, without
    building it (jobs need it before any actor starts, to skip images already done).

    Reads the RootSAM checkpoint's metadata when one is set (a few MB); reads and hashes the
    base checkpoint only when no base digest was given (a digest must be the full 64-hex
    sha256; anything else raises ``ValueError``). The base
    digest is *not* verified here: the actors do that when they load it.
    """
    from rootflow.models import checkpoint as ckptlib
    from rootflow.models._sam2_configs import get_variant
    from rootflow.models.rootsam import RANDOM_INIT, load_rootsam_checkpoint

    if isinstance(config, Mapping):
        from rootflow.config import from_dict

        config = from_dict(RootSAMInferenceConfig, config)
    if config.rootsam_checkpoint:
        return load_rootsam_checkpoint(config.rootsam_checkpoint, sha256=config.rootsam_sha256,
                                       storage_options=storage_options).version
    variant = get_variant(config.variant).name
    if not config.base_checkpoint:
        return f"sam2.1_{variant}@{RANDOM_INIT}"
    digest = ckptlib.check_sha256(config.base_sha256) if config.base_sha256 else ""
    if not digest:
        digest = ckptlib.sha256_bytes(ckptlib.read_verified(
            config.base_checkpoint, sha256=None, storage_options=storage_options))
    return f"sam2.1_{variant}@{digest[:12]}"


# --------------------------------------------------------------------------- Ray Data stage
class RootSAMStage:
    """Ray Data callable class: adds RootSAM columns to ``batch_format="numpy"`` batches.

    Use it as ``ds.map_batches(RootSAMStage, fn_constructor_kwargs={"config": cfg,
    "storage_options": so.to_dict()}, compute=ray.data.ActorPoolStrategy(size=n),
    num_gpus=1, batch_size=4)``: the model loads once per actor. Adds ``rootsam_mask_png``
    (PNG bytes, 0/255, full size), ``rootsam_confidence`` (float64), ``rootsam_model_version``
    and ``rootsam_params`` (JSON). Rows whose ``error`` is set pass through; a row that fails
    here gets ``error = "rootsam: <Type>: <msg>"`` and null outputs, and never fails the batch.

    With ``config.prior`` (``forest``/``unet``) each row's ``<prior>_mask_png`` (made by that
    producer's stage earlier in the same actor chain) labels the policy's points; a row whose
    prior failed or is missing gets ``error = "rootsam: prior <name> failed: <reason>"``, never
    a silent prompt-free mask. ``rootsam_params`` then also records ``prior``,
    ``prior_version`` (the version the prior's stage reported), ``prior_points`` and
    ``prior_positive`` (the policy's points the prior labelled, and those labelled root).
    """

    def __init__(self, config: RootSAMInferenceConfig | Mapping[str, Any] | None = None, *,
                 storage_options: storage.StorageLike = None) -> None:
        if isinstance(config, Mapping):
            from rootflow.config import from_dict

            config = from_dict(RootSAMInferenceConfig, config)
        self.predictor = RootSAMPredictor(config, storage_options=storage_options)
        self._params = json.dumps(self.predictor.params, sort_keys=True)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            return self._run(batch)

    def _run(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["image_id"])
        # An all-null ``error`` column reaches numpy batches as float NaN (Arrow null type),
        # not None: only a non-empty string is an error (stages._errors).
        errors = _errors(batch)
        masks: list[bytes | None] = [None] * n
        conf = np.full(n, np.nan, np.float64)
        versions: list[str | None] = [None] * n
        params: list[str | None] = [None] * n
        todo = [i for i in range(n) if errors[i] is None]
        prior = self.predictor.config.prior
        priors: dict[int, np.ndarray] = {}
        prior_versions: dict[int, str] = {}
        if prior:
            for i in todo:
                try:
                    priors[i], prior_versions[i] = _prior_of_row(batch, i, prior)
                except Exception as e:
                    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                    errors[i] = f"{STAGE}: prior {prior} failed: {msg}"[:500]
            todo = [i for i in todo if i in priors]

        def run(rows: list[int]) -> list[RootSAMResult]:
            return self.predictor.predict([images[i] for i in rows],
                                          priors=[priors[i] for i in rows] if prior else None)

        images = batch["image"]
        results: dict[int, RootSAMResult | BaseException] = {}
        try:
            for i, res in zip(todo, run(todo), strict=True):
                results[i] = res
        except Exception:  # isolate the bad row(s): one at a time
            for i in todo:
                try:
                    results[i] = run([i])[0]
                except Exception as e:
                    results[i] = e
        for i, got in results.items():
            if isinstance(got, BaseException):
                errors[i] = f"{STAGE}: {type(got).__name__}: {got}"
                continue
            r = got
            try:
                masks[i] = encode_png(r.mask)
            except Exception as e:
                errors[i] = f"{STAGE}: {type(e).__name__}: {e}"
                continue
            conf[i] = r.confidence
            versions[i] = r.version
            params[i] = self._params if not prior else json.dumps(
                {**r.params, "prior": prior, "prior_version": prior_versions[i]},
                sort_keys=True)
        out = dict(batch)
        out["error"] = _objects(errors)
        out["rootsam_mask_png"] = _objects(masks)
        out["rootsam_confidence"] = conf
        out["rootsam_model_version"] = _objects(versions)
        out["rootsam_params"] = _objects(params)
        return out


def _prior_of_row(batch: dict[str, np.ndarray], i: int, prior: str) -> tuple[np.ndarray, str]:
    """Row ``i``'s prior mask (bool, image size) and the version its stage reported; raises
    with the reason when the prior's stage failed on the row or did not run on it."""
    from rootflow.io.images import decode_mask

    err = _opt(batch, f"{prior}_error", i)
    if err:
        raise ValueError(str(err))
    png = _opt(batch, f"{prior}_mask_png", i)
    if png is None:
        raise ValueError(f"no {prior} mask for this image (the {prior} stage did not run on it)")
    return decode_mask(png), str(_opt(batch, f"{prior}_model_version", i) or "")
