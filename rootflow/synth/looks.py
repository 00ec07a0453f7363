"""Looks: soil palette, texture, root colour and camera character, as data.

A look is what changes between field sites and cameras while the roots stay roots, so that
RootQuant can be pre-trained on one look and fine-tuned on another (domain shift). Three looks
are modelled on the real images in ``shared/data/real``:

* ``loam``: dark red-brown soil full of bright mineral specks and reddish aggregates, thin tan
  roots of low contrast, black tube-wall margins (CI-600 soybean scans, SegRoot).
* ``sand``: pale grey hazy soil, soft focus, coloured sensor speckle, bright white roots of high
  contrast, strong glare (BTC-100 peanut frames, PRMI).
* ``clay``: dark blue-grey soil with brown blotches where soil touches the tube, pale beige
  roots (switchgrass frames, PRMI).

Colours are linear-ish RGB in [0, 1]; sizes are millimetres so looks hold at any dpi, except
camera properties (blur, speckle), which live in pixels.
"""

from __future__ import annotations

import dataclasses

RGB = tuple[float, float, float]


@dataclasses.dataclass(frozen=True)
class Particles:
    """One class of soil particle: colour, size range (mm), density (per cm2), opacity."""

    color: RGB
    size_mm: tuple[float, float]
    per_cm2: float
    alpha: float = 1.0
    jitter: float = 0.15  # per-particle brightness jitter (fraction)


@dataclasses.dataclass(frozen=True)
class Look:
    """Everything that makes a site/camera look the way it does."""

    name: str
    soil: RGB                          # base soil colour
    soil_alt: RGB                      # second soil colour for blotches/patches
    patch_fraction: float              # share of the frame covered by ``soil_alt`` patches
    patch_scale_mm: float              # size of those patches
    mottle: float                      # amplitude of low-frequency brightness variation
    grain: float                       # amplitude of per-pixel grain
    particles: tuple[Particles, ...]
    root: RGB                          # mature root colour
    root_young: RGB                    # young (tip/lateral) root colour
    root_alpha: tuple[float, float]    # opacity range of roots (contrast)
    blur_px: float                     # optical softness, Gaussian sigma in pixels at >= 300 dpi
    haze: float                        # additive milky veil (0..1)
    glare: float                       # strength of the specular glare blob
    noise: float                       # Gaussian sensor noise sd
    speckle_per_mpx: float             # coloured impulse noise per megapixel (cheap CCDs)
    margin_prob: float                 # probability of dark tube-wall margins left/right
    droplets_per_dm2: float            # condensation droplets on the tube
    scratches: tuple[int, int]         # number of scratches per frame (min, max)


LOOKS: dict[str, Look] = {
    "loam": Look(
        name="loam",
        soil=(0.17, 0.13, 0.115), soil_alt=(0.13, 0.105, 0.10),
        patch_fraction=0.25, patch_scale_mm=25.0, mottle=0.10, grain=0.06,
        particles=(
            Particles((0.43, 0.24, 0.19), (0.15, 1.6), 28.0, 0.7),     # red aggregates
            Particles((0.27, 0.18, 0.15), (0.2, 2.5), 30.0, 0.45),     # brown crumbs
            Particles((0.88, 0.86, 0.78), (0.05, 0.4), 45.0, 0.9),     # bright mineral specks
            Particles((0.05, 0.04, 0.04), (0.15, 0.9), 14.0, 0.7),     # dark pores
            Particles((0.50, 0.47, 0.44), (0.12, 0.6), 8.0, 0.7),      # grey grit
        ),
        root=(0.43, 0.30, 0.19), root_young=(0.62, 0.50, 0.36), root_alpha=(0.5, 0.85),
        blur_px=0.8, haze=0.0, glare=0.12, noise=0.012, speckle_per_mpx=0.0,
        margin_prob=0.6, droplets_per_dm2=3.0, scratches=(0, 4),
    ),
    "sand": Look(
        name="sand",
        soil=(0.44, 0.47, 0.46), soil_alt=(0.38, 0.40, 0.39),
        patch_fraction=0.35, patch_scale_mm=15.0, mottle=0.12, grain=0.07,
        particles=(
            Particles((0.62, 0.63, 0.60), (0.15, 0.6), 12.0, 0.6),     # pale quartz grains
            Particles((0.30, 0.31, 0.30), (0.15, 0.6), 8.0, 0.5),      # dark grains
            Particles((0.80, 0.80, 0.78), (0.05, 0.2), 10.0, 0.8),     # glints
        ),
        root=(0.90, 0.90, 0.84), root_young=(0.97, 0.97, 0.93), root_alpha=(0.75, 1.0),
        blur_px=1.6, haze=0.10, glare=0.35, noise=0.025, speckle_per_mpx=20000.0,
        margin_prob=0.0, droplets_per_dm2=6.0, scratches=(0, 2),
    ),
    "clay": Look(
        name="clay",
        soil=(0.20, 0.21, 0.23), soil_alt=(0.19, 0.15, 0.11),
        patch_fraction=0.4, patch_scale_mm=30.0, mottle=0.15, grain=0.035,
        particles=(
            Particles((0.30, 0.30, 0.31), (0.3, 2.5), 2.0, 0.5),       # grey clods
            Particles((0.10, 0.09, 0.09), (0.2, 1.2), 2.5, 0.6),       # dark voids
            Particles((0.55, 0.52, 0.48), (0.08, 0.3), 2.0, 0.7),      # silt specks
        ),
        root=(0.74, 0.66, 0.55), root_young=(0.86, 0.80, 0.70), root_alpha=(0.7, 0.95),
        blur_px=1.2, haze=0.02, glare=0.1, noise=0.015, speckle_per_mpx=0.0,
        margin_prob=0.0, droplets_per_dm2=1.5, scratches=(1, 5),
    ),
}


def get_look(name: str) -> Look:
    """The look called ``name``; unknown names fail listing the valid ones."""
    try:
        return LOOKS[name]
    except KeyError:
        raise ValueError(f"unknown look {name!r}; valid: {sorted(LOOKS)}") from None
