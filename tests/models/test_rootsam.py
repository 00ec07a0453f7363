"""RootSAM model build, base + delta checkpoints (local and S3), and their failure modes."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from rootflow.models import checkpoint
from rootflow.models import rootsam as R
from rootflow.models.registry import create_model, list_models


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A random-init test model saved as a SAM2.1-format base checkpoint."""
    d = tmp_path_factory.mktemp("rootsam")
    model = R.build_rootsam("test", seed=1)
    uri = str(d / "base.pt")
    sha = R.save_base_checkpoint(model, uri)
    return model, uri, sha


def _tuned(base_uri: str, sha: str) -> R.RootSAM:
    model = R.build_rootsam("test", base_checkpoint=base_uri, base_sha256=sha)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    return model


def _predict(model: R.RootSAM) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    with torch.inference_mode():
        return model(model.preprocess(imgs), torch.tensor([[[100.5, 80.5], [20.5, 30.5]]]),
                     torch.tensor([[1, 0]]))


def test_registry_and_random_init_warning(caplog):
    assert {"rootsam_tiny", "rootsam_small", "rootsam_base_plus", "rootsam_large",
            "rootsam_test"} <= set(list_models())
    with caplog.at_level(logging.WARNING, logger="rootflow.models.rootsam"):
        model = create_model("rootsam_test")
    assert model.random_init and model.base_sha256 == R.RANDOM_INIT
    assert "meaningless" in caplog.text
    assert model.version == "sam2.1_test@random-init"
    assert not model.training
    # random init is seeded: two builds are identical
    again = R.build_rootsam("test")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(),
                                                 again.state_dict().values(), strict=True))
    with pytest.raises(KeyError, match="hiera_base_plus"):
        R.build_rootsam("hiera_huge")


def test_shapes_of_encode_decode_forward():
    model = R.build_rootsam("test")
    x = model.preprocess(np.zeros((2, 256, 256, 3), np.uint8))
    with torch.inference_mode():
        emb = model.encode(x)
        assert emb.image_embed.shape == (2, 256, 16, 16)
        assert [tuple(f.shape) for f in emb.high_res_feats] == [(2, 32, 64, 64), (2, 64, 32, 32)]
        logits, iou, obj = model.decode(emb, points=torch.full((2, 3, 2), 50.0),
                                        labels=torch.ones(2, 3, dtype=torch.int32))
        assert logits.shape == (2, 1, 64, 64) and iou.shape == (2, 1) and obj.shape == (2, 1)
        # many single-point prompts against one image (lattice mode)
        logits, iou, _ = model.decode(emb.index(1), points=torch.rand(7, 1, 2) * 256,
                                      labels=torch.ones(7, 1, dtype=torch.int32),
                                      repeat_image=True, mask_input=torch.zeros(7, 1, 64, 64))
        assert logits.shape == (7, 1, 64, 64) and iou.shape == (7, 1)
        full, iou = model(x, torch.full((2, 1, 2), 9.5), torch.ones(2, 1, dtype=torch.int32))
        assert full.shape == (2, 1, 256, 256)
    with pytest.raises(ValueError, match="256"):
        model.encode(torch.zeros(1, 3, 128, 128))


def test_freeze_keeps_only_decoder_trainable():
    model = R.build_rootsam("test")
    model.freeze_image_encoder()
    names = {n for n, p in model.sam.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(R.TRAINABLE_PREFIXES) for n in names)
    assert set(model.trainable_state_dict()) >= names


def test_base_and_rootsam_checkpoint_round_trip_local(base, tmp_path):
    ref, base_uri, sha = base
    loaded = R.build_rootsam("test", base_checkpoint=base_uri, base_sha256=sha.upper())
    assert loaded.base_sha256 == sha and not loaded.random_init
    assert torch.equal(_predict(loaded)[0], _predict(ref)[0])

    tuned = _tuned(base_uri, sha)
    uri = str(tmp_path / "rootsam.pt")
    rs_sha = R.save_rootsam_checkpoint(tuned, uri, version="rootsam-test-1",
                                       train_config={"lr": 1e-4}, metrics={"val_dice": 0.5})
    ckpt = R.load_rootsam_checkpoint(uri, sha256=rs_sha)
    assert ckpt.variant == "test" and ckpt.base_sha256 == sha
    assert ckpt.train_config == {"lr": 1e-4} and ckpt.metrics == {"val_dice": 0.5}
    assert set(ckpt.state_dict) == set(tuned.trainable_state_dict())
    assert not any(k.startswith("image_encoder") for k in ckpt.state_dict)

    again = R.build_rootsam("test", base_checkpoint=base_uri, rootsam_checkpoint=uri,
                            rootsam_sha256=rs_sha)
    assert again.version == "rootsam-test-1" and again.rootsam_metrics == {"val_dice": 0.5}
    a, b = _predict(again), _predict(tuned)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], _predict(ref)[0])


