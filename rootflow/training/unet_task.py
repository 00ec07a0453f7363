"""U-Net training from scratch as a task of the one Ray Train loop (:mod:`rootflow.training.loop`).

Same protocol as :class:`~rootflow.training.rootsam_task.RootSAMTask`, so a U-Net gets the same
resume, keep-best, failure recovery, early stopping and wall-clock budget:

* **data**: an annotated manifest or a folder of ``<stem>.<ext>`` + ``<stem>_mask.png`` pairs
  (:func:`~rootflow.training.rootsam_task.load_annotated`), split by
  :func:`~rootflow.training.data.split_table`; training patches come from
  :class:`~rootflow.training.data.PatchDataset` (random patches re-drawn every epoch, biased
  toward roots by ``empty_fraction``; no point prompts) with the shared augmentations.
* **loss**: focal Tversky + BCE + boundary (:mod:`rootflow.training.losses`), see
  :class:`UNetLossConfig`.
* **validation**: each validation image is segmented *whole*, through the same tiled
  :class:`~rootflow.models.unet.UNetSegmenter` code inference uses (so ``val_dice`` is the
  number a user gets, seams included), images spread over workers round-robin. Pooled Dice
  (all true positives over all predicted + true root pixels) comes from additive sums all-reduced
  over workers, so it is exact on any number of workers. The same pass accumulates histograms of
  the probabilities of root and soil pixels; the export picks the threshold maximising pooled
  Dice from the *best* epoch's histograms (the validation split is training data, never a test
  fold) without another pass.
* **normalisation**: per-channel mean/std of the training images (plain encoder) or the timm
  encoder's own, saved in the checkpoint.

:func:`train_unet` is what ``rootflow train unet`` runs: ``<out>/unet.pt`` (the model),
``<out>/run/`` (Ray Train's checkpoints; rerunning with the same ``out`` resumes) and
``<out>/train.json`` (config, per-epoch metrics, best metrics, seconds).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from rootflow import config as rf_config
from rootflow.io import storage
from rootflow.models.unet import UNetConfig, UNetSegmenter, build_unet, save_unet
from rootflow.training.augment import AugmentConfig, build_augment
from rootflow.training.data import (
    AnnotatedImage,
    AnnotationError,
    PatchConfig,
    PatchDataset,
    load_pairs,
    split_table,
)
from rootflow.training.loop import LoopContext, TrainRunConfig, fit
from rootflow.training.losses import boundary_loss, focal_tversky_loss, signed_distance_map

log = logging.getLogger(__name__)

MODEL_FILE = "unet.pt"
RUN_NAME = "run"
RECORD_FILE = "train.json"
HIST_BINS = 200


@dataclasses.dataclass(frozen=True)
class UNetLossConfig:
    """Weights of :func:`unet_loss` (focal Tversky + BCE + boundary).

    Attributes:
        tversky_alpha / tversky_beta / tversky_gamma: focal Tversky's false-negative and
            false-positive weights and focal exponent (see :func:`focal_tversky_loss`).
        w_tversky: weight of the region term (handles the 1-5 % root share).
        w_bce: weight of pixel-wise BCE (well-behaved gradients from the first step on, and
            calibrated probabilities for the threshold choice).
        w_boundary: weight of Kervadec's boundary term (penalises probability far from roots).
    """

    tversky_alpha: float = 0.6
    tversky_beta: float = 0.4
    tversky_gamma: float = 0.75
    w_tversky: float = 1.0
    w_bce: float = 0.5
    w_boundary: float = 0.1


def unet_loss(logits: torch.Tensor, target: torch.Tensor, sdm: torch.Tensor,
              cfg: UNetLossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted U-Net loss, averaged over the batch.

    Args:
        logits: ``(B, 1, H, W)``.
        target: ``(B, 1, H, W)`` {0, 1}.
        sdm: ``(B, 1, H, W)`` signed distance maps of ``target``
            (:func:`~rootflow.training.losses.signed_distance_map`).
        cfg: weights.

    Returns:
        The scalar loss and its parts as floats.
    """
    t = target.float()
    ft = focal_tversky_loss(logits, t, alpha=cfg.tversky_alpha, beta=cfg.tversky_beta,
                            gamma=cfg.tversky_gamma).mean()
    bce = F.binary_cross_entropy_with_logits(logits.float(), t)
    bd = boundary_loss(logits, sdm).mean()
    total = cfg.w_tversky * ft + cfg.w_bce * bce + cfg.w_boundary * bd
    return total, {"loss": float(total.detach()), "tversky": float(ft.detach()),
                   "bce": float(bce.detach()), "boundary": float(bd.detach())}


