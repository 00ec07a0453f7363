"""Session registration: where did the camera put this window this time?

A tube camera never comes back to exactly the same place: between sessions the same window is
shifted by tens of pixels (20-120 px between consecutive PRMI peanut sessions, one pair nearly
190 px of 736) and, with a rotating scanner (CI-600), turned. Before two sessions' masks can be
compared pixel by pixel, the later image is registered to the earlier one.

The transform convention (also what ``rootflow align`` prints): the transform maps the
*moving* image onto the *fixed* one; rotate the moving image by ``angle_deg`` about its centre
(counter-clockwise as displayed, y pointing down), then shift it by (``dx``, ``dy``) pixels.
``moving = np.roll(fixed, 5, axis=1)`` (content 5 px to the right) gives ``dx = -5``.

Methods (a registry: :data:`METHODS`; ``docs/dynamics.md`` has the measured comparison on all
PRMI peanut pairs, which is why :data:`DEFAULT_METHOD` is what it is):

* ``identity``: no motion (the baseline every method must beat).
* ``phase``: Fourier-Mellin: rotation from the log-polar phase correlation of the spectra'
  magnitudes, then translation by phase correlation (scikit-image), on band-passed images.
* ``ecc``: ``phase`` refined by OpenCV's ECC maximisation (Euclidean motion, image pyramid).
* ``features``: SIFT key points, Lowe's ratio test, a rotation + translation fitted with RANSAC
  (OpenCV ``estimateAffinePartial2D``), then refined by ECC from that start.

Every result carries a ``quality`` in [0, 1]: the zero-mean normalised cross-correlation of the
band-passed images on the overlap after warping (0 when the content does not line up, 1 for
identical content); below :data:`MIN_QUALITY`, or with less than :data:`MIN_OVERLAP` of the frame
shared, the pair is flagged (``ok=False`` with the reason), never silently guessed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import numpy as np

MIN_QUALITY = 0.05
"""Pairs whose aligned band-passed images correlate less than this are flagged. On the 49
peanut pairs every alignment that raised the mask IoU scored >= 0.099 and every one that
misregistered scored <= 0.03 (docs/dynamics.md): 0.05 sits in that gap."""
MIN_OVERLAP = 0.30
"""Pairs sharing less than this fraction of the fixed frame after alignment are flagged."""
MAX_ANGLE_DEG = 30.0
"""Rotations beyond this are refused as implausible for one tube between two sessions."""


class AlignError(ValueError):
    """A pair that cannot be aligned; the message is the reason recorded with it."""


@dataclasses.dataclass(frozen=True)
class Alignment:
    """Rigid motion mapping the moving image onto the fixed one (see the module docstring).

    Attributes:
        dx, dy: shift in pixels applied after the rotation (x right, y down).
        angle_deg: rotation about the moving image's centre, counter-clockwise as displayed.
        quality: band-passed image correlation on the overlap after warping, in [0, 1].
        overlap: fraction of the fixed frame covered by the warped moving frame.
        method: the registry name that produced it.
        ok: False when the pair is flagged; ``reason`` says why.
    """

    dx: float
    dy: float
    angle_deg: float
    quality: float
    overlap: float
    method: str
    ok: bool = True
    reason: str | None = None

    def matrix(self, shape: tuple[int, ...]) -> np.ndarray:
        """The 2x3 forward matrix (moving pixel -> fixed pixel) for an image of ``shape``."""
        return rigid_matrix(self.dx, self.dy, self.angle_deg, shape)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in ("dx", "dy", "angle_deg", "quality", "overlap"):
            d[k] = round(float(d[k]), 4)
        return d


IDENTITY = Alignment(0.0, 0.0, 0.0, 1.0, 1.0, "identity")


def rigid_matrix(dx: float, dy: float, angle_deg: float, shape: tuple[int, ...]) -> np.ndarray:
    """2x3 matrix: rotate by ``angle_deg`` (CCW as displayed) about the centre, then shift."""
    import cv2

    h, w = shape[:2]
    m = cv2.getRotationMatrix2D(((w - 1) / 2.0, (h - 1) / 2.0), float(angle_deg), 1.0)
    m[0, 2] += dx
    m[1, 2] += dy
    return m


def from_matrix(m: np.ndarray, shape: tuple[int, ...]) -> tuple[float, float, float]:
    """(dx, dy, angle_deg) of a rigid 2x3 forward matrix (scale, if any, is ignored)."""
    h, w = shape[:2]
    angle = math.degrees(math.atan2(m[0, 1], m[0, 0]))
    rot = rigid_matrix(0.0, 0.0, angle, shape)
    return float(m[0, 2] - rot[0, 2]), float(m[1, 2] - rot[1, 2]), float(angle)


def warp(image: np.ndarray, alignment: Alignment, *, nearest: bool = False
         ) -> tuple[np.ndarray, np.ndarray]:
    """The moving ``image`` in the fixed frame, and the bool mask of pixels it covers.

    Masks are warped with ``nearest=True`` (no grey edges to threshold).
    """
    import cv2

    img = np.asarray(image)
    h, w = img.shape[:2]
    m = alignment.matrix(img.shape)
    src = img.astype(np.uint8) if img.dtype == np.bool_ else img
    flags = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    out = cv2.warpAffine(src, m, (w, h), flags=flags, borderMode=cv2.BORDER_CONSTANT,
                         borderValue=0)
    valid = cv2.warpAffine(np.ones((h, w), np.uint8), m, (w, h), flags=cv2.INTER_NEAREST,
                           borderMode=cv2.BORDER_CONSTANT, borderValue=0) > 0
    if img.dtype == np.bool_:
        return out > 0, valid
    return out, valid


# -- preprocessing ----------------------------------------------------------------------------
def _gray(image: np.ndarray) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim == 3:
        a = a[..., :3].astype(np.float32).mean(axis=2)
    return a.astype(np.float32)


def bandpass(image: np.ndarray, *, low_sigma: float = 1.0, high_sigma: float = 12.0) -> np.ndarray:
    """Difference of Gaussians, unit variance: keeps root- and grain-sized structure, drops
    the slow illumination and moisture shading that change between sessions."""
    import cv2

    g = _gray(image)
    a = cv2.GaussianBlur(g, (0, 0), low_sigma) - cv2.GaussianBlur(g, (0, 0), high_sigma)
    sd = float(a.std())
    return a / sd if sd > 0 else a


def quality(fixed: np.ndarray, moving: np.ndarray, alignment: Alignment) -> tuple[float, float]:
    """(quality, overlap) of ``alignment``: ZNCC of band-passed images on the shared pixels
    (clipped to [0, 1]), and the shared fraction of the fixed frame."""
    import cv2

    f = bandpass(fixed)
    m, valid = warp(bandpass(moving), alignment)
    valid = cv2.erode(valid.astype(np.uint8), np.ones((9, 9), np.uint8)) > 0
    overlap = float(valid.mean())
    if valid.sum() < 100:
        return 0.0, overlap
    a = f[valid] - f[valid].mean()
    b = m[valid] - m[valid].mean()
    den = float(np.sqrt((a * a).sum() * (b * b).sum()))
    q = float((a * b).sum() / den) if den > 0 else 0.0
    return max(0.0, min(1.0, q)), overlap


# -- methods ----------------------------------------------------------------------------------
Estimator = Callable[[np.ndarray, np.ndarray], tuple[float, float, float]]
METHODS: dict[str, Estimator] = {}


def register(name: str) -> Callable[[Estimator], Estimator]:
    def deco(fn: Estimator) -> Estimator:
        METHODS[name] = fn
        return fn

    return deco


@register("identity")
def _identity(fixed: np.ndarray, moving: np.ndarray) -> tuple[float, float, float]:
    return 0.0, 0.0, 0.0


def _hann(shape: tuple[int, ...]) -> np.ndarray:
    return np.outer(np.hanning(shape[0]), np.hanning(shape[1])).astype(np.float32)


def _translation(f: np.ndarray, m: np.ndarray) -> tuple[float, float]:
    """Shift (dx, dy) that moves band-passed ``m`` onto ``f`` (phase correlation)."""
    from skimage.registration import phase_cross_correlation

    win = _hann(f.shape)
    shift, _, _ = phase_cross_correlation(f * win, m * win, upsample_factor=20,
                                          normalization="phase")
    return float(shift[1]), float(shift[0])


def _rotation(f: np.ndarray, m: np.ndarray) -> float:
    """Rotation (deg, CCW as displayed) of ``m`` onto ``f`` from the log-polar spectra."""
    from scipy import fft
    from skimage.registration import phase_cross_correlation
    from skimage.transform import warp_polar

    win = _hann(f.shape)
    mags = [np.abs(fft.fftshift(fft.fft2(a * win))) for a in (f, m)]
    radius = min(f.shape) // 2
    n_angles = 1440  # 0.25 deg per row before sub-pixel refinement
    polar = [warp_polar(a, radius=radius, output_shape=(n_angles, radius), scaling="log")
             for a in mags]
    # Skip the lowest frequencies (shading) and the highest (noise, JPEG blocks).
    polar = [p[:, radius // 8: radius // 2] for p in polar]
    shift, _, _ = phase_cross_correlation(polar[0], polar[1], upsample_factor=10,
                                          normalization=None)
    angle = float(shift[0]) * 360.0 / n_angles
    angle = (angle + 90.0) % 180.0 - 90.0  # spectra are symmetric: +-180 is ambiguous
    # warp_polar's angle runs clockwise as displayed; a CCW rotation of the moving image
    # moves its spectrum the same way, so the row shift that undoes it is the CCW angle.
    return -angle


@register("phase")
def _phase(fixed: np.ndarray, moving: np.ndarray) -> tuple[float, float, float]:
    f, m = bandpass(fixed), bandpass(moving)
    best: tuple[float, float, float, float] | None = None
    a0 = _rotation(f, m)
    for angle in {round(a0, 4), 0.0}:
        rot = Alignment(0.0, 0.0, angle, 0.0, 0.0, "phase")
        mr, _ = warp(m, rot)
        dx, dy = _translation(f, mr)
        q, _ = quality(fixed, moving, Alignment(dx, dy, angle, 0.0, 0.0, "phase"))
        if best is None or q > best[0]:
            best = (q, dx, dy, angle)
    assert best is not None
    return best[1], best[2], best[3]


def _ecc_refine(fixed: np.ndarray, moving: np.ndarray, start: tuple[float, float, float]
                ) -> tuple[float, float, float]:
    """ECC (Evangelidis & Psarakis 2008) from ``start``; returns ``start`` if it diverges."""
    import cv2

    f, m = bandpass(fixed, high_sigma=20.0), bandpass(moving, high_sigma=20.0)
    fwd = rigid_matrix(*start, f.shape)
    warp_m = cv2.invertAffineTransform(fwd).astype(np.float32)  # ECC maps template -> input
    crit = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 200, 1e-6)
    try:
        _, warp_m = cv2.findTransformECC(f, m, warp_m, cv2.MOTION_EUCLIDEAN, crit, None, 5)  # type: ignore[call-overload]
    except cv2.error:
        return start
    res = from_matrix(cv2.invertAffineTransform(warp_m), f.shape)
    if math.hypot(res[0] - start[0], res[1] - start[1]) > 30 or abs(res[2] - start[2]) > 5:
        return start  # ECC wandered off: keep the start, quality decides
    return res


@register("ecc")
def _ecc(fixed: np.ndarray, moving: np.ndarray) -> tuple[float, float, float]:
    return _ecc_refine(fixed, moving, _phase(fixed, moving))


def _u8(a: np.ndarray) -> np.ndarray:
    import cv2

    g = _gray(a)
    g = cv2.normalize(g, None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)  # type: ignore[call-overload, unused-ignore]
    return cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(g)


def _features_raw(fixed: np.ndarray, moving: np.ndarray) -> tuple[float, float, float]:
    import cv2

    sift = cv2.SIFT_create(nfeatures=4000)  # type: ignore[attr-defined]
    kf, df = sift.detectAndCompute(_u8(fixed), None)
    km, dm = sift.detectAndCompute(_u8(moving), None)
    if df is None or dm is None or len(kf) < 10 or len(km) < 10:
        raise AlignError("too few SIFT key points to match")
    pairs = cv2.BFMatcher(cv2.NORM_L2).knnMatch(dm, df, k=2)
    good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < 0.8 * p[1].distance]
    if len(good) < 6:
        raise AlignError(f"only {len(good)} SIFT matches pass the ratio test (need 6)")
    src = np.array([km[g.queryIdx].pt for g in good], np.float32)
    dst = np.array([kf[g.trainIdx].pt for g in good], np.float32)
    m, inl = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=3.0,
                                         maxIters=5000, confidence=0.999)
    if m is None or inl is None or int(inl.sum()) < 6:
        raise AlignError("RANSAC found no rotation + translation with 6 inliers")
    scale = math.hypot(m[0, 0], m[0, 1])
    if not 0.9 < scale < 1.1:
        raise AlignError(f"RANSAC fit implies a scale of {scale:.2f}: not the same window")
    return from_matrix(m / np.array([[scale, scale, 1], [scale, scale, 1]]), fixed.shape)


@register("features")
def _features(fixed: np.ndarray, moving: np.ndarray) -> tuple[float, float, float]:
    return _ecc_refine(fixed, moving, _features_raw(fixed, moving))


@register("sift")
def _sift(fixed: np.ndarray, moving: np.ndarray) -> tuple[float, float, float]:
    return _features_raw(fixed, moving)


@register("auto")
def _auto(fixed: np.ndarray, moving: np.ndarray) -> tuple[float, float, float]:
    """``features`` and ``ecc`` both, keeping the one whose result correlates better: SIFT
    fails on blurred or fogged frames where the phase correlation still locks, and the phase
    correlation locks onto condensation patterns where SIFT does not (docs/dynamics.md)."""
    best: tuple[float, tuple[float, float, float]] | None = None
    for name in ("features", "ecc"):
        try:
            res = METHODS[name](fixed, moving)
        except AlignError:
            continue
        q, overlap = quality(fixed, moving, Alignment(*res, 0.0, 0.0, name))
        if overlap < MIN_OVERLAP:
            q = 0.0
        if best is None or q > best[0]:
            best = (q, res)
    if best is None:
        raise AlignError("neither SIFT features nor phase correlation found a transform")
    return best[1]


DEFAULT_METHOD = "auto"


def align(fixed: np.ndarray, moving: np.ndarray, *, method: str = DEFAULT_METHOD,
          min_quality: float = MIN_QUALITY, min_overlap: float = MIN_OVERLAP) -> Alignment:
    """Register ``moving`` to ``fixed`` (same size; RGB or grey).

    Never raises for a pair that merely fails to align: the result then has ``ok=False`` and
    the reason (the transform found, if any, is kept for inspection but must not be used).

    Raises:
        ValueError: an unknown method (the message lists the valid ones).
        AlignError: images of different sizes (not a pair of the same window).
    """
    if method not in METHODS:
        raise ValueError(f"unknown alignment method {method!r}; choose from {sorted(METHODS)}")
    fixed, moving = np.asarray(fixed), np.asarray(moving)
    if fixed.shape[:2] != moving.shape[:2]:
        raise AlignError(f"images of different sizes: fixed {fixed.shape[1]}x{fixed.shape[0]}, "
                         f"moving {moving.shape[1]}x{moving.shape[0]}")
    try:
        dx, dy, angle = METHODS[method](fixed, moving)
    except AlignError as e:
        return Alignment(0.0, 0.0, 0.0, 0.0, 0.0, method, ok=False, reason=str(e))
    a = Alignment(dx, dy, angle, 0.0, 0.0, method)
    q, overlap = quality(fixed, moving, a)
    reason = None
    if abs(angle) > MAX_ANGLE_DEG:
        reason = f"rotation {angle:.1f} deg beyond {MAX_ANGLE_DEG:g} deg"
    elif overlap < min_overlap:
        reason = f"overlap {overlap:.2f} below {min_overlap:g}"
    elif q < min_quality:
        reason = f"quality {q:.3f} below {min_quality:g}: content does not line up"
    return dataclasses.replace(a, quality=q, overlap=overlap, ok=reason is None, reason=reason)
