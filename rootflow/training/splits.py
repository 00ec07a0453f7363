"""Grouped splits: every train/validation/test division in rootflow keeps a tube (or a window) whole.

Sessions of one tube window are near-duplicates: the same soil, the same roots a week later.
Splitting by image puts one session in training and the next in validation and measures
memory, not generalisation. Every trainer (RootSAM, RootQuant, forest, U-Net), every
cross-validation benchmark and ``rootflow evaluate`` therefore splits through this module.

Groups come from file names (:func:`rootflow.io.filenames.parse_name`: Bartz/ICAP, CI-600,
PRMI, tiles ``..._FRMI_NN``), or from ``tube``/``window`` columns when a table has them:

* ``by="tube"``: experiment + tube. The right unit when there are several tubes
  (SegRoot soybean: T002 ... T012).
* ``by="window"``: experiment + tube + window. For archives of one tube (PRMI peanut T064,
  switchgrass T312, whose tiles of one window stay together).
* ``by="auto"`` (the default): tube when there are at least ``min_groups`` tubes, else window.

A name that yields no tube/window is its own group and a warning is logged once per call,
because that may leak sessions; pass a ``group`` column to decide explicitly.

Assignments are deterministic (``seed``) and independent of row order.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa

log = logging.getLogger(__name__)

GroupBy = Literal["auto", "tube", "window"]
GROUP_BYS: tuple[str, ...] = ("auto", "tube", "window")
_FALLBACK = re.compile(r"(?:^|[_\-.])T(?P<tube>\d+)[_\-.]L(?P<window>\d+)(?:[_\-.]|$)", re.I)


class SplitError(ValueError):
    """A split cannot be made as asked (too few groups, bad fold index)."""


def _name(uri: str) -> str:
    return uri.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]


def tube_window(uri_or_name: str) -> tuple[str, str] | None:
    """``(experiment:tube, window)`` parsed from a file name, or None when it has neither."""
    from rootflow.io.filenames import FilenameError, parse_name, stem_of

    name = _name(uri_or_name)
    try:
        p = parse_name(name)
        return f"{p.experiment}:T{p.tube}", f"L{p.window}"
    except (FilenameError, ValueError):
        pass
    m = _FALLBACK.search(stem_of(name))
    if m:
        return f"T{int(m['tube'])}", f"L{int(m['window'])}"
    return None


def group_keys(table: pa.Table, *, by: GroupBy = "auto", min_groups: int = 3,
               column: str = "image_uri") -> np.ndarray:
    """The group of every row, as an object array of strings.

    Uses a ``group`` column when present; else ``tube``/``window`` columns (with
    ``experiment`` when present); else file names in ``column`` (or ``file_name``).

    Raises:
        SplitError: ``by`` is not one of :data:`GROUP_BYS`.
    """
    if by not in GROUP_BYS:
        raise SplitError(f"unknown split grouping {by!r}; choose from {list(GROUP_BYS)}")
    n = table.num_rows
    if "group" in table.column_names:
        return np.asarray([str(g) for g in table["group"].to_pylist()], dtype=object)
    names = table.column_names
    if "tube" in names and "window" in names:
        exp = table["experiment"].to_pylist() if "experiment" in names else [""] * n
        tw = [(f"{e}:T{t}", f"L{w}") if t is not None and w is not None else None
              for e, t, w in zip(exp, table["tube"].to_pylist(), table["window"].to_pylist(),
                                 strict=True)]
    else:
        col = column if column in names else "file_name" if "file_name" in names else None
        if col is None:
            raise SplitError(f"cannot group rows: no {column!r}, file_name, tube/window or "
                             f"group column in {names}")
        tw = [tube_window(str(u)) for u in table[col].to_pylist()]
    ids = table[column].to_pylist() if column in names else [str(i) for i in range(n)]
    unparsed = [str(ids[i]) for i in range(n) if tw[i] is None]
    if unparsed:
        log.warning("%d of %d images have no tube/window in their name (e.g. %s): each is its "
                    "own split group, so sessions of one window may land on both sides; add a "
                    "'group' column to decide", len(unparsed), n, _name(unparsed[0]))
    if by == "auto":
        tubes = {x[0] for x in tw if x is not None}
        by = "tube" if len(tubes) >= min_groups else "window"
    out = [("img:" + str(ids[i])) if x is None else x[0] if by == "tube" else f"{x[0]}:{x[1]}"
           for i, x in enumerate(tw)]
    return np.asarray(out, dtype=object)


def resolve_by(table: pa.Table, by: GroupBy = "auto", *, min_groups: int = 3,
               column: str = "image_uri") -> str:
    """What ``by="auto"`` resolves to for ``table`` ("tube", "window" or "group")."""
    if "group" in table.column_names:
        return "group"
    if by != "auto":
        return by
    keys = group_keys(table, by="tube", min_groups=min_groups, column=column)
    return "tube" if len(set(keys.tolist())) >= min_groups else "window"


def _u(seed: int, key: str) -> float:
    return int(hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()[:12], 16) / 16**12


def grouped_folds(groups: Sequence[str] | np.ndarray, *, k: int, seed: int = 0) -> np.ndarray:
    """Fold index (0..k-1) of every row; whole groups per fold, folds balanced by row count.

    Groups are dealt largest first (ties in a seeded hash order) to the fold with the fewest
    rows so far, so 19 soybean scans over 9 tubes make 3 folds of 6-7 scans.

    Raises:
        SplitError: ``k < 2`` or fewer groups than folds.
    """
    keys = np.asarray(list(groups), dtype=object)
    uniq = sorted(set(keys.tolist()))
    if k < 2:
        raise SplitError(f"need at least 2 folds, got {k}")
    if len(uniq) < k:
        raise SplitError(f"{k} folds need at least {k} groups; there are {len(uniq)}: {uniq}")
    sizes = {g: int(np.count_nonzero(keys == g)) for g in uniq}
    order = sorted(uniq, key=lambda g: (-sizes[g], _u(seed, g)))
    load = [0] * k
    fold_of: dict[str, int] = {}
    for g in order:
        f = min(range(k), key=lambda i: (load[i], i))
        fold_of[g] = f
        load[f] += sizes[g]
    return np.asarray([fold_of[g] for g in keys.tolist()], dtype=np.int64)


def val_mask(groups: Sequence[str] | np.ndarray, *, val_fraction: float,
             seed: int = 0) -> np.ndarray:
    """Bool per row: in validation. Whole groups, about ``val_fraction`` of the rows.

    Groups are taken in a seeded hash order until the validation share reaches
    ``val_fraction``; with two or more groups, each side keeps at least one group.
    With a single group nothing can be held out without leaking: everything is training and
    a warning says so (callers that need validation raise).
    """
    keys = np.asarray(list(groups), dtype=object)
    n = keys.size
    uniq = sorted(set(keys.tolist()), key=lambda g: _u(seed, g))
    is_val = np.zeros(n, bool)
    if val_fraction <= 0 or n == 0:
        return is_val
    if len(uniq) < 2:
        log.warning("all %d images are in one split group (%s): no group can be held out", n,
                    uniq[0] if uniq else "-")
        return is_val
    target = val_fraction * n
    for g in uniq[:-1]:  # never all groups
        if is_val.sum() >= target:
            break
        is_val |= keys == g
    return is_val


def grouped_split(table: pa.Table, *, val_fraction: float, seed: int = 0, by: GroupBy = "auto",
                  column: str = "image_uri") -> tuple[pa.Table, pa.Table]:
    """``(train, val)`` with whole groups on each side (see :func:`val_mask`)."""
    is_val = val_mask(group_keys(table, by=by, column=column), val_fraction=val_fraction,
                      seed=seed)
    idx = np.arange(table.num_rows)
    return table.take(pa.array(idx[~is_val])), table.take(pa.array(idx[is_val]))


def fold_split(table: pa.Table, *, k: int, fold: int, seed: int = 0, by: GroupBy = "auto",
               column: str = "image_uri") -> tuple[pa.Table, pa.Table]:
    """``(train, held_out)`` for fold ``fold`` of ``k`` grouped folds."""
    if not 0 <= fold < k:
        raise SplitError(f"fold must be in [0, {k}), got {fold}")
    folds = grouped_folds(group_keys(table, by=by, column=column), k=k, seed=seed)
    idx = np.arange(table.num_rows)
    return table.take(pa.array(idx[folds != fold])), table.take(pa.array(idx[folds == fold]))


def check_disjoint(a: pa.Table, b: pa.Table, *, by: GroupBy = "auto",
                   column: str = "image_uri") -> None:
    """Raise :class:`SplitError` naming the groups found on both sides."""
    both = pa.concat_tables([a.select([column]), b.select([column])]) if column in a.column_names \
        else None
    if both is None:
        return
    keys = group_keys(both, by=by, column=column)
    shared = set(keys[:a.num_rows].tolist()) & set(keys[a.num_rows:].tolist())
    if shared:
        raise SplitError(f"groups on both sides of a split: {sorted(shared)[:5]}")
