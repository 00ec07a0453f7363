"""Synthetic minirhizotron archive with exact ground truth.

* ``config.py``  :class:`SynthConfig` and size presets (``tiny``, ``small``, ``ci600``)
* ``looks.py``   soil/root/camera looks (``loam``, ``sand``, ``clay``) as data
* ``roots.py``   root-system geometry in mm: growth over a season, clipping, tube drawing
* ``render.py``  :func:`generate_image` -> :class:`SynthImage` (image, mask, per-root truth)
* ``archive.py`` :func:`generate_archive` -> images, masks, ``ground_truth.parquet``,
  ``roots.parquet``, ``experiment.yaml`` and ``synth_config.yaml`` on any fsspec URI

Names are resolved lazily so that importing the CLI does not pull in OpenCV.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rootflow.synth.archive import SynthArchive, archive_entries, generate_archive
    from rootflow.synth.config import PRESETS, SynthConfig
    from rootflow.synth.looks import LOOKS
    from rootflow.synth.render import RootGT, SynthImage, generate_image, rasterize

_EXPORTS = {
    "SynthConfig": "config", "PRESETS": "config", "LOOKS": "looks",
    "RootGT": "render", "SynthImage": "render", "generate_image": "render", "rasterize": "render",
    "SynthArchive": "archive", "generate_archive": "archive", "archive_entries": "archive",
}

__all__ = [
    "LOOKS", "PRESETS", "RootGT", "SynthArchive", "SynthConfig", "SynthImage",
    "archive_entries", "generate_archive", "generate_image", "rasterize",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        module = importlib.import_module(f"rootflow.synth.{_EXPORTS[name]}")
        return getattr(module, name)
    raise AttributeError(f"module 'rootflow.synth' has no attribute {name!r}")
