"""Embedding cache: run the frozen image encoder once per augmented view, train on the results.

RootSAM freezes SAM2.1's image encoder, which is most of the model's compute (Hiera-B+: 69.1 M
of SAM2.1 b+'s 80.9 M parameters; the trained prompt encoder + mask decoder are 4.2 M). For a given input it always returns the same features, so instead
of re-encoding every patch every epoch we draw ``views`` augmented versions of every training
patch up front (patch position, geometric *and* photometric augmentation are all applied before
the encoder, exactly as :class:`~rootflow.training.data.PatchDataset` does at ``epoch = view``),
encode each once, store the encoder outputs with the transformed mask and prompts on object
storage, and let the decoder train on them: epoch ``e`` reads view ``e % views``. With
``views >= epochs`` the cached run sees exactly the patches the uncached one would.

What it costs: a fixed pool of ``views`` draws per patch instead of a fresh draw every epoch, and
storage: per item ``256 x (S/16)^2 + 32 x (S/4)^2 + 64 x (S/8)^2`` values (~4.2 M at S = 1024,
8.4 MB in float16; the default). SAM2's decoder-side ``conv_s0``/``conv_s1`` projections run in
the image pass (sam2's ``forward_image``), so the cache stores their 32/64-channel outputs
(8x smaller than the 256-channel FPN maps) and RootSAM training keeps those two convolutions
frozen with the encoder, cached or not, so both paths train the same parameters.

Layout under ``<uri>/<key>/``: ``shard-VVV-SSSSS.pt`` files (one view's items, ``shard_size``
each, written with :func:`rootflow.models.checkpoint.save`) and ``index.json`` written last
(its presence means the cache is complete). ``key`` hashes everything that changes the
contents (variant, base weights, the frozen projections, images, patch/augment configs, seed,
views, dtype), so a stale cache is never reused and a rerun (or a restarted worker) reuses a
finished one. Workers build disjoint shards in parallel (``rank::world_size``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch

from rootflow.io import storage
from rootflow.models import checkpoint as ckpt_io
from rootflow.training.losses import signed_distance_map

INDEX = "index.json"


@dataclasses.dataclass(frozen=True)
class EmbeddingCacheConfig:
    """Where and how to cache encoder outputs.

    Attributes:
        uri: parent folder (local or ``s3://``); the cache lives in ``<uri>/<key>``.
        views: augmented draws per training patch (epoch ``e`` uses view ``e % views``).
        dtype: storage precision of the features (float16 halves size; SAM2 runs its encoder
            in bf16 on GPUs anyway).
        shard_size: items per shard file.
        encode_batch_size: patches per encoder call while building.
    """

    uri: str
    views: int = 4
    dtype: Literal["float16", "float32"] = "float16"
    shard_size: int = 64
    encode_batch_size: int = 4


def cache_key(*, model: Any, image_ids: Sequence[str], description: Mapping[str, Any],
              cfg: EmbeddingCacheConfig) -> str:
    """Hex digest naming a cache: model identity + frozen projections + data + settings."""
    h = hashlib.sha256()
    frozen = model.sam.sam_mask_decoder
    for name in ("conv_s0", "conv_s1"):
        for t in getattr(frozen, name).state_dict().values():
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    meta = {"variant": model.variant.name, "base": model.base_sha256,
            "images": list(image_ids), "desc": description, "views": cfg.views,
            "dtype": cfg.dtype, "shard_size": cfg.shard_size}
    h.update(json.dumps(meta, sort_keys=True, default=str).encode())
    return h.hexdigest()[:20]


def _shard_name(view: int, shard: int) -> str:
    return f"shard-{view:03d}-{shard:05d}.pt"


def build_embedding_cache(
    model: Any,
    dataset: Any,
    *,
    cfg: EmbeddingCacheConfig,
    key: str,
    views: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    storage_options: storage.StorageLike = None,
) -> str:
    """Encode this rank's shards of ``views x len(dataset)`` items; returns the cache URI.

    Every rank calls this with the same arguments, then the caller synchronises (barrier) and
    rank 0 calls :func:`finalize_embedding_cache`. Shards that already exist are skipped, so a
    restarted build resumes.

    Args:
        model: a :class:`~rootflow.models.rootsam.RootSAM` (encoder frozen, in eval mode).
        dataset: a :class:`~rootflow.training.data.PatchDataset` (``item(i, epoch=view)``).
        cfg: cache settings.
        key: from :func:`cache_key`.
        views: overrides ``cfg.views`` (validation caches one un-augmented view).
    """
    n_views = cfg.views if views is None else views
    root = storage.join(cfg.uri, key)
    if storage.exists(storage.join(root, INDEX), storage_options):
        return root
    n = len(dataset)
    per_view = math.ceil(n / cfg.shard_size)
    jobs = [(v, s) for v in range(n_views) for s in range(per_view)]
    dtype = getattr(torch, cfg.dtype)
    for v, s in jobs[rank::world_size]:
        uri = storage.join(root, _shard_name(v, s))
        if storage.exists(uri, storage_options):
            continue
        idx = range(s * cfg.shard_size, min(n, (s + 1) * cfg.shard_size))
        items = [dataset.item(i, epoch=v) for i in idx]
        feats: list[Any] = []
        for b in range(0, len(items), cfg.encode_batch_size):
            chunk = items[b:b + cfg.encode_batch_size]
            images = torch.as_tensor(np.stack([it["image"] for it in chunk]))
            with torch.inference_mode():
                emb = encode_patches(model, images)
            feats.append(emb)
        from rootflow.models.rootsam import ImageEmbeddings

        emb = ImageEmbeddings.cat(feats)
        shard = {
            "image_embed": emb.image_embed.to("cpu", dtype),
            "hr0": emb.high_res_feats[0].to("cpu", dtype),
            "hr1": emb.high_res_feats[1].to("cpu", dtype),
            "mask": torch.as_tensor(np.stack([it["mask"] for it in items])),
            "points": torch.as_tensor(np.stack([it["points"] for it in items])),
            "labels": torch.as_tensor(np.stack([it["labels"] for it in items])),
            "index": torch.as_tensor(np.array([it["index"] for it in items])),
        }
        ckpt_io.save(shard, uri, storage_options=storage_options)
    return root


def finalize_embedding_cache(root: str, *, n_items: int, views: int, shard_size: int,
                             description: Mapping[str, Any],
                             storage_options: storage.StorageLike = None) -> None:
    """Write ``index.json`` (rank 0, after every rank finished its shards)."""
    missing = [_shard_name(v, s) for v in range(views)
               for s in range(math.ceil(n_items / shard_size))
               if not storage.exists(storage.join(root, _shard_name(v, s)), storage_options)]
    if missing:
        raise RuntimeError(f"embedding cache {root} is incomplete: {missing[:5]} missing")
    index = {"n_items": n_items, "views": views, "shard_size": shard_size,
             "description": description}
    storage.write_bytes(storage.join(root, INDEX), json.dumps(index, default=str).encode(),
                        storage_options)


def encode_patches(model: Any, images: torch.Tensor) -> Any:
    """uint8 ``(B, P, P, 3)`` patches -> encoder features at the model's input size.

    Patches whose side is not the model's ``image_size`` are resized to it (bilinear), as
    ``SAM2ImagePredictor`` does: stage 1's 512 px patches reach a 1024 px encoder at 2x zoom.
    """
    x = model.preprocess(images)
    s = model.image_size
    if x.shape[-1] != s or x.shape[-2] != s:
        x = torch.nn.functional.interpolate(x, size=(s, s), mode="bilinear", align_corners=False)
    return model.encode(x)


class CachedPatchDataset:
    """Training items served from a finished cache: view ``epoch % views`` of each patch.

    Items are dicts of tensors: ``image_embed``, ``hr0``, ``hr1`` (stored dtype), ``mask`` bool
    ``(P, P)``, ``sdm`` float32, ``points`` ``(N, 2)``, ``labels`` ``(N,)``, ``index``. The
    current view's shards are read on :meth:`set_epoch` and kept in memory (one view at a time).
    """

    def __init__(self, root: str, *, storage_options: storage.StorageLike = None) -> None:
        self.root = root
        self.storage_options = storage_options
        index = json.loads(storage.read_bytes(storage.join(root, INDEX), storage_options))
        self.n_items = int(index["n_items"])
        self.views = int(index["views"])
        self.shard_size = int(index["shard_size"])
        self._view: int | None = None
        self._shards: list[dict[str, torch.Tensor]] = []
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        view = epoch % self.views
        if view == self._view:
            return
        per_view = math.ceil(self.n_items / self.shard_size)
        self._shards = [ckpt_io.load(storage.join(self.root, _shard_name(view, s)),
                                     storage_options=self.storage_options)
                        for s in range(per_view)]
        self._view = view

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, index: int) -> dict[str, Any]:
        shard = self._shards[index // self.shard_size]
        j = index % self.shard_size
        item = {k: v[j] for k, v in shard.items()}
        item["sdm"] = torch.as_tensor(signed_distance_map(item["mask"].numpy()))
        return item