def test_sha256_mismatch(base, tmp_path):
    """Guards against a wrong digest loading, and against a short prefix being accepted as a
    digest (32 bits can be forged): only the full 64-hex sha256 counts."""
    _, base_uri, sha = base
    for short in (sha[:8], sha[:12], sha[:63]):
        with pytest.raises(ValueError, match="full 64-hex"):
            R.build_rootsam("test", base_checkpoint=base_uri, base_sha256=short)
    with pytest.raises(checkpoint.ChecksumError, match="sha256 mismatch"):
        R.build_rootsam("test", base_checkpoint=base_uri, base_sha256="0" * 64)
    uri = str(tmp_path / "rs.pt")
    R.save_rootsam_checkpoint(_tuned(base_uri, sha), uri, version="v")
    with pytest.raises(checkpoint.ChecksumError):
        R.build_rootsam("test", base_checkpoint=base_uri, rootsam_checkpoint=uri,
                        rootsam_sha256="deadbeef" * 8)


def test_wrong_base_and_wrong_variant_fail_clearly(base, tmp_path):
    _, base_uri, sha = base
    uri = str(tmp_path / "rs.pt")
    R.save_rootsam_checkpoint(_tuned(base_uri, sha), uri, version="rootsam-x")
    with pytest.raises(R.RootSAMBaseMismatchError, match=f"fine-tuned on base checkpoint sha256 {sha[:16]}"):
        R.build_rootsam("test", rootsam_checkpoint=uri)  # random-init base
    ckpt = R.load_rootsam_checkpoint(uri)
    wrong_variant = R.RootSAMCheckpoint(**{**ckpt.to_dict(), "variant": "hiera_tiny"})
    model = R.build_rootsam("test", base_checkpoint=base_uri)
    with pytest.raises(R.RootSAMBaseMismatchError, match="hiera_tiny"):
        R.apply_rootsam_checkpoint(model, wrong_variant)
    # a base checkpoint passed as the RootSAM checkpoint
    with pytest.raises(ValueError, match="looks like a SAM2.1 base"):
        R.load_rootsam_checkpoint(base_uri)


def test_strict_keys_are_named(base, tmp_path):
    ref, _, _ = base
    state = dict(ref.sam.state_dict())
    state.pop("sam_mask_decoder.iou_token.weight")
    state["sam_mask_decoder.extra.weight"] = torch.zeros(1)
    state["no_mem_embed"] = torch.zeros(1, 1, 8)
    bad = str(tmp_path / "bad_base.pt")
    checkpoint.save({"model": state}, bad)
    with pytest.raises(checkpoint.CheckpointMismatchError) as err:
        R.build_rootsam("test", base_checkpoint=bad)
    msg = str(err.value)
    assert "sam_mask_decoder.iou_token.weight" in msg and "sam_mask_decoder.extra.weight" in msg
    assert "no_mem_embed (1, 1, 8) vs (1, 1, 256)" in msg

    model = R.build_rootsam("test")
    delta = model.trainable_state_dict()
    delta.pop("sam_prompt_encoder.not_a_point_embed.weight")
    ckpt = R.RootSAMCheckpoint(state_dict=delta, variant="test", base_sha256=R.RANDOM_INIT,
                               version="v")
    with pytest.raises(checkpoint.CheckpointMismatchError, match="not_a_point_embed"):
        R.apply_rootsam_checkpoint(model, ckpt)


@pytest.mark.s3
def test_round_trip_through_s3(base, s3):
    ref, base_local, sha = base
    prefix = s3.fresh_prefix("rootsam")
    base_uri = f"{prefix}/sam2.1_test.pt"
    assert R.save_base_checkpoint(ref, base_uri, storage_options=s3.storage) == sha
    tuned = _tuned(base_local, sha)
    rs_uri = f"{prefix}/rootsam.pt"
    rs_sha = R.save_rootsam_checkpoint(tuned, rs_uri, version="rootsam-s3",
                                       storage_options=s3.storage)
    got = R.build_rootsam("test", base_checkpoint=base_uri, base_sha256=sha,
                          rootsam_checkpoint=rs_uri, rootsam_sha256=rs_sha,
                          storage_options=s3.storage)
    assert got.version == "rootsam-s3" and got.base_sha256 == sha
    assert torch.equal(_predict(got)[0], _predict(tuned)[0])


# Parameter counts of Meta's SAM2.1 releases (model card: 38.9M, 46M, 80.8M, 224.4M).
@pytest.mark.slow
@pytest.mark.parametrize("name,params_m", [("rootsam_tiny", 38.9), ("rootsam_small", 46.0),
                                           ("rootsam_base_plus", 80.8),
                                           ("rootsam_large", 224.4)])
def test_full_configs_build(name, params_m):
    model = create_model(name)
    n = sum(p.numel() for p in model.sam.parameters()) / 1e6
    assert n == pytest.approx(params_m, rel=0.02)
    assert model.image_size == 1024 and model.low_res_size == 256
