"""Training augmentations applied to image, mask and point prompts together (albumentations).

Why albumentations: it is maintained, fast (OpenCV kernels), and one ``Compose`` transforms the
image, the mask *and keypoints* with the same random parameters, including elastic deformation
and coarse dropout, which torchvision v2 does not do for keypoints. Writing our own would mean
re-deriving every geometric transform for points, and getting one wrong silently teaches the
decoder that a "root" click may sit on soil.

Points use the continuous pixel convention of :mod:`rootflow.inference.prompts` (pixel ``(r, c)``
covers ``[c, c+1) x [r, r+1)``, centre ``c + 0.5``). albumentations 2.x puts pixel centres on
integers instead (a horizontal flip maps ``x`` to ``W - 1 - x``; OpenCV's warps agree), so
:func:`augment` shifts points by half a pixel into its convention and back; otherwise every
flip would move a click one pixel sideways, off a 2-px root.

After the transforms, every surviving point is **re-labelled from the transformed mask** (a
positive that interpolation or elastic warping pushed off a 2-px root becomes a correct negative
rather than a wrong positive), points that left the frame or fell into a dropout hole are gone
(``remove_invisible``), and :func:`augment` tops the set back up to ``n_pos`` positives and
``n_neg`` negatives with the same EDT sampler on the transformed mask, so a batch always stacks.

Occlusions (coarse dropout) hide image pixels but leave the mask: the root is still there
behind the soil clump or the scratch, and the decoder should learn to bridge it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from rootflow.inference.prompts import sample_edt_points


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Probabilities and strengths of each augmentation (0 disables one).

    Attributes:
        p_flip: D4 symmetry (flips and 90-degree turns): tube images have no preferred side.
        p_affine: small rotation/scale/shift (tube curvature, camera placement).
        rotate_deg: max absolute rotation of the affine.
        scale: (min, max) zoom of the affine (dpi varies between cameras).
        p_elastic: elastic deformation (roots bend; soil settles).
        elastic_alpha / elastic_sigma: its displacement strength and smoothness (px).
        p_color: brightness/contrast/saturation/hue jitter (lighting, soil moisture).
        brightness / contrast / saturation / hue: jitter strengths.
        p_noise: Gaussian sensor noise.
        noise_std: (min, max) noise std as a fraction of the 0-255 range.
        p_dropout: coarse dropout occlusions (soil clumps, condensation, scratches).
        dropout_holes: (min, max) holes per patch.
        dropout_size: (min, max) hole side as a fraction of the patch side.
    """

    p_flip: float = 0.75
    p_affine: float = 0.5
    rotate_deg: float = 15.0
    scale: tuple[float, float] = (0.8, 1.25)
    p_elastic: float = 0.2
    elastic_alpha: float = 30.0
    elastic_sigma: float = 6.0
    p_color: float = 0.8
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.03
    p_noise: float = 0.3
    noise_std: tuple[float, float] = (0.01, 0.05)
    p_dropout: float = 0.3
    dropout_holes: tuple[int, int] = (1, 4)
    dropout_size: tuple[float, float] = (0.05, 0.15)

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation at all (validation)."""
        return cls(p_flip=0, p_affine=0, p_elastic=0, p_color=0, p_noise=0, p_dropout=0)


def build_augment(cfg: AugmentConfig) -> Any:
    """An ``albumentations.Compose`` over ``image``, ``mask`` and ``keypoints`` (xy)."""
    import albumentations as A
    import cv2

    reflect = cv2.BORDER_REFLECT_101  # the same reflected root in the image and in the mask
    ts: list[Any] = []
    if cfg.p_flip > 0:
        ts.append(A.SquareSymmetry(p=cfg.p_flip))
    if cfg.p_affine > 0:
        ts.append(A.Affine(rotate=(-cfg.rotate_deg, cfg.rotate_deg), scale=cfg.scale,
                           translate_percent=(-0.05, 0.05), border_mode=reflect,
                           p=cfg.p_affine))
    if cfg.p_elastic > 0:
        ts.append(A.ElasticTransform(alpha=cfg.elastic_alpha, sigma=cfg.elastic_sigma,
                                     border_mode=reflect, p=cfg.p_elastic))
    if cfg.p_color > 0:
        ts.append(A.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast,
                                saturation=cfg.saturation, hue=cfg.hue, p=cfg.p_color))
    if cfg.p_noise > 0:
        ts.append(A.GaussNoise(std_range=cfg.noise_std, p=cfg.p_noise))
    if cfg.p_dropout > 0:
        ts.append(A.CoarseDropout(num_holes_range=cfg.dropout_holes,
                                  hole_height_range=cfg.dropout_size,
                                  hole_width_range=cfg.dropout_size,
                                  fill="random_uniform", fill_mask=None, p=cfg.p_dropout))
    return A.Compose(ts, keypoint_params=A.KeypointParams(format="xy", remove_invisible=True),
                     seed=0)


def augment(
    transform: Any,
    image: np.ndarray,
    mask: np.ndarray,
    points: np.ndarray,
    *,
    n_pos: int,
    n_neg: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Apply ``transform`` to one patch and its prompts; relabel and top up the points.

    Args:
        transform: from :func:`build_augment` (or None for no augmentation).
        image: uint8 ``(H, W, 3)``.
        mask: bool ``(H, W)``.
        points: float ``(N, 2)`` xy drawn on the untransformed patch (labels are re-read).
        n_pos / n_neg: the prompt counts to return.
        rng: drives the transform's randomness (seeded per sample for reproducibility).

    Returns:
        ``image`` uint8 ``(H, W, 3)``, ``mask`` bool ``(H, W)``, ``points`` float32
        ``(n_pos + n_neg, 2)`` and ``labels`` int32 (1 root, 0 background; positives first).
    """
    if transform is not None:
        transform.set_random_seed(int(rng.integers(0, 2**31 - 1)))
        kp = np.asarray(points, np.float32).reshape(-1, 2) - 0.5  # -> integer pixel centres
        out = transform(image=image, mask=mask.astype(np.uint8), keypoints=kp)
        image = np.ascontiguousarray(out["image"])
        mask = np.asarray(out["mask"]) > 0
        kp_out = np.asarray(out["keypoints"], np.float32)
        points = (kp_out.reshape(len(kp_out), -1)[:, :2] if kp_out.size
                  else np.zeros((0, 2), np.float32)) + 0.5
    return _relabel_and_fill(mask, points, n_pos=n_pos, n_neg=n_neg, rng=rng, image=image)


