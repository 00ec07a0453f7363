"""RootSAM's losses as small pure functions: focal Tversky + boundary + IoU-head MSE (+ BCE,
logit range).

* **Focal Tversky** (Abraham & Khan 2019): roots cover 0.1-5 % of a frame, so pixel-wise BCE is
  dominated by soil. Tversky weighs false negatives (``alpha``) above false positives
  (``beta``): a missed fine root costs more than a slightly fat one. The focal exponent
  ``gamma < 1`` keeps the gradient alive for patches that are already mostly right.
* **Boundary loss** (Kervadec et al. 2019, MIDL / MedIA 2021): ``mean(p * phi)`` with ``phi``
  the signed distance map of the ground truth (negative inside, positive outside). It
  penalises probability far from the true root in proportion to the distance, which region
  losses do not see; it is only a complement (alone it is minimised by predicting nothing
  inside a small object), hence the weighted sum.
* **IoU-head MSE**: SAM's IoU-prediction head is trained to predict the IoU of its own mask
  with the ground truth (as SAM/SAM2 train it), so RootSAM's confidence stays meaningful for
  QC after fine-tuning.
* **BCE** and a **logit-range penalty** (``LossConfig.w_bce``, ``logit_range``/``w_range``):
  the two sigmoid-based terms above give no gradient to a pixel predicted wrong with a large
  logit, and without a bound the logits grow until neither the mask prompt nor a corrective
  click can move a pixel; these two terms keep clicks trainable (see :class:`LossConfig`).

Empty masks: Tversky uses a smoothing term so an empty prediction on an empty target costs 0
and any false positive costs > 0; the distance map of an empty target is ``+1`` everywhere
(every pixel is "outside, far away"), of a full target ``-1``. Distance maps are normalised by
the patch side so the boundary term is resolution independent (stage 1 and 2 use different
patch sizes with the same weights).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Weights and shape parameters of :func:`rootsam_loss`.

    Attributes:
        tversky_alpha: weight of false negatives (missed root pixels).
        tversky_beta: weight of false positives.
        tversky_gamma: focal exponent (``loss = (1 - TI) ** gamma``).
        w_tversky / w_boundary / w_iou: weights of the three terms.
        w_bce: weight of a per-pixel binary cross-entropy term (0 = the three terms alone).
            Focal Tversky and the boundary term act through ``sigmoid(logits)``: a pixel
            predicted wrong with a large logit gives them almost no gradient, and under Adam
            the logits of a decoder trained from scratch grow to |logit| ~ 100 within a few
            hundred steps, so the errors a corrective click marks are never corrected
            (measured, docs/rootsam.md "Corrective clicks"). BCE's gradient on a wrong pixel
            stays ``|p - t| ~ 1`` however confident it is (SAM's own mask loss is BCE-based
            focal + Dice for the same reason).
        logit_range / w_range: a penalty ``w_range * mean(relu(|logit| - logit_range)^2) /
            logit_range`` (0 weight or range = off). Without it the image-only evidence of a
            decoder trained from scratch grows to |logit| ~ 100, and neither the mask prompt
            nor a click (both enter the decoder through bounded embeddings) can move a pixel
            that confident: the previous mask is ignored and clicks barely act. With logits
            kept near the range the decision (``logit > 0``) is unchanged, and the previous
            mask and clicks can still flip it (measured, docs/rootsam.md "Corrective clicks").
    """

    tversky_alpha: float = 0.7
    tversky_beta: float = 0.3
    tversky_gamma: float = 0.75
    w_tversky: float = 1.0
    w_boundary: float = 0.5
    w_iou: float = 1.0
    w_bce: float = 1.0
    logit_range: float = 4.0
    w_range: float = 1.0


def focal_tversky_loss(logits: torch.Tensor, target: torch.Tensor, *, alpha: float = 0.7,
                       beta: float = 0.3, gamma: float = 0.75,
                       smooth: float = 1.0) -> torch.Tensor:
    """Per-sample focal Tversky loss.

    Args:
        logits: ``(B, 1, H, W)`` or ``(B, H, W)`` mask logits.
        target: same shape, {0, 1} (bool or float).
        alpha / beta: false-negative / false-positive weights.
        gamma: focal exponent.
        smooth: added to numerator and denominator (0 loss for empty-on-empty).

    Returns:
        ``(B,)`` losses in ``[0, 1]``.
    """
    p = torch.sigmoid(logits.float()).flatten(1)
    t = target.float().flatten(1)
    tp = (p * t).sum(1)
    fn = ((1 - p) * t).sum(1)
    fp = (p * (1 - t)).sum(1)
    ti = (tp + smooth) / (tp + alpha * fn + beta * fp + smooth)
    return (1 - ti).clamp_min(0).pow(gamma)


