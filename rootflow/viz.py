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
