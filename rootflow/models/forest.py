"""An ilastik-style pixel classifier: multi-scale filter features + gradient-boosted trees.

The forest is rootflow's cheap, trainable-in-minutes segmenter: a lab with a dozen traced scans
(or a few scribbles on them) gets a model on a laptop's CPU, and it runs on CPU workers at
~14 CPU-s per 2550 x 2273 scan. It satisfies :class:`rootflow.models.segmenters.Segmenter`.
Numbers below are from ``benchmarks/forest_speed.py`` on the SegRoot soybean scans (train on
tubes T002-T006, 12 scans; test on the unseen tubes T007-T012, 7 scans; pooled Dice), on a
2-core machine shared with other jobs.

**Features** (:func:`forest_features`, the ilastik set). On each channel and at each scale
``sigma`` (0.7 to 10 px): Gaussian smoothing, difference of Gaussians, gradient magnitude,
Laplacian of Gaussian, the two Hessian eigenvalues and the two structure-tensor eigenvalues:
8 planes per channel and scale, 96 by default. The channels are a *reduction* of RGB: ``grey``
(luma) carries the shape and one opponent chroma channel ``rb`` = R - B what separates a
reddish-brown root from grey-brown soil and white mineral grains. R, G and B are highly
correlated on soil: all three cost 1.5x the features for nothing (stage-1 test Dice, random
forest mode: RGB 0.414, grey + R-B 0.414, grey alone 0.400; adding R-G to grey + R-B, gradient
boosting: 0.477 vs 0.469). The scales follow the roots: mean root width in these masks is
2-4 px, so the smallest scales resolve the root and the larger ones its surroundings (tube
wall, grains). Adding 0.5, 2.5 or 20 px changed Dice by < 0.005.

Each smoothed image ``S = G_sigma * c`` is computed once with a separable float32 kernel (OpenCV
``sepFilter2D``, truncated at ``truncate * sigma``); derivatives are 3-tap central differences
of ``S`` (on a smoothed image, a derivative of Gaussian up to a slight extra blur); difference
of Gaussians is between consecutive scales (``S_{i-1} - S_i``, the first against the channel
itself), so neither needs another blur. The structure tensor smooths products of the
finest-scale gradients at ``sigma`` (ilastik's inner scale is sigma/2; the finest one keeps
the halo small and the orientation of a 2-4 px root sharp). Features of a whole scan: ~2 CPU-s.

**Autocontext** (ilastik's two-stage workflow; on by default). Stage 1 classifies from the
filter features; stage 2 sees them *and* the same filters applied to stage 1's probability
map (``context_sigmas``), so it can use "a root continues here" or "this is the tube wall",
which no single-pixel feature carries. Stage-1 Dice saturated at 0.46-0.48 whatever the scales,
channels, sample sizes or tree sizes; the second stage gave 0.511-0.515. Stage 2 is trained on
*out-of-fold* stage-1 maps (each training image's map comes from stage-1 trees that never saw
it), as stacking requires: otherwise stage 2 learns to trust an over-confident map.

**Trees.** LightGBM gradient boosting (``boosting="gbdt"``), 60 rounds of 31 leaves at most 6
deep, per stage. Measured at stage 1 with the same features and samples: gradient boosting
0.469 test Dice, random-forest mode (``"rf"``: bagging, 100 trees of 63 leaves) 0.414, so gbdt
is the default and rf stays available. Depth 6 and 60 rounds at learning rate 0.15 cost 0.003
Dice against depth 10 and 100 rounds, and predict 2.7x faster. Per-pixel prediction runs in a
small numba kernel (:class:`_Ensemble`) instead of ``Booster.predict``: the same splits and
bit-identical raw scores (tested), on feature maps laid out channel-first as the filters write
them, ~1.5x faster than LightGBM's row-wise predictor here.

**Training.** Labels are full masks (bool) or scribbles (int: 1 root, 0 background, -1 or 255
unlabelled). Per image at most ``samples_per_class`` pixels of each class are drawn (seeded),
so a scan with 1 % root pixels teaches both classes alike. That balance pushes probabilities
toward "root" (the chosen threshold is ~0.96 on the soybean scans), so the threshold is picked
afterwards to maximise pooled Dice on a natural-frequency sample of labelled pixels, predicted
*out of fold* (two folds of images, or the two halves of a single image): never on test data,
never in-sample. On the soybean check that threshold gave 0.511 where the best possible
threshold on the test scans gives 0.515. Training on the 12 scans: ~4-6 min wall on the busy
2-core machine (features, then six LightGBM fits: two fold models and a full one per stage),
peak RSS 2 GB; ``max_seconds`` bounds it.

**Tiles.** Inference never holds the features of a whole scan (96 float32 maps of 2550 x 2273
are 2.2 GB). Each ``tile`` x ``tile`` block is computed from a window grown by the receptive
field of the whole chain (:func:`feature_halo`; with autocontext the context filters' halo on
top), and only its centre is kept. At the image edge the channels are mirrored once, as deep
as the whole chain reaches, so edge tiles are computed like any other. Every filter has finite
support (truncated kernels) and no kept pixel is ever computed by OpenCV's edge code
(``_TAIL``), so the result equals an untiled run bit for bit (tested on odd sizes, and on real
scans for tiles of 200, 333, 512 and 2048 px).

**File.** One JSON document, nothing to unpickle: ``{"format": "rootflow.forest/1", "config":
..., "feature_names": [...], "threshold": t, "lightgbm": "<final-stage LightGBM text model>",
"lightgbm_context": "<stage-1 model>" or null, "train": {...}}``. ``version`` is
``"forest-" + sha256(file)[:12]``: any change of trees, features, threshold or tile changes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from rootflow.io import storage
from rootflow.models.segmenters import SegmenterLoadError

log = logging.getLogger(__name__)

FORMAT = "rootflow.forest/1"

#: Feature groups, in the order they appear for each channel and scale.
FEATURE_GROUPS: tuple[str, ...] = ("gauss", "dog", "ggm", "log", "hoge", "ste")
_EIGEN_GROUPS = ("hoge", "ste")


class ForestError(ValueError):
    """Unusable training input or settings (a one-line message naming the file or image)."""


# -- channels ----------------------------------------------------------------------------------
#: Channel reductions of RGB (weights on R, G, B; values scaled to [0, 1] or [-1, 1]).
_CHANNEL_WEIGHTS: dict[str, tuple[float, float, float]] = {
    "grey": (0.299, 0.587, 0.114),
    "r": (1.0, 0.0, 0.0),
    "g": (0.0, 1.0, 0.0),
    "b": (0.0, 0.0, 1.0),
    "rb": (1.0, 0.0, -1.0),  # warm-cool opponent: reddish-brown roots vs grey soil, white grains
    "rg": (1.0, -1.0, 0.0),
}
CHANNELS: tuple[str, ...] = tuple(_CHANNEL_WEIGHTS)


# -- config ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ForestConfig:
    """Everything that defines a forest's features, trees and inference (saved in the file).

    Attributes:
        sigmas: filter scales in px, ascending.
        channels: RGB reductions the filters run on (see :data:`CHANNELS`).
        features: feature groups (see :data:`FEATURE_GROUPS`).
        truncate: Gaussian kernels end at ``truncate * sigma``; the tile halo follows.
        autocontext: add a second stage that also sees filters of stage 1's probability map.
        context_sigmas: scales of those filters (all groups) on the probability map.
        boosting: LightGBM ``"gbdt"`` (gradient boosting) or ``"rf"`` (random forest).
        n_estimators: trees per stage; num_leaves, max_depth, learning_rate (gbdt only),
            min_data_in_leaf, bagging_fraction, feature_fraction: LightGBM settings.
        samples_per_class: cap of sampled training pixels per class per image.
        threshold_samples: natural-frequency labelled pixels per image for the threshold.
        tile: inference tile side in px (the output does not depend on it).
        seed: sampling and LightGBM seed.
    """

    sigmas: tuple[float, ...] = (0.7, 1.0, 1.6, 3.5, 5.0, 10.0)
    channels: tuple[str, ...] = ("grey", "rb")
    features: tuple[str, ...] = FEATURE_GROUPS
    truncate: float = 3.0
    autocontext: bool = True
    context_sigmas: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    boosting: str = "gbdt"
    n_estimators: int = 60
    num_leaves: int = 31
    max_depth: int = 6
    learning_rate: float = 0.15
    min_data_in_leaf: int = 20
    bagging_fraction: float = 0.8
    feature_fraction: float = 0.8
    samples_per_class: int = 20000
    threshold_samples: int = 50000
    tile: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        def bad(msg: str) -> ForestError:
            return ForestError(f"ForestConfig: {msg}")

        for name in ("sigmas", "context_sigmas"):
            s = tuple(float(v) for v in getattr(self, name))
            object.__setattr__(self, name, s)
            if (name == "sigmas" and not s) or any(v <= 0 for v in s) or list(s) != sorted(set(s)):
                raise bad(f"{name} must be distinct positive scales in ascending order, got {s}")
        if self.autocontext and not self.context_sigmas:
            raise bad("autocontext needs context_sigmas")
        for name, valid in (("channels", CHANNELS), ("features", FEATURE_GROUPS)):
            vals = tuple(getattr(self, name))
            object.__setattr__(self, name, vals)
            unknown = [v for v in vals if v not in valid]
            if unknown or not vals or len(set(vals)) != len(vals):
                raise bad(f"{name} {list(vals)}: each one of {list(valid)}, no repeats")
        if self.boosting not in ("gbdt", "rf"):
            raise bad(f"boosting must be 'gbdt' or 'rf', got {self.boosting!r}")
        if self.tile < 32:
            raise bad(f"tile must be >= 32 px, got {self.tile}")
        if self.n_estimators < 1 or self.num_leaves < 2 or self.samples_per_class < 1:
            raise bad("n_estimators >= 1, num_leaves >= 2, samples_per_class >= 1")
        if not 0 < self.bagging_fraction <= 1 or not 0 < self.feature_fraction <= 1:
            raise bad("bagging_fraction and feature_fraction in (0, 1]")
        if self.boosting == "rf" and self.bagging_fraction >= 1:
            raise bad("boosting='rf' needs bagging_fraction < 1")

    def context(self) -> ForestConfig | None:
        """The feature config of stage 2's probability-map filters (None without autocontext)."""
        if not self.autocontext:
            return None
        return dataclasses.replace(self, sigmas=self.context_sigmas, channels=("grey",),
                                   features=FEATURE_GROUPS, autocontext=False)


