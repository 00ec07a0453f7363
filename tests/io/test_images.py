"""Decoding the bad-input corpus image by image (no Ray): right pixels or a clear reason."""

from __future__ import annotations

import numpy as np
import pytest

from rootflow.io import images
from rootflow.traits.binary import MaskError
from tests.reliability import _corpus as corpus

IMG, MASK = corpus.base_image()
DECODABLE = [k for k in corpus.KINDS if k.image is not None]


@pytest.mark.parametrize("kind", DECODABLE, ids=lambda k: k.name)
def test_corpus_kind_decodes_or_is_refused_with_its_reason(kind: corpus.Kind) -> None:
    """Guards against an unusual-but-valid image decoded wrongly (wrong colours, orientation,
    bit depth scaling) and against a broken one decoded into garbage instead of refused."""
    outcome, stage, words = corpus.expected(kind)
    data = kind.image(IMG, MASK)  # type: ignore[misc]
    if stage == "decode":
        with pytest.raises(images.ImageDecodeError) as e:
            images.decode(data)
        assert words.lower() in str(e.value).lower()
        assert "\n" not in str(e.value)
        return
    rgb, bits = images.decode(data)
    assert rgb.dtype == np.uint8 and rgb.shape == IMG.shape
    want = np.repeat(IMG[..., :1], 3, axis=2) if kind.grey else IMG
    err = float(np.abs(rgb.astype(np.int16) - want).mean())
    assert err <= kind.max_err, (kind.name, err)
    if kind.mask is None or outcome != "ok":
        return
    mask = images.decode_mask(kind.mask(IMG, MASK))
    assert mask.dtype == bool and mask.shape == MASK.shape


def test_bomb_is_refused_from_the_header_alone() -> None:
    """Guards against decoding a decompression bomb (a 100-byte file declaring 2.5 Gpx):
    the refusal names the limit and happens before any pixel buffer is allocated."""
    import tracemalloc

    data = corpus.bomb_png()
    assert len(data) < 10_000
    tracemalloc.start()
    with pytest.raises(images.ImageDecodeError, match="limit"):
        images.decode(data)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 50 * 2**20  # nowhere near the 2.5 GB the pixels would take
    # The same header check on a TIFF (tifffile reads only the IFD).
    small = corpus._tiff_bytes(IMG)
    with pytest.raises(images.ImageDecodeError, match="limit"):
        images.check_declared_size(small, max_pixels=100)


def test_exif_orientation_is_applied() -> None:
    """Guards against ignoring EXIF orientation: a camera's rotated JPEG would come out
    sideways, and its (upright) mask would then be refused as the wrong size."""
    data = corpus._exif_rotated_jpeg(IMG)
    rgb, _ = images.decode(data)
    assert rgb.shape == IMG.shape
    assert np.abs(rgb.astype(int) - IMG).mean() < 8
    for o in range(1, 9):  # every orientation maps back to the same upright content shape
        arr = np.arange(6).reshape(2, 3)
        out = images.apply_orientation(arr, o)
        assert out.shape == ((2, 3) if o <= 4 else (3, 2))
    np.testing.assert_array_equal(images.apply_orientation(np.rot90(IMG, 1), 6), IMG)
    np.testing.assert_array_equal(images.apply_orientation(np.rot90(IMG, -1), 8), IMG)
    np.testing.assert_array_equal(images.apply_orientation(np.rot90(IMG, 2), 3), IMG)


@pytest.mark.parametrize("values", [(0, 255), (0, 1), (0,), (7,)])
def test_binary_masks_decode(values: tuple[int, ...]) -> None:
    """Guards against refusing a valid binary mask (0 plus one positive value, or constant)."""
    m = np.zeros((40, 40), np.uint8) + values[0]
    if len(values) > 1:
        m[10:20] = values[1]
    out = images.decode_mask(corpus._cv2_bytes(".png", m))
    assert out.sum() == (m > 0).sum()


@pytest.mark.parametrize("how", ["grey", "jpeg"])
def test_grey_or_jpeg_masks_are_not_thresholded(how: str) -> None:
    """Guards against the old silent ``> 0`` threshold: a grey or JPEG-compressed mask (whose
    halo of 1..254 values would all become root) is refused with the traits' "not binary"."""
    m = MASK.copy()
    if how == "grey":
        m[m == 0] = 3
        m[0, :] = 0
        data = corpus._cv2_bytes(".png", m)
    else:
        data = corpus._cv2_bytes(".jpg", m)
    with pytest.raises(MaskError, match="not binary"):
        images.decode_mask(data)


def test_cmyk_and_palette_tiff_colours() -> None:
    """Guards against reading CMYK ink or palette indices as if they were RGB/grey values."""
    import tifffile  # noqa: F401  (the TIFF path)

    rgb, _ = images.decode(corpus._cmyk_tiff(IMG))
    assert np.abs(rgb.astype(int) - IMG).mean() < 2
    cmap = np.zeros((3, 256), np.uint16)
    cmap[0, 1] = 65535  # index 1 is pure red
    idx = (MASK > 0).astype(np.uint8)
    data = corpus._tiff_bytes(idx, photometric="palette", colormap=cmap)
    rgb, _ = images.decode(data)
    assert (rgb[MASK > 0] == (255, 0, 0)).all() and (rgb[MASK == 0] == 0).all()
