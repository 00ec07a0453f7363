"""Regression metrics for per-image root length/area: small pure numpy functions.

Each takes 1-D arrays of equal length (anything ``np.asarray`` accepts, torch tensors on CPU
included), ignores rows where either value is NaN, and returns a plain ``float``: NaN when the
metric is undefined (no rows; R2 with constant truth), never an exception, so a validation
epoch on an unlucky shard still reports.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ArrayLike = Any


def _pair(pred: ArrayLike, true: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=np.float64).reshape(-1)
    t = np.asarray(true, dtype=np.float64).reshape(-1)
    if p.shape != t.shape:
        raise ValueError(f"pred and true differ in length: {p.shape[0]} vs {t.shape[0]}")
    ok = np.isfinite(p) & np.isfinite(t)
    return p[ok], t[ok]


def r2(pred: ArrayLike, true: ArrayLike) -> float:
    """Coefficient of determination ``1 - SS_res / SS_tot`` (NaN if < 2 rows or constant truth)."""
    p, t = _pair(pred, true)
    if p.size < 2:
        return float("nan")
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    if ss_tot == 0.0:
        return float("nan")
    return 1.0 - float(np.sum((t - p) ** 2)) / ss_tot


def mae(pred: ArrayLike, true: ArrayLike) -> float:
    """Mean absolute error, in the unit of the inputs."""
    p, t = _pair(pred, true)
    return float(np.mean(np.abs(p - t))) if p.size else float("nan")


def rmse(pred: ArrayLike, true: ArrayLike) -> float:
    """Root mean squared error, in the unit of the inputs."""
    p, t = _pair(pred, true)
    return float(np.sqrt(np.mean((p - t) ** 2))) if p.size else float("nan")


def bias(pred: ArrayLike, true: ArrayLike) -> float:
    """Mean signed error ``mean(pred - true)``: > 0 means the model over-estimates."""
    p, t = _pair(pred, true)
    return float(np.mean(p - t)) if p.size else float("nan")


def presence_accuracy(presence: ArrayLike, true: ArrayLike, *, threshold: float = 0.5,
                      min_value: float = 0.0) -> float:
    """Accuracy of the zero / non-zero call.

    Args:
        presence: predicted probability (or 0/1) that the image shows roots, ``(N,)``.
        true: the true amount (length in mm), ``(N,)``; "present" means ``true > min_value``.
        threshold: probability at or above which the prediction says "present".
    """
    p, t = _pair(presence, true)
    if not p.size:
        return float("nan")
    return float(np.mean((p >= threshold) == (t > min_value)))


def regression_report(*, pred_length_mm: ArrayLike, true_length_mm: ArrayLike,
                      pred_area_mm2: ArrayLike, true_area_mm2: ArrayLike,
                      presence: ArrayLike | None = None, threshold: float = 0.5,
                      min_length_mm: float = 0.0) -> dict[str, float]:
    """All metrics for length and area (and presence when given) as one flat dict.

    Keys: ``length_r2, length_mae_mm, length_rmse_mm, length_bias_mm, area_r2, area_mae_mm2,
    area_rmse_mm2, area_bias_mm2, presence_accuracy, n``.
    """
    out: dict[str, float] = {}
    for name, unit, pred, true in (("length", "mm", pred_length_mm, true_length_mm),
                                   ("area", "mm2", pred_area_mm2, true_area_mm2)):
        out[f"{name}_r2"] = r2(pred, true)
        out[f"{name}_mae_{unit}"] = mae(pred, true)
        out[f"{name}_rmse_{unit}"] = rmse(pred, true)
        out[f"{name}_bias_{unit}"] = bias(pred, true)
    if presence is not None:
        out["presence_accuracy"] = presence_accuracy(presence, true_length_mm,
                                                     threshold=threshold, min_value=min_length_mm)
    out["n"] = float(np.asarray(true_length_mm).reshape(-1).shape[0])
    return out


def regression_sums(pred: ArrayLike, true: ArrayLike, *, prefix: str) -> dict[str, float]:
    """Additive sufficient statistics of :func:`r2`/:func:`mae`/:func:`rmse`/:func:`bias`.

    Summing these over data-parallel workers and passing the totals to
    :func:`metrics_from_sums` gives the exact metrics over all workers' rows (averaging
    per-worker R2 values would not).
    """
    p, t = _pair(pred, true)
    return {f"{prefix}n": float(p.size), f"{prefix}sum_t": float(t.sum()),
            f"{prefix}sum_t2": float((t ** 2).sum()), f"{prefix}sse": float(((p - t) ** 2).sum()),
            f"{prefix}sae": float(np.abs(p - t).sum()), f"{prefix}se": float((p - t).sum())}


def metrics_from_sums(sums: dict[str, float], *, prefix: str, unit: str) -> dict[str, float]:
    """R2, MAE, RMSE and bias from (summed) :func:`regression_sums` output."""
    n = sums[f"{prefix}n"]
    name = prefix.rstrip("_")
    if n <= 0:
        nan = float("nan")
        return {f"{name}_r2": nan, f"{name}_mae_{unit}": nan, f"{name}_rmse_{unit}": nan,
                f"{name}_bias_{unit}": nan}
    ss_tot = sums[f"{prefix}sum_t2"] - sums[f"{prefix}sum_t"] ** 2 / n
    r2_val = 1.0 - sums[f"{prefix}sse"] / ss_tot if n >= 2 and ss_tot > 1e-12 else float("nan")
    return {f"{name}_r2": r2_val, f"{name}_mae_{unit}": sums[f"{prefix}sae"] / n,
            f"{name}_rmse_{unit}": float(np.sqrt(sums[f"{prefix}sse"] / n)),
            f"{name}_bias_{unit}": sums[f"{prefix}se"] / n}