@dataclasses.dataclass(frozen=True)
class UNetTrainConfig:
    """The U-Net recipe (saved in ``train.json`` and inside the exported checkpoint).

    The defaults are sized for a 20-minute budget on two CPU cores with the SegRoot-(8,5)-sized
    net: a step of 8 x 256 px patches is ~0.3 s of compute (0.7-1.4 s measured on the shared
    2-core machine), an epoch is 64 patches per training image plus one tiled pass over the
    validation scans (~8 CPU-s each). Measured on SegRoot soybean tubes T002-T006 (9 training +
    3 validation scans): 11 epochs (~790 steps) in two 10-minute parts, pooled Dice 0.49 on
    tubes T007-T012; the validation curve was still rising, so ``epochs=30`` is a ceiling the
    budget normally reaches first.

    Attributes:
        data: annotated manifest or a folder of image/mask pairs.
        unet: architecture and inference tiling.
        encoder_weights / encoder_sha256: encoder initialisation (timm state dict or a previous
            rootflow ``unet.pt``); None = random init, which is what the default recipe uses.
        patch: training patches (size, count per image per epoch, root-free share; no points).
        augment: training augmentation.
        loss: loss weights.
        epochs: total epochs (a budget-stopped run resumes up to this).
        early_stopping_patience: epochs without ``val_dice`` gain before stopping (None = off).
        batch_size: patches per step per worker.
        lr / weight_decay: AdamW.
        plateau_factor / plateau_patience: ReduceLROnPlateau on ``val_dice``.
        threshold: probability threshold when not tuned (and the one ``val_dice`` uses).
        tune_threshold: at export, use the threshold maximising pooled Dice on the validation
            split (from the best epoch's probability histograms).
        mean / std: 0-1 RGB normalisation (None = training-image statistics for ``plain``,
            the timm encoder's own otherwise).
        val_fraction / split_seed: hash split when the manifest has no ``split`` column.
        max_images: use only the first N annotated images.
        loader_workers: DataLoader processes per Ray worker (0 = in the training process).
        seed: patch/augmentation seed.
    """

    data: str = ""
    unet: UNetConfig = UNetConfig()
    encoder_weights: str | None = None
    encoder_sha256: str | None = None
    patch: PatchConfig = PatchConfig(patch_size=256, patches_per_image=64, empty_fraction=0.1,
                                     n_pos=0, n_neg=0)
    augment: AugmentConfig = AugmentConfig()
    loss: UNetLossConfig = UNetLossConfig()
    epochs: int = 30
    early_stopping_patience: int | None = 8
    batch_size: int = 8
    lr: float = 2e-3
    weight_decay: float = 1e-4
    plateau_factor: float = 0.5
    plateau_patience: int = 3
    threshold: float = 0.5
    tune_threshold: bool = True
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    val_fraction: float = 0.2
    split_seed: int = 0
    max_images: int | None = None
    loader_workers: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")
        if self.batch_size < 1 or self.epochs < 1:
            raise ValueError("batch_size and epochs must be >= 1")