def signed_distance_map(mask: np.ndarray) -> np.ndarray:
    """Kervadec's level-set ``phi`` of a binary mask, normalised by the mask's longer side.

    Args:
        mask: bool ``(H, W)``.

    Returns:
        float32 ``(H, W)``: ``-d_in(x)`` inside the object (distance to the background),
        ``+d_out(x)`` outside (distance to the object), both divided by ``max(H, W)``;
        ``+1`` everywhere for an empty mask, ``-1`` for a full one.
    """
    import cv2

    m = np.asarray(mask, bool)
    h, w = m.shape
    if not m.any():
        return np.ones((h, w), np.float32)
    if m.all():
        return -np.ones((h, w), np.float32)
    # distance of each pixel to the nearest pixel of the other class (0 for those pixels
    # themselves); the boundary sits between the classes, so shift by half a pixel.
    d_out = cv2.distanceTransform((~m).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    d_in = cv2.distanceTransform(m.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    phi = np.where(m, -(d_in - 0.5), d_out - 0.5)
    return (phi / float(max(h, w))).astype(np.float32)


def boundary_loss(logits: torch.Tensor, sdm: torch.Tensor) -> torch.Tensor:
    """Per-sample boundary loss ``mean(sigmoid(logits) * phi)`` (Kervadec et al.).

    Args:
        logits: ``(B, 1, H, W)`` or ``(B, H, W)``.
        sdm: same shape, from :func:`signed_distance_map` (negative inside).

    Returns:
        ``(B,)``; can be negative (it is minimised, not a distance).
    """
    p = torch.sigmoid(logits.float()).flatten(1)
    return (p * sdm.float().flatten(1)).mean(1)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of ``logits > 0`` with ``target``, per sample; 1.0 when both are empty.

    Args:
        logits: ``(B, 1, H, W)`` or ``(B, H, W)``.
        target: same shape, {0, 1}.

    Returns:
        ``(B,)`` float in ``[0, 1]`` (no gradient).
    """
    pred = (logits.detach() > 0).flatten(1)
    t = target.detach().bool().flatten(1)
    inter = (pred & t).sum(1).float()
    union = (pred | t).sum(1).float()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def iou_head_loss(iou_pred: torch.Tensor, logits: torch.Tensor,
                  target: torch.Tensor) -> torch.Tensor:
    """Per-sample MSE between SAM's predicted IoU and the mask's actual IoU.

    Args:
        iou_pred: ``(B, 1)`` or ``(B,)`` from the decoder's IoU head.
        logits / target: as in :func:`mask_iou` (the target IoU carries no gradient).

    Returns:
        ``(B,)``.
    """
    actual = mask_iou(logits, target)
    return (iou_pred.float().reshape(-1) - actual) ** 2


def rootsam_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor,
                 sdm: torch.Tensor, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted RootSAM training loss, averaged over the batch.

    Args:
        logits: ``(B, 1, H, W)`` mask logits at the target's resolution.
        iou_pred: ``(B, 1)``.
        target: ``(B, 1, H, W)`` {0, 1}.
        sdm: ``(B, 1, H, W)`` signed distance maps of ``target``.
        cfg: weights and Tversky parameters.

    Returns:
        The scalar loss (for ``backward``) and its parts as floats for logging.
    """
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear",
                               align_corners=False)
    ft = focal_tversky_loss(logits, target, alpha=cfg.tversky_alpha, beta=cfg.tversky_beta,
                            gamma=cfg.tversky_gamma).mean()
    bd = boundary_loss(logits, sdm).mean()
    iou = iou_head_loss(iou_pred, logits, target).mean()
    total = cfg.w_tversky * ft + cfg.w_boundary * bd + cfg.w_iou * iou
    parts = {"tversky": float(ft.detach()), "boundary": float(bd.detach()),
             "iou_mse": float(iou.detach())}
    if cfg.w_bce:
        bce = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        total = total + cfg.w_bce * bce
        parts["bce"] = float(bce.detach())
    if cfg.w_range and cfg.logit_range > 0:
        over = (logits.float().abs() - cfg.logit_range).clamp_min(0)
        rng = (over * over).mean() / cfg.logit_range
        total = total + cfg.w_range * rng
        parts["logit_range"] = float(rng.detach())
    return total, {"loss": float(total.detach()), **parts}