def _to_dict(cfg: ForestConfig) -> dict[str, Any]:
    from rootflow import config as cfglib

    return cfglib.to_dict(cfg)


def _from_dict(data: dict[str, Any]) -> ForestConfig:
    from rootflow import config as cfglib

    return cfglib.from_dict(ForestConfig, data)


# -- features ----------------------------------------------------------------------------------
def _radius(sigma: float, truncate: float) -> int:
    return int(math.ceil(truncate * sigma))


@functools.lru_cache(maxsize=64)
def _gauss_kernel(sigma: float, truncate: float) -> np.ndarray:
    r = _radius(sigma, truncate)
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    out = (k / k.sum()).astype(np.float32)
    out.setflags(write=False)
    return out


def feature_halo(cfg: ForestConfig) -> int:
    """Receptive-field radius in px of :func:`forest_features` (one stage).

    A pixel's features depend only on input pixels at most this far away (Chebyshev), so a
    tile computed from a window grown by this much equals the untiled result in its centre.
    The chain: a Gaussian (``ceil(truncate * sigma)``), then a 3-tap derivative (+1), and for
    the structure tensor a second Gaussian at ``sigma`` on products of finest-scale gradients.
    """
    r_max = _radius(max(cfg.sigmas), cfg.truncate)
    halo = r_max
    if {"ggm", "log", "hoge"} & set(cfg.features):
        halo = r_max + 1
    if "ste" in cfg.features:
        halo = max(halo, _radius(min(cfg.sigmas), cfg.truncate) + 1 + r_max)
    return halo


def _stage_names(cfg: ForestConfig, channels: Sequence[str]) -> list[str]:
    names = []
    for ch in channels:
        for s in cfg.sigmas:
            for g in FEATURE_GROUPS:
                if g not in cfg.features:
                    continue
                if g in _EIGEN_GROUPS:
                    names += [f"{ch}_{g}_max_s{s:g}", f"{ch}_{g}_min_s{s:g}"]
                else:
                    names.append(f"{ch}_{g}_s{s:g}")
    return names


def feature_names(cfg: ForestConfig) -> list[str]:
    """Names of the :func:`forest_features` planes, in order: ``<channel>_<group>_s<sigma>``.

    These are stage 1's inputs. With autocontext, stage 2's inputs are these followed by
    :func:`context_feature_names`.
    """
    return _stage_names(cfg, cfg.channels)


def context_feature_names(cfg: ForestConfig) -> list[str]:
    """Names of stage 2's probability-map features (``proba_<group>_s<sigma>``); [] without."""
    ctx = cfg.context()
    return [] if ctx is None else _stage_names(ctx, ("proba",))


def _channels(image: np.ndarray, cfg: ForestConfig) -> np.ndarray:
    """uint8 RGB (H, W, 3) -> float32 (C, H, W) channel reductions (see :data:`CHANNELS`)."""
    import cv2

    m = np.array([_CHANNEL_WEIGHTS[c] for c in cfg.channels], np.float32) / np.float32(255.0)
    # float32 in, so OpenCV computes (and returns) float32, not saturated uint8
    out = cv2.transform(np.ascontiguousarray(image, dtype=np.float32), m)
    if out.ndim == 2:
        out = out[..., None]
    return np.ascontiguousarray(np.moveaxis(out, -1, 0))


