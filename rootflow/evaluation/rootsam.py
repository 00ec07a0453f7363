"""RootSAM's evaluation table: mIoU / Dice with fixed-point prompts, NoC@85/90, s per click.

``rootflow evaluate rootsam --data DIR --config NAME [--base-checkpoint URI]
[--checkpoint LABEL=URI ...]`` scores the SAM2.1 base (its un-tuned decoder) and each labelled
RootSAM checkpoint on held-out ``<stem>.<ext>`` + ``<stem>_mask.png`` pairs, cut into 512 px
views (the seed's setting). Every number goes through the deployed code:

* the first mask of a view is :meth:`RootSAMPredictor.predict` with the configured prompt
  policy (fixed-point prompts labelled by the policy's rule: no ground truth, no human);
* ``miou`` = mean over views of the root-class IoU; ``dice`` = pooled Dice
  (:func:`rootflow.evaluation.metrics.summarize_pixels`);
* ``noc85`` / ``noc90``: clicks of the simulated clicker
  (:func:`rootflow.inference.prompts.next_click`, the one training uses) fed to
  :meth:`RootSAMPredictor.refine` (original prompts + all clicks so far, previous logits as mask
  prompt) until the view's IoU reaches 85 % / 90 %, counted as ``max_clicks`` (20) when never
  reached; mean over views;
* ``s_per_click``: wall seconds per :meth:`refine` call with the tile embeddings cached (the
  encoder ran in ``predict``), on the device the predictor uses (CPU here).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rootflow.evaluation.metrics import add_sums, pixel_counts, summarize_pixels
from rootflow.inference.prompts import next_click

log = logging.getLogger(__name__)

MAX_CLICKS = 20
TARGETS = (0.85, 0.90)


class RootSAMEvaluationError(ValueError):
    """The inputs cannot be evaluated (message names the file or argument)."""


def root_iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Root-class IoU of one view (1.0 when neither has a root pixel)."""
    p, t = np.asarray(pred, bool), np.asarray(truth, bool)
    union = int(np.count_nonzero(p | t))
    return 1.0 if union == 0 else int(np.count_nonzero(p & t)) / union


@dataclasses.dataclass
class ClickTrace:
    """One view's interactive run: IoU after 0, 1, 2, ... clicks, and seconds per click."""

    ious: list[float]
    seconds: list[float]
    first_mask: np.ndarray

    def noc(self, target: float, max_clicks: int = MAX_CLICKS) -> int:
        """Clicks needed to reach ``target`` IoU (``max_clicks`` when never reached)."""
        for k, v in enumerate(self.ious):
            if v >= target:
                return k
        return max_clicks


def click_trace(predictor: Any, image: np.ndarray, truth: np.ndarray, *,
                max_clicks: int = MAX_CLICKS, stop_at: float = max(TARGETS)) -> ClickTrace:
    """Predict ``image`` with the policy, then click with :func:`next_click` and
    :meth:`~rootflow.inference.rootsam.RootSAMPredictor.refine` until IoU >= ``stop_at`` or
    ``max_clicks`` clicks."""
    truth = np.asarray(truth, bool)
    res = predictor.predict([image], return_logits=True)[0]
    first = res.mask
    ious = [root_iou(res.mask, truth)]
    seconds: list[float] = []
    prompts = res.tile_prompts
    prev, mask = res.logits, res.mask
    pts: list[tuple[float, float]] = []
    labs: list[int] = []
    while ious[-1] < stop_at and len(pts) < max_clicks:
        c = next_click(mask, truth)
        if c is None:
            break
        pts.append((c[0], c[1]))
        labs.append(c[2])
        t0 = time.perf_counter()
        r, _ = predictor.refine(image, points=np.array(pts, np.float32),
                                labels=np.array(labs, np.int32), previous=prev, prompts=prompts)
        seconds.append(time.perf_counter() - t0)
        prev, mask = r.logits, r.mask
        ious.append(root_iou(mask, truth))
    return ClickTrace(ious, seconds, first)


