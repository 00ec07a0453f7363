"""The bad-input corpus: every kind of odd or broken image the job must survive, generated here.

Nothing is committed: each kind is a few kB of bytes made by code from one synthetic root image
(:func:`base_image`), with the outcome the job must produce written beside it:

* ``ok``: valid but unusual; decoded correctly (checked against the source pixels where the
  encoding is lossless) and measured: a ``traits`` row;
* ``reject:<stage>:<words>``: lands in ``rejects`` at ``<stage>`` with a reason containing
  ``<words>`` (case-insensitive), which is what a person reads to fix the file.

:data:`MANIFEST_KINDS` are faults of the manifest itself: ``manifest validate`` and ``infer``
refuse them with one line naming the column (and the row), exit 2, before any work.
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

H, W = 96, 128  # stored size of every corpus image (small: the corpus runs end to end)


def base_image() -> tuple[np.ndarray, np.ndarray]:
    """A soil-coloured RGB image with a few bright roots and the roots' binary mask."""
    rng = np.random.default_rng(7)
    img = np.empty((H, W, 3), np.uint8)
    img[...] = (92, 64, 40)
    img = np.clip(img + rng.integers(-12, 12, (H, W, 3)), 0, 255).astype(np.uint8)
    mask = np.zeros((H, W), np.uint8)
    mask[10:86, 30:34] = 255  # a vertical root
    mask[50:53, 20:110] = 255  # a horizontal one
    img[mask > 0] = (225, 215, 190)
    img[0, 0] = (255, 255, 255)  # the full 8-bit range, so 16-bit and float scalings are exact
    img[0, 1] = (0, 0, 0)
    return img, mask


def _cv2_bytes(ext: str, arr: np.ndarray, params: list[int] | None = None) -> bytes:
    import cv2

    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[..., ::-1]
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., [2, 1, 0, 3]]
    ok, buf = cv2.imencode(ext, np.ascontiguousarray(arr), params or [])
    assert ok
    return bytes(buf)


