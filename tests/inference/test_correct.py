"""Click-based correction: click tables, versions, and the refine loop."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rootflow.inference.correct import (
    Clicks,
    clicks_from_table,
    correct_image,
    correct_many,
    corrected_version,
    read_clicks,
)
from rootflow.inference.rootsam import RootSAMPredictor
from rootflow.io.images import decode_mask
from tests.inference._helpers import TINY, root_image


def _table() -> pa.Table:
    return pa.table({"image_id": ["a", "a", "b"], "x": [10, 20.25, 5], "y": [3, 4, 7],
                     "label": [1, 0, 1]})


def test_clicks_table_grouping_and_pixel_centres():
    clicks = clicks_from_table(_table())
    assert sorted(clicks) == ["a", "b"]
    a = clicks["a"]
    np.testing.assert_allclose(a.points, [[10.5, 3.5], [20.25, 4.5]])
    assert a.labels.tolist() == [1, 0]
    same = clicks_from_table(_table().to_pandas())
    assert same["a"].digest == a.digest


def test_digest_is_order_independent_and_sensitive():
    a = Clicks("i", np.array([[1.5, 2.5], [3.5, 4.5]], np.float32), np.array([1, 0], np.int32))
    b = Clicks("i", a.points[::-1].copy(), a.labels[::-1].copy())
    c = Clicks("i", a.points, np.array([1, 1], np.int32))
    assert a.digest == b.digest != c.digest
    assert corrected_version("rootsam-v1", a) == f"rootsam-v1+clicks-{a.digest}"


def test_bad_click_tables_fail_clearly():
    with pytest.raises(ValueError, match="lacks column"):
        clicks_from_table(pa.table({"image_id": ["a"], "x": [1]}))
    with pytest.raises(ValueError, match="null or NaN values in row"):
        clicks_from_table(pd.DataFrame({"image_id": ["a", "b"], "x": [1.0, np.nan],
                                        "y": [1, 2], "label": [1, 0]}))
    with pytest.raises(ValueError, match="0 or 1"):
        clicks_from_table(pa.table({"image_id": ["a"], "x": [1], "y": [1], "label": [2]}))


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_read_clicks_local(tmp_path, fmt):
    path = tmp_path / f"clicks.{fmt}"
    if fmt == "parquet":
        pq.write_table(_table(), path)
    else:
        path.write_text("image_id,x,y,label\n007,10,3,1\n007,20.25,4,0\nb,5,7,1\n")
    clicks = read_clicks(str(path))
    key = "a" if fmt == "parquet" else "007"  # ids stay strings (no int parsing of 007)
    assert clicks[key].labels.tolist() == [1, 0]


def test_correct_image_and_many():
    pred = RootSAMPredictor(TINY)
    img = root_image(60, 300)
    prev = pred.predict([img])[0].mask
    clicks = Clicks("a", np.array([[12.5, 20.5], [40.5, 40.5]], np.float32),
                    np.array([1, 0], np.int32))
    res = correct_image(pred, image=img, previous=prev, clicks=clicks, parent_version="rs-1")
    assert res.model_version == f"rs-1+clicks-{clicks.digest}"
    assert res.tiles_rerun == [0]
    assert decode_mask(res.mask_png).shape == (60, 300)
    assert res.params["clicks_digest"] == clicks.digest and res.params["n_negative_clicks"] == 1
    assert '"parent_version": "rs-1"' in res.params_json
    # same clicks, same result (deterministic, idempotent in the lake)
    again = list(correct_many(pred, {"a": clicks}, fetch=lambda _id: (img, prev, "rs-1")))
    assert len(again) == 1 and np.array_equal(again[0].mask, res.mask)
    assert again[0].model_version == res.model_version
