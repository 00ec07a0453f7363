"""Decoding and validating minirhizotron images (JPEG, PNG, TIFF; 8 or 16 bit; grey, RGB, RGBA).

Everything downstream sees one form: ``uint8`` RGB ``(H, W, 3)``. 16-bit scans are scaled by
their actual range rather than a blind ``>> 8`` (many 16-bit cameras use only 12 bits), and the
original bit depth is reported so it can be recorded.
"""

from __future__ import annotations

import io

import numpy as np

MIN_SIDE = 32
MAX_PIXELS = 20_000 * 20_000


class ImageDecodeError(ValueError):
    """The bytes are not an image we can use; the message is the reject reason."""


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Decode bytes to ``(uint8 RGB array (H, W, 3), original bit depth)``.

    Raises:
        ImageDecodeError: empty, truncated or unsupported data, or an implausible size.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    arr = _decode_any(data)
    rgb, bits = to_rgb8(arr)
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageDecodeError(f"image too small ({w}x{h} px; need at least {MIN_SIDE} px a side)")
    return rgb, bits


def _decode_any(data: bytes) -> np.ndarray:
    head = data[:4]
    if head[:2] in (b"II", b"MM"):  # TIFF: tifffile keeps 16-bit and multi-sample data intact
        import tifffile

        try:
            arr = tifffile.imread(io.BytesIO(data))
        except Exception as e:
            raise ImageDecodeError(f"cannot decode TIFF: {e}") from e
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = np.moveaxis(arr, 0, -1)  # planar (C, H, W) -> (H, W, C)
        return np.asarray(arr)
    import cv2

    buf = np.frombuffer(data, np.uint8)
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if arr is None:
        # OpenCV returns None for truncated/garbage data; Pillow gives a better message.
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                return np.asarray(im)
        except Exception as e:
            raise ImageDecodeError(f"cannot decode image: {e}") from e
    if arr.ndim == 3 and arr.shape[2] == 3:
        arr = arr[..., ::-1]  # BGR -> RGB
    elif arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., [2, 1, 0, 3]]  # BGRA -> RGBA
    return arr


def to_rgb8(arr: np.ndarray) -> tuple[np.ndarray, int]:
    """Any grey/RGB/RGBA, 8/16-bit/float array -> ``(uint8 (H, W, 3), original bits)``."""
    arr = np.asarray(arr)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageDecodeError(f"unsupported image shape {arr.shape}")
    if arr.shape[0] * arr.shape[1] > MAX_PIXELS:
        raise ImageDecodeError(f"image too large ({arr.shape[1]}x{arr.shape[0]} px)")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]  # minirhizotron RGBA exports carry an all-opaque alpha
    if arr.dtype == np.uint8:
        bits = 8
        out = arr
    elif arr.dtype == np.bool_:
        bits = 1
        out = arr.astype(np.uint8) * 255
    elif np.issubdtype(arr.dtype, np.integer):
        bits = 16 if arr.dtype.itemsize >= 2 else 8
        hi = float(arr.max()) if arr.size else 0.0
        scale = 255.0 / hi if hi > 255 else 1.0
        out = np.clip(arr.astype(np.float32) * scale + 0.5, 0, 255).astype(np.uint8)
    elif np.issubdtype(arr.dtype, np.floating):
        bits = 32
        finite = np.nan_to_num(arr.astype(np.float32))
        hi = float(finite.max()) if finite.size else 0.0
        scale = 255.0 if hi <= 1.0 else 255.0 / hi
        out = np.clip(finite * scale + 0.5, 0, 255).astype(np.uint8)
    else:
        raise ImageDecodeError(f"unsupported pixel type {arr.dtype}")
    if out.ndim == 2:
        out = np.repeat(out[..., None], 3, axis=2)
    return np.ascontiguousarray(out), bits


def encode_png(mask: np.ndarray) -> bytes:
    """Binary mask (bool or 0/1 or 0/255) -> 8-bit PNG bytes with 0 / 255 (the masks' convention)."""
    import cv2

    m = (np.asarray(mask) > 0).astype(np.uint8) * 255
    ok, buf = cv2.imencode(".png", m, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise ValueError("PNG encoding failed")
    return bytes(buf)


def decode_mask(data: bytes) -> np.ndarray:
    """Mask PNG/TIFF bytes -> bool (H, W); any non-zero pixel (in any channel) is root."""
    arr = _decode_any(data)
    if arr.ndim == 3:
        arr = arr[..., :3].max(axis=2)
    return np.asarray(arr) > 0