def _features_into(chans: np.ndarray, cfg: ForestConfig, out: np.ndarray,
                   crop: tuple[int, int, int, int]) -> None:
    """Write the features of ``chans`` (C, h, w) cropped to ``crop`` (y0, y1, x0, x1) into
    ``out`` (F, y1 - y0, x1 - x0), in :func:`feature_names` order.

    Each step extrapolates at the window's edge with OpenCV's ``BORDER_REFLECT``; callers
    (:class:`_Stages`) keep only pixels far enough inside for that never to matter.
    """
    import cv2

    border = cv2.BORDER_REFLECT
    f32 = cv2.CV_32F
    y0, y1, x0, x1 = crop
    groups = set(cfg.features)
    d1 = np.array([-0.5, 0.0, 0.5], np.float32)
    d2 = np.array([1.0, -2.0, 1.0], np.float32)
    one = np.ones(1, np.float32)
    k = 0

    def put(a: np.ndarray) -> None:
        nonlocal k
        out[k] = a[y0:y1, x0:x1]
        k += 1

    def eig(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> None:
        # eigenvalues of [[a, b], [b, c]]: (a + c) / 2 +- sqrt(((a - c) / 2)^2 + b^2)
        half = cv2.addWeighted(a, 0.5, c, 0.5, 0.0)
        d = cv2.magnitude(cv2.addWeighted(a, 0.5, c, -0.5, 0.0), b)
        put(cv2.add(half, d))
        put(cv2.subtract(half, d))

    need_grad = bool({"ggm", "ste"} & groups)
    need_second = bool({"log", "hoge"} & groups)
    for c in chans:
        c = np.ascontiguousarray(c, dtype=np.float32)
        prev = c
        tensor: tuple[np.ndarray, ...] | None = None
        for s in cfg.sigmas:
            g = _gauss_kernel(s, cfg.truncate)
            sm = cv2.sepFilter2D(c, f32, g, g, borderType=border)
            if need_grad:
                gx = cv2.sepFilter2D(sm, f32, d1, one, borderType=border)
                gy = cv2.sepFilter2D(sm, f32, one, d1, borderType=border)
                if tensor is None and "ste" in groups:  # finest-scale gradients
                    tensor = (cv2.multiply(gx, gx), cv2.multiply(gx, gy), cv2.multiply(gy, gy))
            if need_second:
                gxx = cv2.sepFilter2D(sm, f32, d2, one, borderType=border)
                gyy = cv2.sepFilter2D(sm, f32, one, d2, borderType=border)
            for grp in FEATURE_GROUPS:
                if grp not in groups:
                    continue
                if grp == "gauss":
                    put(sm)
                elif grp == "dog":
                    put(cv2.subtract(prev, sm))
                elif grp == "ggm":
                    put(cv2.magnitude(gx, gy))
                elif grp == "log":
                    put(cv2.add(gxx, gyy))
                elif grp == "hoge":
                    gxy = cv2.sepFilter2D(sm, f32, d1, d1, borderType=border)
                    eig(gxx, gxy, gyy)
                else:  # ste
                    assert tensor is not None
                    j = [cv2.sepFilter2D(t, f32, g, g, borderType=border) for t in tensor]
                    eig(j[0], j[1], j[2])
            prev = sm
    if k != out.shape[0]:  # pragma: no cover - guards feature_names against drift
        raise AssertionError(f"wrote {k} feature planes, expected {out.shape[0]}")


def _check_image(image: np.ndarray, what: str = "image") -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=2)
    if a.ndim != 3 or a.shape[2] not in (3, 4) or a.dtype != np.uint8:
        raise ForestError(f"{what}: expected uint8 RGB (H, W, 3), got {a.dtype} {a.shape}")
    return a[..., :3]


def forest_features(image: np.ndarray, cfg: ForestConfig) -> np.ndarray:
    """Stage-1 features of a whole image: uint8 RGB (H, W, 3) -> float32 (H, W, F).

    For inspection and small images; inference and training compute the same planes tile by
    tile. F = ``len(feature_names(cfg))``.
    """
    img = _check_image(image)
    h, w = img.shape[:2]
    stages = _Stages(dataclasses.replace(cfg, autocontext=False))
    with _cv2_threads(1):
        out = stages.stage1_features(stages.channels(img), (0, h, 0, w))
    return np.ascontiguousarray(np.moveaxis(out, 0, -1))


_CV2_LOCK = threading.Lock()


@contextlib.contextmanager
def _cv2_threads(n: int) -> Iterator[None]:
    """OpenCV's own thread pool off (we parallelise over tiles), restored afterwards."""
    import cv2

    with _CV2_LOCK:
        before = cv2.getNumThreads()
        cv2.setNumThreads(n)
    try:
        yield
    finally:
        with _CV2_LOCK:
            cv2.setNumThreads(before)


def _default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(8, n))


