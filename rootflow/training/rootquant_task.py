"""RootQuant training and fine-tuning as a task of the shared loop (:mod:`rootflow.training.loop`).

There is no RootQuant-specific epoch loop: :class:`RootQuantTask` implements the loop's task
protocol (setup / train_epoch / validate / state_dict / load_state_dict / export) and
:func:`train` hands it to :func:`rootflow.training.loop.fit`, which runs it under Ray Train
(checkpoints every epoch, keep-best, resume, rank-0 writes).

Data: per-image labels (:mod:`rootflow.training.labels`) and the images they name. Each image is
read once, resampled to the model's ``mm_per_px`` and kept in memory (uint8) for the run; every
epoch draws a fresh augmentation (flips, 90-degree turns, brightness/contrast, and a random
offset of the tile grid so the model never learns where tile borders fall), cuts it into
tiles, and the tiles of ``batch_images`` images go through the network together; their cell
maps are summed per image and compared with the image's label. Where a mask exists
(``mask_uri``), every cell of every tile is also supervised with the length/area of its part of
the mask (:func:`rootflow.training.labels.density_maps`,
:func:`rootflow.models.rootquant.cell_loss`): image sums alone were too weak a signal for a
small network trained from scratch (it collapsed to "no root" on every image).

Fine-tuning to a new species from little data is the same task with ``init_from`` (a RootQuant
checkpoint) and ``optim.head_only_epochs > 0``: the backbone is frozen (and its BatchNorm
statistics too) for those first epochs, then the whole network trains at ``backbone_lr``
(lower than the head's ``lr``), the usual recipe against overwriting good features with the
gradients of a randomly initialised head.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from rootflow import config as _config
from rootflow.evaluation import metrics as rm
from rootflow.io import storage
from rootflow.models.rootquant import RootQuantConfig
from rootflow.training import labels as _labels
from rootflow.training.loop import LoopContext, TrainRunConfig

if TYPE_CHECKING:
    import pyarrow as pa
    import torch

    from rootflow.training.loop import FitResult


@dataclasses.dataclass(frozen=True)
class RootQuantDataConfig:
    """Where labels and images come from and how they are split.

    Attributes:
        source: ``table`` (CSV/Parquet, mapped by ``columns``), ``traits`` (the Delta traits
            table, ``model_name == "mask"``) or ``masks`` (a manifest with ``mask_uri``;
            labels measured with :func:`rootflow.traits.measure`).
        uri: the label table / Delta table / manifest.
        columns: column mapping for ``source="table"``.
        trait_length / trait_area: trait columns (``traits``) or ``measure`` keys (``masks``).
        base_uri: folder that relative image names in a label table resolve against.
        manifest: manifest to take dpi (and canonical URIs) from, matched on URI or file name.
        default_dpi: dpi for labels that still have none.
        val_uri: a separate validation label source of the same kind (else a split).
        val_fraction: share of images held out as whole tubes/windows (seeded by ``split_seed``)
            without ``val_uri`` (:mod:`rootflow.training.splits`).
        folds / fold: grouped k-fold split instead (``folds > 1``; ``fold`` is held out).
        limit: use only this many training images (chosen by ``split_seed``): learning curves.
        tile_labels: when labels carry a ``mask_uri`` (``columns.mask``, ``source: masks``, or
            a manifest with masks), supervise every cell with the length/area its part of the
            mask holds (:func:`rootflow.training.labels.density_maps`), on top of the image
            loss. Images without a usable mask fall back to the image loss alone.
    """

    source: Literal["table", "traits", "masks"] = "table"
    uri: str = ""
    columns: _labels.LabelColumns = dataclasses.field(default_factory=_labels.LabelColumns)
    trait_length: str = "length_mm"
    trait_area: str = "projected_area_mm2"
    base_uri: str | None = None
    manifest: str | None = None
    default_dpi: float | None = None
    val_uri: str | None = None
    val_fraction: float = 0.2
    folds: int = 0
    fold: int = 0
    split_seed: int = 0
    limit: int | None = None
    tile_labels: bool = True


@dataclasses.dataclass(frozen=True)
class RootQuantOptimConfig:
    """Optimiser and schedule.

    Attributes:
        batch_images: images per step (all their tiles go through together).
        lr: head learning rate (and backbone's when ``backbone_lr`` is None).
        backbone_lr: backbone learning rate once it trains (fine-tuning: lower than ``lr``).
        weight_decay: AdamW weight decay.
        head_only_epochs: first epochs with the backbone frozen (fine-tuning).
        schedule: ``cosine`` decay over the run's epochs after ``warmup_epochs`` of linear
            warm-up, or ``constant``. A function of the epoch alone, so resume needs no state.
        grad_clip_norm: clip the gradient norm (None = off); guards the exp() of the head.
        precise_bn_images: after each epoch in which the backbone trains, recompute the
            BatchNorm running statistics as an exact average over this many training images
            (0 = off). Running averages lag weights that move fast (small data, from scratch):
            measured here, eval-mode predictions were near chance while train-mode ones fit.
    """

    batch_images: int = 8
    lr: float = 1e-3
    backbone_lr: float | None = None
    weight_decay: float = 1e-4
    head_only_epochs: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: int = 0
    grad_clip_norm: float | None = 5.0
    precise_bn_images: int = 256


@dataclasses.dataclass(frozen=True)
class RootQuantLossConfig:
    """Weights of :func:`rootflow.models.rootquant.rootquant_loss` (per image) and
    :func:`rootflow.models.rootquant.cell_loss` (per cell, where masks give cell labels).

    Attributes:
        image_weight / tile_weight: weights of the image-level and the dense (per-cell, where
            masks give cell labels) loss.
        cell_presence_min_length_mm: a cell counts as "root present" above this length.
    """

    huber_delta: float = 1.0
    area_weight: float = 1.0
    presence_weight: float = 1.0
    presence_min_length_mm: float = 0.0
    image_weight: float = 1.0
    tile_weight: float = 1.0
    cell_presence_min_length_mm: float = 0.05


@dataclasses.dataclass(frozen=True)
class RootQuantAugmentConfig:
    """Label-preserving augmentations (length and area do not change under any of them)."""

    flips: bool = True
    rot90: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    random_offset: bool = True


@dataclasses.dataclass(frozen=True)
class RootQuantTrainConfig:
    """A RootQuant training or fine-tuning run (saved inside the exported checkpoint).

    Attributes:
        model: network and input scale for a fresh model (ignored with ``init_from``).
        init_from / init_sha256: RootQuant checkpoint to start from (fine-tuning); its own
            config (backbone, ``mm_per_px``, tiles) defines the model.
        presence_threshold: the hurdle decision used for validation metrics (as the predictor).
        run: how the loop runs (workers, storage, checkpoint ranking).
    """

    model: RootQuantConfig = dataclasses.field(default_factory=RootQuantConfig)
    init_from: str | None = None
    init_sha256: str | None = None
    data: RootQuantDataConfig = dataclasses.field(default_factory=RootQuantDataConfig)
    optim: RootQuantOptimConfig = dataclasses.field(default_factory=RootQuantOptimConfig)
    loss: RootQuantLossConfig = dataclasses.field(default_factory=RootQuantLossConfig)
    augment: RootQuantAugmentConfig = dataclasses.field(default_factory=RootQuantAugmentConfig)
    presence_threshold: float | None = 0.5
    run: TrainRunConfig = dataclasses.field(
        default_factory=lambda: TrainRunConfig(name="rootquant", metric="val_loss", mode="min"))


# --------------------------------------------------------------------------------------------
# labels
# --------------------------------------------------------------------------------------------
def load_labels(data: RootQuantDataConfig, *, uri: str | None = None,
                storage_options: storage.StorageLike = None) -> pa.Table:
    """Labels of ``data.source`` at ``uri`` (default ``data.uri``), with dpi resolved."""
    uri = uri or data.uri
    if not uri:
        raise ValueError("data.uri is not set: give a label table, traits table or manifest")
    if data.source == "table":
        table = _labels.read_labels(uri, columns=data.columns, base_uri=data.base_uri,
                                    storage_options=storage_options)
    elif data.source == "traits":
        table = _labels.from_traits_table(uri, length_column=data.trait_length,
                                          area_column=data.trait_area,
                                          storage_options=storage_options)
    elif data.source == "masks":
        from rootflow.io.manifest import read_manifest

        table = _labels.from_masks(read_manifest(uri, storage_options=storage_options),
                                   length_key=data.trait_length, area_key=data.trait_area,
                                   storage_options=storage_options)
    else:
        raise ValueError(f"unknown data.source {data.source!r}; use table, traits or masks")
    if data.manifest:
        from rootflow.io.manifest import read_manifest

        table = _labels.attach_manifest(table, read_manifest(data.manifest,
                                                             storage_options=storage_options))
    if data.default_dpi:
        table = _labels.fill_dpi(table, data.default_dpi)
    _labels.require_dpi(table)
    return table


def split_labels(table: pa.Table, data: RootQuantDataConfig) -> tuple[pa.Table, pa.Table]:
    """Train/validation parts by ``folds``/``fold`` or ``val_fraction``, then ``limit``.

    Both keep whole tubes (or windows of a single tube) on one side
    (:mod:`rootflow.training.splits`): sessions of one window are near-duplicates.
    """
    import pyarrow as pa

    from rootflow.training import splits

    if data.folds > 1:
        train, val = splits.fold_split(table, k=data.folds, fold=data.fold, seed=data.split_seed)
    else:
        train, val = splits.grouped_split(table, val_fraction=data.val_fraction,
                                          seed=data.split_seed)
    if data.limit is not None and data.limit < train.num_rows:
        keep = np.sort(np.random.default_rng(data.split_seed + 1).permutation(train.num_rows)
                       [:data.limit])
        train = train.take(pa.array(keep))
    return train, val


# --------------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------------
class RootQuantImages:
    """Map-style dataset: item ``i`` -> ``(tiles uint8 (N, 3, t, t), length_mm, area_mm2,
    cell_labels (N, 2, g, g) float32, NaN without a mask)``.

    Images are read and resampled to ``mm_per_px`` on first use and cached (uint8), so later
    epochs cost only augmentation and tiling. With ``tile_labels`` and a ``mask_uri`` column,
    the mask's length/area density maps (:func:`rootflow.training.labels.density_maps`) are
    cached too and go through the same flips, turns and grid offset as the image, so every
    cell of every tile gets its own length and area. Augmentations are seeded by
    (seed, epoch, index) so a resumed run sees the same data it would have seen.
    """

    def __init__(self, table: pa.Table, *, mm_per_px: float, tile_px: int, cell_px: int,
                 fill: tuple[int, int, int], augment: RootQuantAugmentConfig | None,
                 storage_options: storage.StorageLike = None, seed: int = 0,
                 tile_labels: bool = False) -> None:
        self.uris = table["image_uri"].to_pylist()
        self.length_mm = table["length_mm"].to_numpy().astype(np.float32)
        self.area_mm2 = table["area_mm2"].to_numpy().astype(np.float32)
        self.dpi = table["dpi"].to_numpy(zero_copy_only=False).astype(float)
        self.mm_per_px, self.tile_px, self.cell_px, self.fill = mm_per_px, tile_px, cell_px, fill
        self.augment = augment
        self.storage_options = storage_options
        self.seed = seed
        self.epoch = 0
        self._cache: dict[int, np.ndarray] = {}
        self.mask_uris: list[str | None] = (
            table["mask_uri"].to_pylist() if tile_labels and "mask_uri" in table.column_names
            else [None] * len(self.uris))
        self._density: dict[int, np.ndarray | None] = {}

    def __len__(self) -> int:
        return len(self.uris)

    def image(self, i: int) -> np.ndarray:
        """Image ``i`` at the model scale (cached)."""
        if i not in self._cache:
            from rootflow.io import images
            from rootflow.models.rootquant import to_model_scale

            rgb, _ = images.decode(storage.read_bytes(self.uris[i], self.storage_options))
            self._cache[i] = to_model_scale(rgb, dpi=float(self.dpi[i]), mm_per_px=self.mm_per_px)
        return self._cache[i]

    def density(self, i: int) -> np.ndarray | None:
        """Length/area density maps of image ``i`` at the model scale (cached), or None."""
        if i not in self._density:
            uri = self.mask_uris[i]
            dens = None
            if uri:
                from rootflow.io import images

                mask = images.decode_mask(storage.read_bytes(uri, self.storage_options))
                dens = _labels.density_maps(mask, dpi=float(self.dpi[i]),
                                            mm_per_px=self.mm_per_px,
                                            length_mm=float(self.length_mm[i]),
                                            area_mm2=float(self.area_mm2[i]))
                if dens is not None and dens.shape[:2] != self.image(i).shape[:2]:
                    dens = None  # mask and image disagree in size: no tile labels
            self._density[i] = dens
        return self._density[i]

    def __getitem__(self, i: int) -> tuple[np.ndarray, float, float, np.ndarray]:
        from rootflow.models.rootquant import tile_image

        img = self.image(i)
        dens = self.density(i)
        offset = (0, 0)
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            img, dens = _augment(img, dens, rng, self.augment)
            if self.augment.random_offset:
                offset = (int(rng.integers(self.tile_px)), int(rng.integers(self.tile_px)))
        tiles = tile_image(img, tile_px=self.tile_px, fill=self.fill, offset=offset)
        g = self.tile_px // self.cell_px
        if dens is None:
            cell_y = np.full((len(tiles), 2, g, g), np.nan, np.float32)
        else:
            cell_y = _labels.cell_sums(dens, tile_px=self.tile_px, cell_px=self.cell_px,
                                       offset=offset).astype(np.float32)
        return tiles, float(self.length_mm[i]), float(self.area_mm2[i]), cell_y


def _augment(img: np.ndarray, dens: np.ndarray | None, rng: np.random.Generator,
             cfg: RootQuantAugmentConfig) -> tuple[np.ndarray, np.ndarray | None]:
    """Same flips/turns for image and density maps; photometric changes to the image only."""
    def geo(a: np.ndarray | None, op: Any) -> np.ndarray | None:
        return None if a is None else op(a)

    if cfg.flips and rng.random() < 0.5:
        img, dens = img[:, ::-1], geo(dens, lambda a: a[:, ::-1])
    if cfg.flips and rng.random() < 0.5:
        img, dens = img[::-1], geo(dens, lambda a: a[::-1])
    if cfg.rot90:
        k = int(rng.integers(4))
        img, dens = np.rot90(img, k), geo(dens, lambda a: np.rot90(a, k))
    if cfg.brightness or cfg.contrast:
        gain = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
        shift = 255.0 * rng.uniform(-cfg.brightness, cfg.brightness)
        mean = img.mean(axis=(0, 1), keepdims=True)
        img = np.clip((img - mean) * gain + mean + shift, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(img), (None if dens is None else np.ascontiguousarray(dens))


def collate(items: list[tuple[np.ndarray, float, float, np.ndarray]]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images of different sizes -> ``(tiles (N,3,t,t) uint8, image_index (N,), length (B,),
    area (B,), cell_labels (N, 2, g, g))``: all tiles in one tensor, with the image each
    belongs to; cell labels (length, area) are NaN for tiles of images without a mask."""
    import torch

    tiles = torch.from_numpy(np.concatenate([it[0] for it in items], axis=0))
    counts = torch.tensor([len(it[0]) for it in items])
    index = torch.repeat_interleave(torch.arange(len(items)), counts)
    length = torch.tensor([it[1] for it in items], dtype=torch.float32)
    area = torch.tensor([it[2] for it in items], dtype=torch.float32)
    cell_y = torch.from_numpy(np.concatenate([it[3] for it in items], axis=0))
    return tiles, index, length, area, cell_y


def epoch_lr(base: float, epoch: int, *, epochs: int, schedule: str, warmup_epochs: int = 0,
             start_epoch: int = 0) -> float:
    """Learning rate of ``epoch`` (cosine to 1 % of ``base`` over ``[start_epoch, epochs)``)."""
    e = epoch - start_epoch
    if warmup_epochs and e < warmup_epochs:
        return base * (e + 1) / (warmup_epochs + 1)
    if schedule == "constant":
        return base
    span = max(1, epochs - start_epoch - warmup_epochs)
    t = min(1.0, max(0.0, (e - warmup_epochs) / span))
    return base * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * t)))


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------
class RootQuantTask:
    """The loop's task for RootQuant (see the module docstring)."""

    def __init__(self, config: RootQuantTrainConfig | Mapping[str, Any]) -> None:
        if not isinstance(config, RootQuantTrainConfig):
            config = _config.from_dict(RootQuantTrainConfig, config)
        self.config = config
        self._phase: str | None = None

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, ctx: LoopContext) -> None:
        import torch

        from rootflow.models import rootquant as rq

        self.ctx = ctx
        cfg = self.config
        opts = ctx.storage_options
        table = load_labels(cfg.data, storage_options=opts)
        if cfg.data.val_uri:
            self.train_labels = table
            self.val_labels = load_labels(cfg.data, uri=cfg.data.val_uri, storage_options=opts)
            if cfg.data.limit is not None:
                self.train_labels, _ = split_labels(
                    table, dataclasses.replace(cfg.data, val_fraction=0.0, folds=0))
        else:
            self.train_labels, self.val_labels = split_labels(table, cfg.data)
        if self.train_labels.num_rows == 0:
            raise ValueError(f"no training images left from {cfg.data.uri}")

        if cfg.init_from:
            model = rq.load(cfg.init_from, sha256=cfg.init_sha256, storage_options=opts)
        else:
            model = rq.build(cfg.model, storage_options=opts)
        self.net = model
        self.model = ctx.prepare_model(model)
        mc = model.config
        common: dict[str, Any] = {"mm_per_px": mc.mm_per_px, "tile_px": model.tile_px,
                                  "cell_px": mc.cell_px, "fill": model.fill,
                                  "storage_options": opts, "seed": ctx.run.seed}
        self.train_set = RootQuantImages(self.train_labels, augment=cfg.augment,
                                         tile_labels=cfg.data.tile_labels, **common)
        self.val_set = RootQuantImages(self.val_labels, augment=None, **common)
        self.loader = ctx.loader(self.train_set, batch_size=cfg.optim.batch_images, shuffle=True,
                                 collate_fn=collate)
        head = list(model.head.parameters())
        backbone = list(model.backbone.parameters())
        self.optimizer = torch.optim.AdamW(
            [{"params": backbone, "name": "backbone"}, {"params": head, "name": "head"}],
            lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)

    # -- phases ---------------------------------------------------------------------------------
    def _set_phase(self, epoch: int) -> str:
        phase = "head" if epoch < self.config.optim.head_only_epochs else "all"
        if phase != self._phase:
            self.net.set_backbone_trainable(phase == "all")
            if self.ctx.world_size > 1:  # DDP fixes its parameter set at construction
                self.model = self.ctx.prepare_model(self.net)
            self._phase = phase
        o = self.config.optim
        start = 0 if phase == "head" else o.head_only_epochs
        head_lr = epoch_lr(o.lr, epoch, epochs=self.ctx.run.epochs, schedule=o.schedule,
                           warmup_epochs=o.warmup_epochs, start_epoch=0)
        bb_lr = epoch_lr(o.backbone_lr if o.backbone_lr is not None else o.lr, epoch,
                         epochs=self.ctx.run.epochs, schedule=o.schedule,
                         warmup_epochs=o.warmup_epochs, start_epoch=start)
        for g in self.optimizer.param_groups:
            g["lr"] = head_lr if g["name"] == "head" else (bb_lr if phase == "all" else 0.0)
        return phase

    # -- epochs ---------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        import torch

        from rootflow.models.rootquant import cell_loss, rootquant_loss

        phase = self._set_phase(epoch)
        self.train_set.epoch = epoch
        self.model.train()
        if phase == "head":
            self.net.backbone.eval()  # frozen backbone: keep its BatchNorm statistics too
        lc, mc = self.config.loss, self.net.config
        sums: dict[str, float] = {"loss": 0.0, "loss_length": 0.0, "loss_area": 0.0,
                                  "loss_presence": 0.0, "cell_loss_amount": 0.0,
                                  "cell_loss_tile": 0.0, "cell_loss_presence": 0.0}
        n_img, n_tiles, t0 = 0, 0, time.perf_counter()
        dev = self.ctx.device
        for tiles, index, length, area, cell_y in self.loader:
            tiles, index = tiles.to(dev, non_blocking=True), index.to(dev)
            length, area, cell_y = length.to(dev), area.to(dev), cell_y.to(dev)
            out = self.model(tiles, index, len(length))
            img_loss, parts = rootquant_loss(
                out, length, area, huber_delta=lc.huber_delta, area_weight=lc.area_weight,
                presence_weight=lc.presence_weight,
                presence_min_length_mm=lc.presence_min_length_mm,
                length_scale_mm=mc.length_scale_mm, area_scale_mm2=mc.area_scale_mm2)
            t_loss, t_parts = cell_loss(
                out.tile_raw, cell_y, self.net.units, huber_delta=lc.huber_delta,
                area_weight=lc.area_weight, presence_weight=lc.presence_weight,
                presence_min_length_mm=lc.cell_presence_min_length_mm)
            loss = lc.image_weight * img_loss + lc.tile_weight * t_loss
            parts.update(t_parts)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.config.optim.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.net.parameters() if p.requires_grad],
                    self.config.optim.grad_clip_norm)
            self.optimizer.step()
            b = len(length)
            sums["loss"] += float(loss.detach()) * b
            for k, v in parts.items():
                sums[k] += v * b
            n_img += b
            n_tiles += len(tiles)
        dt = time.perf_counter() - t0
        if phase == "all" and self.config.optim.precise_bn_images > 0:
            self._precise_bn(epoch, self.config.optim.precise_bn_images)
        out_m = {k: v / max(1, n_img) for k, v in sums.items()}
        out_m.update({"images_per_s": n_img / dt if dt > 0 else 0.0,
                      "tiles_per_s": n_tiles / dt if dt > 0 else 0.0,
                      "lr": self.optimizer.param_groups[1]["lr"],
                      "backbone_trainable": float(phase == "all")})
        return out_m

    def _precise_bn(self, epoch: int, n_images: int) -> None:
        """Reset BatchNorm statistics to the exact mean/variance over training images (seeded
        subset, unaugmented), as "precise BN" does; each worker uses its own images (DDP
        broadcasts rank 0's buffers at the next forward)."""
        import torch

        bns = [m for m in self.net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not bns:
            return
        rng = np.random.default_rng((self.ctx.run.seed, epoch, self.ctx.world_rank))
        idx = rng.permutation(len(self.train_set))[:n_images]
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches below
        saved, self.train_set.augment = self.train_set.augment, None
        self.net.train()
        try:
            with torch.no_grad():
                bs = self.config.optim.batch_images
                for s in range(0, len(idx), bs):
                    tiles = collate([self.train_set[int(i)] for i in idx[s:s + bs]])[0]
                    self.net.forward_tiles(tiles.to(self.ctx.device))
        finally:
            self.train_set.augment = saved
            for m, mom in zip(bns, momenta, strict=True):
                m.momentum = mom

    def predict_val(self) -> dict[str, np.ndarray]:
        """This worker's validation shard: predictions and labels (``rank::world_size``)."""
        import torch

        from rootflow.models.rootquant import aggregate_tiles

        idx = list(range(self.ctx.world_rank, len(self.val_set), self.ctx.world_size))
        self.net.eval()
        preds: dict[str, list[float]] = {"length": [], "area": [], "logit": []}
        bs = self.config.optim.batch_images
        with torch.inference_mode():
            for s in range(0, len(idx), bs):
                items = [self.val_set[i] for i in idx[s:s + bs]]
                tiles, index = collate(items)[:2]
                summary = self.net.summarize(self.net.forward_tiles(tiles.to(self.ctx.device)))
                length, area, logit = aggregate_tiles(summary.cpu(), index, len(items))
                preds["length"] += length.tolist()
                preds["area"] += area.tolist()
                preds["logit"] += logit.tolist()
        logits = np.asarray(preds["logit"])
        return {"length_mm": np.asarray(preds["length"]), "area_mm2": np.asarray(preds["area"]),
                "presence_logit": logits, "presence": 1.0 / (1.0 + np.exp(-logits)),
                "true_length_mm": self.val_set.length_mm[idx].astype(float),
                "true_area_mm2": self.val_set.area_mm2[idx].astype(float)}

    def validate(self, epoch: int) -> dict[str, float]:
        """Exact metrics over all workers: additive sums are all-reduced, then turned into
        R2/MAE/RMSE/bias (the loop then averages identical values, a no-op)."""
        import torch

        from rootflow.models.rootquant import RootQuantOutput, rootquant_loss

        p = self.predict_val()
        lc, mc = self.config.loss, self.net.config
        n = len(p["length_mm"])
        loss_sum = 0.0
        if n:
            out = RootQuantOutput(length_mm=torch.tensor(p["length_mm"]),
                                  area_mm2=torch.tensor(p["area_mm2"]),
                                  presence_logit=torch.tensor(p["presence_logit"]),
                                  tile_raw=torch.zeros(1, 3))
            loss, _ = rootquant_loss(out, torch.tensor(p["true_length_mm"]),
                                     torch.tensor(p["true_area_mm2"]), huber_delta=lc.huber_delta,
                                     area_weight=lc.area_weight,
                                     presence_weight=lc.presence_weight,
                                     presence_min_length_mm=lc.presence_min_length_mm,
                                     length_scale_mm=mc.length_scale_mm,
                                     area_scale_mm2=mc.area_scale_mm2)
            loss_sum = float(loss) * n
        thr = self.config.presence_threshold
        keep = p["presence"] >= thr if thr is not None else np.ones(n, bool)
        length = np.where(keep, p["length_mm"], 0.0)
        area = np.where(keep, p["area_mm2"], 0.0)
        present = p["true_length_mm"] > lc.presence_min_length_mm
        sums = {"loss_sum": loss_sum, "n_images": float(n),
                "presence_correct": float(np.sum((p["presence"] >= 0.5) == present)),
                **rm.regression_sums(length, p["true_length_mm"], prefix="length_"),
                **rm.regression_sums(area, p["true_area_mm2"], prefix="area_")}
        sums = self.ctx.all_reduce(sums, op="sum")
        n_all = sums["n_images"]
        out_m = {"loss": sums["loss_sum"] / n_all if n_all else float("nan"),
                 "presence_accuracy": sums["presence_correct"] / n_all if n_all else float("nan"),
                 "n_images": n_all}
        out_m.update(rm.metrics_from_sums(sums, prefix="length_", unit="mm"))
        out_m.update(rm.metrics_from_sums(sums, prefix="area_", unit="mm2"))
        return out_m

    # -- state ----------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"model": {k: v.detach().cpu() for k, v in self.net.state_dict().items()},
                "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        from rootflow.models import checkpoint

        checkpoint.load_state_dict_strict(self.net, state["model"], what="RootQuant task state")
        self.optimizer.load_state_dict(state["optimizer"])

    def export(self, uri: str) -> str:
        """Write the RootQuant checkpoint (config + weights + training record); return ``uri``."""
        from rootflow.models import rootquant as rq

        meta = {"train_config": _config.to_dict(self.config),
                "best": self.ctx.best, "n_train_images": self.train_labels.num_rows,
                "n_val_images": self.val_labels.num_rows,
                "init_from": self.config.init_from}
        rq.save(self.net, uri, meta=meta, storage_options=self.ctx.storage_options)
        return uri


def train(config: RootQuantTrainConfig, *,
          storage_options: storage.StorageLike = None) -> FitResult:
    """Run a RootQuant training/fine-tuning job on the connected Ray (the shared loop)."""
    from rootflow.training.loop import fit

    return fit(functools.partial(RootQuantTask, config), run=config.run,
               storage_options=storage_options)
