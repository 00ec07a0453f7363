"""RootSAM task in-process (one CPU worker, no Ray): what trains, what is frozen, the export,
and the embedding cache. The Ray runs are in ``test_rootsam_fit.py``."""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate

from rootflow.training.data import PatchConfig
from rootflow.training.embedding_cache import EmbeddingCacheConfig
from rootflow.training.loop import LoopContext, TrainRunConfig
from rootflow.training.rootsam_task import FROZEN_DECODER_PARTS, RootSAMTask, RootSAMTrainConfig
from tests.training._rootsam_helpers import write_pairs

TRAINABLE = ("sam_prompt_encoder.", "sam_mask_decoder.")


def _cfg(data: Path, **kw: object) -> RootSAMTrainConfig:
    base = dict(data=str(data), variant="test",
                patch=PatchConfig(patch_size=96, patches_per_image=1, n_pos=3, n_neg=3),
                val_patch=PatchConfig(patch_size=96, patches_per_image=1, n_pos=3, n_neg=3),
                batch_size=2, lr=1e-3, val_fraction=0.25)
    base.update(kw)
    return RootSAMTrainConfig(**base)  # type: ignore[arg-type]


def _ctx() -> LoopContext:
    return LoopContext(world_rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                       run=TrainRunConfig(metric="val_miou", mode="max"))


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("toy") / "pairs", 4, height=96, width=128)


def test_encoder_frozen_decoder_trains_and_export_loads(pairs: Path, tmp_path: Path) -> None:
    task = RootSAMTask(_cfg(pairs))
    ctx = _ctx()
    task.setup(ctx)
    sam = task.model.sam
    frozen_before = {k: v.clone() for k, v in sam.state_dict().items()
                     if not k.startswith(TRAINABLE) or k.startswith(FROZEN_DECODER_PARTS)}
    trainable_before = {k: v.clone() for k, v in sam.state_dict().items()
                        if k.startswith(TRAINABLE) and not k.startswith(FROZEN_DECODER_PARTS)}

    m0 = task.train_epoch(0)
    val = task.validate(0)

    after = sam.state_dict()
    for k, v in frozen_before.items():  # byte-identical, every tensor of the image path
        assert v.numpy().tobytes() == after[k].numpy().tobytes(), k
    changed = [k for k, v in trainable_before.items() if not torch.equal(v, after[k])]
    assert any(k.startswith("sam_mask_decoder.transformer") for k in changed)
    assert any(k.startswith("sam_mask_decoder.iou_prediction_head") for k in changed)
    assert any(k.startswith("sam_prompt_encoder.point_embeddings") for k in changed)
    assert not sam.image_encoder.training
    assert all(not p.requires_grad for p in sam.image_encoder.parameters())
    assert np.isfinite(m0["loss"]) and m0["lr"] == pytest.approx(1e-3)
    assert 0.0 <= val["miou"] <= 1.0 and 0.0 <= val["dice"] <= 1.0 and val["n_patches"] == len(task.val_ds)

    # state round trip, then the artefact inference loads
    state = task.state_dict()
    other = RootSAMTask(_cfg(pairs))
    other.setup(_ctx())
    other.load_state_dict(state)
    assert all(torch.equal(other.model.sam.state_dict()[k], v)
               for k, v in state["decoder"].items())

    ctx.best = {"epoch": 0.0, "val_miou": val["miou"]}
    uri = task.export(str(tmp_path / "rootsam.pt"))
    from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor
    from rootflow.models.rootsam import load_rootsam_checkpoint

    ckpt = load_rootsam_checkpoint(uri)
    assert ckpt.variant == "test" and ckpt.metrics["val_miou"] == pytest.approx(val["miou"])
    assert ckpt.train_config["task"]["patch"]["patch_size"] == 96
    assert set(ckpt.train_config["val_image_ids"]) == set(task.val_ids)
    pred = RootSAMPredictor(RootSAMInferenceConfig(variant="test", rootsam_checkpoint=uri,
                                                   device="cpu"))
    assert pred.model.rootsam_version == ckpt.version
    for k, v in state["decoder"].items():
        assert torch.equal(pred.model.sam.state_dict()[k], v), k
    out = pred.predict([np.zeros((80, 100, 3), np.uint8)])
    assert out[0].mask.shape == (80, 100)