# -- tree ensemble evaluation ------------------------------------------------------------------
def _lightgbm() -> Any:
    """``import lightgbm``, with OpenMP threads that sleep instead of spin while idle.

    LightGBM's OpenMP workers spin-wait by default; on a machine shared with other jobs
    (Ray workers, CI) two spinning threads made training 7x slower than one (measured). The
    setting only takes effect if OpenMP is not loaded yet, and never overrides the user's.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import lightgbm

    return lightgbm


@functools.lru_cache(maxsize=1)
def _kernel() -> Callable[..., None]:
    """The numba kernel (compiled on first use, cached on disk when possible)."""
    import numba

    @numba.njit(nogil=True, cache=True, boundscheck=False)
    def sum_trees(x, feat, thr, kids, value, root, depth, out):
        # x (F, N) float32, one column per pixel; out (N,) float64 raw sums. Node arrays cover
        # internal nodes and leaves (a leaf loops to itself: infinite threshold), so every
        # pixel takes exactly depth[t] steps in tree t: no data-dependent branch inside the
        # loop over a block of pixels, whose feature columns stay in cache for all trees.
        n = x.shape[1]
        block = 256
        node = np.empty(block, np.int32)
        acc = np.empty(block, np.float64)
        for i0 in range(0, n, block):
            m = min(block, n - i0)
            acc[:m] = 0.0
            for t in range(root.shape[0]):
                node[:m] = root[t]
                for _ in range(depth[t]):
                    for j in range(m):
                        nd = node[j]
                        node[j] = kids[2 * nd + (x[feat[nd], i0 + j] > thr[nd])]
                for j in range(m):
                    acc[j] += value[node[j]]
            out[i0:i0 + m] = acc[:m]

    return sum_trees


class _Ensemble:
    """A LightGBM binary model, flattened for the numba kernel (bit-identical raw scores).

    Thresholds are stored as float32 rounded *down* (the largest float32 <= the double
    threshold): for a float32 feature value ``x``, ``x <= t_double`` iff ``x <= t_float32``, so
    the comparison, and therefore every leaf reached, is LightGBM's. Trees are summed in
    LightGBM's order in float64. Models with categorical or zero-as-missing splits (never made
    by :func:`fit_forest`) fall back to ``Booster.predict``.
    """

    def __init__(self, model_str: str, *, n_features: int) -> None:
        lgb = _lightgbm()

        self.model_str = model_str
        self.booster = lgb.Booster(model_str=model_str)
        if self.booster.num_feature() != n_features:
            raise ValueError(f"model has {self.booster.num_feature()} features, the config "
                             f"defines {n_features}")
        head, _, _ = model_str.partition("\nTree=")
        header = dict(line.split("=", 1) for line in head.splitlines() if "=" in line)
        obj = header.get("objective", "").split()
        if not obj or obj[0] not in ("binary", "cross_entropy", "xentropy"):
            raise ValueError(f"not a binary model (objective {header.get('objective')!r})")
        if int(header.get("num_tree_per_iteration", "1")) != 1:
            raise ValueError("more than one tree per iteration")
        self.sigmoid = 1.0
        for tok in obj[1:]:
            if tok.startswith("sigmoid:"):
                self.sigmoid = float(tok.split(":", 1)[1])
        if obj[0] != "binary":
            self.sigmoid = 1.0
        self.average = "average_output" in head.splitlines()
        self.n_trees = self.booster.num_trees()
        self.fast = True
        try:
            self._flatten(model_str)
        except _Unsupported:
            self.fast = False

    def _flatten(self, model_str: str) -> None:
        body = model_str.split("\nend of trees", 1)[0]
        feat: list[int] = []
        thr: list[float] = []
        kids: list[int] = []
        value: list[float] = []
        root: list[int] = []
        depth: list[int] = []
        for block in body.split("\nTree=")[1:]:
            kv = dict(line.split("=", 1) for line in block.splitlines()[1:] if "=" in line)
            n_leaves = int(kv["num_leaves"])
            leaves = [float(v) for v in kv["leaf_value"].split()]
            base = len(value)
            root.append(base)
            if n_leaves == 1:
                feat.append(0)
                thr.append(np.inf)
                kids += [base, base]
                value.append(leaves[0])
                depth.append(0)
                continue
            n_int = n_leaves - 1
            sf = [int(v) for v in kv["split_feature"].split()]
            th = [float(v) for v in kv["threshold"].split()]
            dt = [int(v) for v in kv["decision_type"].split()]
            lc = [int(v) for v in kv["left_child"].split()]
            rc = [int(v) for v in kv["right_child"].split()]
            if any(d & 1 or ((d >> 2) & 3) == 1 for d in dt):  # categorical, zero-as-missing
                raise _Unsupported

            def index(c: int, base: int = base, n_int: int = n_int) -> int:
                return base + c if c >= 0 else base + n_int + ~c

            for i in range(n_int):
                feat.append(sf[i])
                thr.append(th[i])
                kids += [index(lc[i]), index(rc[i])]
                value.append(0.0)
            for j in range(n_leaves):
                feat.append(0)
                thr.append(np.inf)
                kids += [base + n_int + j] * 2
                value.append(leaves[j])
            d = [0] * n_int
            deepest = 0
            for i in range(n_int):  # parents precede children in LightGBM's numbering
                for c in (lc[i], rc[i]):
                    if c >= 0:
                        d[c] = d[i] + 1
                    else:
                        deepest = max(deepest, d[i] + 1)
            depth.append(deepest)
        t64 = np.asarray(thr, np.float64)
        t32 = t64.astype(np.float32)
        over = t32.astype(np.float64) > t64
        t32[over] = np.nextafter(t32[over], np.float32(-np.inf))
        self.feat = np.asarray(feat, np.int32)
        self.thr = t32
        self.kids = np.asarray(kids, np.int32)
        self.value = np.asarray(value, np.float64)
        self.root = np.asarray(root, np.int32)
        self.depth = np.asarray(depth, np.int32)
        if len(root) != self.n_trees:
            raise ValueError(f"parsed {len(root)} trees, LightGBM has {self.n_trees}")

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for ``x`` (F, N) float32 (one column per pixel) -> float32 (N,)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if self.fast:
            raw = np.empty(x.shape[1], np.float64)
            _kernel()(x, self.feat, self.thr, self.kids, self.value, self.root, self.depth, raw)
        else:
            raw = np.asarray(self.booster.predict(x.T, raw_score=True, num_threads=1),
                             np.float64)
        if self.average:  # random forest: LightGBM averages the summed trees
            raw = raw / max(1, self.n_trees)
        return (1.0 / (1.0 + np.exp(-self.sigmoid * raw))).astype(np.float32)


class _Unsupported(Exception):
    pass


# -- tiling ------------------------------------------------------------------------------------
def _tiles(h: int, w: int, tile: int) -> list[tuple[int, int, int, int]]:
    """(y, x, th, tw) of a grid of tiles covering (h, w), row-major (a deterministic order)."""
    return [(y, x, min(tile, h - y), min(tile, w - x))
            for y in range(0, h, tile) for x in range(0, w, tile)]


#: Extra rows and columns computed and thrown away after every filter window. OpenCV computes
#: pixels near a window's edge (its border extrapolation, the scalar tail of its vector loops)
#: by other code than the interior, which rounds differently in the last bit, and a tree split
#: can turn that bit into another leaf (measured: 16 of 697k probabilities changed between two
#: tilings before). Kept pixels are always at least ``halo + _TAIL`` from the bottom and right
#: edge and ``halo`` from the top and left edge of their window, so they always come from the
#: interior code and their features, bit for bit, do not depend on the tiling (tested).
_TAIL = 32


class _Stages:
    """Stage 1 (+ stage 2) of a forest: padded channels, features and probabilities of a tile.

    Coordinates are the image's. The channels are mirrored once at the image edge by
    ``pad = h1 + h2 + _TAIL`` px, so every window, at the edge or not, sees real or mirrored
    pixels to the full depth of its receptive field: stage 1 needs ``h1`` around each pixel,
    stage 2 needs stage-1 probabilities ``h2`` around each pixel (themselves computed, at the
    edge, from mirrored pixels).
    """

    def __init__(self, cfg: ForestConfig, stage1: _Ensemble | None = None,
                 stage2: _Ensemble | None = None) -> None:
        self.cfg = cfg
        self.ctx = cfg.context()
        self.stage1 = stage1
        self.stage2 = stage2
        self.n1 = len(feature_names(cfg))
        self.n2 = len(context_feature_names(cfg))
        self.h1 = feature_halo(cfg)
        self.h2 = feature_halo(self.ctx) if self.ctx is not None else 0
        self.pad = self.h1 + self.h2 + _TAIL

    def channels(self, image: np.ndarray) -> np.ndarray:
        """Channel reductions of ``image`` (C, H + 2 pad, W + 2 pad), mirrored at the edge."""
        c = _channels(image, self.cfg)
        p = self.pad
        return np.pad(c, ((0, 0), (p, p), (p, p)), mode="symmetric")  # = BORDER_REFLECT

    def stage1_features(self, chans: np.ndarray, win: tuple[int, int, int, int]) -> np.ndarray:
        """Stage-1 features (n1, y1 - y0, x1 - x0) of window ``win`` = (y0, y1, x0, x1).

        ``chans`` come from :meth:`channels`; the window may reach ``h2`` px outside the image.
        """
        y0, y1, x0, x1 = win
        p, h1 = self.pad, self.h1
        src = chans[:, p + y0 - h1:p + y1 + h1 + _TAIL, p + x0 - h1:p + x1 + h1 + _TAIL]
        f1 = np.empty((self.n1, y1 - y0, x1 - x0), np.float32)
        _features_into(src, self.cfg, f1, (h1, h1 + y1 - y0, h1, h1 + x1 - x0))
        return f1

    def stage1_proba(self, f1: np.ndarray, ens: _Ensemble | None = None) -> np.ndarray:
        """Stage-1 probabilities (wh, ww) of features ``f1`` (by ``ens``, default stage 1)."""
        model = ens or self.stage1
        assert model is not None
        return model.predict(f1.reshape(self.n1, -1)).reshape(f1.shape[1:])

    def context_window(self, y: int, x: int, th: int, tw: int) -> tuple[int, int, int, int]:
        """The stage-1 window whose probabilities stage 2 needs for tile (y, x, th, tw)."""
        g = self.h2
        return y - g, y + th + g, x - g, x + tw + g

    def stage2_features(self, f1: np.ndarray, p1: np.ndarray) -> np.ndarray:
        """Stage-2 features (n1 + n2, th, tw) of the tile whose context window gave ``f1``
        (stage-1 features) and ``p1`` (stage-1 probabilities)."""
        assert self.ctx is not None
        g = self.h2
        rh, rw = p1.shape
        th, tw = rh - 2 * g, rw - 2 * g
        f2 = np.empty((self.n1 + self.n2, th, tw), np.float32)
        f2[:self.n1] = f1[:, g:g + th, g:g + tw]
        q = np.zeros((rh + _TAIL, rw + _TAIL), np.float32)  # the tail margin: never read
        q[:rh, :rw] = p1
        _features_into(q[None], self.ctx, f2[self.n1:], (g, g + th, g, g + tw))
        return f2

    def tile_proba(self, chans: np.ndarray, y: int, x: int, th: int, tw: int) -> np.ndarray:
        """Root probabilities (th, tw) of tile (y, x, th, tw)."""
        if self.stage2 is None:
            return self.stage1_proba(self.stage1_features(chans, (y, y + th, x, x + tw)))
        f1 = self.stage1_features(chans, self.context_window(y, x, th, tw))
        f2 = self.stage2_features(f1, self.stage1_proba(f1))
        del f1
        return self.stage2.predict(f2.reshape(len(f2), -1)).reshape(th, tw)


def _map_tiles(fn: Callable[[Any], Any], tiles: Sequence[Any], threads: int) -> list[Any]:
    """``[fn(t) for t in tiles]`` on ``threads`` threads (numba and OpenCV release the GIL)."""
    if threads <= 1 or len(tiles) <= 1:
        return [fn(t) for t in tiles]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=min(threads, len(tiles))) as pool:
        return list(pool.map(fn, tiles))


# -- the segmenter -----------------------------------------------------------------------------
class ForestSegmenter:
    """A trained forest (see the module docstring); load with :meth:`from_bytes` or
    :func:`rootflow.models.segmenters.load_segmenter`."""

    kind = "forest"

    def __init__(self, cfg: ForestConfig, lightgbm: str, *, threshold: float,
                 lightgbm_context: str | None = None, train: dict[str, Any] | None = None,
                 num_threads: int | None = None) -> None:
        if cfg.autocontext != (lightgbm_context is not None):
            raise ValueError("autocontext needs exactly one context (stage-1) model")
        n1 = len(feature_names(cfg))
        n2 = len(context_feature_names(cfg))
        if cfg.autocontext:
            stage1 = _Ensemble(str(lightgbm_context), n_features=n1)
            stage2: _Ensemble | None = _Ensemble(lightgbm, n_features=n1 + n2)
        else:
            stage1, stage2 = _Ensemble(lightgbm, n_features=n1), None
        self.cfg = cfg
        self.threshold = float(threshold)
        self.train_info = dict(train or {})
        self.num_threads = num_threads
        self._stage1, self._stage2 = stage1, stage2
        self._loaded: tuple[float, bytes] | None = None  # (threshold, file bytes) as read

    # -- identity ------------------------------------------------------------------------------
    def _doc(self) -> dict[str, Any]:
        final = self._stage2 if self._stage2 is not None else self._stage1
        return {
            "format": FORMAT,
            "config": _to_dict(self.cfg),
            "feature_names": feature_names(self.cfg) + context_feature_names(self.cfg),
            "threshold": self.threshold,
            "lightgbm": final.model_str,
            "lightgbm_context": self._stage1.model_str if self._stage2 is not None else None,
            "train": self.train_info,
        }

    def to_bytes(self) -> bytes:
        """The model file (UTF-8 JSON); a loaded, unchanged model gives back its exact bytes."""
        if self._loaded is not None and self._loaded[0] == self.threshold:
            return self._loaded[1]
        return json.dumps(self._doc(), separators=(",", ":")).encode("utf-8")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()

    @property
    def version(self) -> str:
        """``forest-<12 hex>`` of the file bytes (trees, features, threshold, tile...)."""
        return "forest-" + self.sha256[:12]

    def params(self) -> dict[str, Any]:
        """JSON-able settings for each traits row's ``params``."""
        cfg = self.cfg
        return {"kind": self.kind, "version": self.version, "threshold": self.threshold,
                "tile": cfg.tile, "sigmas": list(cfg.sigmas), "channels": list(cfg.channels),
                "features": list(cfg.features), "autocontext": cfg.autocontext,
                "context_sigmas": list(cfg.context_sigmas) if cfg.autocontext else [],
                "boosting": cfg.boosting, "max_depth": cfg.max_depth,
                "n_stages": 1 if self._stage2 is None else 2,
                "n_trees": self._stage1.n_trees + (self._stage2.n_trees if self._stage2 else 0)}

    # -- inference -----------------------------------------------------------------------------
    def predict_proba(self, image: np.ndarray, *, tile: int | None = None) -> np.ndarray:
        """uint8 RGB (H, W, 3) -> float32 root probability (H, W), tile by tile.

        ``tile`` overrides the configured tile side (the result does not depend on it).
        """
        img = _check_image(image)
        h, w = img.shape[:2]
        stages = _Stages(self.cfg, self._stage1, self._stage2)
        chans = stages.channels(img)
        out = np.empty((h, w), np.float32)

        def one(t: tuple[int, int, int, int]) -> None:
            y, x, th, tw = t
            out[y:y + th, x:x + tw] = stages.tile_proba(chans, y, x, th, tw)

        threads = self.num_threads or _default_threads()
        with _cv2_threads(1):
            _map_tiles(one, _tiles(h, w, tile or self.cfg.tile), threads)
        return out

    def predict(self, image: np.ndarray) -> np.ndarray:
        """Bool root mask (H, W): ``predict_proba(image) >= threshold``."""
        return self.predict_proba(image) >= self.threshold

    # -- files ---------------------------------------------------------------------------------
    @classmethod
    def from_bytes(cls, data: bytes, *, uri: str = "<bytes>",
                   num_threads: int | None = None) -> ForestSegmenter:
        """Parse a model file (JSON + LightGBM text; nothing is unpickled).

        Raises:
            SegmenterLoadError: not JSON, another format, missing keys, or trees that do not
                match the saved feature configuration (names the ``uri``).
        """
        try:
            doc = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as e:
            raise SegmenterLoadError(f"{uri}: not a rootflow forest (unreadable JSON: {e})") \
                from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            fmt = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
            raise SegmenterLoadError(f"{uri}: format {fmt!r} is not {FORMAT!r}")
        missing = [k for k in ("config", "threshold", "lightgbm", "feature_names")
                   if k not in doc]
        if missing:
            raise SegmenterLoadError(f"{uri}: forest file lacks {missing}")
        try:
            cfg = _from_dict(doc["config"])
            names = feature_names(cfg) + context_feature_names(cfg)
            if list(doc["feature_names"]) != names:
                raise ValueError("feature_names do not match the config's features")
            seg = cls(cfg, str(doc["lightgbm"]), threshold=float(doc["threshold"]),
                      lightgbm_context=doc.get("lightgbm_context"),
                      train=doc.get("train") or {}, num_threads=num_threads)
        except SegmenterLoadError:
            raise
        except Exception as e:
            raise SegmenterLoadError(f"{uri}: corrupt forest file ({type(e).__name__}: "
                                     f"{str(e).splitlines()[0] if str(e) else ''})") from None
        seg._loaded = (seg.threshold, bytes(data))
        return seg

    def save(self, uri: str, *, storage_options: storage.StorageLike = None) -> str:
        """Write the model file to ``uri`` (local or object storage); returns its sha256."""
        data = self.to_bytes()
        storage.write_bytes(uri, data, storage_options)
        return hashlib.sha256(data).hexdigest()

    def __repr__(self) -> str:
        return f"ForestSegmenter({self.version}, threshold={self.threshold:.4f})"


