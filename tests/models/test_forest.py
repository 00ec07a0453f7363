"""The forest segmenter: features, exact tiling, training from masks and scribbles, the model
file (JSON, versioned, no pickle) and ``rootflow train forest``.

Images are small synthetic scenes made here: noisy, blurred soil texture with bright mineral
grains and curvy 2-3 px reddish roots (seeded). A tiny config (three scales, 30 trees, 64 px
tiles) keeps the whole file to a few seconds of training.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from rootflow.models import forest as F
from rootflow.models.segmenters import SegmenterLoadError, load_segmenter

CFG = F.ForestConfig(sigmas=(0.7, 1.6, 3.5), context_sigmas=(1.0, 3.0), n_estimators=30,
                     samples_per_class=3000, threshold_samples=5000, tile=64)


def synth(seed: int, h: int = 160, w: int = 200, n_roots: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB soil with curvy roots, and the bool root mask."""
    rng = np.random.default_rng(seed)
    soil = cv2.GaussianBlur(rng.normal(0, 1, (h, w)).astype(np.float32), (0, 0), 1.5) * 25 + 90
    img = np.stack([soil, soil * 0.85, soil * 0.7], -1)
    img[rng.random((h, w)) < 0.01] += 80  # bright grains: small, not elongated
    mask = np.zeros((h, w), np.uint8)
    for _ in range(n_roots):
        x, y, a = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0, 2 * np.pi)
        pts = []
        for _ in range(60):
            a += rng.normal(0, 0.15)
            x, y = x + 2 * np.cos(a), y + 2 * np.sin(a)
            pts.append((x, y))
        cv2.polylines(mask, [np.array(pts, np.int32)], False, 1, thickness=int(rng.integers(2, 4)))
    m = mask > 0
    img[m] = img[m] * 0.4 + np.array([200, 150, 110]) * 0.6
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8), m


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    return float(2 * (pred & truth).sum() / (pred.sum() + truth.sum()))


@pytest.fixture(scope="module")
def trained() -> F.ForestSegmenter:
    pairs = [synth(i) for i in range(3)]
    return F.fit_forest([p[0] for p in pairs], [p[1] for p in pairs], CFG, progress=False,
                        num_threads=1)


def test_features_have_names_shapes_and_finite_values() -> None:
    """Guards against feature planes and names drifting apart (a model would read the wrong
    plane) and against NaN/inf from the eigenvalue maths on flat regions."""
    img, _ = synth(5, 50, 70)
    img[:10] = 128  # a perfectly flat band: zero gradients and Hessians
    names = F.feature_names(CFG)
    feats = F.forest_features(img, CFG)
    assert feats.shape == (50, 70, len(names)) and feats.dtype == np.float32
    assert len(names) == len(set(names)) == 2 * 3 * 8  # channels x sigmas x planes
    assert np.isfinite(feats).all()
    # channels are float reductions of RGB (not quantised or clipped: R - B can be negative)
    a = img.astype(np.float64)
    chans = F._channels(img, CFG)
    np.testing.assert_allclose(chans[0], (a @ [0.299, 0.587, 0.114]) / 255, atol=1e-6)
    np.testing.assert_allclose(chans[1], (a[..., 0] - a[..., 2]) / 255, atol=1e-6)
    # the fast separable filters are the textbook ones (scipy, same border and support)
    from scipy import ndimage as ndi

    grey = chans[0]
    for s in CFG.sigmas:
        want = ndi.gaussian_filter(grey.astype(np.float64), s, mode="reflect",
                                   radius=int(np.ceil(3 * s)))
        np.testing.assert_allclose(feats[..., names.index(f"grey_gauss_s{s:g}")], want,
                                   atol=1e-5)
        sm = feats[..., names.index(f"grey_gauss_s{s:g}")].astype(np.float64)
        gy, gx = np.gradient(sm)
        np.testing.assert_allclose(feats[1:-1, 1:-1, names.index(f"grey_ggm_s{s:g}")],
                                   np.hypot(gx, gy)[1:-1, 1:-1], atol=1e-5)
    # the structure tensor's eigenvalues are >= 0 and ordered; the Hessian's are ordered
    for grp in ("ste", "hoge"):
        hi, lo = names.index(f"grey_{grp}_max_s1.6"), names.index(f"grey_{grp}_min_s1.6")
        assert (feats[..., hi] >= feats[..., lo]).all()
    assert (feats[..., names.index("grey_ste_min_s1.6")] >= -1e-6).all()