def test_embedding_cache_matches_live_encoding(pairs: Path, tmp_path: Path) -> None:
    cache = EmbeddingCacheConfig(uri=str(tmp_path / "cache"), views=2, dtype="float32",
                                 shard_size=3)
    cached = RootSAMTask(_cfg(pairs, cache=cache))
    cached.setup(_ctx())
    live = RootSAMTask(_cfg(pairs))
    live.setup(_ctx())
    assert len(cached.train_ds) == len(live.train_ds)
    for epoch in (0, 1, 2):  # epoch 2 reuses view 0
        cached.train_ds.set_epoch(epoch)
        live.train_ds.set_epoch(epoch % 2)
        last = len(live.train_ds) - 1
        a, b = cached.train_ds[last], live.train_ds[last]
        assert torch.equal(a["mask"], torch.as_tensor(b["mask"]))
        assert torch.equal(a["points"], torch.as_tensor(b["points"]))
        with torch.no_grad():
            la, ia = cached._forward(default_collate([a]))
            lb, ib = live._forward(default_collate([b]))
        torch.testing.assert_close(la, lb, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ia, ib, atol=1e-5, rtol=1e-5)
    # a second setup reuses the finished cache (no new folder); the key covers the augmentation
    roots = sorted(p.parent.name for p in (tmp_path / "cache").rglob("index.json"))
    assert len(roots) == 2  # train + val
    again = RootSAMTask(_cfg(pairs, cache=cache))
    again.setup(_ctx())
    assert sorted(p.parent.name for p in (tmp_path / "cache").rglob("index.json")) == roots
    from rootflow.training.embedding_cache import cache_key

    key = functools.partial(cache_key, model=live.model, image_ids=live.train_ids, cfg=cache)
    assert key(description={"augment": 1}) != key(description={"augment": 2})
    assert np.isfinite(again.train_epoch(0)["loss"])


def test_validation_shards_are_exact_over_workers():
    """Guards against validation metrics counting padded duplicates: the shards of 2 and 3
    workers cover every item exactly once (DistributedSampler would repeat items to pad)."""
    from rootflow.training.rootsam_task import exact_shard_loader

    data = list(range(7))
    for world in (1, 2, 3):
        seen = [int(x) for r in range(world)
                for b in exact_shard_loader(data, rank=r, world_size=world, batch_size=2)
                for x in b]
        assert sorted(seen) == data, (world, seen)


def test_validation_uses_deployed_policy_not_ground_truth_prompts(pairs: Path):
    """Guards against validation prompted from the ground truth: val_miou must be the mIoU
    of ``deployed_decode`` (prompts labelled by the model's own prompt-free pass), the code
    inference runs."""
    from rootflow.evaluation.metrics import SegmentationMeter, summarize
    from rootflow.inference.rootsam import deployed_decode

    task = RootSAMTask(_cfg(pairs, click_rounds=1))
    task.setup(_ctx())
    val = task.validate(0)
    meter = SegmentationMeter()
    with torch.no_grad():
        for i in range(len(task.val_ds)):
            it = default_collate([task.val_ds[i]])
            emb = task._embed(it)
            out = deployed_decode(task.model, emb, task.cfg.prompts, size=96,
                                  rngs=[np.random.default_rng([task.cfg.seed, 7, i])])
            meter.update(task.model.upscale(out.logits, 96) > 0, it["mask"].unsqueeze(1))
    assert val["miou"] == pytest.approx(summarize(meter.sums())["miou"], abs=1e-3)
    assert val["n"] == len(task.val_ds)


def test_each_stage_validates_at_its_own_scale():
    """Guards against stage 2 being selected on stage 1's (2x zoomed) validation patches."""
    from rootflow.training.rootsam_task import RootSAMRecipe, StageConfig, recipe_stages

    stages = recipe_stages(RootSAMRecipe(task=RootSAMTrainConfig(data="x")))
    assert [(t.patch.patch_size, t.val_patch.patch_size) for t, _ in stages] == [
        (512, 512), (1024, 1024)]
    fixed = recipe_stages(RootSAMRecipe(stage2=StageConfig(epochs=1, patch_size=1024,
                                                           lr=1e-5, val_patch_size=768)))
    assert fixed[1][0].val_patch.patch_size == 768


def test_loop_gradient_clipping_and_cpu_autocast_are_options():
    """Guards against the loop's grad-clip option not clipping, and bf16 autocast leaking
    onto CPU runs (it is CUDA-only); the defaults leave existing tasks unchanged."""
    ctx = _ctx()
    assert ctx.run.grad_clip_norm is None and ctx.run.precision == "fp32"
    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.full((4,), 10.0)
    assert ctx.clip_gradients([p]) is None and torch.equal(p.grad, torch.full((4,), 10.0))
    clip = LoopContext(world_rank=0, world_size=1, local_rank=0, device=torch.device("cpu"),
                       run=TrainRunConfig(grad_clip_norm=1.0, precision="bf16"))
    assert clip.clip_gradients([p]) == pytest.approx(20.0)
    assert float(p.grad.norm()) == pytest.approx(1.0, rel=1e-4)
    with clip.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match="precision"):
        TrainRunConfig(precision="fp16")  # type: ignore[arg-type]