# -- training ----------------------------------------------------------------------------------
_UNLABELLED = (-1, 255)


def _parse_labels(label: np.ndarray, shape: tuple[int, int], name: str,
                  ) -> tuple[np.ndarray, bool]:
    """Labels -> int8 (H, W) with 1 root, 0 background, -1 unlabelled; and "is a full mask".

    The rule: a bool array is a full mask. A numeric array is read as scribbles (1 root,
    0 background, -1 or 255 unlabelled); without unlabelled pixels it is a full 0/1 mask.
    Any other value is an error, and so is an array of only 0 and 255: that is a mask PNG's
    convention, ambiguous here (pass ``mask > 0``).
    """
    a = np.asarray(label)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.shape != tuple(shape):
        raise ForestError(f"{name}: labels are {a.shape}, the image is {tuple(shape)}")
    if a.dtype == bool:
        return a.astype(np.int8), True
    if not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.floating)):
        raise ForestError(f"{name}: labels of dtype {a.dtype}; expected bool or integers")
    if a.dtype == np.uint8:
        counts = np.bincount(a.ravel(), minlength=256)
        values = np.flatnonzero(counts)
    else:
        values = np.unique(a)
    bad = [v for v in values.tolist() if v not in (0, 1, *_UNLABELLED)]
    if bad:
        shown = ", ".join(f"{v:g}" for v in bad[:5])
        raise ForestError(f"{name}: label value(s) {shown} are not 0 (background), 1 (root) "
                          f"or -1/255 (unlabelled); pass a 0/255 mask as bool (mask > 0)")
    present = set(values.tolist())
    if present == {0, 255}:
        raise ForestError(f"{name}: labels are only 0 and 255, a mask's convention: pass it "
                          f"as bool (mask > 0), or mark roots 1 in scribbles")
    out = np.full(a.shape, -1, np.int8)
    out[a == 1] = 1
    out[a == 0] = 0
    return out, not (present & set(_UNLABELLED))