def _pil_bytes(im: Any, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _tiff_bytes(arr: np.ndarray, **kw: Any) -> bytes:
    import tifffile

    buf = io.BytesIO()
    if arr.ndim == 3 and arr.shape[2] == 3:
        kw.setdefault("photometric", "rgb")
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A 100-byte PNG whose header declares ``width x height`` grey pixels (2.5 Gpx): decoding
    it would allocate gigabytes; the job must refuse it from the header alone."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))  # one row of the declared width
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def _exif_rotated_jpeg(img: np.ndarray) -> bytes:
    """The image stored rotated 90 degrees counter-clockwise, with EXIF orientation 6 ("rotate
    90 degrees clockwise to view"): the upright view is ``img`` itself."""
    from PIL import Image

    stored = Image.fromarray(np.ascontiguousarray(np.rot90(img, 1)))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _pil_bytes(stored, "JPEG", quality=95, exif=exif.tobytes())


def _cmyk_jpeg(img: np.ndarray) -> bytes:
    from PIL import Image

    return _pil_bytes(Image.fromarray(img).convert("CMYK"), "JPEG", quality=95)


def _cmyk_tiff(img: np.ndarray) -> bytes:
    from PIL import Image

    cmyk = np.asarray(Image.fromarray(img).convert("CMYK"))
    return _tiff_bytes(cmyk, photometric="separated")


def _palette_png(img: np.ndarray) -> bytes:
    from PIL import Image

    return _pil_bytes(Image.fromarray(img).quantize(64), "PNG")


@dataclasses.dataclass(frozen=True)
class Kind:
    """One corpus entry: how to make the image (and its mask) and what must happen."""

    name: str
    expect: str  # "ok" or "reject:<stage>:<words in the reason>"
    image: Callable[[np.ndarray, np.ndarray], bytes] | None  # None: no file written
    mask: Callable[[np.ndarray, np.ndarray], bytes] | None = None  # None: the good PNG mask
    suffix: str = ".png"
    uri: str | None = None  # use this URI instead of writing a file ("{root}" is replaced)
    max_err: float = 0.0  # largest mean |decoded - source| allowed (0: lossless); "ok" kinds
    grey: bool = False  # compare with the source's grey (first) channel


def _good_mask(img: np.ndarray, mask: np.ndarray) -> bytes:
    return _cv2_bytes(".png", mask)


KINDS: tuple[Kind, ...] = (
    # -- valid but unusual: decoded correctly and measured ---------------------------------------
    Kind("plain_png", "ok", lambda i, m: _cv2_bytes(".png", i)),
    Kind("plain_jpeg", "ok", lambda i, m: _cv2_bytes(".jpg", i), suffix=".jpg", max_err=8),
    Kind("png_named_jpg", "ok", lambda i, m: _cv2_bytes(".png", i), suffix=".jpg"),
    Kind("tiff_16bit_full_range", "ok", lambda i, m: _tiff_bytes(i.astype(np.uint16) * 257),
         suffix=".tif"),
    Kind("tiff_16bit_12bit_camera", "ok", lambda i, m: _tiff_bytes(i.astype(np.uint16) * 16),
         suffix=".tif"),
    Kind("png_16bit", "ok", lambda i, m: _cv2_bytes(".png", i.astype(np.uint16) * 257)),
    Kind("tiff_float32_0_1", "ok", lambda i, m: _tiff_bytes(i.astype(np.float32) / 255.0),
         suffix=".tif"),
    Kind("tiff_planar_rgb", "ok",
         lambda i, m: _tiff_bytes(np.moveaxis(i, -1, 0).copy(), planarconfig="separate",
                                  photometric="rgb"), suffix=".tif"),
    Kind("jpeg_cmyk", "ok", lambda i, m: _cmyk_jpeg(i), suffix=".jpg", max_err=8),
    Kind("tiff_cmyk", "ok", lambda i, m: _cmyk_tiff(i), suffix=".tif"),
    Kind("png_palette", "ok", lambda i, m: _palette_png(i), max_err=4),
    Kind("png_rgba", "ok", lambda i, m: _cv2_bytes(".png", np.dstack([i, np.full((H, W), 255,
                                                                                  np.uint8)]))),
    Kind("png_grey", "ok", lambda i, m: _cv2_bytes(".png", i[..., 0]), grey=True),
    Kind("jpeg_grey", "ok", lambda i, m: _cv2_bytes(".jpg", i[..., 0]), suffix=".jpg",
         grey=True, max_err=8),
    Kind("jpeg_exif_rotated", "ok", lambda i, m: _exif_rotated_jpeg(i), suffix=".jpg",
         max_err=8),
    Kind("mask_all_zero", "ok", lambda i, m: _cv2_bytes(".png", i),
         mask=lambda i, m: _cv2_bytes(".png", np.zeros_like(m))),
    Kind("mask_0_1_values", "ok", lambda i, m: _cv2_bytes(".png", i),
         mask=lambda i, m: _cv2_bytes(".png", (m > 0).astype(np.uint8))),
    # -- broken files: rejected with a reason a person understands --------------------------------
    Kind("zero_bytes", "reject:decode:empty file", lambda i, m: b""),
    Kind("truncated_jpeg", "reject:decode:truncated jpeg",
         lambda i, m: _cv2_bytes(".jpg", i)[:600], suffix=".jpg"),
    Kind("truncated_png", "reject:decode:cannot decode",
         lambda i, m: _cv2_bytes(".png", i)[:400]),
    Kind("truncated_tiff", "reject:decode:tiff",
         lambda i, m: _tiff_bytes(i)[:300], suffix=".tif"),
    Kind("text_named_jpg", "reject:decode:cannot decode",
         lambda i, m: b"<html>403 Forbidden</html>\n", suffix=".jpg"),
    Kind("one_by_one_px", "reject:decode:too small",
         lambda i, m: _cv2_bytes(".png", i[:1, :1])),
    Kind("decompression_bomb", "reject:decode:limit", lambda i, m: bomb_png()),
    Kind("missing_file", "reject:read:no such file", None,
         uri="{root}/images/does_not_exist.png"),
    Kind("uri_is_a_folder", "reject:read:", None, uri="{root}/images"),
    Kind("unknown_scheme", "reject:read:protocol", None, uri="nosuch://bucket/x.png"),
    Kind("mask_wrong_size", "reject:decode_mask:mask is", lambda i, m: _cv2_bytes(".png", i),
         mask=lambda i, m: _cv2_bytes(".png", m[:50, :60])),
    Kind("mask_grey_levels", "reject:decode_mask:not binary", lambda i, m: _cv2_bytes(".png", i),
         mask=lambda i, m: _cv2_bytes(".png", (m // 2 + np.arange(W, dtype=np.uint8)[None] % 3))),
    Kind("mask_saved_as_jpeg", "reject:decode_mask:not binary",
         lambda i, m: _cv2_bytes(".png", i), mask=lambda i, m: _cv2_bytes(".jpg", m)),
    Kind("mask_zero_bytes", "reject:decode_mask:empty", lambda i, m: _cv2_bytes(".png", i),
         mask=lambda i, m: b""),
)
"""Per-image kinds (31): 17 valid-but-unusual, 14 broken."""


def expected(kind: Kind) -> tuple[str, str | None, str]:
    """(outcome ``ok``/``reject``, stage, words in the reason)."""
    if kind.expect == "ok":
        return "ok", None, ""
    _, stage, words = kind.expect.split(":", 2)
    return "reject", stage, words


# -- manifest-level faults: refused with one line naming the column (and row), exit 2 --------------
MANIFEST_KINDS: tuple[tuple[str, Callable[[dict[str, Any]], Any], tuple[str, ...]], ...] = (
    # (name, how to spoil a good manifest (a dict of columns), words the one-line error contains)
    ("missing_image_uri_column", lambda c: c.pop("image_uri"), ("image_uri",)),
    ("wrong_type_tube", lambda c: c.__setitem__("tube", ["one"] + c["tube"][1:]),
     ("'tube'", "row 0")),
    ("duplicate_image_id", lambda c: c.__setitem__("image_id", [c["image_id"][0]] * 2
                                                    + c["image_id"][2:]),
     ("duplicate image_id", "rows 0 and 1")),
    ("path_like_image_id", lambda c: c["image_id"].__setitem__(1, "../../etc/cron.d/x"),
     ("'image_id'", "row 1")),
    ("image_id_with_separator", lambda c: c["image_id"].__setitem__(0, "tube1/img"),
     ("'image_id'", "row 0")),
    ("image_id_too_long", lambda c: c["image_id"].__setitem__(2, "x" * 300),
     ("'image_id'", "row 2")),
    ("missing_dpi_no_config", lambda c: c.pop("dpi"), ("'dpi'",)),
    ("negative_dpi", lambda c: c["dpi"].__setitem__(1, -96.0), ("'dpi'", "row 1")),
    ("date_does_not_parse", lambda c: c.__setitem__("captured_at", ["2021-13-45T99:00:00"]
                                                      + c["captured_at"][1:]),
     ("'captured_at'", "row 0")),
    ("empty_image_uri", lambda c: c["image_uri"].__setitem__(0, None), ("'image_uri'", "row 0")),
)
"""Manifest-level kinds (10)."""
