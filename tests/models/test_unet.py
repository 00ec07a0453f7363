"""The U-Net model and its segmenter, without Ray: build, tiling, checkpoints, encoder weights."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import torch

from rootflow.models import checkpoint as ckpt_io
from rootflow.models.segmenters import Segmenter, SegmenterLoadError, load_segmenter
from rootflow.models.unet import UNetConfig, UNetSegmenter, build_unet, save_unet
from tests.training._rootsam_helpers import toy_pair

TINY = UNetConfig(widths=(4, 8, 16, 32), tile=128, overlap=48)


@pytest.fixture(scope="module")
def trained() -> UNetSegmenter:
    """A tiny U-Net after 30 Adam steps on toy roots (real, non-trivial weights in seconds)."""
    torch.manual_seed(0)
    net = build_unet(TINY)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    rng = np.random.default_rng(0)
    pairs = [toy_pair(i, height=80, width=80, n_roots=3) for i in range(8)]
    for _ in range(30):
        idx = rng.choice(len(pairs), 4)
        x = torch.stack([torch.from_numpy(pairs[i][0]).permute(2, 0, 1) for i in idx])
        y = torch.stack([torch.from_numpy(pairs[i][1]) for i in idx]).float()[:, None]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            net((x.float() - 128) / 64), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return UNetSegmenter(net, TINY, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.mark.parametrize("encoder", ["plain", "resnet10t", "test_convnext"])
def test_builds_offline_any_size(encoder: str) -> None:
    """Guards: a timm encoder that downloads or needs fixed sizes; odd sizes cropped wrongly."""
    cfg = UNetConfig(encoder=encoder, widths=(4, 8, 16, 32, 64))
    net = build_unet(cfg).eval()
    with torch.no_grad():
        for h, w in [(37, 53), (64, 64), (5, 7)]:
            assert net(torch.randn(2, 3, h, w)).shape == (2, 1, h, w)
    for up, norm in [("transpose", "group"), ("bilinear", "none")]:
        alt = build_unet(dataclasses.replace(TINY, up=up, norm=norm)).eval()
        with torch.no_grad():
            assert alt(torch.randn(1, 3, 37, 53)).shape == (1, 1, 37, 53)
    with pytest.raises(ValueError, match="unknown encoder"):
        build_unet(UNetConfig(encoder="no_such_net"))
    with pytest.raises(ValueError, match="valid"):
        UNetConfig(norm="layer")  # type: ignore[arg-type]


def test_tiled_matches_untiled(trained: UNetSegmenter) -> None:
    """Guards seams: tiles misplaced, mis-weighted or too little overlap for the net's context."""
    image, _ = toy_pair(123, height=300, width=410, n_roots=6)
    whole = UNetSegmenter(trained.model, dataclasses.replace(TINY, tile=512),
                          mean=trained.mean, std=trained.std)
    ref = whole.predict_proba(image)
    tiled = trained.predict_proba(image)  # 128 px tiles, 48 px overlap: 5 x 4 tiles
    assert tiled.shape == (300, 410) and tiled.dtype == np.float32
    diff = np.abs(tiled - ref)
    # a misplaced or mis-weighted tile shifts whole bands by ~0.5; what remains with a correct
    # stitch is the context cut at inner tile edges, a few hundredths at a few pixels
    assert diff.max() < 0.15 and diff.mean() < 1e-3, (diff.max(), diff.mean())
    assert ((tiled >= 0.5) != (ref >= 0.5)).mean() < 1e-3
    # a strip narrower than a tile is padded by reflection, not with black
    strip = image[:, :70]
    np.testing.assert_allclose(trained.predict_proba(strip), whole.predict_proba(strip),
                               atol=0.15)
    assert trained.predict(image).dtype == bool


def test_save_load_roundtrip_and_strict_keys(trained: UNetSegmenter, tmp_path: Path) -> None:
    """Guards: a checkpoint that loads with other outputs, silently tolerates renamed keys, or
    needs pickles (weights_only)."""
    uri = str(tmp_path / "unet.pt")
    sha = save_unet(trained.model, TINY, uri, threshold=0.4, mean=trained.mean,
                    std=trained.std, meta={"note": "test", "when": np.float64(1.5)})
    seg = load_segmenter(uri, sha256=sha)
    assert isinstance(seg, UNetSegmenter) and isinstance(seg, Segmenter)
    assert seg.kind == "unet" and seg.threshold == pytest.approx(0.4)
    assert seg.version == f"unet-{sha[:12]}" and seg.params()["sha256"] == sha
    image, _ = toy_pair(7, height=200, width=150)
    np.testing.assert_array_equal(seg.predict_proba(image), trained.predict_proba(image))
    assert trained.version.startswith("unet-") and trained.version != seg.version
    assert load_segmenter(str(tmp_path)).version == seg.version  # the folder resolves

    obj = ckpt_io.load(uri)
    sd = obj["state_dict"]
    key = next(k for k in sd if k.endswith("head.weight"))
    sd["head.renamed"] = sd.pop(key)
    bad = tmp_path / "renamed.pt"
    ckpt_io.save(obj, str(bad))
    with pytest.raises(SegmenterLoadError, match=r"renamed\.pt.*head\.renamed") as e:
        load_segmenter(str(bad))
    assert key in str(e.value)

    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(Path(uri).read_bytes()[:3000])
    with pytest.raises(SegmenterLoadError, match="corrupt.pt"):
        load_segmenter(str(corrupt))
    other = tmp_path / "other.pt"
    buf = io.BytesIO()
    torch.save({"format": "rootflow.rootquant/1"}, buf)
    other.write_bytes(buf.getvalue())
    with pytest.raises(SegmenterLoadError, match="other.pt.*rootflow.rootquant/1"):
        UNetSegmenter.from_bytes(other.read_bytes(), uri=str(other))


def test_encoder_weights_from_a_timm_file(tmp_path: Path) -> None:
    """Guards: timm full-model weights (``stages.0``, classifier) not reaching the features-only
    encoder, or a wrong file loading silently."""
    import timm

    full = timm.create_model("test_convnext", pretrained=False)
    path = tmp_path / "timm.pt"
    torch.save({"state_dict": full.state_dict()}, path)
    sha = ckpt_io.sha256_bytes(path.read_bytes())
    cfg = UNetConfig(encoder="test_convnext", widths=(4, 8, 16, 32, 64))
    net = build_unet(cfg, encoder_weights=str(path), encoder_sha256=sha)
    enc = net.encoder.body.state_dict()  # type: ignore[union-attr]
    src = full.state_dict()
    assert torch.equal(enc["stages_0.blocks.0.conv_dw.weight"],
                       src["stages.0.blocks.0.conv_dw.weight"])
    assert torch.equal(enc["stem_0.weight"], src["stem.0.weight"])
    with pytest.raises(ckpt_io.ChecksumError):
        build_unet(cfg, encoder_weights=str(path), encoder_sha256="0" * 64)
    wrong = tmp_path / "resnet.pt"
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), wrong)
    with pytest.raises(ckpt_io.CheckpointMismatchError, match="missing keys.*stages_0"):
        build_unet(cfg, encoder_weights=str(wrong))

    # a previous rootflow run's encoder initialises a new one
    run = tmp_path / "prev.pt"
    save_unet(net, cfg, str(run))
    again = build_unet(cfg, encoder_weights=str(run))
    for k, v in net.encoder.state_dict().items():
        assert torch.equal(again.encoder.state_dict()[k], v), k