@dataclasses.dataclass
class _Samples:
    """Sampled pixels of one image: flat indices, labels, roles, fold, features."""

    index: np.ndarray  # int64 flat pixel index
    y: np.ndarray  # bool, root
    balanced: np.ndarray  # bool: in the class-balanced training sample
    natural: np.ndarray  # bool: in the natural-frequency threshold sample
    fold: np.ndarray  # int8: 0/1, or -1 without cross-fitting
    x1: np.ndarray | None = None  # (n, n1) stage-1 features
    x2: np.ndarray | None = None  # (n, n2) context features


def _draw(lab: np.ndarray, cfg: ForestConfig, i: int, full: bool) -> _Samples | None:
    """Class-balanced and natural-frequency samples of one image (seeded by config and index)."""
    rng = np.random.default_rng([cfg.seed, i])
    flat = lab.ravel()
    pos = np.flatnonzero(flat == 1)
    neg = np.flatnonzero(flat == 0)
    if len(pos) + len(neg) == 0:
        return None
    cap = cfg.samples_per_class
    bal = np.concatenate([rng.choice(pos, min(cap, len(pos)), replace=False),
                          rng.choice(neg, min(cap, len(neg)), replace=False)])
    n_lab = flat.size if full else len(pos) + len(neg)
    k = min(cfg.threshold_samples, n_lab)
    if full:
        nat = rng.choice(flat.size, k, replace=False)
    else:
        nat = rng.choice(np.concatenate([pos, neg]), k, replace=False)
    index = np.concatenate([bal, nat]).astype(np.int64)
    role = np.zeros(len(index), bool)
    role[:len(bal)] = True
    return _Samples(index=index, y=flat[index] == 1, balanced=role, natural=~role,
                    fold=np.full(len(index), -1, np.int8))


def _by_tile(s: _Samples, w: int, tiles: Sequence[tuple[int, int, int, int]],
             ) -> list[tuple[tuple[int, int, int, int], np.ndarray]]:
    ys, xs = np.divmod(s.index, w)
    out = []
    for t in tiles:
        y, x, th, tw = t
        sel = np.flatnonzero((ys >= y) & (ys < y + th) & (xs >= x) & (xs < x + tw))
        if len(sel):
            out.append((t, sel))
    return out


