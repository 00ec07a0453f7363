"""Score a folder of predicted masks against a folder of human masks, the way root scientists do.

Pixel overlap pooled over every pixel of every image (:mod:`rootflow.evaluation.metrics`),
clDice for the skeleton, and agreement of the *traits* the lab will publish: per-image root
length and projected area measured by :func:`rootflow.traits.measure` on both masks, compared by
R² (coefficient of determination), Pearson r² and the bias of the total.

Pairing is by file name: ``<stem>_mask.png`` in ``pred`` with ``<stem>_mask.png`` in ``truth``.
A truth mask without a prediction, a prediction without a truth mask, a size mismatch, or a
mask that is not binary are :class:`EvaluationError` s naming the files.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rootflow.evaluation import metrics as M

log = logging.getLogger(__name__)
MASK_SUFFIX = "_mask.png"


class EvaluationError(ValueError):
    """Inputs that cannot be scored (the message names the files)."""


@dataclasses.dataclass(frozen=True)
class MaskPair:
    stem: str
    pred: Path
    truth: Path


def pair_masks(pred_dir: str | Path, truth_dir: str | Path, *,
               allow_extra_pred: bool = True) -> list[MaskPair]:
    """``<stem>_mask.png`` files of ``truth_dir`` with their namesakes in ``pred_dir``.

    Raises:
        EvaluationError: a folder is missing or holds no masks, or a truth mask has no
            prediction (all such stems are named).
    """
    pred_dir, truth_dir = Path(pred_dir), Path(truth_dir)
    for d, what in ((pred_dir, "--pred"), (truth_dir, "--truth")):
        if not d.is_dir():
            raise EvaluationError(f"{what} {d}: not a folder")
    truth = {p.name[: -len(MASK_SUFFIX)]: p for p in sorted(truth_dir.glob(f"*{MASK_SUFFIX}"))}
    pred = {p.name[: -len(MASK_SUFFIX)]: p for p in sorted(pred_dir.glob(f"*{MASK_SUFFIX}"))}
    if not truth:
        raise EvaluationError(f"--truth {truth_dir}: no *{MASK_SUFFIX} files")
    missing = sorted(set(truth) - set(pred))
    if missing:
        shown = ", ".join(f"{s}{MASK_SUFFIX}" for s in missing[:5])
        more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
        raise EvaluationError(f"{len(missing)} truth mask(s) have no prediction in {pred_dir}: "
                              f"{shown}{more}")
    extra = sorted(set(pred) - set(truth))
    if extra and not allow_extra_pred:
        raise EvaluationError(f"{len(extra)} prediction(s) have no truth mask: {extra[:5]}")
    if extra:
        log.warning("%d prediction(s) in %s have no truth mask and are ignored (e.g. %s)",
                    len(extra), pred_dir, extra[0] + MASK_SUFFIX)
    return [MaskPair(s, pred[s], truth[s]) for s in sorted(truth)]


def read_mask(path: Path) -> np.ndarray:
    """A 0/255 (or 0/1, or bool) mask PNG as bool; anything else is an :class:`EvaluationError`."""
    from rootflow.io.images import ImageDecodeError, _decode_any

    try:
        arr = _decode_any(path.read_bytes())
    except (ImageDecodeError, OSError, ValueError) as e:
        raise EvaluationError(f"{path}: unreadable mask ({e})") from None
    if arr.ndim == 3:
        if arr.shape[-1] == 4:
            arr = arr[..., :3]
        if not (arr == arr[..., :1]).all():
            raise EvaluationError(f"{path}: a colour image, not a binary mask")
        arr = arr[..., 0]
    values = np.unique(arr)
    hi = values.max() if values.size else 0
    if not set(values.tolist()) <= {0, hi}:
        raise EvaluationError(f"{path}: not binary ({values.size} grey levels, e.g. "
                              f"{values[:4].tolist()}): threshold it first")
    return arr > 0


def _traits(mask: np.ndarray, dpi: float) -> tuple[float, float]:
    from rootflow.traits import measure

    t = measure(mask, dpi=dpi)
    return float(t["length_mm"]), float(t["projected_area_mm2"])


def iter_scores(pairs: list[MaskPair], *, dpi: float | None = None,
                cldice: bool = True) -> Iterator[dict[str, Any]]:
    """Per-image rows: counts, per-image scores and the traits of both masks."""
    unit_dpi = dpi if dpi else 25.4  # 25.4 dpi = 1 px per mm: lengths come out in px
    for pair in pairs:
        p, t = read_mask(pair.pred), read_mask(pair.truth)
        if p.shape != t.shape:
            raise EvaluationError(f"size mismatch: {pair.pred} is {p.shape[1]}x{p.shape[0]}, "
                                  f"{pair.truth} is {t.shape[1]}x{t.shape[0]}")
        counts = M.pixel_counts(p, t, cldice=cldice)
        scores = M.summarize_pixels(counts)
        lp, ap = _traits(p, unit_dpi)
        lt, at = _traits(t, unit_dpi)
        yield {"stem": pair.stem, "height": p.shape[0], "width": p.shape[1],
               **{k: counts[k] for k in ("tp", "fp", "fn", "tn")},
               "dice": scores["dice"], "iou": scores["iou"], "cldice": scores["cldice"],
               "precision": scores["precision"], "recall": scores["recall"],
               "pred_length": lp, "true_length": lt, "pred_area": ap, "true_area": at,
               "_counts": counts}


def summarize_rows(rows: list[dict[str, Any]], *, dpi: float | None = None) -> dict[str, Any]:
    """The pooled summary over per-image rows (what ``rootflow evaluate masks`` prints)."""
    total: dict[str, float] = {}
    for r in rows:
        total = M.add_sums(total, r["_counts"])
    pooled = M.summarize_pixels(total)
    agree = M.trait_agreement(pred_length=[r["pred_length"] for r in rows],
                              true_length=[r["true_length"] for r in rows],
                              pred_area=[r["pred_area"] for r in rows],
                              true_area=[r["true_area"] for r in rows])
    unit = "mm" if dpi else "px"
    return {
        "n_images": len(rows),
        **{k: pooled[k] for k in ("dice", "iou", "precision", "recall", "cldice",
                                  "topology_precision", "topology_sensitivity")},
        "mean_image_dice": float(np.mean([r["dice"] for r in rows])) if rows else float("nan"),
        **{k: agree[k] for k in ("length_r2", "length_pearson_r2", "length_bias_pct",
                                 "area_r2", "area_pearson_r2", "area_bias_pct")},
        f"length_mae_{unit}": agree["length_mae"],
        f"area_mae_{unit}2": agree["area_mae"],
        "true_length_total": float(sum(r["true_length"] for r in rows)),
        "pred_length_total": float(sum(r["pred_length"] for r in rows)),
        "length_unit": unit, "dpi": dpi,
    }


CSV_COLUMNS = ("stem", "height", "width", "tp", "fp", "fn", "tn", "dice", "iou", "cldice",
               "precision", "recall", "pred_length", "true_length", "pred_area", "true_area")


def write_csv(rows: list[dict[str, Any]], path: str | Path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(CSV_COLUMNS), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def evaluate_masks(pred_dir: str | Path, truth_dir: str | Path, *, dpi: float | None = None,
                   csv_path: str | Path | None = None, cldice: bool = True,
                   progress: bool = False) -> dict[str, Any]:
    """Pair, score, summarise; optionally write the per-image CSV. See the module docstring."""
    pairs = pair_masks(pred_dir, truth_dir)
    it = iter_scores(pairs, dpi=dpi, cldice=cldice)
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=len(pairs), desc="evaluate", unit="mask")
    rows = list(it)
    if csv_path:
        write_csv(rows, csv_path)
    return summarize_rows(rows, dpi=dpi)