def _relabel_and_fill(mask: np.ndarray, points: np.ndarray, *, n_pos: int, n_neg: int,
                      rng: np.random.Generator, image: np.ndarray,
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    h, w = mask.shape
    pts = np.asarray(points, np.float32).reshape(-1, 2)
    inside = (pts[:, 0] >= 0) & (pts[:, 0] < w) & (pts[:, 1] >= 0) & (pts[:, 1] < h)
    pts = pts[inside]
    cols = np.clip(pts[:, 0].astype(np.int64), 0, w - 1)
    rows = np.clip(pts[:, 1].astype(np.int64), 0, h - 1)
    is_root = mask[rows, cols]
    pos, neg = pts[is_root][:n_pos], pts[~is_root][:n_neg]
    need_pos, need_neg = n_pos - len(pos), n_neg - len(neg)
    if need_pos or need_neg:
        extra, extra_lab = sample_edt_points(mask, n_pos=need_pos, n_neg=need_neg, rng=rng)
        pos = np.concatenate([pos, extra[extra_lab == 1]])
        neg = np.concatenate([neg, extra[extra_lab == 0]])
    points_out = np.concatenate([pos, neg]).astype(np.float32).reshape(-1, 2)
    labels = np.concatenate([np.ones(len(pos), np.int32), np.zeros(len(neg), np.int32)])
    return image, mask, points_out, labels