# -- the task --------------------------------------------------------------------------------
class UNetTask:
    """A U-Net for :func:`rootflow.training.loop.fit` (see the module docstring)."""

    def __init__(self, cfg: UNetTrainConfig) -> None:
        self.cfg = cfg

    def setup(self, ctx: LoopContext) -> None:
        cfg = self.cfg
        if not cfg.data:
            raise ValueError("UNetTrainConfig.data is empty: give an annotated manifest or a "
                             "folder of image/mask pairs")
        self.ctx = ctx
        opts = ctx.storage_options
        self.model = build_unet(cfg.unet, encoder_weights=cfg.encoder_weights,
                                encoder_sha256=cfg.encoder_sha256, storage_options=opts)
        # channels-last: ~40 % faster training steps on CPU (oneDNN), also the fast GPU layout
        self.model = self.model.to(memory_format=torch.channels_last)
        self.net = ctx.prepare_model(self.model)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr,
                                     weight_decay=cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.opt, mode="max", factor=cfg.plateau_factor, patience=cfg.plateau_patience)

        train_t, val_t = split_annotated(cfg, storage_options=opts)
        self.train_ids = train_t["image_id"].to_pylist()
        self.val_ids = val_t["image_id"].to_pylist()
        train_pairs = load_pairs(train_t, storage_options=opts)
        # each worker decodes only the validation images it segments
        mine = val_t.take(list(range(ctx.world_rank, val_t.num_rows, ctx.world_size)))
        self.val_pairs = load_pairs(mine, storage_options=opts)
        self.val_sdm = [signed_distance_map(p.mask) for p in self.val_pairs]
        self.mean, self.std = normalisation(cfg, self.model, train_pairs)
        self.val_hist: dict[str, list[float]] | None = None

        self.train_ds = PatchDataset(train_pairs, cfg.patch, seed=cfg.seed,
                                     transform=build_augment(cfg.augment))
        shard = -(-len(self.train_ds) // ctx.world_size)
        self.train_loader = ctx.loader(self.train_ds, batch_size=cfg.batch_size, shuffle=True,
                                       drop_last=shard > cfg.batch_size,
                                       num_workers=cfg.loader_workers)
        dev = ctx.device
        self._mean_t = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1) * 255.0
        self._std_t = torch.tensor(self.std, device=dev).view(1, 3, 1, 1) * 255.0

    # -- steps ---------------------------------------------------------------------------------
    def _inputs(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` -> normalised float ``(B, 3, H, W)`` (as UNetSegmenter does)."""
        x = images.to(self.ctx.device).permute(0, 3, 1, 2).float()
        return ((x - self._mean_t) / self._std_t).contiguous(memory_format=torch.channels_last)

    def train_epoch(self, epoch: int) -> dict[str, float]:
        self.train_ds.set_epoch(epoch)
        self.net.train()
        dev = self.ctx.device
        sums: dict[str, float] = {}
        n = 0
        for batch in self.train_loader:
            logits = self.net(self._inputs(batch["image"]))
            mask = batch["mask"].to(dev).unsqueeze(1)
            sdm = batch["sdm"].to(dev).unsqueeze(1)
            loss, parts = unet_loss(logits, mask, sdm, self.cfg.loss)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
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

    def segmenter(self, threshold: float | None = None) -> UNetSegmenter:
        """The model as it is now, wrapped for whole-image tiled inference."""
        return UNetSegmenter(LoopContext.unwrap(self.net), self.cfg.unet,
                             threshold=self.cfg.threshold if threshold is None else threshold,
                             mean=self.mean, std=self.std, device=self.ctx.device)

    def validate(self, epoch: int) -> dict[str, float]:
        from rootflow.evaluation.metrics import PixelMeter, summarize_pixels

        seg = self.segmenter()
        meter = PixelMeter(cldice=True)
        sums = {"loss_sum": 0.0, "loss_n": 0.0}
        pos = np.zeros(HIST_BINS, np.float64)
        neg = np.zeros(HIST_BINS, np.float64)
        for pair, sdm in zip(self.val_pairs, self.val_sdm, strict=True):
            prob = seg.predict_proba(pair.image)
            truth = pair.mask
            meter.update(prob >= seg.threshold, truth)
            bins = np.minimum((prob * HIST_BINS).astype(np.int64), HIST_BINS - 1)
            pos += np.bincount(bins[truth], minlength=HIST_BINS)
            neg += np.bincount(bins[~truth], minlength=HIST_BINS)
            p = torch.from_numpy(prob).clamp(1e-6, 1 - 1e-6)
            logits = torch.log(p) - torch.log1p(-p)
            _, parts = unet_loss(logits[None, None], torch.from_numpy(truth)[None, None],
                                 torch.from_numpy(sdm)[None, None], self.cfg.loss)
            sums["loss_sum"] += parts["loss"]
            sums["loss_n"] += 1.0
        sums.update({f"px_{k}": v for k, v in meter.sums().items()})
        for i in range(HIST_BINS):
            sums[f"hist_pos_{i:03d}"] = float(pos[i])
            sums[f"hist_neg_{i:03d}"] = float(neg[i])
        red = self.ctx.all_reduce(sums)
        self.val_hist = {"pos": [red[f"hist_pos_{i:03d}"] for i in range(HIST_BINS)],
                         "neg": [red[f"hist_neg_{i:03d}"] for i in range(HIST_BINS)]}
        best_t, best_dice = best_threshold(self.val_hist["pos"], self.val_hist["neg"])
        px = summarize_pixels({k[3:]: v for k, v in red.items() if k.startswith("px_")})
        out = {k: px[k] for k in ("dice", "iou", "precision", "recall", "cldice", "n_images")}
        out.update(loss=red["loss_sum"] / max(red["loss_n"], 1.0), best_threshold=best_t,
                   dice_at_best_threshold=best_dice)
        return out

    def on_epoch_end(self, epoch: int, metrics: Mapping[str, float]) -> None:
        self.sched.step(metrics["val_dice"])

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"model": LoopContext.unwrap(self.net).state_dict(),
                "opt": self.opt.state_dict(), "sched": self.sched.state_dict(),
                "mean": list(self.mean), "std": list(self.std), "val_hist": self.val_hist}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from rootflow.models.checkpoint import load_state_dict_strict

        load_state_dict_strict(LoopContext.unwrap(self.net), state["model"], what="U-Net")
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.mean = tuple(float(v) for v in state["mean"])
        self.std = tuple(float(v) for v in state["std"])
        dev = self.ctx.device
        self._mean_t = torch.tensor(self.mean, device=dev).view(1, 3, 1, 1) * 255.0
        self._std_t = torch.tensor(self.std, device=dev).view(1, 3, 1, 1) * 255.0
        self.val_hist = state.get("val_hist")

    def export(self, uri: str) -> str:
        cfg = self.cfg
        threshold, source = cfg.threshold, "config"
        best = dict(self.ctx.best or {})
        if cfg.tune_threshold and self.val_hist is not None and sum(self.val_hist["pos"]) > 0:
            threshold, dice = best_threshold(self.val_hist["pos"], self.val_hist["neg"])
            source = "validation pooled Dice"
            best["val_dice_at_threshold"] = dice
        meta = {"task": rf_config.to_dict(cfg), "run": rf_config.to_dict(self.ctx.run),
                "best": best, "threshold_source": source,
                "train_image_ids": self.train_ids, "val_image_ids": self.val_ids}
        save_unet(LoopContext.unwrap(self.net), cfg.unet, uri, threshold=threshold,
                  mean=self.mean, std=self.std, meta=meta,
                  storage_options=self.ctx.storage_options)
        return uri


# -- helpers ---------------------------------------------------------------------------------
def pooled_dice(tp: float, fp: float, fn: float) -> float:
    """``2 TP / (2 TP + FP + FN)`` over all pixels; 1.0 when there is no root and none found."""
    den = 2 * tp + fp + fn
    return 2 * tp / den if den > 0 else 1.0


def best_threshold(pos: Sequence[float], neg: Sequence[float]) -> tuple[float, float]:
    """The bin edge ``k / bins`` maximising pooled Dice, from probability histograms.

    Args:
        pos / neg: counts of root / soil pixels per probability bin ``[k/bins, (k+1)/bins)``.

    Returns:
        ``(threshold, dice)``; ties go to the threshold closest to 0.5.
    """
    p = np.asarray(pos, np.float64)
    q = np.asarray(neg, np.float64)
    bins = len(p)
    tp = np.cumsum(p[::-1])[::-1]  # predicted root at threshold k/bins: bins >= k
    fp = np.cumsum(q[::-1])[::-1]
    fn = p.sum() - tp
    den = 2 * tp + fp + fn
    dice = np.where(den > 0, 2 * tp / np.maximum(den, 1e-12), 1.0)
    ks = np.arange(1, bins)  # thresholds strictly inside (0, 1)
    d = dice[1:]
    order = np.lexsort((np.abs(ks / bins - 0.5), -d))
    k = int(ks[order[0]])
    return k / bins, float(dice[k])


def normalisation(cfg: UNetTrainConfig, model: torch.nn.Module,
                  pairs: Sequence[AnnotatedImage]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """0-1 RGB ``(mean, std)``: the config's, the timm encoder's, or the training images'."""
    if cfg.mean is not None and cfg.std is not None:
        return tuple(cfg.mean), tuple(cfg.std)
    enc = getattr(model, "encoder", None)
    if cfg.unet.encoder != "plain" and hasattr(enc, "default_mean"):
        return tuple(enc.default_mean), tuple(enc.default_std)  # type: ignore[union-attr]
    s = np.zeros(3)
    s2 = np.zeros(3)
    n = 0
    for p in pairs:  # float64 sums over a strided subsample: exact enough, bounded memory
        px = p.image[::4, ::4].reshape(-1, 3).astype(np.float64) / 255.0
        s += px.sum(0)
        s2 += (px**2).sum(0)
        n += len(px)
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(s2 / max(n, 1) - mean**2, 1e-6))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def split_annotated(cfg: UNetTrainConfig, *, storage_options: storage.StorageLike = None,
                    ) -> tuple[Any, Any]:
    """``(train, val)`` tables of ``cfg.data``.

    Raises:
        AnnotationError: no annotated images, or too few to hold out a validation image.
    """
    from rootflow.training.rootsam_task import load_annotated

    table = load_annotated(cfg.data, storage_options=storage_options)
    if cfg.max_images:
        table = table.slice(0, cfg.max_images)
    train_t, val_t = split_table(table, val_fraction=cfg.val_fraction, seed=cfg.split_seed)
    if val_t.num_rows == 0 or train_t.num_rows == 0:
        raise AnnotationError(f"{cfg.data}: {table.num_rows} annotated image(s) give "
                              f"{train_t.num_rows} for training and {val_t.num_rows} for "
                              f"validation (val_fraction={cfg.val_fraction}); need both")
    return train_t, val_t


def check_data(cfg: UNetTrainConfig, *, storage_options: storage.StorageLike = None) -> int:
    """Fail fast on the driver (before Ray starts workers) on unusable annotations.

    Reads only the image headers (PIL) to compare image and mask sizes; a file PIL cannot
    open is left to the workers' full decoder.

    Returns:
        The number of annotated images.

    Raises:
        AnnotationError: no pairs, no split possible, a missing file, or a wrong-size mask.
    """
    from PIL import Image

    train_t, val_t = split_annotated(cfg, storage_options=storage_options)
    n = 0
    for table in (train_t, val_t):
        for image_uri, mask_uri in zip(table["image_uri"].to_pylist(),
                                       table["mask_uri"].to_pylist(), strict=True):
            sizes: list[tuple[int, int] | None] = []
            for uri in (image_uri, mask_uri):
                try:
                    data = storage.read_bytes(uri, storage_options)
                except (OSError, FileNotFoundError) as e:
                    raise AnnotationError(f"{uri}: cannot read ({e})") from None
                try:
                    with Image.open(io.BytesIO(data)) as im:
                        sizes.append(im.size)
                except Exception:  # noqa: BLE001 - the workers' decoder will say what is wrong
                    sizes.append(None)
            size_i, size_m = sizes
            if size_i is not None and size_m is not None and size_i != size_m:
                (iw, ih), (mw, mh) = size_i, size_m
                raise AnnotationError(f"{mask_uri}: mask is {mw}x{mh} px, image is {iw}x{ih} "
                                      f"({image_uri})")
            n += 1
    return n


# -- the run ---------------------------------------------------------------------------------
def run_config(cfg: UNetTrainConfig, out: str, *, max_minutes: float | None = 20.0,
               num_workers: int = 1, use_gpu: bool = False,
               cpus_per_worker: float | None = None, max_failures: int = 1) -> TrainRunConfig:
    """The loop settings of :func:`train_unet` (``<out>/run``, keep-best by ``val_dice``)."""
    if cpus_per_worker is None:
        cpus_per_worker = float(max(1, (os.cpu_count() or 2) // max(1, num_workers)))
    return TrainRunConfig(
        name=RUN_NAME, storage_path=out, epochs=cfg.epochs, num_workers=num_workers,
        use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, max_failures=max_failures,
        metric="val_dice", mode="max", num_to_keep=2,
        early_stopping_patience=cfg.early_stopping_patience, seed=cfg.seed,
        export_uri=storage.join(storage.normalize(out), MODEL_FILE), max_minutes=max_minutes)


def train_unet(data: str, out: str, *, cfg: UNetTrainConfig | None = None,
               max_minutes: float | None = 20.0, num_workers: int = 1, use_gpu: bool = False,
               cpus_per_worker: float | None = None, max_failures: int = 1,
               storage_options: storage.StorageLike = None, check: bool = True,
               started: float | None = None) -> dict[str, Any]:
    """Train (or resume) a U-Net into the folder ``out`` and write ``<out>/train.json``.

    Needs a running Ray (``rootflow.inference._cli.init_ray``). Calling it again with the same
    ``out`` resumes from the latest checkpoint up to ``cfg.epochs``; a finished run re-exports.

    Args:
        data: annotated manifest or folder of pairs (overrides ``cfg.data``).
        out: output folder URI (local or ``s3://``).
        cfg: the recipe (default :class:`UNetTrainConfig`).
        max_minutes: wall-clock budget of this call (None = none).
        num_workers / use_gpu / cpus_per_worker / max_failures: Ray Train execution
            (``cpus_per_worker`` None = this machine's cores split over the workers, which is
            also torch's thread count per worker).
        check: run :func:`check_data` first (the CLI already has).
        started: ``time.time()`` the budget counts from (default: now; the CLI passes its own
            start, so Ray's start-up counts too).

    Returns:
        The summary printed by the CLI: ``model_uri``, ``sha256``, ``version``, ``best_epoch``,
        ``val_dice``, ``threshold``, ``epochs_run``, ``epochs``, ``complete``,
        ``stopped_by_budget``, ``seconds``, ``train_json``.

    Raises:
        AnnotationError: unusable annotations (checked before any worker starts).
    """
    from rootflow.models import checkpoint as ckpt_io

    started = time.time() if started is None else started
    cfg = dataclasses.replace(cfg or UNetTrainConfig(), data=data)
    if check:
        check_data(cfg, storage_options=storage_options)
    out = storage.normalize(out)
    if max_minutes is not None:  # what is left of the budget when the loop starts
        max_minutes = max(1e-3, max_minutes - (time.time() - started) / 60.0)
    run = run_config(cfg, out, max_minutes=max_minutes, num_workers=num_workers,
                     use_gpu=use_gpu, cpus_per_worker=cpus_per_worker, max_failures=max_failures)
    res = fit(functools.partial(UNetTask, cfg), run=run, storage_options=storage_options)
    seconds = time.time() - started
    blob = ckpt_io.read_verified(res.export_uri, storage_options=storage_options)
    sha = ckpt_io.sha256_bytes(blob)
    seg = UNetSegmenter.from_bytes(blob, uri=res.export_uri)
    summary = {
        "model_uri": res.export_uri, "sha256": sha, "version": seg.version,
        "best_epoch": res.best_epoch, "val_dice": res.best_metrics.get("val_dice"),
        "threshold": seg.threshold,
        "val_dice_at_threshold": seg.train_info.get("best", {}).get("val_dice_at_threshold"),
        "epochs_run": res.epochs_run, "epochs": cfg.epochs, "complete": res.complete,
        "stopped_early": res.stopped_early, "stopped_by_budget": res.stopped_by_budget,
        "seconds": round(seconds, 1),
        "train_seconds": round(sum(h.get("epoch_time_s", 0.0) for h in res.history), 1),
        "train_json": storage.join(out, RECORD_FILE),
    }
    record = {**summary, "config": rf_config.to_dict(cfg), "run": rf_config.to_dict(run),
              "best_metrics": res.best_metrics, "history": res.history,
              "train_image_ids": seg.train_info.get("train_image_ids"),
              "val_image_ids": seg.train_info.get("val_image_ids")}
    storage.write_bytes(summary["train_json"], json.dumps(record, indent=2).encode(),
                        storage_options)
    return summary
