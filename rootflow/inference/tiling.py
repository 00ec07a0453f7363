"""Tiling whole tube scans into model-size squares and stitching per-tile logits back.

Why tile at all: SAM2 takes a fixed square input (1024 px). Resizing a 2550 x 2273 scan down to
1024 would shrink a 4-px-wide fine root to under 2 px and lose it; tiling keeps native
resolution.

Why the overlap: a pixel near a tile edge is predicted with only part of its surroundings (the
encoder sees padding or nothing beyond the edge, Hiera's windowed attention and the decoder's
upsampling convs are truncated there), so edge predictions are the least reliable. Tiles
therefore overlap by at least the decoder's *useful context* (by default ``tile // 8``: 128 px
at 1024, i.e. two cells of the 64 x 64 embedding grid plus the upsampling convs' reach), and
the stitch weights fall smoothly to ~0 at inner tile edges (a raised-cosine ramp across the
overlap) so each pixel is decided mostly by the tile that sees it best and seams do not show.
Along the image border there is no neighbour, so the weight stays 1 there.

Stitching is a normalised weighted sum: ``out = sum_t w_t * v_t / sum_t w_t``. For a per-pixel
function the tiles agree wherever they overlap, so the blend returns exactly the untiled result
(up to float rounding); the tests check that, including odd sizes and images smaller than a
tile (padded, then cropped). Placement is deterministic: tiles start every ``tile - overlap``
pixels and the last one is clamped to end at the border (RootPainter's ``get_tiles``), so no
tile is mostly padding unless the image is smaller than a tile.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Literal

import numpy as np

BlendKind = Literal["cosine", "linear"]


def default_overlap(tile: int) -> int:
    """Overlap used when none is given: ``tile // 8`` (128 px for SAM2's 1024 px input)."""
    return max(1, tile // 8)


def _starts(length: int, tile: int, overlap: int) -> tuple[int, ...]:
    if length <= tile:
        return (0,)
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    return tuple(min(i * stride, length - tile) for i in range(n))


@dataclasses.dataclass(frozen=True)
class TileGrid:
    """Where the tiles of one ``(height, width)`` image sit.

    Attributes:
        height, width: image size in px.
        tile: tile side in px (the model input size).
        overlap: minimum overlap between neighbouring tiles in px.
        ys, xs: top-left corners along each axis; tiles are the product ``ys x xs`` (row-major).
    """

    height: int
    width: int
    tile: int
    overlap: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def origins(self) -> list[tuple[int, int]]:
        """``(y0, x0)`` of every tile, row-major."""
        return [(y, x) for y in self.ys for x in self.xs]

    def tiles_containing(self, x: float, y: float) -> list[int]:
        """Indices of the tiles whose image-covered area contains point ``(x, y)``."""
        return [i for i, (y0, x0) in enumerate(self.origins())
                if y0 <= y < min(y0 + self.tile, self.height)
                and x0 <= x < min(x0 + self.tile, self.width)]

    def weights(self, index: int, *, kind: BlendKind = "cosine") -> np.ndarray:
        """float32 ``(tile, tile)`` stitch weights of tile ``index`` (separable ramps).

        A side gets a ramp only where a neighbouring tile overlaps it, so border pixels keep
        weight 1 and every image pixel has a positive total weight.
        """
        iy, ix = divmod(index, len(self.xs))
        wy = _ramp_1d(self.ys, iy, self.tile, self.height, kind)
        wx = _ramp_1d(self.xs, ix, self.tile, self.width, kind)
        return np.outer(wy, wx).astype(np.float32)


def make_grid(height: int, width: int, *, tile: int, overlap: int | None = None) -> TileGrid:
    """Tile an image of ``(height, width)`` px with squares of ``tile`` px.

    Args:
        height, width: image size.
        tile: side of a tile (the model's input size).
        overlap: minimum overlap in px (default :func:`default_overlap`); must be < tile.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least 1x1, got {height}x{width}")
    ov = default_overlap(tile) if overlap is None else int(overlap)
    if not 0 <= ov < tile:
        raise ValueError(f"overlap must be in [0, tile={tile}), got {ov}")
    return TileGrid(height, width, tile, ov, _starts(height, tile, ov), _starts(width, tile, ov))


def _ramp_1d(starts: tuple[int, ...], i: int, tile: int, length: int, kind: BlendKind) -> np.ndarray:
    w = np.ones(tile, np.float64)
    pos = np.arange(tile, dtype=np.float64) + 0.5
    start = starts[i]
    if i > 0:  # neighbour before: ramp up across the shared band
        band = starts[i - 1] + tile - start
        w = np.minimum(w, _profile(pos / band, kind))
    if i < len(starts) - 1:  # neighbour after
        band = start + tile - starts[i + 1]
        w = np.minimum(w, _profile((tile - pos) / band, kind))
    # pixels past the image (padding of a tile larger than the image) never count
    w[max(0, length - start):] = 0.0
    return w


def _profile(t: np.ndarray, kind: BlendKind) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    if kind == "cosine":
        return 0.5 - 0.5 * np.cos(np.pi * t)
    if kind == "linear":
        return t
    raise ValueError(f"unknown blend kind {kind!r}; valid: 'cosine', 'linear'")


def extract_tiles(image: np.ndarray, grid: TileGrid, *, pad_value: float = 0) -> np.ndarray:
    """Cut ``(H, W, ...)`` ``image`` into ``(T, tile, tile, ...)`` tiles (padding past the border).

    Padding only happens when the image is smaller than a tile along an axis; its value is
    ``pad_value`` (0 = black, like the dark margins of minirhizotron frames).
    """
    h, w = image.shape[:2]
    if (h, w) != (grid.height, grid.width):
        raise ValueError(f"image is {w}x{h} but the grid is for {grid.width}x{grid.height}")
    t = grid.tile
    out = np.full((len(grid), t, t, *image.shape[2:]), pad_value, dtype=image.dtype)
    for k, (y0, x0) in enumerate(grid.origins()):
        patch = image[y0:y0 + t, x0:x0 + t]
        out[k, :patch.shape[0], :patch.shape[1]] = patch
    return out


class Stitcher:
    """Accumulates weighted tile values into a full-image array (tiles may come in any order).

    ``values`` per tile are ``(tile, tile)`` or ``(C, tile, tile)``; :meth:`result` returns
    ``(H, W)`` or ``(C, H, W)`` float32.
    """

    def __init__(self, grid: TileGrid, *, channels: int | None = None,
                 kind: BlendKind = "cosine") -> None:
        self.grid = grid
        self.kind = kind
        shape = (grid.height, grid.width) if channels is None else (channels, grid.height,
                                                                   grid.width)
        self._acc = np.zeros(shape, np.float64)
        self._wsum = np.zeros((grid.height, grid.width), np.float64)
        self._origins = grid.origins()
        self._seen: set[int] = set()

    def add(self, index: int, values: np.ndarray) -> None:
        y0, x0 = self._origins[index]
        h = min(self.grid.tile, self.grid.height - y0)
        w = min(self.grid.tile, self.grid.width - x0)
        wt = self.grid.weights(index, kind=self.kind)[:h, :w]
        v = np.asarray(values, dtype=np.float64)[..., :h, :w]
        self._acc[..., y0:y0 + h, x0:x0 + w] += v * wt
        self._wsum[y0:y0 + h, x0:x0 + w] += wt
        self._seen.add(index)

    def result(self) -> np.ndarray:
        if len(self._seen) != len(self.grid):
            missing = sorted(set(range(len(self.grid))) - self._seen)
            raise ValueError(f"tiles {missing[:10]} were never added")
        return (self._acc / self._wsum).astype(np.float32)


def stitch(values: np.ndarray, grid: TileGrid, *, kind: BlendKind = "cosine") -> np.ndarray:
    """Blend ``(T, [C,] tile, tile)`` per-tile values into ``([C,] H, W)`` float32."""
    if len(values) != len(grid):
        raise ValueError(f"got {len(values)} tiles for a grid of {len(grid)}")
    st = Stitcher(grid, channels=values.shape[1] if values.ndim == 4 else None, kind=kind)
    for k, v in enumerate(values):
        st.add(k, v)
    return st.result()


def apply_tiled(
    fn: Callable[[np.ndarray], np.ndarray],
    image: np.ndarray,
    *,
    tile: int,
    overlap: int | None = None,
    batch_size: int = 4,
    kind: BlendKind = "cosine",
) -> np.ndarray:
    """Run ``fn`` (tiles ``(B, tile, tile, C)`` -> ``(B, tile, tile)``) over ``image``, stitched.

    The generic form of what the RootSAM predictor does; also what the seam tests use.
    """
    grid = make_grid(image.shape[0], image.shape[1], tile=tile, overlap=overlap)
    tiles = extract_tiles(image, grid)
    st = Stitcher(grid, kind=kind)
    for b0 in range(0, len(tiles), batch_size):
        out = fn(tiles[b0:b0 + batch_size])
        for k, v in enumerate(out):
            st.add(b0 + k, v)
    return st.result()