def test_kernel_equals_lightgbm(trained: F.ForestSegmenter) -> None:
    """Guards against the numba tree walk taking a different path than LightGBM (float32
    thresholds, leaf numbering, averaging): probabilities must equal ``Booster.predict``."""
    img, _ = synth(7, 60, 90)
    x = F.forest_features(img, CFG).reshape(-1, len(F.feature_names(CFG)))
    ens = trained._stage1
    want = ens.booster.predict(x)
    got = ens.predict(np.ascontiguousarray(x.T))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    slow = F._Ensemble(ens.model_str, n_features=x.shape[1])
    slow.fast = False
    np.testing.assert_array_equal(slow.predict(x.T), got)
    # zero-as-missing splits (never made by fit_forest) take LightGBM's own predictor
    import lightgbm as lgb

    y = x[:, 0] > np.median(x[:, 0])
    zam = lgb.train({"objective": "binary", "zero_as_missing": True, "verbose": -1,
                     "num_threads": 1}, lgb.Dataset(x, y), num_boost_round=3)
    odd = F._Ensemble(zam.model_to_string(), n_features=x.shape[1])
    assert not odd.fast
    np.testing.assert_allclose(odd.predict(x.T), zam.predict(x), rtol=0, atol=1e-6)
    rf = F.fit_forest([synth(1)[0]], [synth(1)[1]], dataclasses.replace(
        CFG, boosting="rf", autocontext=False, n_estimators=8), progress=False, num_threads=1)
    np.testing.assert_allclose(rf._stage1.predict(np.ascontiguousarray(x.T)),
                               rf._stage1.booster.predict(x), rtol=0, atol=1e-6)


def test_tiled_equals_untiled_on_odd_size(trained: F.ForestSegmenter) -> None:
    """Guards the halo: tiles of 64 px over a 157 x 211 image (both stages, many tile borders
    and a ragged last row/column) must give exactly the one-tile probabilities."""
    img, _ = synth(11, 157, 211)
    assert trained.cfg.autocontext
    tiled = trained.predict_proba(img)
    whole = trained.predict_proba(img, tile=4096)
    assert tiled.shape == (157, 211) and tiled.dtype == np.float32
    assert tiled.min() >= 0 and tiled.max() <= 1
    np.testing.assert_array_equal(tiled, whole)
    np.testing.assert_array_equal(trained.predict_proba(img, tile=37), tiled)


def test_features_do_not_depend_on_the_window() -> None:
    """Guards bit-exact tiling: OpenCV rounds the last pixels of a row differently (scalar
    tail of its vector loop), and a 1e-7 feature difference at a split flips a leaf; features
    of a pixel must be the same bits whatever window computed them (tail margin)."""
    img, _ = synth(13, 131, 389)
    st = F._Stages(dataclasses.replace(CFG, sigmas=(0.3,), autocontext=False))  # halo 3 px
    chans = st.channels(img)
    whole = st.stage1_features(chans, (0, 131, 0, 389))
    for y, x, th, tw in F._tiles(131, 389, 45):  # 389 = 8 * 48 + 5: a ragged last tile
        np.testing.assert_array_equal(st.stage1_features(chans, (y, y + th, x, x + tw)),
                                      whole[:, y:y + th, x:x + tw])


def test_fit_on_full_masks_segments_a_new_image(trained: F.ForestSegmenter) -> None:
    """Guards against a model that trains but does not segment (labels, sampling, threshold):
    Dice on an unseen image far above the all-root constant model."""
    img, truth = synth(42)
    pred = trained.predict(img)
    assert pred.dtype == bool and pred.shape == truth.shape
    constant = dice(np.ones_like(truth), truth)
    assert constant < 0.2
    assert dice(pred, truth) > 0.8
    info = trained.train_info
    assert info["labels"] == "masks" and info["n_images_used"] == 3
    assert "out-of-fold (images)" in info["threshold_method"]
    assert 0.05 < trained.threshold < 1 and info["n_trees"] == [30, 30]


