"""Render one minirhizotron frame and its exact ground truth from a seeded scene.

The frame is built back to front, the way light reaches the camera:

1. **soil** seen through the tube: base colour, mottling, patches where soil touches the wall,
   a per-pixel grain, and thousands of particles (aggregates, mineral specks, pores);
2. **roots** pressed against the tube: each visible root is drawn once into an integer label
   image with :func:`rootflow.synth.roots.draw_tube`; the *mask is that label image* (> 0),
   so the mask and the picture come from the same geometry. The picture adds a cylinder
   shading from the distance transform, per-root colour (young laterals paler), soft edges,
   and places where the root dips behind soil (lower opacity, still in the mask, as a human
   annotator would trace it);
3. **tube wall**: a few soil particles in front of roots, condensation droplets, scratches,
   glare, haze, vignetting, dark wall margins (outside the soil box), optical blur and sensor
   noise.

All randomness comes from named streams of :class:`numpy.random.SeedSequence`: the scene
(roots, soil, wall) from ``scene_seed`` and the session (light, droplets, noise) from ``seed``,
so the same window photographed in two sessions shows the same soil and growing roots.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from rootflow.synth.config import SynthConfig
from rootflow.synth.looks import Look, Particles, get_look
from rootflow.synth.roots import GrowthParams, clip_lengths, grow_scene, tube_pixels

# Independent random streams (spawn keys) of a scene and of an image.
_EMPTY, _GEOMETRY, _SOIL, _WALL, _ROOT_LOOK = 1, 2, 3, 4, 5
_SESSION = 11


@dataclasses.dataclass(frozen=True, eq=False)
class RootGT:
    """Ground truth of one root visible in a frame.

    Attributes:
        root_id: id within the scene (stable across sessions of the same window).
        parent_id: ``root_id`` of the parent root, ``None`` for primaries.
        order: 1 primary, 2 lateral, 3 lateral of a lateral.
        length_mm: length of the drawn centre line inside the soil box.
        mean_diameter_mm: drawn diameter averaged along the visible centre line.
        points_px: ``(N, 2)`` float64 ``(x, y)`` centre line in continuous pixel coordinates
            (pixel ``(r, c)`` covers ``[c, c+1) x [r, r+1)``); it may run outside the frame.
        diameter_px: ``(N,)`` drawn diameter at each vertex (>= ``min_width_px``).
    """

    root_id: int
    parent_id: int | None
    order: int
    length_mm: float
    mean_diameter_mm: float
    points_px: np.ndarray
    diameter_px: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class SynthImage:
    """One rendered frame with exact ground truth.

    Attributes:
        image: ``uint8 (H, W, 3)`` RGB.
        mask: ``bool (H, W)``: every pixel covered by a visible root.
        roots: roots with a visible centre line (``length_mm > 0``).
        length_mm: total visible centre-line length (sum over ``roots``).
        projected_area_mm2: mask pixel count times the pixel area (overlaps count once,
            as RhizoVision Explorer's projected area).
        mean_diameter_mm: length-weighted mean drawn diameter; NaN when there are no roots.
        dpi: pixels per inch.
        root_px: mask pixel count.
        soil_box_px: ``(x0, y0, x1, y1)`` the part of the frame where soil (and roots) is
            visible; outside it is the dark tube-wall margin.
        day: growth day rendered (``None``: roots fully grown).
        seed, scene_seed: the seeds that reproduce this frame.
    """

    image: np.ndarray
    mask: np.ndarray
    roots: list[RootGT]
    length_mm: float
    projected_area_mm2: float
    mean_diameter_mm: float
    dpi: float
    root_px: int
    soil_box_px: tuple[int, int, int, int]
    day: float | None
    seed: int
    scene_seed: int

    @property
    def n_roots(self) -> int:
        return len(self.roots)

    @property
    def mm_per_px(self) -> float:
        return 25.4 / self.dpi

    def root_mask(self, root_id: int) -> np.ndarray:
        """``bool (H, W)`` mask of one root alone (same drawing as :attr:`mask`)."""
        by_id = {r.root_id: r for r in self.roots}
        if root_id not in by_id:
            raise KeyError(f"root {root_id} is not visible; visible: {sorted(by_id)}")
        root = by_id[root_id]
        return rasterize(root.points_px, root.diameter_px, shape=self.mask.shape,
                         box=self.soil_box_px)


def rasterize(points_px: np.ndarray, diameter_px: np.ndarray, *, shape: tuple[int, ...],
              box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    """``bool`` mask of one tube (a centre line with diameters), cut to ``box``.

    The same pixel-centre rule that builds :attr:`SynthImage.mask`, so callers (e.g. trait
    tests) can draw one root alone and compare.
    """
    h, w = shape[:2]
    out = np.zeros((h, w), bool)
    rows, cols = tube_pixels(points_px, diameter_px, box=box or (0, 0, w, h))
    out[rows, cols] = True
    return out


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(seed) & (2**63 - 1), stream]))


def generate_image(seed: int, config: SynthConfig, *, scene_seed: int | None = None,
                   day: float | None = None, depth_cm: float = 0.0) -> SynthImage:
    """Render one frame and its ground truth.

    Args:
        seed: seed of this photograph (lighting, droplets, noise).
        config: image size, dpi, look and root-architecture knobs.
        scene_seed: seed of the window (soil, roots, tube wall); defaults to ``seed``.
            Frames sharing a ``scene_seed`` show the same window at different ``day``s.
        day: days since sowing; roots show the part grown by then. ``None`` = fully grown.
        depth_cm: depth of the window: roots arrive later and are sparser deeper down.

    Returns:
        The frame, its mask and per-root ground truth. Same arguments -> identical arrays.
    """
    look = get_look(config.look)
    scene_seed = seed if scene_seed is None else scene_seed
    h, w = config.height, config.width
    px_per_mm = config.dpi / 25.4

    wall_rng = _rng(scene_seed, _WALL)
    box = _soil_box(wall_rng, look, w, h)
    soil, front = _soil(_rng(scene_seed, _SOIL), look, h, w, px_per_mm)

    roots, label = _visible_roots(scene_seed, config, day=day, depth_cm=depth_cm, box=box)
    mask = label > 0

    img = _composite_roots(_rng(scene_seed, _ROOT_LOOK), look, soil, label, roots, px_per_mm)
    session_rng = _rng(seed, _SESSION)
    img = _tube_wall(wall_rng, session_rng, look, img, front, box, px_per_mm, config.dpi)

    root_px = int(mask.sum())
    length = float(sum(r.length_mm for r in roots))
    mean_d = (float(sum(r.length_mm * r.mean_diameter_mm for r in roots) / length)
              if length > 0 else math.nan)
    return SynthImage(
        image=img, mask=mask, roots=roots, length_mm=length,
        projected_area_mm2=root_px / px_per_mm**2, mean_diameter_mm=mean_d, dpi=config.dpi,
        root_px=root_px, soil_box_px=box, day=day, seed=int(seed), scene_seed=int(scene_seed),
    )


# -- roots ------------------------------------------------------------------------------------

def _visible_roots(scene_seed: int, config: SynthConfig, *, day: float | None, depth_cm: float,
                   box: tuple[int, int, int, int]) -> tuple[list[RootGT], np.ndarray]:
    """Grow the scene to ``day``, keep roots visible in ``box``, draw them into a label image."""
    h, w = config.height, config.width
    label = np.zeros((h, w), np.int32)
    if _rng(scene_seed, _EMPTY).random() < config.empty_fraction:
        return [], label
    px_per_mm = config.dpi / 25.4
    params = GrowthParams(
        roots_per_dm2=config.roots_per_dm2 * math.exp(-max(depth_cm, 0.0) / config.depth_decay_cm),
        branching=config.branching,
        arrival_day=max(depth_cm, 0.0) * 10.0 / config.root_front_mm_per_day,
    )
    geoms = grow_scene(_rng(scene_seed, _GEOMETRY), width_mm=w / px_per_mm,
                       height_mm=h / px_per_mm, params=params)
    fbox = tuple(float(b) for b in box)
    out: list[RootGT] = []
    for g in geoms:
        pts_mm, d_mm = g.grown(day)
        if len(pts_mm) < 2:
            continue
        pts = pts_mm * px_per_mm
        seg_len = clip_lengths(pts, fbox)  # type: ignore[arg-type]
        visible_px = float(seg_len.sum())
        if visible_px <= 0.0:
            continue
        diam = np.maximum(d_mm * px_per_mm, config.min_width_px)
        seg_d = (diam[:-1] + diam[1:]) / 2
        out.append(RootGT(
            root_id=g.root_id, parent_id=g.parent_id, order=g.order,
            length_mm=visible_px / px_per_mm,
            mean_diameter_mm=float((seg_len * seg_d).sum() / visible_px) / px_per_mm,
            points_px=pts, diameter_px=diam,
        ))
        rows, cols = tube_pixels(pts, diam, box=box)
        label[rows, cols] = len(out)
    return out, label


def _composite_roots(rng: np.random.Generator, look: Look, soil: np.ndarray, label: np.ndarray,
                     roots: list[RootGT], px_per_mm: float) -> np.ndarray:
    """Paint roots over the soil: colour per root, cylinder shading, soft edges, dips."""
    import cv2

    if not roots:
        return soil
    n = len(roots)
    mature, young = np.array(look.root), np.array(look.root_young)
    youth = np.array([{1: 0.2, 2: 0.6, 3: 0.8}[r.order] for r in roots])
    youth = np.clip(youth + rng.normal(0, 0.2, n), 0, 1)
    colors = np.zeros((n + 1, 3), np.float32)
    colors[1:] = (mature[None] * (1 - youth[:, None]) + young[None] * youth[:, None]) * \
        rng.uniform(0.85, 1.1, (n, 1))
    opacity = np.zeros(n + 1, np.float32)
    opacity[1:] = rng.uniform(*look.root_alpha, n)
    radius = np.ones(n + 1, np.float32)
    radius[1:] = [max(float(np.mean(r.diameter_px)) / 2, 0.5) for r in roots]

    mask8 = (label > 0).astype(np.uint8)
    dist = cv2.distanceTransform(mask8, cv2.DIST_L2, 5)
    # Where a root dips away from the wall, soil veils it; the mask still holds it.
    veil = np.clip(0.8 + 0.5 * _noise(rng, label.shape[0], label.shape[1], 6 * px_per_mm), 0.35, 1.0)
    alpha = mask8.astype(np.float32) * opacity[label] * veil
    sigma = max(0.35 * px_per_mm / 5.9, 0.5)
    alpha = cv2.GaussianBlur(alpha, (0, 0), sigma)  # soft edges
    # Halo pixels just outside a root take the colour of the nearest root (a 3x3 max).
    near = cv2.dilate(label.astype(np.float32), np.ones((3, 3), np.uint8)).astype(np.int64)
    near[mask8 > 0] = label[mask8 > 0]
    sel = np.flatnonzero((alpha > 1e-3) & (near > 0))
    lab = near.ravel()[sel]
    p = np.clip(dist.ravel()[sel] / radius[lab], 0, 1)
    shade = np.sqrt(1 - (1 - p) ** 2)  # a cylinder seen side-on: bright axis, darker flanks
    tex = 1 + 0.08 * rng.standard_normal(len(sel)).astype(np.float32)
    rgb = colors[lab] * ((0.6 + 0.4 * shade) * tex)[:, None]
    a = alpha.ravel()[sel][:, None]
    out = soil.reshape(-1, 3)
    out[sel] = out[sel] * (1 - a) + rgb * a
    return soil


# -- soil -------------------------------------------------------------------------------------

def _noise(rng: np.random.Generator, h: int, w: int, cell_px: float) -> np.ndarray:
    """Smooth noise with unit-ish standard deviation and features about ``cell_px`` wide."""
    import cv2

    cell_px = max(cell_px, 1.0)
    gh, gw = int(math.ceil(h / cell_px)) + 3, int(math.ceil(w / cell_px)) + 3
    small = rng.standard_normal((gh, gw)).astype(np.float32)
    big = cv2.resize(small, (int(round(gw * cell_px)), int(round(gh * cell_px))),
                     interpolation=cv2.INTER_CUBIC)
    oy, ox = int(cell_px), int(cell_px)
    out = big[oy:oy + h, ox:ox + w]
    if out.shape != (h, w):  # tiny cells: fall back to a direct resize
        out = cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)
    sd = float(out[::5, ::5].std())
    return out / sd if sd > 0 else out


def _soil(rng: np.random.Generator, look: Look, h: int, w: int,
          px_per_mm: float) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Soil picture ``(H, W, 3)`` float32 plus a sparse layer of particles in front of roots."""
    import cv2

    base = np.array(look.soil, np.float32) * rng.uniform(0.9, 1.1, 3).astype(np.float32)
    alt = np.array(look.soil_alt, np.float32)
    # Patches where soil touches the wall: a two-scale field cut at a quantile, so edges are
    # irregular and fairly sharp, as in the switchgrass frames.
    patch = 0.8 * _noise(rng, h, w, look.patch_scale_mm * px_per_mm) + \
        0.35 * _noise(rng, h, w, look.patch_scale_mm * px_per_mm / 5)
    thr = float(np.quantile(patch[::7, ::7], 1 - look.patch_fraction))
    patch_w = np.clip((patch - thr) * 6.0, 0, 1)
    mottle = 0.6 * _noise(rng, h, w, 5 * px_per_mm) + 0.4 * _noise(rng, h, w, 1.2 * px_per_mm)
    white = rng.standard_normal((h, w), dtype=np.float32)
    grain: np.ndarray = cv2.GaussianBlur(white, (0, 0), max(0.04 * px_per_mm, 0.5))
    lum = (1 + look.mottle * mottle) * (1 + look.grain * 2.5 * grain)
    img = (base[None, None] + patch_w[..., None] * (alt - base)[None, None]) * lum[..., None]

    layer = np.zeros((h, w, 3), np.float32)
    alpha = np.zeros((h, w), np.float32)
    front_layer = np.zeros((h, w, 3), np.float32)
    front_alpha = np.zeros((h, w), np.float32)
    area_cm2 = h * w / (px_per_mm * 10) ** 2
    for cls in look.particles:
        _draw_particles(rng, cls, int(rng.poisson(cls.per_cm2 * area_cm2)), px_per_mm,
                        layer, alpha, front_layer, front_alpha)
    sigma = max(0.03 * px_per_mm, 0.5)
    cover: np.ndarray = cv2.GaussianBlur(alpha, (0, 0), sigma)[..., None]
    colour: np.ndarray = cv2.GaussianBlur(layer, (0, 0), sigma)
    colour *= (1 + 0.4 * look.grain / 0.05 * grain)[..., None]  # grains are not flat colour
    img = img * (1 - cover) + colour * cover
    return img.astype(np.float32), (front_layer, front_alpha)


def _draw_particles(rng: np.random.Generator, cls: Particles, n: int, px_per_mm: float,
                    layer: np.ndarray, alpha: np.ndarray, front_layer: np.ndarray,
                    front_alpha: np.ndarray) -> None:
    """Irregular polygons (large) or single pixels (small), about 1 in 8 in front of roots."""
    import cv2

    if n == 0:
        return
    h, w = alpha.shape
    # Log-uniform sizes: many fine grains, few large crumbs, as in a sieve analysis.
    lo, hi = cls.size_mm
    radius = np.exp(rng.uniform(math.log(lo), math.log(hi), n)) * px_per_mm / 2
    xs = rng.uniform(0, w, n)
    ys = rng.uniform(0, h, n)
    gains = 1 + cls.jitter * rng.standard_normal(n)
    colors = np.clip(np.array(cls.color)[None] * gains[:, None], 0, 1.2).astype(np.float32)
    front = rng.random(n) < 0.12
    small = radius < 1.0
    # Sub-pixel specks: one pixel each, vectorised.
    if small.any():
        yi = ys[small].astype(int)
        xi = xs[small].astype(int)
        a = (cls.alpha * np.clip(radius[small] * 2, 0.3, 1)).astype(np.float32)
        fr = front[small]
        for lay, alp, sel in ((layer, alpha, ~fr), (front_layer, front_alpha, fr)):
            lay[yi[sel], xi[sel]] = colors[small][sel]
            alp[yi[sel], xi[sel]] = np.maximum(alp[yi[sel], xi[sel]], a[sel])
    idx = np.flatnonzero(~small)
    if len(idx) == 0:
        return
    k = 7
    ang = np.sort(rng.uniform(0, 2 * np.pi, (len(idx), k)), axis=1)
    rad = radius[idx, None] * rng.uniform(0.6, 1.25, (len(idx), k))
    aspect = rng.uniform(0.5, 1.0, (len(idx), 1))
    rot = rng.uniform(0, np.pi, (len(idx), 1))
    px = rad * np.cos(ang)
    py = rad * np.sin(ang) * aspect
    cx = xs[idx, None] + px * np.cos(rot) - py * np.sin(rot)
    cy = ys[idx, None] + px * np.sin(rot) + py * np.cos(rot)
    polys = np.round(np.stack([cx, cy], axis=2) * 16).astype(np.int32)
    for j, i in enumerate(idx):
        lay, alp = (front_layer, front_alpha) if front[i] else (layer, alpha)
        c = colors[i]
        cv2.fillConvexPoly(lay, polys[j], (float(c[0]), float(c[1]), float(c[2])),
                           cv2.LINE_8, 4)
        cv2.fillConvexPoly(alp, polys[j], float(cls.alpha), cv2.LINE_8, 4)


# -- tube wall and camera ---------------------------------------------------------------------

def _soil_box(rng: np.random.Generator, look: Look, w: int, h: int) -> tuple[int, int, int, int]:
    """Columns where soil is visible; dark wall margins (if any) lie outside."""
    x0, x1 = 0, w
    if rng.random() < look.margin_prob:
        if rng.random() < 0.85:
            x0 = int(round(w * rng.uniform(0.04, 0.18)))
        if rng.random() < 0.85:
            x1 = w - int(round(w * rng.uniform(0.04, 0.18)))
    return (x0, 0, x1, h)


def _tube_wall(wall_rng: np.random.Generator, rng: np.random.Generator, look: Look,
               img: np.ndarray, front: tuple[np.ndarray, np.ndarray],
               box: tuple[int, int, int, int], px_per_mm: float, dpi: float) -> np.ndarray:
    """Everything between the soil and the sensor, then the sensor itself.

    Scratches, droplets and light are folded into one per-pixel affine map
    ``img * gain + offset`` (2-D maps, one pass over the 3-channel image) because at
    2550 x 2273 px every full-image float pass costs tens of milliseconds.
    """
    import cv2

    h, w = img.shape[:2]
    f_layer, f_alpha = front
    if f_alpha.any():  # soil crumbs in front of the roots
        sig = max(0.03 * px_per_mm, 0.5)
        fa = cv2.GaussianBlur(f_alpha, (0, 0), sig)
        fl = cv2.GaussianBlur(f_layer, (0, 0), sig)
        sel = np.flatnonzero(fa > 1e-3)
        a = fa.ravel()[sel][:, None]
        flat = img.reshape(-1, 3)
        flat[sel] = flat[sel] * (1 - a) + fl.reshape(-1, 3)[sel] * a

    gain = np.ones((h, w), np.float32)
    offset = np.zeros((h, w), np.float32)
    # Scratches belong to the tube (scene stream): long, thin, faint, mostly along the tube.
    for _ in range(int(wall_rng.integers(look.scratches[0], look.scratches[1] + 1))):
        n = 12
        x = wall_rng.uniform(0, w) + np.cumsum(wall_rng.normal(0, 0.01 * w, n))
        if wall_rng.random() < 0.7:
            y = np.linspace(wall_rng.uniform(-0.2, 0.5) * h, wall_rng.uniform(0.5, 1.2) * h, n)
        else:
            y = wall_rng.uniform(0, h) + np.cumsum(wall_rng.normal(0, 0.02 * h, n))
            x = np.linspace(wall_rng.uniform(-0.2, 0.5) * w, wall_rng.uniform(0.5, 1.2) * w, n)
        pts = np.round(np.stack([x, y], 1) * 16).astype(np.int32)
        cv2.polylines(offset, [pts], False, float(wall_rng.uniform(0.05, 0.2)), 1,
                      cv2.LINE_AA, 4)

    # Condensation: droplets brighten inside, darken at the rim, carry a specular dot.
    area_dm2 = h * w / (px_per_mm * 100) ** 2
    n_drop = int(rng.poisson(look.droplets_per_dm2 * area_dm2 * rng.uniform(0.2, 2.0)))
    if n_drop:
        fill = np.zeros((h, w), np.float32)
        rim = np.zeros((h, w), np.float32)
        spec = np.zeros((h, w), np.float32)
        for _ in range(n_drop):
            c = (int(rng.uniform(0, w) * 16), int(rng.uniform(0, h) * 16))
            r = rng.lognormal(math.log(0.8), 0.6) * px_per_mm
            ax = (int(r * 16), int(r * rng.uniform(0.6, 1.0) * 16))
            ang = float(rng.uniform(0, 180))
            cv2.ellipse(fill, c, ax, ang, 0, 360, 1.0, -1, cv2.LINE_AA, 4)
            cv2.ellipse(rim, c, ax, ang, 0, 360, 1.0, max(1, int(r * 0.15)), cv2.LINE_AA, 4)
            sc = (c[0] - int(ax[0] * 0.35), c[1] - int(ax[1] * 0.35))
            cv2.circle(spec, sc, max(8, int(r * 0.15 * 16)), 1.0, -1, cv2.LINE_AA, 4)
        k = (1 - 0.12 * fill) * (1 - 0.35 * rim)
        offset = offset * k + 0.1 * fill * (1 - 0.35 * rim) + 0.6 * spec
        gain *= k

    # Light: session gain, glare blob (screen blend), haze, vignetting. These are smooth, so
    # they are computed on a coarse grid and resized.
    sh, sw = max(h // 8, 8), max(w // 8, 8)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    yy, xx = (yy + 0.5) * h / sh, (xx + 0.5) * w / sw
    g = np.zeros((sh, sw), np.float32)
    if look.glare > 0:
        gx, gy = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h
        gs = rng.uniform(0.15, 0.4) * min(h, w)
        g = look.glare * rng.uniform(0.3, 1.0) * np.exp(-((xx - gx) ** 2 + (yy - gy) ** 2)
                                                          / (2 * gs * gs))
    r2 = ((xx - w / 2) / (w / 2)) ** 2 + ((yy - h / 2) / (h / 2)) ** 2
    vig = 1 - rng.uniform(0.05, 0.25) * r2 / 2
    hz = look.haze
    light_gain = cv2.resize(((1 - g) * (1 - hz) * vig).astype(np.float32), (w, h),
                            interpolation=cv2.INTER_LINEAR)
    light_off = cv2.resize(((g * (1 - hz) + 0.75 * hz) * vig).astype(np.float32), (w, h),
                           interpolation=cv2.INTER_LINEAR)
    session_gain = float(rng.uniform(0.85, 1.15))
    cast = rng.uniform(0.97, 1.03, 3).astype(np.float32)
    gain = gain * light_gain * session_gain
    offset = offset * light_gain * session_gain + light_off
    img *= gain[..., None]
    img *= cast[None, None]
    img += offset[..., None]

    _paint_margins(wall_rng, img, box)

    # Optical blur is a camera property in pixels; low-dpi renders stand for downscaled scans,
    # which are sharper per pixel, hence the scale below 300 dpi.
    sigma = look.blur_px * min(dpi / 300.0, 1.0)
    if sigma > 0.3:
        img = cv2.GaussianBlur(img, (0, 0), sigma)
    # Sensor noise: one Gaussian plane, rolled to decorrelate the channels (a third of the
    # random draws of a full (H, W, 3) field, indistinguishable at this amplitude).
    noise = rng.standard_normal((h, w), dtype=np.float32) * np.float32(look.noise)
    img[..., 0] += noise
    img[..., 1] += np.roll(noise, (h // 3, w // 3), axis=(0, 1))
    img[..., 2] += np.roll(noise, (2 * h // 3, w // 5), axis=(0, 1))
    if look.speckle_per_mpx > 0:
        n = int(rng.poisson(look.speckle_per_mpx * h * w / 1e6))
        ys, xs = rng.integers(0, h, n), rng.integers(0, w, n)
        palette = np.array([[0.3, 0.9, 0.3], [0.85, 0.4, 0.9], [0.9, 0.9, 0.9]], np.float32)
        strength = rng.uniform(0.2, 0.8, (n, 1)).astype(np.float32)
        img[ys, xs] = img[ys, xs] * (1 - strength) + strength * palette[rng.integers(0, 3, n)]
    np.clip(img, 0.0, 1.0, out=img)
    img *= 255.0
    img += 0.5
    return img.astype(np.uint8)


def _paint_margins(rng: np.random.Generator, img: np.ndarray,
                   box: tuple[int, int, int, int]) -> None:
    """Dark tube-wall strips outside the soil box, with wavy reflections and a tape edge."""
    import cv2

    h, w = img.shape[:2]
    x0, _, x1, _ = box
    for lo, hi, edge in ((0, x0, x0), (x1, w, x1)):
        if hi <= lo:
            continue
        strip = np.empty((h, hi - lo, 3), np.float32)
        strip[:] = np.array([0.05, 0.065, 0.065], np.float32) * rng.uniform(0.7, 1.3)
        for _ in range(int(rng.integers(2, 8))):
            n = 10
            x = rng.uniform(0, hi - lo) + np.cumsum(rng.normal(0, 0.01 * w, n))
            y = np.linspace(0, h, n)
            pts = np.round(np.stack([x, y], 1) * 16).astype(np.int32)
            v = float(rng.uniform(0.05, 0.15))
            cv2.polylines(strip, [pts], False, (v, v, v), 1, cv2.LINE_AA, 4)
        if rng.random() < 0.5:  # bright tape/edge reflection right at the soil boundary
            width = max(2, int(0.012 * w))
            if edge == x0:
                strip[:, -width:] = 0.8
            else:
                strip[:, :width] = 0.8
        img[:, lo:hi] = strip
