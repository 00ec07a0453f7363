"""Tiling + stitching: a per-pixel stand-in model gives exactly the untiled output."""

from __future__ import annotations

import numpy as np
import pytest

from rootflow.inference.tiling import (
    Stitcher,
    apply_tiled,
    extract_tiles,
    make_grid,
    stitch,
)


def _per_pixel(tiles: np.ndarray) -> np.ndarray:
    """A stand-in 'model': any per-pixel function of the RGB values."""
    x = tiles.astype(np.float32) / 255.0
    return np.sin(3 * x[..., 0]) + x[..., 1] * x[..., 2] - 0.25


@pytest.mark.parametrize("hw", [(101, 157), (64, 64), (37, 20), (1, 1), (130, 67), (255, 513)])
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_stitched_equals_untiled_for_per_pixel_function(hw, kind):
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    img = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    got = apply_tiled(_per_pixel, img, tile=64, overlap=16, batch_size=3, kind=kind)
    assert got.shape == hw
    np.testing.assert_allclose(got, _per_pixel(img[None])[0], rtol=0, atol=1e-5)


def test_grid_covers_image_with_minimum_overlap_and_clamped_last_tile():
    g = make_grid(2273, 2550, tile=1024)
    assert g.overlap == 128
    assert g.xs == (0, 896, 1526) and g.ys == (0, 896, 1249)
    assert len(g) == 9
    for starts, length in ((g.xs, g.width), (g.ys, g.height)):
        assert starts[0] == 0 and starts[-1] + g.tile == length
        assert all(b - a <= g.tile - g.overlap for a, b in zip(starts, starts[1:], strict=False))


def test_small_image_is_one_padded_tile():
    g = make_grid(20, 30, tile=64, overlap=8)
    assert len(g) == 1
    tiles = extract_tiles(np.full((20, 30, 3), 7, np.uint8), g)
    assert tiles.shape == (1, 64, 64, 3)
    assert (tiles[0, :20, :30] == 7).all() and (tiles[0, 20:] == 0).all()
    w = g.weights(0)
    assert (w[:20, :30] == 1).all() and (w[20:] == 0).all() and (w[:, 30:] == 0).all()


def test_weights_are_one_on_borders_and_fall_at_inner_edges():
    g = make_grid(200, 200, tile=128, overlap=56)
    w0 = g.weights(0)
    assert w0[0, 0] == 1 and w0[0, 60] == 1       # image border: no ramp
    assert w0[0, 127] < 0.01 and w0[127, 0] < 0.01  # inner edges: ~0
    # every pixel has positive total weight
    total = np.zeros((200, 200))
    for k, (y0, x0) in enumerate(g.origins()):
        total[y0:y0 + 128, x0:x0 + 128] += g.weights(k)
    assert total.min() > 0.5


def test_seam_free_blend_of_disagreeing_tiles_is_smooth():
    """Tiles that disagree (constant 0 vs 1) blend without a jump at the tile edge."""
    g = make_grid(64, 112, tile=64, overlap=16)
    vals = np.stack([np.full((64, 64), float(k)) for k in range(len(g))])
    out = stitch(vals, g)
    row = out[10]
    assert row[0] == 0 and row[-1] == 1
    assert np.abs(np.diff(row)).max() < 0.2  # a hard seam would jump by 1


def test_channels_and_errors():
    g = make_grid(50, 70, tile=32, overlap=8)
    vals = np.random.default_rng(0).random((len(g), 2, 32, 32))
    st = Stitcher(g, channels=2)
    for k in range(len(g) - 1):
        st.add(k, vals[k])
    with pytest.raises(ValueError, match="never added"):
        st.result()
    st.add(len(g) - 1, vals[-1])
    assert st.result().shape == (2, 50, 70)
    with pytest.raises(ValueError, match="overlap"):
        make_grid(10, 10, tile=8, overlap=8)
    with pytest.raises(ValueError, match="grid"):
        extract_tiles(np.zeros((5, 5)), g)


def test_tiles_containing():
    g = make_grid(100, 100, tile=64, overlap=28)  # starts 0, 36
    assert g.tiles_containing(10, 10) == [0]
    assert sorted(g.tiles_containing(50, 50)) == [0, 1, 2, 3]
    assert g.tiles_containing(99, 5) == [1]