def test_fit_from_scribbles_only() -> None:
    """Guards the scribble path: a few root strokes (1) and background strokes (0) on
    otherwise unlabelled (-1 / 255) images must still give a working segmenter."""
    images, labels = [], []
    for seed, unlabelled in ((20, -1), (21, 255)):
        img, m = synth(seed)
        lab = np.full(m.shape, unlabelled, np.int16 if unlabelled < 0 else np.uint8)
        root_stroke = m & (np.arange(m.shape[1]) < m.shape[1] // 2)  # roots of the left half
        near_root = cv2.dilate(m.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
        for r in (15, 60, 110, 150):  # background strokes: rows, away from roots
            lab[r:r + 2][~near_root[r:r + 2]] = 0
        lab[root_stroke] = 1
        assert (lab != unlabelled).mean() < 0.2
        images.append(img)
        labels.append(lab)
    seg = F.fit_forest(images, labels, CFG, progress=False, num_threads=1)
    assert seg.train_info["labels"] == "scribbles"
    img, truth = synth(43)
    assert dice(seg.predict(img), truth) > 0.6


def test_time_budget_gives_a_smaller_valid_model() -> None:
    """Guards ``max_seconds``: a budget far too small must still end with a usable model
    (fewer images and trees, no autocontext stage, and the saved config saying so)."""
    pairs = [synth(i) for i in range(3)]
    seg = F.fit_forest([p[0] for p in pairs], [p[1] for p in pairs], CFG, progress=False,
                       num_threads=1, max_seconds=0.01)
    assert not seg.cfg.autocontext and seg.train_info["n_trees"] == [1]
    assert seg.train_info["n_images_used"] == 1
    back = F.ForestSegmenter.from_bytes(seg.to_bytes())
    assert back.predict(pairs[0][0]).shape == pairs[0][1].shape


def test_bytes_roundtrip_version_and_save(trained: F.ForestSegmenter, tmp_path: Path) -> None:
    """Guards the model file: reloaded models predict identically and keep their version; the
    version is the file's hash, so a new threshold gives a new version; no pickle inside."""
    img, _ = synth(12, 90, 100)
    data = trained.to_bytes()
    doc = json.loads(data)
    assert doc["format"] == "rootflow.forest/1" and isinstance(doc["lightgbm"], str)
    assert doc["feature_names"] == F.feature_names(CFG) + F.context_feature_names(CFG)
    assert doc["config"]["sigmas"] == [0.7, 1.6, 3.5] and doc["threshold"] == trained.threshold
    back = F.ForestSegmenter.from_bytes(data, num_threads=2)
    assert back.version == trained.version == "forest-" + hashlib.sha256(data).hexdigest()[:12]
    assert back.to_bytes() == data
    np.testing.assert_array_equal(back.predict_proba(img), trained.predict_proba(img))
    assert back.params()["version"] == back.version and back.params()["kind"] == "forest"
    json.dumps(back.params())

    sha = trained.save(str(tmp_path / "m" / "forest.json"))
    assert sha == hashlib.sha256((tmp_path / "m" / "forest.json").read_bytes()).hexdigest()
    loaded = load_segmenter(str(tmp_path / "m"), sha256=sha, kind="forest")
    assert loaded.version == trained.version

    back.threshold = trained.threshold + 0.01
    assert back.version != trained.version
    assert F.ForestSegmenter.from_bytes(back.to_bytes()).threshold == back.threshold
    back.threshold = trained.threshold
    assert back.version == trained.version


def test_corrupt_or_foreign_files_raise_load_error(trained: F.ForestSegmenter) -> None:
    """Guards against tracebacks (or a silently wrong model) from a damaged or foreign file:
    each case is one SegmenterLoadError naming the URI."""
    doc = json.loads(trained.to_bytes())
    cases = {
        "not json": b"{this is not json",
        "unet format": json.dumps({**doc, "format": "rootflow.unet/1"}).encode(),
        "truncated trees": json.dumps({**doc, "lightgbm": doc["lightgbm"][:500]}).encode(),
        "features drift": json.dumps({**doc, "feature_names": doc["feature_names"][:-1]}).encode(),
        "bad config": json.dumps({**doc, "config": {**doc["config"], "sigmas": []}}).encode(),
        "no trees": json.dumps({k: v for k, v in doc.items() if k != "lightgbm"}).encode(),
    }
    for what, data in cases.items():
        with pytest.raises(SegmenterLoadError, match="s3://b/m.json") as e:
            F.ForestSegmenter.from_bytes(data, uri="s3://b/m.json")
        assert "\n" not in str(e.value), what


def test_bad_labels_raise_forest_error() -> None:
    """Guards the input rules: each mistake is a ForestError naming the image."""
    img, m = synth(3, 40, 50)
    with pytest.raises(F.ForestError, match="scan-a: labels are"):
        F.fit_forest([img], [m[:30]], CFG, progress=False, names=["scan-a"])
    with pytest.raises(F.ForestError, match="scan-a: label value"):
        F.fit_forest([img], [m.astype(np.uint8) * 7], CFG, progress=False, names=["scan-a"])
    with pytest.raises(F.ForestError, match="only 0 and 255"):
        F.fit_forest([img], [m.astype(np.uint8) * 255], CFG, progress=False)
    with pytest.raises(F.ForestError, match="no pixel is labelled root"):
        F.fit_forest([img], [np.zeros_like(m)], CFG, progress=False)
    with pytest.raises(F.ForestError, match="2 images but 1"):
        F.fit_forest([img, img], [m], CFG, progress=False)
    with pytest.raises(F.ForestError, match="sigmas"):
        F.ForestConfig(sigmas=(3.0, 1.0))


def _write_pairs(folder: Path, seeds: range) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for s in seeds:
        img, m = synth(s, 120, 150)
        cv2.imwrite(str(folder / f"scan{s}.png"), img[..., ::-1])
        cv2.imwrite(str(folder / f"scan{s}_mask.png"), m.astype(np.uint8) * 255)


def test_cli_train_forest_writes_model_and_record(tmp_path: Path) -> None:
    """Guards ``rootflow train forest``: exit 0, one JSON object on stdout, forest.json that
    loads with its sha256, and train.json; an image without a mask is skipped."""
    from typer.testing import CliRunner

    from rootflow.cli import app

    data = tmp_path / "data"
    _write_pairs(data, range(2))
    cv2.imwrite(str(data / "lonely.png"), synth(9, 120, 150)[0])
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["train", "forest", "--data", str(data), "--out", str(out),
                                   "--no-progress", "--set", "n_estimators=15",
                                   "--set", "sigmas=[0.7,1.6,3.5]", "--set", "tile=64",
                                   "--set", "context_sigmas=[1.0,3.0]"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    assert set(result) == {"model_uri", "sha256", "version", "seconds", "n_images", "n_pixels",
                           "threshold"}
    assert result["n_images"] == 2 and Path(result["model_uri"]) == out / "forest.json"
    seg = load_segmenter(str(out), sha256=result["sha256"])
    assert seg.version == result["version"] and seg.threshold == result["threshold"]
    record = json.loads((out / "train.json").read_text())
    assert record["config"]["n_estimators"] == 15 and record["train"]["n_images_used"] == 2


def test_cli_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    """Guards against tracebacks for unusable input: no pairs, or a non-binary mask, exits 2
    with one ``error:`` line naming the folder/file."""
    from typer.testing import CliRunner

    from rootflow.cli import app

    empty = tmp_path / "nopairs"
    empty.mkdir()
    cv2.imwrite(str(empty / "a.png"), synth(1, 40, 40)[0])
    res = CliRunner().invoke(app, ["train", "forest", "--data", str(empty),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert res.stderr.strip().count("\n") == 0 and res.stderr.startswith("error: ")
    assert str(empty) in res.stderr and "Traceback" not in res.output

    grey = tmp_path / "grey"
    _write_pairs(grey, range(1))
    cv2.imwrite(str(grey / "scan0_mask.png"), np.tile(np.arange(150, dtype=np.uint8), (120, 1)))
    res = CliRunner().invoke(app, ["train", "forest", "--data", str(grey),
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "scan0_mask.png: not a binary mask" in res.stderr
    res = CliRunner().invoke(app, ["train", "forest", "--data", str(grey), "--out", "x",
                                   "--set", "boosting=xgb"])
    assert res.exit_code == 2 and res.stderr.startswith("error: ForestConfig: boosting")
