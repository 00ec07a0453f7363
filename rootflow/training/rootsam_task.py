"""RootSAM fine-tuning as a task of the generic loop, and the two-stage recipe on top of it.

What trains (RootSAM's recipe): SAM2.1's image encoder is frozen (no gradient, eval mode); the
prompt encoder and mask decoder train. SAM2's decoder-side ``conv_s0``/``conv_s1`` projections
run inside the image pass and are frozen with it, so cached and live embeddings train the same
parameters (see :mod:`rootflow.training.embedding_cache`). The loss is focal Tversky + boundary
+ IoU-head MSE (:mod:`rootflow.training.losses`); AdamW with ``ReduceLROnPlateau`` on the
validation mIoU; validation mIoU/Dice on fixed held-out patches (:mod:`rootflow.evaluation.metrics`).

Prompts come from the one :class:`~rootflow.inference.prompts.PromptPolicy` inference uses
(``task.prompts``; give inference the same values). Each training sample is an interactive
episode (:func:`interactive_rounds`, SAM's click simulation): a prompt-free pass; the policy's
points labelled by the ground truth, with the first pass's logits as mask prompt; then
``click_rounds`` simulated corrective clicks (:func:`rootflow.inference.prompts.next_click`,
SAM2's clicker: the centre of the thickest error, positive on a missed root, negative on a false
one), each added to the prompts, with the previous low-res logits plus the clicks written in
(:func:`rootflow.inference.prompts.paint_clicks`) as mask prompt. The loss is the mean over
rounds. Validation runs the *deployed* policy (:func:`rootflow.inference.rootsam.deployed_decode`:
labels from the prompt-free pass, no ground truth) at the stage's own patch size, so ``val_miou``
measures the masks inference writes; each validation patch is scored exactly once over all
workers (no sampler padding).

Stages are configs of the same task (:class:`RootSAMRecipe`): stage 1 on 512 px patches at
lr 1e-4, stage 2 on 1024 px patches at lr 1e-5 starting from stage 1's best checkpoint
(:func:`train_rootsam` wires the export of one into ``init_checkpoint`` of the next). Patches
are resized to the model's input side (1024 for SAM2.1; 256 for the ``test`` variant), so stage
1 sees roots at 2x zoom and stage 2 at the scale inference tiles at; each stage validates on
patches of its own size (:func:`recipe_stages` sets ``val_patch.patch_size``).

The exported artefact is a RootSAM checkpoint (:func:`rootflow.models.rootsam.save_rootsam_checkpoint`)
holding the prompt encoder + mask decoder, the base's sha256, this config and the best
validation metrics; inference loads it with ``build_rootsam(..., rootsam_checkpoint=uri)``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from rootflow import config as rf_config
from rootflow.evaluation.metrics import SegmentationMeter, summarize
from rootflow.inference.prompts import PromptPolicy, next_clicks_batch, paint_clicks
from rootflow.io import storage
from rootflow.training.augment import AugmentConfig, build_augment
from rootflow.training.data import (
    PatchConfig,
    PatchDataset,
    load_pairs,
    pairs_manifest,
    read_annotated_manifest,
    split_table,
)
from rootflow.training.embedding_cache import EmbeddingCacheConfig, encode_patches
from rootflow.training.loop import FitResult, LoopContext, TrainRunConfig, fit
from rootflow.training.losses import LossConfig, rootsam_loss

log = logging.getLogger(__name__)

MANIFEST_EXTS = (".csv", ".csv.gz", ".tsv", ".parquet", ".pq")
FROZEN_DECODER_PARTS = ("sam_mask_decoder.conv_s0.", "sam_mask_decoder.conv_s1.")


@dataclasses.dataclass(frozen=True)
class RootSAMTrainConfig:
    """Everything that decides what a RootSAM stage learns (saved in the exported checkpoint).

    Attributes:
        data: annotated manifest (CSV/Parquet with ``image_uri``, ``mask_uri``) or a folder of
            ``<stem>.<ext>`` + ``<stem>_mask.png`` pairs.
        variant: SAM2.1 variant (``hiera_tiny|hiera_small|hiera_base_plus|hiera_large|test``).
        base_checkpoint / base_sha256: Meta's SAM2.1 weights for ``variant`` (None = random
            init: mechanics only, masks meaningless).
        init_checkpoint / init_sha256: RootSAM checkpoint to start from (stage 2: stage 1's).
        patch: training patches (size, count, root-free share, prompts).
        val_patch: validation patches (fixed, un-augmented; RootSAM validates at 512 px).
        augment: training augmentation.
        loss: loss weights.
        batch_size: patches per step per worker.
        lr / weight_decay: AdamW.
        plateau_factor / plateau_patience: ReduceLROnPlateau on ``val_miou``.
        val_fraction / split_seed: hash split when the manifest has no ``split`` column.
        max_images: use only the first N annotated images (quick runs).
        loader_workers: DataLoader processes per Ray worker (0 = in the training process).
        prompts: the prompt policy (the same object type inference builds from its config).
        click_rounds: simulated corrective clicks per training sample (0 = none).
        rule_share: share of training samples whose policy prompts are labelled by the
            deployed rule (the model's prompt-free pass) instead of the ground truth.
        cache: train on cached encoder outputs (None = encode every step).
        version: RootSAM version string (default ``rootsam-<variant>-<date>``).
        seed: patch/prompt/augmentation seed.
    """

    data: str = ""
    variant: str = "hiera_base_plus"
    base_checkpoint: str | None = None
    base_sha256: str | None = None
    init_checkpoint: str | None = None
    init_sha256: str | None = None
    patch: PatchConfig = PatchConfig()
    val_patch: PatchConfig = PatchConfig(patch_size=512, patches_per_image=4)
    augment: AugmentConfig = AugmentConfig()
    loss: LossConfig = LossConfig()
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-4
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    val_fraction: float = 0.2
    split_seed: int = 0
    max_images: int | None = None
    loader_workers: int = 0
    prompts: PromptPolicy = PromptPolicy()
    click_rounds: int = 2
    rule_share: float = 0.5
    cache: EmbeddingCacheConfig | None = None
    version: str = ""
    seed: int = 0


class _DecoderHead(nn.Module):
    """The trainable part (prompt encoder + mask decoder) as one module for DDP.

    Registers only those two sub-modules, so DDP synchronises exactly their gradients; the
    forward goes through :meth:`RootSAM.decode`, which uses these same module objects.
    """

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.sam_prompt_encoder = model.sam.sam_prompt_encoder
        self.sam_mask_decoder = model.sam.sam_mask_decoder
        self._model = [model]  # a list hides the frozen encoder from nn.Module registration

    def forward(self, emb: Any, points: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor,
                *, patch: int, click_rounds: int, policy: PromptPolicy | None = None,
                rule_share: float = 0.0, rng: np.random.Generator | None = None,
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One interactive episode per sample (:func:`interactive_rounds`) in one forward, so
        DDP sees each parameter's gradient once per step."""
        return interactive_rounds(self._model[0], emb, points, labels, mask, patch=patch,
                                  click_rounds=click_rounds, policy=policy,
                                  rule_share=rule_share, rng=rng)


def interactive_rounds(model: Any, emb: Any, points: torch.Tensor, labels: torch.Tensor,
                       mask: torch.Tensor, *, patch: int, click_rounds: int,
                       policy: PromptPolicy | None = None, rule_share: float = 0.0,
                       rng: np.random.Generator | None = None,
                       ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """SAM-style interactive training episode on a batch (the training forward of RootSAM).

    Round 0: prompt-free pass. Round 1: the policy's prompts (``points`` in patch px, labelled
    by the ground truth) with round 0's logits (detached) as mask prompt. Rounds 2..: one
    simulated click per sample (:func:`~rootflow.inference.prompts.next_clicks_batch` on the
    previous prediction at patch size; padding where it is already perfect) appended to the
    prompts, previous low-res logits (detached) with all clicks so far written in
    (:func:`~rootflow.inference.prompts.paint_clicks`) as mask prompt: exactly what
    :meth:`RootSAMPredictor.refine` feeds at inference (original prompts + clicks + previous
    logits with the clicks written in). Gradient flows within each round; rounds are linked
    only through detached logits, as in SAM.

    Args:
        model: the :class:`~rootflow.models.rootsam.RootSAM`.
        emb: embeddings of the ``B`` patches.
        points / labels: ``(B, N, 2)`` patch px / ``(B, N)``.
        mask: ``(B, P, P)`` bool ground truth (for the clicks).
        patch: patch side ``P`` (points are scaled to the model input).
        policy / rule_share / rng: with probability ``rule_share`` per sample, round 1's
            prompts are redrawn by ``policy.inference_prompts`` from round 0's probabilities:
            the deployed situation (labels from the model's own first pass, not the truth),
            so the click rounds learn to correct the errors the deployed policy makes.

    Returns:
        ``[(low-res logits (B, 1, S/4, S/4), iou (B, 1)), ...]``, one per round.
    """
    from rootflow.inference.rootsam import prompt_free_decode

    dev = model.device
    scale = model.image_size / patch
    logits, iou = prompt_free_decode(model, emb)
    rounds = [(logits, iou)]
    points = points.to(dev, torch.float32)
    labs = labels.to(dev, torch.int32)
    if policy is not None and rule_share > 0:
        gen = rng if rng is not None else np.random.default_rng()
        with torch.no_grad():
            prob = torch.sigmoid(model.upscale(logits.detach().float(), patch))[:, 0].cpu().numpy()
        for i in np.flatnonzero(gen.random(len(prob)) < rule_share):
            p_i, l_i = policy.inference_prompts(prob[i], rng=gen)
            points[i] = torch.from_numpy(p_i).to(dev)
            labs[i] = torch.from_numpy(l_i).to(dev)
    pts = points * scale
    truth = mask.detach().bool().cpu().numpy()
    clicks = torch.zeros(len(pts), 0, 2, device=dev)
    click_labs = torch.zeros(len(pts), 0, dtype=torch.int32, device=dev)
    for r in range(1 + click_rounds):
        prompt = logits.detach()
        if r > 0:
            with torch.no_grad():
                pred = (model.upscale(logits.detach(), patch)[:, 0] > 0).cpu().numpy()
            cp, cl = next_clicks_batch(pred, truth)
            clicks = torch.cat([clicks, torch.from_numpy(cp).to(dev)[:, None] * scale], dim=1)
            click_labs = torch.cat([click_labs, torch.from_numpy(cl).to(dev)[:, None]], dim=1)
            prompt = paint_clicks(prompt, clicks, click_labs, image_size=model.image_size)
        logits, iou, _ = model.decode(emb, points=torch.cat([pts, clicks], dim=1),
                                      labels=torch.cat([labs, click_labs], dim=1),
                                      mask_input=prompt)
        rounds.append((logits, iou))
    return rounds


class RootSAMTask:
    """One RootSAM stage for :func:`rootflow.training.loop.fit` (see the module docstring)."""

    def __init__(self, cfg: RootSAMTrainConfig) -> None:
        self.cfg = cfg

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, ctx: LoopContext) -> None:
        from rootflow.models.rootsam import build_rootsam

        cfg = self.cfg
        if not cfg.data:
            raise ValueError("RootSAMTrainConfig.data is empty: give an annotated manifest or "
                             "a folder of image/mask pairs")
        self.ctx = ctx
        opts = ctx.storage_options
        self.model = build_rootsam(cfg.variant, base_checkpoint=cfg.base_checkpoint,
                                   base_sha256=cfg.base_sha256,
                                   rootsam_checkpoint=cfg.init_checkpoint,
                                   rootsam_sha256=cfg.init_sha256, storage_options=opts,
                                   device=ctx.device)
        freeze_encoder(self.model)
        self.head = ctx.prepare_model(_DecoderHead(self.model), find_unused_parameters=True)
        params = [p for p in self.head.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience)

        table = load_annotated(cfg.data, storage_options=opts)
        if cfg.max_images:
            table = table.slice(0, cfg.max_images)
        train_t, val_t = split_table(table, val_fraction=cfg.val_fraction, seed=cfg.split_seed)
        if val_t.num_rows == 0:
            raise ValueError(f"{cfg.data}: no validation images (val_fraction="
                             f"{cfg.val_fraction}, {table.num_rows} images)")
        self.train_ids = train_t["image_id"].to_pylist()
        self.val_ids = val_t["image_id"].to_pylist()
        train_live = PatchDataset(load_pairs(train_t, storage_options=opts), cfg.patch,
                                  seed=cfg.seed, transform=build_augment(cfg.augment),
                                  policy=cfg.prompts)
        val_live = PatchDataset(load_pairs(val_t, storage_options=opts), cfg.val_patch,
                                seed=cfg.seed + 1, transform=None, policy=cfg.prompts)
        self.train_ds: Any = train_live
        self.val_ds: Any = val_live
        if cfg.cache is not None:
            self.train_ds = self._cached(train_live, self.train_ids, cfg.cache.views, "train")
            self.val_ds = self._cached(val_live, self.val_ids, 1, "val")
        shard = -(-len(self.train_ds) // ctx.world_size)  # padded per-worker shard length
        self.train_loader = ctx.loader(self.train_ds, batch_size=cfg.batch_size, shuffle=True,
                                       drop_last=shard > cfg.batch_size,
                                       num_workers=cfg.loader_workers)
        self.val_loader = exact_shard_loader(self.val_ds, rank=ctx.world_rank,
                                             world_size=ctx.world_size,
                                             batch_size=cfg.batch_size,
                                             num_workers=cfg.loader_workers,
                                             pin_memory=ctx.device.type == "cuda")

    def _cached(self, live: PatchDataset, ids: list[str], views: int, split: str) -> Any:
        """Build (all ranks, disjoint shards) or reuse the embedding cache of ``live``."""
        from rootflow.training.embedding_cache import (
            CachedPatchDataset,
            build_embedding_cache,
            cache_key,
            finalize_embedding_cache,
        )

        assert self.cfg.cache is not None
        ccfg = dataclasses.replace(self.cfg.cache, views=views)
        desc = {"split": split, "patch": rf_config.to_dict(live.cfg), "seed": live.seed,
                "prompts": rf_config.to_dict(self.cfg.prompts),
                "augment": rf_config.to_dict(self.cfg.augment) if split == "train" else None}
        key = cache_key(model=self.model, image_ids=ids, description=desc, cfg=ccfg)
        ctx = self.ctx
        root = build_embedding_cache(self.model, live, cfg=ccfg, key=key, rank=ctx.world_rank,
                                     world_size=ctx.world_size,
                                     storage_options=ctx.storage_options)
        ctx.barrier()
        if ctx.is_rank0 and not storage.exists(storage.join(root, "index.json"),
                                               ctx.storage_options):
            finalize_embedding_cache(root, n_items=len(live), views=views,
                                     shard_size=ccfg.shard_size, description=desc,
                                     storage_options=ctx.storage_options)
        ctx.barrier()
        return CachedPatchDataset(root, storage_options=ctx.storage_options)

    # -- steps ---------------------------------------------------------------------------------
    def _embed(self, batch: Mapping[str, torch.Tensor]) -> Any:
        from rootflow.models.rootsam import ImageEmbeddings

        dev = self.ctx.device
        if "image_embed" in batch:
            return ImageEmbeddings(batch["image_embed"].to(dev, torch.float32),
                                   (batch["hr0"].to(dev, torch.float32),
                                    batch["hr1"].to(dev, torch.float32)))
        with torch.no_grad(), self.ctx.autocast():
            emb = encode_patches(self.model, batch["image"])
        return emb.to(dtype=torch.float32)

    def _forward(self, batch: Mapping[str, torch.Tensor], *, click_rounds: int | None = None,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch -> the last round's logits at patch size ``(B, 1, P, P)`` and IoU ``(B, 1)``."""
        mask = batch["mask"].to(self.ctx.device)
        p = int(mask.shape[-1])
        rounds = self.head(self._embed(batch), batch["points"], batch["labels"], mask, patch=p,
                           click_rounds=self.cfg.click_rounds if click_rounds is None
                           else click_rounds)
        logits, iou = rounds[-1]
        return self.model.upscale(logits, p), iou

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.train_ds.set_epoch(epoch)
        self.head.train()
        dev = self.ctx.device
        sums: dict[str, float] = {}
        n = 0
        for batch in self.train_loader:
            emb = self._embed(batch)
            mask = batch["mask"].to(dev)
            p = int(mask.shape[-1])
            sdm = batch["sdm"].to(dev).unsqueeze(1)
            rng = np.random.default_rng([self.cfg.seed, epoch, int(batch["index"][0])])
            with self.ctx.autocast():
                rounds = self.head(emb, batch["points"], batch["labels"], mask, patch=p,
                                   click_rounds=self.cfg.click_rounds, policy=self.cfg.prompts,
                                   rule_share=self.cfg.rule_share, rng=rng)
            loss, parts = episode_loss(self.model, rounds, mask.unsqueeze(1), sdm, self.cfg.loss,
                                       patch=p)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.ctx.clip_gradients(p_ for p_ in self.head.parameters() if p_.requires_grad)
            self.opt.step()
            b = int(mask.shape[0])
            for k, v in parts.items():
                sums[k] = sums.get(k, 0.0) + v * b
            n += b
        if n == 0:
            raise ValueError(f"no training batch on rank {self.ctx.world_rank}: "
                             f"{len(self.train_ds)} patches for {self.ctx.world_size} worker(s)")
        out = {k: v / n for k, v in sums.items()}
        out["lr"] = float(self.opt.param_groups[0]["lr"])
        return out

    def validate(self, epoch: int) -> dict[str, float]:
        """Metrics of the deployed policy (no ground truth in the prompts) at this stage's
        patch size, exact over workers: every patch counted once (sums all-reduced)."""
        from rootflow.inference.rootsam import deployed_decode

        self.head.eval()
        dev = self.ctx.device
        meter = SegmentationMeter()
        loss_sum, n = 0.0, 0
        with torch.no_grad():
            for batch in self.val_loader:
                emb = self._embed(batch)
                mask = batch["mask"].to(dev).unsqueeze(1)
                p = int(mask.shape[-1])
                sdm = batch["sdm"].to(dev).unsqueeze(1)
                rngs = [np.random.default_rng([self.cfg.seed, 7, int(i)])
                        for i in batch["index"].tolist()]
                with self.ctx.autocast():
                    out = deployed_decode(self.model, emb, self.cfg.prompts, size=p, rngs=rngs)
                logits = self.model.upscale(out.logits.float(), p)
                _, parts = rootsam_loss(logits, out.iou.float(), mask, sdm, self.cfg.loss)
                loss_sum += parts["loss"] * int(mask.shape[0])
                n += int(mask.shape[0])
                meter.update(logits > 0, mask, out.iou.float())
        sums = self.ctx.all_reduce({**meter.sums(), "loss_sum": loss_sum, "loss_n": float(n)})
        metrics = summarize(sums)
        metrics["loss"] = sums["loss_sum"] / max(sums["loss_n"], 1.0)
        metrics["n"] = sums["loss_n"]
        return metrics

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.sched.step(metrics["val_miou"])

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"decoder": self.model.trainable_state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from rootflow.models.checkpoint import CheckpointMismatchError
        from rootflow.models.rootsam import TRAINABLE_PREFIXES

        target = {k for k in self.model.sam.state_dict() if k.startswith(TRAINABLE_PREFIXES)}
        got = set(state["decoder"])
        if got != target:
            raise CheckpointMismatchError("RootSAM prompt encoder + mask decoder",
                                          target - got, got - target)
        self.model.sam.load_state_dict(dict(state["decoder"]), strict=False)
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])

    def export(self, uri: str) -> str:
        from rootflow.models.rootsam import save_rootsam_checkpoint

        version = self.cfg.version or (
            f"rootsam-{self.model.variant.name}-{_dt.date.today():%Y.%m.%d}")
        metrics = {k: v for k, v in (self.ctx.best or {}).items()}
        train_config = {"task": rf_config.to_dict(self.cfg),
                        "run": rf_config.to_dict(self.ctx.run),
                        "train_image_ids": self.train_ids, "val_image_ids": self.val_ids}
        save_rootsam_checkpoint(self.model, uri, version=version, train_config=train_config,
                                metrics=metrics, storage_options=self.ctx.storage_options)
        return uri


def episode_loss(model: Any, rounds: list[tuple[torch.Tensor, torch.Tensor]],
                 mask: torch.Tensor, sdm: torch.Tensor, cfg: LossConfig, *, patch: int,
                 ) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean :func:`rootsam_loss` over the rounds of :func:`interactive_rounds` (logits
    upscaled to the patch). Parts: the policy round's terms, ``loss`` = the mean, and
    ``loss_free`` / ``loss_last`` (prompt-free and last click round)."""
    total = None
    parts: dict[str, float] = {}
    first = last = 0.0
    for r, (logits, iou) in enumerate(rounds):
        loss, prt = rootsam_loss(model.upscale(logits.float(), patch), iou.float(), mask, sdm, cfg)
        total = loss if total is None else total + loss
        if r == 0:
            first = prt["loss"]
        if r == 1:
            parts = dict(prt)
        last = prt["loss"]
    assert total is not None
    total = total / len(rounds)
    parts.update(loss=float(total.detach()), loss_free=first, loss_last=last)
    return total, parts


def exact_shard_loader(dataset: Any, *, rank: int, world_size: int, batch_size: int,
                       num_workers: int = 0, pin_memory: bool = False) -> Any:
    """A ``DataLoader`` over indices ``rank::world_size`` of ``dataset``: disjoint shards that
    cover every item exactly once (unlike ``DistributedSampler``, which pads by repeating
    items), so all-reduced validation sums are exact."""
    from torch.utils.data import DataLoader, Subset

    idx = list(range(rank, len(dataset), world_size))
    return DataLoader(Subset(dataset, idx), batch_size=batch_size, shuffle=False,
                      num_workers=num_workers, pin_memory=pin_memory)


def freeze_encoder(model: Any) -> None:
    """Freeze the image encoder (and the decoder's image-side projections); eval mode.

    ``RootSAM.freeze_image_encoder`` leaves the prompt encoder and mask decoder trainable;
    we also freeze ``conv_s0``/``conv_s1``, which SAM2 applies inside the image pass.
    """
    model.freeze_image_encoder()
    for name, p in model.sam.named_parameters():
        if name.startswith(FROZEN_DECODER_PARTS):
            p.requires_grad_(False)
    model.eval()


def load_annotated(data: str, *, storage_options: storage.StorageLike = None) -> Any:
    """Annotated manifest from a manifest file or a folder of image/mask pairs."""
    if data.lower().endswith(MANIFEST_EXTS):
        return read_annotated_manifest(data, storage_options=storage_options)
    return pairs_manifest(data, storage_options=storage_options)


# -- the recipe ----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StageConfig:
    """What differs between RootSAM's stages (everything else is the shared task config).

    Attributes:
        epochs: epochs of this stage (0 skips it).
        patch_size: training patch side.
        lr: AdamW learning rate.
        val_patch_size: validation patch side; None = ``patch_size`` (each stage is selected
            at its own scale: 512 in stage 1, 1024 in stage 2).
    """

    epochs: int = 20
    patch_size: int = 512
    lr: float = 1e-4
    val_patch_size: int | None = None


@dataclasses.dataclass(frozen=True)
class RootSAMRecipe:
    """The whole two-stage recipe as one typed config (``rootflow train rootsam --config``).

    Attributes:
        task: shared task settings (data, variant, base checkpoint, prompts, loss...).
        stage1: 512 px patches at lr 1e-4 (RootSAM).
        stage2: 1024 px patches at lr 1e-5, starting from stage 1's best checkpoint.
        run: execution template (workers, storage, failures); ``name`` gets ``-stage1`` /
            ``-stage2`` appended and ``epochs`` comes from the stage.
        out: URI of the final RootSAM checkpoint (stage 1's export sits beside it as
            ``<stem>-stage1.pt``).
    """

    task: RootSAMTrainConfig = RootSAMTrainConfig()
    stage1: StageConfig = StageConfig(epochs=20, patch_size=512, lr=1e-4)
    stage2: StageConfig = StageConfig(epochs=10, patch_size=1024, lr=1e-5)
    run: TrainRunConfig = TrainRunConfig(name="rootsam", metric="val_miou", mode="max",
                                         num_to_keep=2, early_stopping_patience=5)
    out: str = "rootsam.pt"


def recipe_stages(recipe: RootSAMRecipe) -> list[tuple[RootSAMTrainConfig, TrainRunConfig]]:
    """The (task, run) pairs of the recipe's non-empty stages, in order."""
    out = []
    stem = recipe.out[:-3] if recipe.out.endswith(".pt") else recipe.out
    stages = [("stage1", recipe.stage1), ("stage2", recipe.stage2)]
    active = [(n, st) for n, st in stages if st.epochs > 0]
    for i, (name, st) in enumerate(active):
        task = dataclasses.replace(
            recipe.task, lr=st.lr,
            patch=dataclasses.replace(recipe.task.patch, patch_size=st.patch_size),
            val_patch=dataclasses.replace(recipe.task.val_patch,
                                          patch_size=st.val_patch_size or st.patch_size))
        last = i == len(active) - 1
        run = dataclasses.replace(recipe.run, name=f"{recipe.run.name}-{name}", epochs=st.epochs,
                                  export_uri=recipe.out if last else f"{stem}-{name}.pt")
        out.append((task, run))
    if not out:
        raise ValueError("both stages have epochs=0: nothing to train")
    return out


def train_rootsam(
    stages: list[tuple[RootSAMTrainConfig, TrainRunConfig]],
    *,
    storage_options: storage.StorageLike = None,
) -> list[FitResult]:
    """Run stages in order; each later stage starts from the previous stage's best export.

    Each stage is an ordinary :func:`~rootflow.training.loop.fit` with its own run name, so a
    crashed recipe rerun with the same names skips finished stages (they just re-export) and
    resumes the interrupted one from its last checkpoint.
    """
    results: list[FitResult] = []
    prev: str | None = None
    for task_cfg, run in stages:
        if prev is not None:
            task_cfg = dataclasses.replace(task_cfg, init_checkpoint=prev, init_sha256=None)
        res = fit(_task_factory(task_cfg), run=run, storage_options=storage_options)
        log.info("stage %s: best epoch %d %s=%.4f -> %s", run.name, res.best_epoch, run.metric,
                 res.best_metrics.get(run.metric, float("nan")), res.export_uri)
        results.append(res)
        prev = res.export_uri
    return results


def _task_factory(cfg: RootSAMTrainConfig) -> Any:
    import functools

    return functools.partial(RootSAMTask, cfg)
