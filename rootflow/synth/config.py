"""Typed configuration of the synthetic archive, with size presets.

One frozen dataclass drives both :func:`~rootflow.synth.render.generate_image` and
:func:`~rootflow.synth.archive.generate_archive`; it round-trips through
:mod:`rootflow.config` (YAML + ``key=value`` overrides) and is written next to every archive.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from rootflow.synth.looks import LOOKS

LookName = Literal["loam", "sand", "clay"]
PresetName = Literal["tiny", "small", "ci600", "bartz"]

#: Image geometry presets. ``small`` is the default (same field of view as ``ci600`` would be
#: too coarse at 75 dpi for thin roots, so it is a 108 x 95 mm window at 150 dpi); ``ci600`` is
#: the CID CI-600 in-situ root imager's 216 x 192 mm scan at 300 dpi (2550 x 2273 px, as the
#: SegRoot soybean images); ``bartz`` is a Bartz BTC-100 frame (18 x 13.5 mm at 640 x 480 px,
#: ~900 dpi, like the PRMI peanut frames); ``tiny`` is for unit tests.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"height": 224, "width": 256, "dpi": 150.0},
    "small": {"height": 560, "width": 640, "dpi": 150.0},
    "ci600": {"height": 2273, "width": 2550, "dpi": 300.0},
    "bartz": {"height": 480, "width": 640, "dpi": 903.0},
}


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a synthetic archive (same config + seed = same bytes).

    Attributes:
        seed: root of every derived seed (scenes and images draw independent streams from it).
        height, width, dpi: image geometry; one pixel is ``25.4 / dpi`` mm.
        look: soil/camera look, see :mod:`rootflow.synth.looks`.
        experiment, operator: written into the Bartz/ICAP file names.
        n_years, n_tubes, n_windows, n_sessions: archive grid (images = the product, or
            ``n_images`` if smaller: the grid is walked year, tube, window, session so a
            truncated archive still holds whole time series of a window).
        n_images: optional cap on the number of images.
        first_year: calendar year of the first season.
        empty_fraction: probability that a window gets no roots all season. Early sessions
            of deep windows are also empty because roots have not reached them yet, so the
            share of empty images in an archive is at least this.
        roots_per_dm2: primary roots per 100 cm2 (before the depth decay).
        branching: multiplier on lateral branching rates.
        min_width_px: floor on drawn root diameter in pixels, so thin roots exist in the mask.
        first_session_day, session_interval_days: days after sowing of session 1, and between
            sessions.
        root_front_mm_per_day: speed of the rooting front down the profile: a window at depth
            ``d`` sees its first primaries after ``d / speed`` days.
        depth_decay_cm: root density falls as ``exp(-depth_cm / depth_decay_cm)``.
        frame_height_mm: (derived) image height in mm, written to ``experiment.yaml``.
        insertion_angle_deg, surface_window, surface_offset_cm, depth_band_cm: tube
            installation, written to ``experiment.yaml`` and used for depth.
        species, treatment: written to ``experiment.yaml``.
        jpeg_quality: JPEG quality of the written images.
    """

    seed: int = 0
    height: int = 560
    width: int = 640
    dpi: float = 150.0
    look: str = "loam"
    experiment: str = "SYNTH"
    operator: str = "RF"
    n_years: int = 1
    n_tubes: int = 2
    n_windows: int = 3
    n_sessions: int = 3
    n_images: int | None = None
    first_year: int = 2021
    empty_fraction: float = 0.15
    roots_per_dm2: float = 3.0
    branching: float = 1.0
    min_width_px: float = 2.0
    first_session_day: float = 28.0
    session_interval_days: float = 14.0
    root_front_mm_per_day: float = 15.0
    depth_decay_cm: float = 60.0
    insertion_angle_deg: float = 45.0
    surface_window: int = 1
    surface_offset_cm: float = 0.0
    depth_band_cm: float = 10.0
    species: str | None = "maize"
    treatment: str | None = None
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.look not in LOOKS:
            raise ValueError(f"unknown look {self.look!r}; valid: {sorted(LOOKS)}")
        if min(self.height, self.width) < 32:
            raise ValueError(f"image too small ({self.width}x{self.height}); need >= 32 px")
        if self.dpi <= 0:
            raise ValueError(f"dpi must be positive, got {self.dpi}")
        if not 0.0 <= self.empty_fraction <= 1.0:
            raise ValueError(f"empty_fraction must be in [0, 1], got {self.empty_fraction}")
        for name in ("n_years", "n_tubes", "n_windows", "n_sessions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.n_images is not None and self.n_images < 0:
            raise ValueError("n_images must be >= 0")
        if not self.experiment or not all(c.isalnum() or c in ".-" for c in self.experiment):
            raise ValueError(f"experiment {self.experiment!r}: use letters, digits, '.', '-'")
        if not self.operator.isalnum():
            raise ValueError(f"operator {self.operator!r}: use letters and digits")

    @property
    def mm_per_px(self) -> float:
        return 25.4 / self.dpi

    @property
    def frame_height_mm(self) -> float:
        return self.height * self.mm_per_px

    @property
    def frame_width_mm(self) -> float:
        return self.width * self.mm_per_px

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SynthConfig:
        """A config from a size preset (``tiny``, ``small``, ``ci600``, ``bartz``) + overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; valid: {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def depth_cm(self, window: int) -> float:
        """Vertical depth of a window's centre (the formula LAKE applies to ``experiment.yaml``)."""
        import math

        along_mm = (window - self.surface_window) * self.frame_height_mm + self.frame_height_mm / 2
        return along_mm / 10 * math.sin(math.radians(self.insertion_angle_deg)) + \
            self.surface_offset_cm
