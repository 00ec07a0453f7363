"""Annotated manifests, splits, patches, prompts and augmentation for RootSAM training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from rootflow.inference.prompts import sample_edt_points
from rootflow.training.augment import AugmentConfig, augment, build_augment
from rootflow.training.data import (
    AnnotatedImage,
    AnnotationError,
    PatchConfig,
    PatchDataset,
    load_pairs,
    pairs_manifest,
    read_annotated_manifest,
    split_table,
)
from tests.training._rootsam_helpers import toy_pair, write_manifest_csv, write_pairs


def test_pairs_manifest_and_csv_manifest(tmp_path: Path) -> None:
    folder = write_pairs(tmp_path / "pairs", 5)
    csv = write_manifest_csv(folder, tmp_path / "m.csv")
    (folder / "orphan.png").write_bytes((folder / "toy_000.png").read_bytes())  # no mask
    table = pairs_manifest(str(folder))
    assert table.num_rows == 5 and table.column_names == ["image_id", "image_uri", "mask_uri"]
    assert all(m.endswith("_mask.png") for m in table["mask_uri"].to_pylist())
    pairs = load_pairs(table)
    assert pairs[0].image.dtype == np.uint8 and pairs[0].mask.dtype == bool
    assert pairs[0].mask.any() and pairs[0].image.shape[:2] == pairs[0].mask.shape

    m = read_annotated_manifest(str(csv))
    assert set(m["image_id"].to_pylist()) == set(table["image_id"].to_pylist())  # same ids
    train, val = split_table(m, val_fraction=0.5)
    assert val.num_rows == 1 and train.num_rows == 4  # the split column wins over the fraction

    with pytest.raises(AnnotationError, match="mask_uri"):
        (tmp_path / "bad.csv").write_text("image_uri\na.png\n")
        read_annotated_manifest(str(tmp_path / "bad.csv"))


def test_hash_split_is_stable_and_never_empty(tmp_path: Path) -> None:
    table = pairs_manifest(str(write_pairs(tmp_path / "p", 8)))
    t1, v1 = split_table(table, val_fraction=0.25, seed=3)
    t2, v2 = split_table(table.take([7, 6, 5, 4, 3, 2, 1, 0]), val_fraction=0.25, seed=3)
    assert sorted(v1["image_id"].to_pylist()) == sorted(v2["image_id"].to_pylist())
    assert v1.num_rows >= 1 and t1.num_rows >= 1 and t1.num_rows + v1.num_rows == 8
    _, v0 = split_table(table.slice(0, 2), val_fraction=0.01)
    assert v0.num_rows == 1


def _pairs(n: int = 3, **kw: int) -> list[AnnotatedImage]:
    return [AnnotatedImage(str(i), *toy_pair(i, **kw)) for i in range(n)]


def test_patches_are_reproducible_per_epoch_and_prompted_correctly() -> None:
    cfg = PatchConfig(patch_size=64, patches_per_image=4, empty_fraction=0.0, n_pos=4, n_neg=3)
    ds = PatchDataset(_pairs(), cfg, seed=1, transform=build_augment(AugmentConfig()))
    assert len(ds) == 12
    a, b = ds.item(5, epoch=0), ds.item(5, epoch=0)
    assert all(np.array_equal(a[k], b[k]) for k in a if k != "sdm")
    # OpenCV's first distanceTransform call can differ in the last float bit from later ones
    np.testing.assert_allclose(a["sdm"], b["sdm"], atol=1e-6)
    c = ds.item(5, epoch=1)
    assert not np.array_equal(a["image"], c["image"])
    for it in (a, c):
        assert it["image"].shape == (64, 64, 3) and it["mask"].shape == (64, 64)
        assert it["points"].shape == (7, 2) and it["labels"].tolist() == [1] * 4 + [0] * 3
        r, col = it["points"][:, 1].astype(int), it["points"][:, 0].astype(int)
        assert it["mask"][r, col].tolist() == [True] * 4 + [False] * 3  # labels match the mask
        assert it["mask"].any()  # empty_fraction=0: centred on a root
        assert (it["sdm"][it["mask"]] < 0).all()


def test_empty_fraction_and_small_images() -> None:
    cfg = PatchConfig(patch_size=24, patches_per_image=10, empty_fraction=1.0, n_pos=2, n_neg=2)
    ds = PatchDataset(_pairs(2, height=96, width=200, n_roots=1), cfg)
    items = [ds[i] for i in range(len(ds))]
    assert sum(not it["mask"].any() for it in items) >= 15
    empty = next(it for it in items if not it["mask"].any())
    assert empty["labels"].tolist() == [0, 0, 0, 0]  # no root: every prompt is negative
    # an image smaller than the patch is reflect-padded, not rejected
    big = PatchDataset(_pairs(1, height=40, width=50), PatchConfig(patch_size=64))
    assert big[0]["image"].shape == (64, 64, 3)


def test_augmentation_moves_points_with_the_mask() -> None:
    """Geometric transforms carry keypoints: drawn on roots, they land on transformed roots.

    Flips/90-degree turns are exact (this catches a half-pixel convention error, which moves
    every click one pixel); rotation/scale with a nearest-neighbour mask is exact up to
    rasterisation on 2-5 px roots (root pixels are ~20 % of this image).
    """
    image, mask = toy_pair(4, height=96, width=96, n_roots=4)
    pts, _ = sample_edt_points(mask, n_pos=40, n_neg=0, rng=0)
    off = dict(p_flip=0.0, p_affine=0.0, p_elastic=0.0, p_color=0.0, p_noise=0.0,
               p_dropout=0.0)
    for cfg, least in ((AugmentConfig(**{**off, "p_flip": 1.0}), 1.0),
                       (AugmentConfig(**{**off, "p_affine": 1.0}), 0.8)):
        t = build_augment(cfg)
        for seed in range(8):
            t.set_random_seed(seed)
            out = t(image=image, mask=mask.astype(np.uint8), keypoints=pts - 0.5)  # see augment()
            kp = np.clip((np.asarray(out["keypoints"])[:, :2] + 0.5).astype(int), 0, 95)
            hit = (out["mask"] > 0)[kp[:, 1], kp[:, 0]].mean()
            assert hit >= least, (cfg, seed, hit)

    # the full pipeline (with elastic, dropout, colour) always returns consistent labels
    rng = np.random.default_rng(0)
    full = build_augment(AugmentConfig(p_elastic=1.0, p_dropout=1.0))
    for _ in range(5):
        img, m, p, lab = augment(full, image, mask, pts[:5], n_pos=5, n_neg=5, rng=rng)
        assert img.shape == image.shape and img.dtype == np.uint8 and p.shape == (10, 2)
        assert (m[p[:, 1].astype(int), p[:, 0].astype(int)] == (lab == 1)).all()
