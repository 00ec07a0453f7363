"""RootQuant training and fine-tuning as a task of the shared loop (:mod:`rootflow.training.loop`).

There is no RootQuant-specific epoch loop: :class:`RootQuantTask` implements the loop's task
protocol (setup / train_epoch / validate / state_dict / load_state_dict / export) and
:func:`train` hands it to :func:`rootflow.training.loop.fit`, which runs it under Ray Train
(checkpoints every epoch, keep-best, resume, rank-0 writes).

Data: per-image labels (:mod:`rootflow.training.labels`) and the images they name. Small
training sets are cached (read once, resampled to the model's ``mm_per_px``, kept as uint8);
larger ones (``data.cache_max_images``) or runs with ``data.loader_workers`` stream: each image is
read when drawn, so memory stays flat at any archive size. Every epoch draws a fresh
augmentation (flips, 90-degree turns, brightness/contrast, and a random offset of the tile grid
so the model never learns where tile borders fall) and cuts each image into tiles with their
context; at most ``optim.tile_batch`` tiles go through the network at once (exact gradient
accumulation above that, :meth:`RootQuantTask._step`); cell maps are summed per image and
compared with the image's label. Where a mask exists (``mask_uri``), every cell of every tile
is also supervised with the length/area of its part of the mask
(:func:`rootflow.training.labels.density_maps`, :func:`rootflow.models.rootquant.cell_loss`):
image sums alone were too weak a signal for a small network trained from scratch (it collapsed
to "no root" on every image).

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
        cache_images: keep every resampled image (and its density maps) in memory for the run
            (fast epochs, memory grows with the data). ``None``: cache when the training set
            has at most ``cache_max_images`` images and ``loader_workers`` is 0, else stream:
            read and resample each image when it is drawn (flat memory at any archive size).
        loader_workers: DataLoader processes reading and tiling images ahead of the step.
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
    cache_images: bool | None = None
    cache_max_images: int = 2000
    loader_workers: int = 0


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
        tile_batch: most tiles in one forward/backward pass. A step whose images have more
            tiles runs in micro-batches with exact gradient accumulation: a first pass without
            gradients gives every tile's sums, the image loss is differentiated with respect to
            them, then each micro-batch is run again and back-propagates its share (the image
            loss couples all tiles of an image, so plain accumulation would be wrong).
        amp: bf16 autocast of the forward passes on CUDA (ignored on CPU).
        steps_per_epoch: stop an epoch after this many steps (None = one pass over the data).
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
    tile_batch: int = 64
    amp: bool = True
    steps_per_epoch: int | None = None


@dataclasses.dataclass(frozen=True)
class RootQuantLossConfig:
    """Weights of :func:`rootflow.models.rootquant.rootquant_loss` (per image) and
    :func:`rootflow.models.rootquant.cell_loss` (per cell, where masks give cell labels).

    Attributes:
        image_weight / tile_weight: weights of the image-level and the dense (per-cell, where
            masks give cell labels) loss.
        cell_presence_min_length_mm: a cell counts as "root present" above this length.
        huber_delta: ``None`` (default) = squared error on the log1p image totals and on the
            cell amounts; a number = Huber with that transition (the seed's loss: ``1.0``).
            Why squared error is the default, with the numbers:
            :func:`rootflow.models.rootquant.regression_loss`.
    """

    huber_delta: float | None = None
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
        run: how the loop runs (workers, storage, checkpoint ranking: validation length R2 by
            default; ``val_loss`` (log space) picked an R2 0.84 epoch over a 0.90 one).
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
        default_factory=lambda: TrainRunConfig(name="rootquant", metric="val_length_r2",
                                               mode="max"))


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
    """Map-style dataset: item ``i`` -> ``(tiles uint8 (N, 3, s, s), length_mm, area_mm2,
    cell_labels (N, 2, g, g) float32, NaN without a mask, image area mm2)``; ``s`` is the tile
    plus its ``context`` (:func:`rootflow.models.rootquant.tile_image`), ``g = tile_px //
    cell_px`` (1 for the pooled head, whose cell is the tile).

    With ``cache`` images are read and resampled to ``mm_per_px`` on first use and kept
    (uint8), so later epochs cost only augmentation and tiling; without it every item is read
    when drawn (streaming: memory does not grow with the archive). With ``tile_labels`` and a ``mask_uri`` column,
    the mask's length/area density maps (:func:`rootflow.training.labels.density_maps`) are
    cached too and go through the same flips, turns and grid offset as the image, so every
    cell of every tile gets its own length and area. Augmentations are seeded by
    (seed, epoch, index) so a resumed run sees the same data it would have seen.
    """

    def __init__(self, table: pa.Table, *, mm_per_px: float, tile_px: int, cell_px: int,
                 fill: tuple[int, int, int], augment: RootQuantAugmentConfig | None,
                 storage_options: storage.StorageLike = None, seed: int = 0,
                 tile_labels: bool = False, context: tuple[int, int] = (0, 0),
                 cache: bool = True) -> None:
        self.uris = table["image_uri"].to_pylist()
        self.length_mm = table["length_mm"].to_numpy().astype(np.float32)
        self.area_mm2 = table["area_mm2"].to_numpy().astype(np.float32)
        self.dpi = table["dpi"].to_numpy(zero_copy_only=False).astype(float)
        self.mm_per_px, self.tile_px, self.cell_px, self.fill = mm_per_px, tile_px, cell_px, fill
        self.context = (int(context[0]), int(context[1]))
        self.cache = cache
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
        if i in self._cache:
            return self._cache[i]
        from rootflow.io import images
        from rootflow.models.rootquant import to_model_scale

        rgb, _ = images.decode(storage.read_bytes(self.uris[i], self.storage_options))
        img = to_model_scale(rgb, dpi=float(self.dpi[i]), mm_per_px=self.mm_per_px)
        if self.cache:
            self._cache[i] = img
        return img

    def density(self, i: int) -> np.ndarray | None:
        """Length/area density maps of image ``i`` at the model scale (cached), or None."""
        if i not in self._density or not self.cache:
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
            if not self.cache:
                return dens
            self._density[i] = dens
        return self._density[i]

    def __getitem__(self, i: int) -> tuple[np.ndarray, float, float, np.ndarray, float]:
        from rootflow.models.rootquant import image_area_mm2, tile_image

        img = self.image(i)
        dens = self.density(i)
        area_px = image_area_mm2(img.shape, self.mm_per_px)
        offset = (0, 0)
        if self.augment is not None:
            rng = np.random.default_rng((self.seed, self.epoch, i))
            img, dens = _augment(img, dens, rng, self.augment)
            if self.augment.random_offset:
                offset = (int(rng.integers(self.tile_px)), int(rng.integers(self.tile_px)))
        tiles = tile_image(img, tile_px=self.tile_px, fill=self.fill, offset=offset,
                           context=self.context)
        g = self.tile_px // self.cell_px
        if dens is None:
            cell_y = np.full((len(tiles), 2, g, g), np.nan, np.float32)
        else:
            cell_y = _labels.cell_sums(dens, tile_px=self.tile_px, cell_px=self.cell_px,
                                       offset=offset).astype(np.float32)
        return tiles, float(self.length_mm[i]), float(self.area_mm2[i]), cell_y, area_px


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


def collate(items: list[tuple[np.ndarray, float, float, np.ndarray, float]]
            ) -> tuple[torch.Tensor, ...]:
    """Images of different sizes -> ``(tiles (N,3,s,s) uint8, image_index (N,), length (B,),
    area (B,), cell_labels (N, 2, g, g), image_area_mm2 (B,))``: all tiles in one tensor, with
    the image each belongs to; cell labels (length, area) are NaN for tiles of images without
    a mask."""
    import torch

    tiles = torch.from_numpy(np.concatenate([it[0] for it in items], axis=0))
    counts = torch.tensor([len(it[0]) for it in items])
    index = torch.repeat_interleave(torch.arange(len(items)), counts)
    length = torch.tensor([it[1] for it in items], dtype=torch.float32)
    area = torch.tensor([it[2] for it in items], dtype=torch.float32)
    cell_y = torch.from_numpy(np.concatenate([it[3] for it in items], axis=0))
    img_area = torch.tensor([it[4] for it in items], dtype=torch.float32)
    return tiles, index, length, area, cell_y, img_area


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
        d = cfg.data
        cache = d.cache_images
        if cache is None:
            cache = d.loader_workers == 0 and self.train_labels.num_rows <= d.cache_max_images
        common: dict[str, Any] = {"mm_per_px": mc.mm_per_px, "tile_px": model.tile_px,
                                  "cell_px": model.label_cell_px, "fill": model.fill,
                                  "context": model.context, "storage_options": opts,
                                  "seed": ctx.run.seed}
        self.train_set = RootQuantImages(self.train_labels, augment=cfg.augment,
                                         tile_labels=d.tile_labels, cache=bool(cache), **common)
        self.val_set = RootQuantImages(
            self.val_labels, augment=None,
            cache=bool(cache) and self.val_labels.num_rows <= d.cache_max_images, **common)
        self.loader = ctx.loader(self.train_set, batch_size=cfg.optim.batch_images, shuffle=True,
                                 collate_fn=collate, num_workers=d.loader_workers)
        self._amp = bool(cfg.optim.amp) and ctx.device.type == "cuda"
        head = [*model.head.parameters(), model.presence_calib]
        backbone = list(model.backbone.parameters())
        assert len(head) + len(backbone) == len(list(model.parameters()))
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

        phase = self._set_phase(epoch)
        self.train_set.epoch = epoch
        self.model.train()
        if phase == "head":
            self.net.backbone.eval()  # frozen backbone: keep its BatchNorm statistics too
        sums: dict[str, float] = {"loss": 0.0, "loss_length": 0.0, "loss_area": 0.0,
                                  "loss_presence": 0.0, "cell_loss_amount": 0.0,
                                  "cell_loss_tile": 0.0, "cell_loss_presence": 0.0}
        n_img, n_tiles, t0 = 0, 0, time.perf_counter()
        dev = self.ctx.device
        limit = self.config.optim.steps_per_epoch
        for step, batch in enumerate(self.loader):
            if limit is not None and step >= limit:
                break
            tiles, index, length, area, cell_y, img_area = (t.to(dev, non_blocking=True)
                                                            for t in batch)
            self.optimizer.zero_grad(set_to_none=True)
            loss, parts = self._step(tiles, index, length, area, cell_y, img_area)
            if self.config.optim.grad_clip_norm:
                torch.nn.utils.clip_grad_norm_(
                    [p for p in self.net.parameters() if p.requires_grad],
                    self.config.optim.grad_clip_norm)
            self.optimizer.step()
            b = len(length)
            sums["loss"] += loss * b
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

    def _losses(self, out: Any, cell_raw: torch.Tensor | None, cell_y: torch.Tensor | None,
                length: torch.Tensor, area: torch.Tensor) -> tuple[Any, Any, dict[str, float]]:
        from rootflow.models.rootquant import cell_loss, rootquant_loss

        lc, mc = self.config.loss, self.net.config
        img_loss: Any = None
        parts: dict[str, Any] = {}
        if out is not None:
            img_loss, parts = rootquant_loss(
                out, length, area, huber_delta=lc.huber_delta, area_weight=lc.area_weight,
                presence_weight=lc.presence_weight,
                presence_min_length_mm=lc.presence_min_length_mm,
                length_scale_mm=mc.length_scale_mm, area_scale_mm2=mc.area_scale_mm2)
        t_loss = None
        if cell_raw is not None and cell_y is not None:
            t_loss, t_parts = cell_loss(
                cell_raw, cell_y, self.net.units, huber_delta=lc.huber_delta,
                area_weight=lc.area_weight, presence_weight=lc.presence_weight,
                presence_min_length_mm=lc.cell_presence_min_length_mm)
            parts = {**parts, **t_parts}
        return img_loss, t_loss, parts

    def _step(self, tiles: torch.Tensor, index: torch.Tensor, length: torch.Tensor,
              area: torch.Tensor, cell_y: torch.Tensor, img_area: torch.Tensor
              ) -> tuple[float, dict[str, float]]:
        """Forward + backward of one step (gradients accumulated in ``.grad``); returns the loss.

        At most ``optim.tile_batch`` tiles go through the network at once. Above that, the
        step is exact gradient accumulation over micro-batches: the image loss depends on the
        sums over all tiles of an image, so a first pass without gradients gives every tile's
        summary, the image loss is differentiated with respect to those summaries, and each
        micro-batch is then run again and back-propagates ``summary . dL/dsummary`` plus its
        share of the cell loss (weighted by its share of labelled tiles). Under DDP only the
        last micro-batch synchronises gradients.
        """
        import contextlib

        import torch

        lc = self.config.loss
        n_img, n = len(length), len(tiles)
        tb = max(1, int(self.config.optim.tile_batch))

        def amp() -> Any:
            return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._amp)

        if n <= tb:
            with amp():
                raw = self.model(tiles)
            out = self.net.images_from_summary(self.net.summarize(raw.float()), index, n_img,
                                               img_area, tile_raw=raw)
            img_loss, t_loss, parts = self._losses(out, raw.float(), cell_y, length, area)
            loss = lc.image_weight * img_loss + lc.tile_weight * t_loss
            loss.backward()
            return float(loss.detach()), parts

        chunks = [slice(s, min(n, s + tb)) for s in range(0, n, tb)]
        with torch.no_grad(), amp():
            summary = torch.cat([self.net.summarize(self.model(tiles[c]).float())
                                 for c in chunks])
        summary.requires_grad_(True)
        out = self.net.images_from_summary(summary, index, n_img, img_area)
        img_loss, _, parts = self._losses(out, None, None, length, area)
        calib = self.net.presence_calib
        # gradients w.r.t. the summaries (and the presence calibration, which is back-propagated
        # with the last micro-batch so that DDP synchronises it with everything else)
        d_summary, d_calib = torch.autograd.grad(lc.image_weight * img_loss, [summary, calib])
        known = torch.isfinite(cell_y).flatten(1).all(dim=1)
        n_known = int(known.sum())
        total = float(lc.image_weight * img_loss.detach())
        cell_parts: dict[str, float] = {}
        no_sync = getattr(self.model, "no_sync", None)
        for i, c in enumerate(chunks):
            last = i == len(chunks) - 1
            ctx = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
            with ctx:
                with amp():
                    raw = self.model(tiles[c])
                raw = raw.float()
                surrogate = (self.net.summarize(raw) * d_summary[c]).sum()
                if last and calib.requires_grad:
                    surrogate = surrogate + (calib * d_calib).sum()
                share = int(known[c].sum())
                if share and lc.tile_weight:
                    _, t_loss, t_parts = self._losses(None, raw, cell_y[c], length, area)
                    w = share / n_known
                    surrogate = surrogate + lc.tile_weight * w * t_loss
                    total += float(lc.tile_weight * w * t_loss.detach())
                    for k, v in t_parts.items():
                        cell_parts[k] = cell_parts.get(k, 0.0) + w * v
                surrogate.backward()
        parts.update(cell_parts)
        return total, parts

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
                tb = max(1, int(self.config.optim.tile_batch))
                for s in range(0, len(idx), bs):
                    tiles = collate([self.train_set[int(i)] for i in idx[s:s + bs]])[0]
                    for c in range(0, len(tiles), tb):
                        self.net.forward_tiles(tiles[c:c + tb].to(self.ctx.device))
        finally:
            self.train_set.augment = saved
            for m, mom in zip(bns, momenta, strict=True):
                m.momentum = mom

    def predict_val(self) -> dict[str, np.ndarray]:
        """This worker's validation shard: predictions and labels (``rank::world_size``)."""
        import torch

        idx = list(range(self.ctx.world_rank, len(self.val_set), self.ctx.world_size))
        self.net.eval()
        preds: dict[str, list[float]] = {"length": [], "area": [], "logit": []}
        bs = self.config.optim.batch_images
        with torch.inference_mode():
            for s in range(0, len(idx), bs):
                items = [self.val_set[i] for i in idx[s:s + bs]]
                tiles, index, _, _, _, img_area = collate(items)
                tb = max(1, int(self.config.optim.tile_batch))
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self._amp):
                    summary = torch.cat([
                        self.net.summarize(self.net.forward_tiles(
                            tiles[c:c + tb].to(self.ctx.device)).float()).cpu()
                        for c in range(0, len(tiles), tb)])
                o = self.net.images_from_summary(summary, index, len(items), img_area)
                length, area, logit = o.length_mm, o.area_mm2, o.presence_logit
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