def _best_threshold(p: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """The threshold maximising pooled Dice of ``p >= t`` against ``y``; and that Dice."""
    if not y.any():
        return 0.5, float("nan")
    order = np.argsort(-p, kind="stable")
    ps, ys = p[order], y[order]
    tp = np.cumsum(ys, dtype=np.float64)
    k = np.arange(1, len(p) + 1, dtype=np.float64)
    dice = 2 * tp / (k + ys.sum())
    last = np.r_[ps[1:] != ps[:-1], True]  # a threshold keeps all ties of its value
    dice = np.where(last, dice, -1.0)
    i = int(np.argmax(dice))
    return float(ps[i]), float(dice[i])


class _Clock:
    def __init__(self, max_seconds: float | None) -> None:
        self.t0 = time.monotonic()
        self.max = max_seconds

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def at(self, fraction: float) -> float:
        """Monotonic deadline at ``fraction`` of the budget (inf without one)."""
        return math.inf if self.max is None else self.t0 + fraction * self.max

    def past(self, fraction: float) -> bool:
        return time.monotonic() > self.at(fraction)


def _lgb_params(cfg: ForestConfig, threads: int) -> dict[str, Any]:
    p: dict[str, Any] = {
        "objective": "binary", "boosting_type": cfg.boosting, "num_leaves": cfg.num_leaves,
        "max_depth": cfg.max_depth, "min_data_in_leaf": cfg.min_data_in_leaf,
        "bagging_fraction": cfg.bagging_fraction,
        "bagging_freq": 1 if cfg.bagging_fraction < 1 else 0,
        "feature_fraction": cfg.feature_fraction, "seed": cfg.seed, "num_threads": threads,
        "deterministic": True, "force_row_wise": True, "verbose": -1,
    }
    if cfg.boosting == "gbdt":
        p["learning_rate"] = cfg.learning_rate
    return p


def _fit_trees(x: np.ndarray, y: np.ndarray, cfg: ForestConfig, threads: int,
               deadline: float) -> str:
    """One LightGBM model on rows ``x`` (n, F); stops adding trees at ``deadline``."""
    lgb = _lightgbm()

    def time_cap(env: Any) -> None:
        if time.monotonic() > deadline:
            raise lgb.callback.EarlyStopException(env.iteration, [])

    time_cap.order = 30  # type: ignore[attr-defined]
    ds = lgb.Dataset(x, label=y.astype(np.float32), free_raw_data=True,
                     params={"verbose": -1, "max_bin": 255})
    # OpenMP costs more than it brings on small samples (and spins badly on a busy machine):
    # one thread per 50k rows at most.
    threads = max(1, min(threads, len(y) // 50_000))
    booster = lgb.train(_lgb_params(cfg, threads), ds, num_boost_round=cfg.n_estimators,
                        callbacks=[time_cap])
    return str(booster.model_to_string())


def _stack(samples: Sequence[_Samples], rows: str, fold: int | None, stage: int,
           ) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for s in samples:
        m = getattr(s, rows) if fold is None else getattr(s, rows) & (s.fold == fold)
        if not m.any():
            continue
        assert s.x1 is not None
        if stage == 1:
            x = s.x1[m]
        else:
            assert s.x2 is not None
            x = np.concatenate([s.x1[m], s.x2[m]], axis=1)
        xs.append(x)
        ys.append(s.y[m])
    if not xs:
        return np.empty((0, 0), np.float32), np.empty(0, bool)
    return np.ascontiguousarray(np.concatenate(xs), dtype=np.float32), np.concatenate(ys)


def fit_forest(images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
               cfg: ForestConfig = ForestConfig(), *, max_seconds: float | None = None,
               progress: bool = True, num_threads: int | None = None,
               names: Sequence[str] | None = None) -> ForestSegmenter:
    """Train a forest on images with full masks or scribbles.

    Args:
        images: uint8 RGB (H, W, 3) arrays.
        labels: per image, a bool full mask, or int scribbles (1 root, 0 background, -1 or
            255 unlabelled); see :func:`_parse_labels` for the exact rule.
        cfg: features, trees, sampling (saved in the model).
        max_seconds: wall-clock budget, checked between images and between trees (an image
            in progress finishes). Features stop taking new images at 30 % of it (40 %
            without autocontext; always at least one root and one background pixel); stage-1
            trees stop at 50 % (95 %); the autocontext stage is dropped (and the saved config
            says so) if stage 1 ends after 55 %; its context features stop taking images at
            65 % and its trees at 97 %. None = no limit.
        progress: tqdm bars on stderr.
        num_threads: threads for features and LightGBM (None = this machine's cores, max 8).
        names: image names for messages and the training record (default ``image <i>``).

    Raises:
        ForestError: mismatched lengths or sizes, invalid label values, no root or no
            background pixel labelled anywhere.
    """
    from tqdm import tqdm

    clock = _Clock(max_seconds)
    if len(images) != len(labels):
        raise ForestError(f"{len(images)} images but {len(labels)} label arrays")
    if not len(images):
        raise ForestError("no training images")
    names = list(names) if names is not None else [f"image {i}" for i in range(len(images))]
    threads = num_threads or _default_threads()

    # 1. labels and samples (cheap; all images, so bad input fails before any work)
    imgs: list[np.ndarray] = []
    samples: list[_Samples | None] = []
    modes = set()
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        img = _check_image(image, names[i])
        lab, full = _parse_labels(label, img.shape[:2], names[i])
        modes.add("masks" if full else "scribbles")
        imgs.append(img)
        samples.append(_draw(lab, cfg, i, full))
    if not any(s is not None and s.y[s.balanced].any() for s in samples):
        raise ForestError("no pixel is labelled root (1) in any image")
    if not any(s is not None and (~s.y[s.balanced]).any() for s in samples):
        raise ForestError("no pixel is labelled background (0) in any image")

    # 2. stage-1 features at the sampled pixels, tile by tile
    n1 = len(feature_names(cfg))
    stages1 = _Stages(cfg)
    feat_deadline = 0.3 if cfg.autocontext else 0.4
    used: list[int] = []
    seen_root = seen_bg = False
    with _cv2_threads(1):
        bar = tqdm(total=len(imgs), desc="forest features", unit="img", disable=not progress)
        for i, (img, s) in enumerate(zip(imgs, samples, strict=True)):
            bar.update(1)
            if s is None:
                continue
            if seen_root and seen_bg and clock.past(feat_deadline):
                log.warning("forest: time budget: features of %d of %d images", len(used),
                            len(imgs))
                break
            h, w = img.shape[:2]
            chans = stages1.channels(img)
            x1 = np.empty((len(s.index), n1), np.float32)

            def one(job: tuple[tuple[int, int, int, int], np.ndarray], chans: np.ndarray = chans,
                    index: np.ndarray = s.index, x1: np.ndarray = x1, w: int = w) -> None:
                (y, x, th, tw), sel = job
                f = stages1.stage1_features(chans, (y, y + th, x, x + tw))
                yy, xx = np.divmod(index[sel], w)
                x1[sel] = f[:, yy - y, xx - x].T

            _map_tiles(one, _by_tile(s, w, _tiles(h, w, cfg.tile)), threads)
            s.x1 = x1
            used.append(i)
            seen_root |= bool(s.y[s.balanced].any())
            seen_bg |= bool((~s.y[s.balanced]).any())
        bar.close()
    train_set = [s for s in samples if s is not None and s.x1 is not None]

    # 3. folds: images alternately, or the two halves of a single image
    fold_mode = "images" if len(train_set) >= 2 else "halves"
    for k, (i, s) in enumerate(zip(used, train_set, strict=True)):
        if fold_mode == "images":
            s.fold[:] = k % 2
        else:
            s.fold[:] = (s.index % imgs[i].shape[1]) >= imgs[i].shape[1] // 2

    def both_classes(fold: int) -> bool:
        yb = np.concatenate([s.y[s.balanced & (s.fold == fold)] for s in train_set])
        return bool(yb.any() and (~yb).any())

    if not (both_classes(0) and both_classes(1)):
        fold_mode = "none"
        for s in train_set:
            s.fold[:] = -1
        log.warning("forest: a fold lacks root or background pixels: the threshold (and the "
                    "autocontext stage) are fitted in-sample")

    # 4. stage 1: fold models (out-of-fold maps and thresholds) and the full model
    stage1_end = 0.5 if cfg.autocontext else 0.95
    fold_models: dict[int, str] = {}
    if fold_mode != "none":
        for f in (0, 1):
            x, y = _stack(train_set, "balanced", f, 1)
            fold_models[f] = _fit_trees(x, y, cfg, threads, clock.at(stage1_end * (0.5 + f / 4)))
    x, y = _stack(train_set, "balanced", None, 1)
    stage1 = _fit_trees(x, y, cfg, threads, clock.at(stage1_end))
    del x, y
    stage1_ens = _Ensemble(stage1, n_features=n1)
    fold_ens = {f: _Ensemble(m, n_features=n1) for f, m in fold_models.items()}

    final_cfg = cfg
    stage2: str | None = None
    oof_ens: dict[int, _Ensemble] = fold_ens
    if cfg.autocontext and clock.past(0.55):
        log.warning("forest: time budget: no autocontext stage")
        final_cfg = dataclasses.replace(cfg, autocontext=False)
    if final_cfg.autocontext:
        # 5. context features from out-of-fold stage-1 maps: a pixel of fold k is mapped by
        # the stage-1 model of fold 1 - k (trained without it), as stage 2 will see at
        # inference a map from trees that never saw the image.
        stages = _Stages(final_cfg, stage1_ens)
        n2 = stages.n2
        done: list[_Samples] = []

        def folds_ready() -> bool:  # each fold has both classes among the images done
            if fold_mode != "images":
                return bool(done)
            ys = [np.concatenate([d.y[d.balanced] for d in done if d.fold[0] == f] or
                                 [np.empty(0, bool)]) for f in (0, 1)]
            return all(y.any() and (~y).any() for y in ys)

        with _cv2_threads(1):
            for i, s in tqdm(list(zip(used, train_set, strict=True)), desc="forest context",
                             unit="img", disable=not progress):
                if clock.past(0.65) and folds_ready():
                    log.warning("forest: time budget: context features of %d of %d images",
                                len(done), len(train_set))
                    break
                img = imgs[i]
                h, w = img.shape[:2]
                chans = stages.channels(img)
                x2 = np.empty((len(s.index), n2), np.float32)
                image_fold = int(s.fold[0])

                def ctx_one(job: tuple[tuple[int, int, int, int], np.ndarray],
                            chans: np.ndarray = chans, index: np.ndarray = s.index,
                            x2: np.ndarray = x2, w: int = w,
                            image_fold: int = image_fold) -> None:
                    (y, x, th, tw), sel = job
                    win = stages.context_window(y, x, th, tw)
                    f1 = stages.stage1_features(chans, win)
                    if fold_mode == "images":
                        p1 = stages.stage1_proba(f1, fold_ens[1 - image_fold])
                    elif fold_mode == "halves":
                        right = np.arange(win[2], win[3]) >= w // 2
                        p1 = stages.stage1_proba(f1, fold_ens[0])  # right half = fold 1
                        p1[:, ~right] = stages.stage1_proba(f1[:, :, ~right], fold_ens[1])
                    else:
                        p1 = stages.stage1_proba(f1)
                    f2 = stages.stage2_features(f1, p1)
                    yy, xx = np.divmod(index[sel], w)
                    x2[sel] = f2[n1:, yy - y, xx - x].T

                _map_tiles(ctx_one, _by_tile(s, w, _tiles(h, w, final_cfg.tile)), threads)
                s.x2 = x2
                done.append(s)
        final_set = done
        # 6. stage 2: fold models for the threshold, then the full model
        oof_ens = {}
        if fold_mode != "none":
            for f in (0, 1):
                x, y = _stack(final_set, "balanced", f, 2)
                oof_ens[f] = _Ensemble(_fit_trees(x, y, final_cfg, threads,
                                                  clock.at(0.7 + 0.1 * f)),
                                       n_features=n1 + n2)
        x, y = _stack(final_set, "balanced", None, 2)
        stage2 = _fit_trees(x, y, final_cfg, threads, clock.at(0.97))
        del x, y
        final_ens = _Ensemble(stage2, n_features=n1 + n2)
    else:
        final_ens = stage1_ens
        final_set = train_set

    # 7. threshold: pooled Dice of out-of-fold predictions on natural-frequency samples
    stage = 2 if final_cfg.autocontext else 1
    ps, ys = [], []
    if fold_mode != "none":
        for f, ens in oof_ens.items():  # model f predicts the pixels of fold 1 - f
            x, y = _stack(final_set, "natural", 1 - f, stage)
            if len(y):
                ps.append(ens.predict(x.T))
                ys.append(y)
    else:
        x, y = _stack(final_set, "natural", None, stage)
        ps.append(final_ens.predict(x.T))
        ys.append(y)
    p_all, y_all = np.concatenate(ps), np.concatenate(ys)
    threshold, oof_dice = _best_threshold(p_all, y_all)

    lgb = _lightgbm()
    n_bal = sum(int(s.balanced.sum()) for s in train_set)
    n_root = sum(int(s.y[s.balanced].sum()) for s in train_set)
    info = {
        "n_images": len(images), "n_images_used": len(train_set),
        "images": [names[i] for i in used], "labels": "+".join(sorted(modes)),
        "n_pixels": n_bal, "n_root": n_root, "n_background": n_bal - n_root,
        "threshold_method": f"max pooled Dice, out-of-fold ({fold_mode}), "
                            f"{len(y_all)} natural-frequency labelled pixels",
        "threshold_pixels": int(len(y_all)), "threshold_root_pixels": int(y_all.sum()),
        "oof_dice": None if math.isnan(oof_dice) else round(oof_dice, 6),
        "n_images_context": len(final_set) if stage2 else 0,
        "n_trees": [stage1_ens.n_trees] + ([final_ens.n_trees] if stage2 else []),
        "seconds": round(clock.elapsed(), 2), "max_seconds": max_seconds,
        "lightgbm": lgb.__version__,
    }
    log.info("forest: %d images, %d pixels, threshold %.4f (out-of-fold Dice %.4f), %.1f s",
             len(train_set), n_bal, threshold, oof_dice, clock.elapsed())
    if stage2 is not None:
        return ForestSegmenter(final_cfg, stage2, threshold=threshold, lightgbm_context=stage1,
                               train=info, num_threads=num_threads)
    return ForestSegmenter(final_cfg, stage1, threshold=threshold, train=info,
                           num_threads=num_threads)


# -- training from files -----------------------------------------------------------------------
def _annotated_table(data: str, storage_options: storage.StorageLike) -> Any:
    """The (image_uri, mask_uri) table of a folder of pairs or of an annotated manifest."""
    from rootflow.training.data import (
        IMAGE_EXTS,
        AnnotationError,
        pairs_manifest,
        read_annotated_manifest,
    )

    try:
        fs = storage.filesystem(data, storage_options)
        path = storage.strip_protocol(data).rstrip("/")
        if not fs.exists(path):
            raise ForestError(f"{data}: no such folder or manifest")
        if fs.isdir(path):
            table = pairs_manifest(data, storage_options=storage_options)
            paired = {storage.normalize(u) for u in table["image_uri"].to_pylist()}
            unpaired = [p for p in sorted(fs.find(path)) if p.lower().endswith(IMAGE_EXTS)
                        and not p.rpartition(".")[0].endswith("_mask")
                        and storage.normalize(storage.to_uri(data, p)) not in paired]
            if unpaired:
                log.warning("forest: %d image(s) without a <stem>_mask.png skipped, e.g. %s",
                            len(unpaired), unpaired[0])
        else:
            table = read_annotated_manifest(data, storage_options=storage_options)
    except AnnotationError as e:
        raise ForestError(str(e)) from None
    return table


def _load_pair(image_uri: str, mask_uri: str, storage_options: storage.StorageLike,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Decode one (image, mask) pair; the mask must be binary: 0 and one root value."""
    from rootflow.io.images import ImageDecodeError, decode

    try:
        image, _ = decode(storage.read_bytes(image_uri, storage_options))
    except (ImageDecodeError, OSError) as e:
        raise ForestError(f"{image_uri}: cannot read image ({e})") from None
    try:
        raw, _ = decode(storage.read_bytes(mask_uri, storage_options))
    except (ImageDecodeError, OSError) as e:
        raise ForestError(f"{mask_uri}: cannot read mask ({e})") from None
    grey = raw.max(axis=2)
    if grey.shape != image.shape[:2]:
        raise ForestError(f"{mask_uri}: mask is {grey.shape[1]}x{grey.shape[0]} px, the image "
                          f"is {image.shape[1]}x{image.shape[0]}")
    values = np.flatnonzero(np.bincount(grey.ravel(), minlength=256))
    if len(values[values > 0]) > 1:
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise ForestError(f"{mask_uri}: not a binary mask (values {shown}); expected "
                          f"0 = background and one root value (255 or 1)")
    return image, grey > 0


def train_forest(data: str, out: str, *, cfg: ForestConfig = ForestConfig(),
                 max_minutes: float | None = None, storage_options: storage.StorageLike = None,
                 progress: bool = True) -> dict[str, Any]:
    """Train a forest on annotated images and write ``<out>/forest.json`` + ``<out>/train.json``.

    Args:
        data: a folder (local or object storage) of ``<stem>.<ext>`` + ``<stem>_mask.png``
            pairs (images without a mask are skipped with a warning), or an annotated
            manifest (CSV/Parquet with ``image_uri``, ``mask_uri``).
        out: output folder URI.
        max_minutes: wall-clock budget (see :func:`fit_forest`); None = no limit.

    Returns:
        ``{"model_uri", "sha256", "version", "seconds", "n_images", "n_pixels", "threshold"}``.

    Raises:
        ForestError: no pairs, an unreadable or non-binary mask, a mask of another size, or
            labels without both classes (the message names the file).
    """
    t0 = time.monotonic()
    table = _annotated_table(data, storage_options)
    image_uris = [str(u) for u in table["image_uri"].to_pylist()]
    mask_uris = [str(u) for u in table["mask_uri"].to_pylist()]
    images, masks = [], []
    for image_uri, mask_uri in zip(image_uris, mask_uris, strict=True):
        image, mask = _load_pair(image_uri, mask_uri, storage_options)
        images.append(image)
        masks.append(mask)
    budget = None if max_minutes is None else max(1.0, max_minutes * 60 - (time.monotonic() - t0))
    seg = fit_forest(images, masks, cfg, max_seconds=budget, progress=progress,
                     names=image_uris)
    del images, masks
    model_uri = storage.join(out, "forest.json")
    sha = seg.save(model_uri, storage_options=storage_options)
    seconds = round(time.monotonic() - t0, 2)
    info = seg.train_info
    result = {"model_uri": model_uri, "sha256": sha, "version": seg.version,
              "seconds": seconds, "n_images": int(info["n_images_used"]),
              "n_pixels": int(info["n_pixels"]), "threshold": seg.threshold}
    record = {**result, "data": data, "config": _to_dict(seg.cfg),
              "config_requested": _to_dict(cfg), "train": info}
    storage.write_bytes(storage.join(out, "train.json"),
                        json.dumps(record, indent=2).encode("utf-8"), storage_options)
    return result