def views(image: np.ndarray, mask: np.ndarray, *, size: int = 512,
          ) -> list[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping ``size`` px views of an image (the last row/column clamped to the
    border; an image smaller than ``size`` is one view)."""
    h, w = mask.shape
    ys = sorted({min(y, max(0, h - size)) for y in range(0, max(1, h - size + size), size)})
    xs = sorted({min(x, max(0, w - size)) for x in range(0, max(1, w - size + size), size)})
    return [(image[y:y + size, x:x + size], mask[y:y + size, x:x + size]) for y in ys for x in xs]


def score(predictor: Any, pairs: Sequence[tuple[np.ndarray, np.ndarray]], *,
          max_clicks: int = MAX_CLICKS) -> dict[str, float]:
    """The table row of one model over ``pairs`` of (view, truth)."""
    if not pairs:
        raise RootSAMEvaluationError("no view to evaluate")
    sums: dict[str, float] = {}
    ious: list[float] = []
    nocs: dict[float, list[float]] = {t: [] for t in TARGETS}
    secs: list[float] = []
    for img, truth in pairs:
        tr = click_trace(predictor, img, truth, max_clicks=max_clicks)
        ious.append(tr.ious[0])
        sums = add_sums(sums, pixel_counts(tr.first_mask, truth, cldice=False))
        for t in TARGETS:
            nocs[t].append(tr.noc(t, max_clicks))
        secs.extend(tr.seconds)
    out = {"miou": float(np.mean(ious)), "dice": summarize_pixels(sums)["dice"]}
    for t in TARGETS:
        out[f"noc{round(t * 100)}"] = float(np.mean(nocs[t]))
    out["s_per_click"] = float(np.mean(secs)) if secs else float("nan")
    out["n_views"] = float(len(pairs))
    out["clicks"] = float(len(secs))
    return out


def load_views(data: str, *, size: int = 512, max_views: int | None = None,
               storage_options: Any = None) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
    """All ``size`` px views of the pairs in ``data`` (first ``max_views``, taken round-robin
    over images so every image contributes); returns the views and the number of images."""
    from rootflow.training.data import AnnotationError, load_pairs, pairs_manifest

    try:
        table = pairs_manifest(data, storage_options=storage_options)
        pairs = load_pairs(table, storage_options=storage_options)
    except (AnnotationError, FileNotFoundError, OSError) as e:
        raise RootSAMEvaluationError(f"{data}: {e}") from None
    per_image = [views(p.image, p.mask, size=size) for p in pairs]
    out: list[tuple[np.ndarray, np.ndarray]] = []
    k = 0
    while any(k < len(v) for v in per_image):
        out.extend(v[k] for v in per_image if k < len(v))
        k += 1
    if max_views is not None:
        out = out[:max_views]
    return out, len(pairs)


def evaluate_rootsam(data: str, *, variant: str, base_checkpoint: str | None = None,
                     base_sha256: str | None = None,
                     checkpoints: Mapping[str, str] | None = None, view: int = 512,
                     max_views: int | None = None, max_clicks: int = MAX_CLICKS,
                     inference: Mapping[str, Any] | None = None,
                     storage_options: Any = None) -> dict[str, Any]:
    """The evaluation table as one dict: ``{"base": row, "<label>": row, ..., "meta": {...}}``
    (rows from :func:`score`). ``inference`` overrides fields of
    :class:`~rootflow.inference.rootsam.RootSAMInferenceConfig` (prompt policy, device...)."""
    from rootflow.inference.rootsam import RootSAMInferenceConfig, RootSAMPredictor

    pairs, n_images = load_views(data, size=view, max_views=max_views,
                                 storage_options=storage_options)
    base_cfg = RootSAMInferenceConfig(variant=variant, base_checkpoint=base_checkpoint,
                                      base_sha256=base_sha256, device="cpu",
                                      **dict(inference or {}))
    models = {"base": base_cfg}
    for label, uri in (checkpoints or {}).items():
        if label in models or label == "meta":
            raise RootSAMEvaluationError(f"--checkpoint label {label!r} is reserved or repeated")
        models[label] = dataclasses.replace(base_cfg, rootsam_checkpoint=uri)
    out: dict[str, Any] = {}
    random_init = False
    for label, cfg in models.items():
        t0 = time.perf_counter()
        pred = RootSAMPredictor(cfg, storage_options=storage_options)
        random_init = random_init or pred.model.random_init
        out[label] = {**score(pred, pairs, max_clicks=max_clicks), "version": pred.version,
                      "prompt_mode": pred.policy.mode, "policy_source": pred.policy_source}
        log.info("evaluate rootsam: %s done in %.1f s: %s", label,
                 time.perf_counter() - t0, out[label])
    out["meta"] = {"data": data, "n_images": n_images, "view_px": view,
                   "variant": variant, "max_clicks": max_clicks,
                   "prompt_mode": base_cfg.prompt_mode, "random_init_base": random_init,
                   "note": ("base is randomly initialised: numbers measure the machinery, "
                            "not RootSAM's quality") if random_init else ""}
    return out
