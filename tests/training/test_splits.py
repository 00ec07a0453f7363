"""Grouped splits: no tube (or window of a one-tube archive) on both sides of any split."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from rootflow.training import splits
from rootflow.training.data import split_table

SOY = [  # the SegRoot soybean names in shared/data/real (9 tubes, 19 scans)
    "Untitled_T002_L002_20.03.17_115856_001_Untitled", "Untitled_T002_L002_23.05.17_073729_007_Untitled",
    "Untitled_T002_L004_11.04.17_084840_004_Untitled", "Untitled_T002_L006_11.04.17_085305_004_Untitled",
    "Untitled_T002_L008_23.05.17_075049_007_Untitled", "Untitled_T003_L002_04.04.17_091357_003_Untitled",
    "Untitled_T003_L008_25.04.17_090719_005_Untitled", "Untitled_T004_L005_09.05.17_122806_006_Untitled",
    "Untitled_T005_L001_28.03.17_092309_002_Untitled", "Untitled_T005_L002_25.04.17_093025_005_Untitled",
    "Untitled_T006_L001_25.04.17_094607_005_Untitled", "Untitled_T006_L002_28.03.17_095137_002_Untitled",
    "Untitled_T007_L001_09.05.17_134410_006_Untitled", "Untitled_T009_L002_28.03.17_124644_002_Untitled",
    "Untitled_T009_L006_11.04.17_170358_004_Untitled", "Untitled_T010_L003_11.04.17_163317_004_Untitled",
    "Untitled_T010_L003_20.03.17_160121_001_Untitled", "Untitled_T010_L004_25.04.17_111251_005_Untitled",
    "Untitled_T012_L007_23.05.17_112212_007_Untitled",
]
PEANUT = [f"2016LATERALPEANUT_T064_L0{w}_2016.{m:02d}.{d:02d}_153725_00{s}_BAZ"
          for w in (18, 26, 34, 42, 50) for s, (m, d) in enumerate(((6, 30), (7, 14), (7, 28)))]
SWITCHGRASS = [f"DOE.S300_T312_L{w}_09.08.17_114706_1_FRMI_{t:02d}" for w in (2, 3, 7)
               for t in range(1, 5)]


def _table(stems: list[str], ext: str = ".jpg") -> pa.Table:
    uris = [f"/data/{s}{ext}" for s in stems]
    return pa.table({"image_id": [f"id{i}" for i in range(len(uris))], "image_uri": uris,
                     "mask_uri": [u.replace(ext, "_mask.png") for u in uris]})


def _groups(t: pa.Table, by: str = "tube") -> set[str]:
    return set(splits.group_keys(t, by=by).tolist())  # type: ignore[arg-type]


@pytest.mark.parametrize("stems,by,n_groups", [(SOY, "tube", 9), (PEANUT, "window", 5),
                                               (SWITCHGRASS, "window", 3)])
def test_auto_grouping_per_real_set(stems: list[str], by: str, n_groups: int) -> None:
    """Guards against splitting a one-tube archive by tube (one group: no hold-out possible)
    or a many-tube archive by window (sessions of a tube's other windows would leak)."""
    t = _table(stems)
    assert splits.resolve_by(t) == by
    assert len(set(splits.group_keys(t).tolist())) == n_groups


@pytest.mark.parametrize("stems", [SOY, PEANUT, SWITCHGRASS])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_table_keeps_groups_whole(stems: list[str], seed: int) -> None:
    """The bug this replaces: a per-image hash put one session of a window in training and the
    next session of the same window in validation."""
    t = _table(stems)
    train, val = split_table(t, val_fraction=0.25, seed=seed)
    assert train.num_rows + val.num_rows == t.num_rows and val.num_rows > 0
    by = splits.resolve_by(t)
    tk, vk = splits.group_keys(train, by=by), splits.group_keys(val, by=by)  # type: ignore[arg-type]
    assert not set(tk.tolist()) & set(vk.tolist())
    splits.check_disjoint(train, val, by=by)  # type: ignore[arg-type]


@pytest.mark.parametrize("stems,k", [(SOY, 3), (SOY, 5), (PEANUT, 5), (SWITCHGRASS, 3)])
def test_grouped_folds_partition_and_balance(stems: list[str], k: int) -> None:
    """Folds must partition the images, never split a group, and stay roughly balanced."""
    t = _table(stems)
    keys = splits.group_keys(t)
    folds = splits.grouped_folds(keys, k=k, seed=0)
    assert set(folds.tolist()) == set(range(k))
    for g in set(keys.tolist()):
        assert len(set(folds[keys == g].tolist())) == 1, g
    sizes = np.bincount(folds, minlength=k)
    assert sizes.max() - sizes.min() <= max(np.bincount(np.unique(keys, return_inverse=True)[1]))
    for f in range(k):
        tr, te = splits.fold_split(t, k=k, fold=f)
        assert not _groups(tr, splits.resolve_by(t)) & _groups(te, splits.resolve_by(t))


def test_too_few_groups_and_bad_fold_are_clear_errors() -> None:
    """Guards against silently falling back to image-level folds."""
    with pytest.raises(splits.SplitError, match="there are 3"):
        splits.grouped_folds(splits.group_keys(_table(SWITCHGRASS)), k=5)
    with pytest.raises(splits.SplitError, match="fold must be"):
        splits.fold_split(_table(SOY), k=3, fold=3)


def test_single_group_holds_nothing_out() -> None:
    """One window only: validation is empty (callers raise) instead of leaking sessions."""
    t = _table([s for s in PEANUT if "_L018_" in s])
    train, val = split_table(t, val_fraction=0.3)
    assert val.num_rows == 0 and train.num_rows == t.num_rows


def test_split_column_and_group_column_win() -> None:
    """An explicit ``split`` or ``group`` column is the user's decision and is honoured."""
    t = _table(SOY).append_column("split", pa.array(["val"] * 3 + ["train"] * 16))
    train, val = split_table(t, val_fraction=0.5)
    assert val.num_rows == 3
    g = _table(SOY[:4]).append_column("group", pa.array(["a", "a", "b", "b"]))
    assert splits.group_keys(g).tolist() == ["a", "a", "b", "b"]


def test_rootquant_split_labels_is_grouped() -> None:
    """RootQuant's k-fold and hold-out splits were per image; both must keep windows whole."""
    from rootflow.training.rootquant_task import RootQuantDataConfig, split_labels

    t = _table(PEANUT)
    for cfg in (RootQuantDataConfig(folds=5, fold=2), RootQuantDataConfig(val_fraction=0.3)):
        train, val = split_labels(t, cfg)
        assert val.num_rows and not _groups(train, "window") & _groups(val, "window")


@pytest.mark.realdata
def test_real_folders_group_as_documented(real_data: Path) -> None:
    """The three real sets in shared/data/real resolve to the groups the docs' study uses."""
    from rootflow.training.data import pairs_manifest

    want = {"segroot_soybean": ("tube", 9), "prmi_peanut": ("window", None),
            "prmi_switchgrass": ("window", 3)}
    for name, (by, n) in want.items():
        t = pairs_manifest(os.fspath(real_data / name))
        assert splits.resolve_by(t) == by
        if n is not None:
            assert len(set(splits.group_keys(t).tolist())) == n
