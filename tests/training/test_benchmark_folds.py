"""The RootQuant real-image recipe and the segmenter study must score the same held-out frames.

``benchmarks/rootquant_compare.py --study recipe`` compares its out-of-fold length predictions
with the segment-then-measure references of ``benchmarks/segmenters_cv.py`` (forest / U-Net
out-of-fold masks). That comparison is only fair when both use the same grouped folds; this
test fails if either benchmark's folds drift (another seed, k, grouping or helper).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parents[2]


def test_recipe_uses_the_segmenter_study_folds(real_data: Path) -> None:
    sys.path.insert(0, os.fspath(REPO))
    from benchmarks.rootquant_compare import recipe_folds
    from benchmarks.segmenters_cv import FOLDS, _fold_tables

    table, folds, _, by = _fold_tables(real_data / "prmi_peanut", FOLDS["prmi_peanut"], 0)
    assert by == "window"  # one tube: sessions of a window stay on one side
    seg = dict(zip(table["image_uri"].to_pylist(), folds.tolist(), strict=True))
    # the recipe builds its table from the same folder (labels are irrelevant to the folds)
    uris = sorted(seg, reverse=True)  # another row order must not change a frame's fold
    ours = recipe_folds(pa.table({"image_uri": uris}), FOLDS["prmi_peanut"])
    assert len(uris) == 65
    assert {u: int(f) for u, f in zip(uris, ours, strict=True)} == seg
    # and no window is split across folds
    win = np.array([Path(u).name.split("_")[2] for u in uris])
    for w in set(win.tolist()):
        assert len(set(ours[win == w].tolist())) == 1
