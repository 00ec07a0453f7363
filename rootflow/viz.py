"""Plots analysts would rather look at than read (used by ``notebooks/``; matplotlib only).

Each function takes a pandas frame straight from a documented query (``docs/lake.md``) and an
optional matplotlib ``Axes``, and returns the ``Axes`` so notebooks can restyle or save it.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _axes(ax: Any = None, figsize: tuple[float, float] = (6, 4)) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def rld_profile(df: Any, *, ax: Any = None) -> Any:
    """Root length density against depth, one line per date (soil depth increases downwards).

    Args:
        df: columns ``depth_band_cm``, ``date``, ``rld_cm_per_cm3`` (the RLD query).
    """
    ax = _axes(ax, (5, 5))
    for date, g in df.sort_values("depth_band_cm").groupby("date"):
        label = date.strftime("%Y-%m-%d") if hasattr(date, "strftime") else str(date)
        ax.plot(g["rld_cm_per_cm3"], g["depth_band_cm"], marker="o", label=label)
    ax.invert_yaxis()
    ax.set_xlabel("root length density (cm cm$^{-3}$)")
    ax.set_ylabel("depth band (cm, top of the band)")
    ax.legend(title="date", fontsize=8)
    ax.set_title("Root length density by depth")
    return ax


def growth(df: Any, *, ax: Any = None) -> Any:
    """Total root length per tube over the sessions.

    Args:
        df: columns ``tube``, ``date``, ``length_mm`` (summed per tube and date).
    """
    ax = _axes(ax)
    for tube, g in df.sort_values("date").groupby("tube"):
        ax.plot(g["date"], g["length_mm"] / 10, marker="o", label=f"T{int(tube):03d}")
    ax.set_xlabel("session date")
    ax.set_ylabel("root length (cm)")
    ax.legend(title="tube", fontsize=8)
    ax.set_title("Root growth between sessions")
    ax.figure.autofmt_xdate()
    return ax


def compare(x: Any, y: Any, *, x_label: str, y_label: str, ax: Any = None) -> Any:
    """Scatter of one producer/version against another, with the 1:1 line and R²."""
    ax = _axes(ax, (4.5, 4.5))
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    ax.scatter(x[ok], y[ok], s=12, alpha=0.7)
    hi = float(max(x[ok].max(initial=0), y[ok].max(initial=0))) or 1.0
    ax.plot([0, hi], [0, hi], "k--", lw=1)
    if ok.sum() > 1 and np.var(x[ok]) > 0:
        r2 = 1 - np.sum((y[ok] - x[ok]) ** 2) / np.sum((x[ok] - x[ok].mean()) ** 2)
        ax.set_title(f"R² (1:1) = {r2:.3f}, n = {int(ok.sum())}")
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    return ax


def overlay(image: np.ndarray, mask: np.ndarray, *, color: tuple[int, int, int] = (255, 40, 40),
            alpha: float = 0.55) -> np.ndarray:
    """RGB image with ``mask`` painted over it (for QA of produced masks)."""
    out = np.asarray(image, dtype=np.float32).copy()
    m = np.asarray(mask) > 0
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(color, np.float32)
    return out.clip(0, 255).astype(np.uint8)


def season(df: Any, *, value: str = "produced_mm_per_day", ax: Any = None,
           cmap: str = "viridis") -> Any:
    """Root production or mortality through a season: depth downward, time across.

    The chart root ecologists draw for minirhizotron dynamics (a depth x date grid, one cell per
    depth band and session date, colour = the value); call it once per figure, e.g. for
    ``produced_mm_per_day`` and ``lost_mm_per_day`` side by side.

    Args:
        df: columns ``depth_band_cm``, ``date`` (the later session of each pair) and ``value``
            (the season query of ``docs/dynamics.md``).
    """
    ax = _axes(ax, (6, 4))
    grid = df.pivot_table(index="depth_band_cm", columns="date", values=value, aggfunc="sum")
    grid = grid.sort_index()
    im = ax.imshow(grid.to_numpy(dtype=float), aspect="auto", cmap=cmap, interpolation="nearest")
    ax.set_yticks(range(len(grid.index)), [f"{d:g}" for d in grid.index])
    ax.set_xticks(range(len(grid.columns)),
                  [c.strftime("%m-%d") if hasattr(c, "strftime") else str(c) for c in grid.columns])
    ax.set_ylabel("depth band (cm, top of the band)")
    ax.set_xlabel("session date")
    label = value.replace("_mm_per_day", " (mm d$^{-1}$)").replace("_mm", " (mm)").replace("_", " ")
    ax.figure.colorbar(im, ax=ax, label=label)
    ax.set_title(label.split(" (")[0].capitalize() + " by depth and date")
    return ax


def runs_processed(df: Any, *, ax: Any = None) -> Any:
    """Images processed and rejected per run, as stacked bars in run order.

    Args:
        df: columns ``run_id``, ``started_at``, ``n_ok``, ``n_rejected`` (the ``runs`` table).
    """
    df = df.sort_values("started_at")
    ax = _axes(ax, (max(5.0, 0.6 * len(df) + 2), 4))
    x = np.arange(len(df))
    ok = df["n_ok"].fillna(0).to_numpy(float)
    rej = df["n_rejected"].fillna(0).to_numpy(float)
    ax.bar(x, ok, color="#4c72b0", label="processed")
    ax.bar(x, rej, bottom=ok, color="#dd8452", label="rejected")
    labels = [f"{t:%Y-%m-%d %H:%M}\n{str(r)[:24]}" if hasattr(t, "strftime") else str(r)[:24]
              for t, r in zip(df["started_at"], df["run_id"], strict=True)]
    ax.set_xticks(x, labels, fontsize=7, rotation=30 if len(df) > 4 else 0,
                  ha="right" if len(df) > 4 else "center")
    ax.set_xlabel("run (start time UTC, run id)")
    ax.set_ylabel("images (count)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("Images processed and rejected per run")
    return ax


def producers_scatter(x: Any, y: Any, *, x_label: str, y_label: str, title: str = "",
                      ax: Any = None) -> Any:
    """One producer against another on the same images: 1:1 line, R² about the 1:1 line and
    bias (mean of y - x, in the units of the axes) in the title."""
    ax = _axes(ax, (4.5, 4.5))
    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    ax.scatter(x[ok], y[ok], s=14, alpha=0.7, color="#4c72b0")
    lo = float(min(x[ok].min(initial=0), y[ok].min(initial=0)))
    hi = float(max(x[ok].max(initial=0), y[ok].max(initial=0))) or 1.0
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="1:1")
    stats = r2_bias(x[ok], y[ok])
    r2 = "n/a" if stats[0] is None else f"{stats[0]:.2f}"
    bias = "n/a" if stats[1] is None else f"{stats[1]:+.1f}"
    ax.set_title(f"{title}\nR² (1:1) = {r2}, bias = {bias}, n = {int(ok.sum())}", fontsize=9)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.legend(fontsize=8, loc="lower right")
    return ax


def r2_bias(x: Any, y: Any) -> tuple[float | None, float | None]:
    """(R² of y against the 1:1 line with x, mean of y - x); None where undefined."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) == 0:
        return None, None
    bias = float(np.mean(y - x))
    if len(x) < 2 or np.var(x) == 0:
        return None, bias
    return float(1 - np.sum((y - x) ** 2) / np.sum((x - x.mean()) ** 2)), bias
