"""Decoding and validating minirhizotron images (JPEG, PNG, TIFF; 8 or 16 bit or float; grey,
RGB, RGBA, palette, CMYK; EXIF-rotated).

Everything downstream sees one form: ``uint8`` RGB ``(H, W, 3)``. 16-bit scans are scaled by
their actual range rather than a blind ``>> 8`` (many 16-bit cameras use only 12 bits), and the
original bit depth is reported so it can be recorded. Palette images are expanded through their
palette, CMYK is converted to RGB, and a JPEG's EXIF orientation is applied (as a viewer shows it).

Untrusted input: the pixel count a file *declares* in its header is checked against
:data:`MAX_PIXELS` before any pixel is decoded, so a decompression bomb (a small file declaring
a huge image) is refused without allocating its pixels.

Masks (:func:`decode_mask`) must be binary (0 and one positive value): a grey or JPEG-compressed
mask is refused with :func:`rootflow.traits.binary.as_binary`'s "not binary" error instead of
being silently thresholded.
"""

from __future__ import annotations

import io

import numpy as np

MIN_SIDE = 32
#: Largest image accepted, in pixels (declared in the header; checked before decoding).
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
    check_declared_size(data)
    if data[:2] == b"\xff\xd8" and data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        # libjpeg "decodes" a cut-off JPEG with its missing part grey; refuse it instead.
        raise ImageDecodeError(f"truncated JPEG: no end-of-image marker ({len(data)} bytes)")
    arr = _decode_any(data)
    rgb, bits = to_rgb8(arr)
    h, w = rgb.shape[:2]
    if min(h, w) < MIN_SIDE:
        raise ImageDecodeError(f"image too small ({w}x{h} px; need at least {MIN_SIDE} px a side)")
    return rgb, bits


def _is_tiff(data: bytes) -> bool:
    return data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def declared_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` as the file's header declares it, without decoding pixels.

    None when the header cannot be read (the decoder then gives the reason).
    """
    try:
        if _is_tiff(data):
            import tifffile

            with tifffile.TiffFile(io.BytesIO(data)) as tif:
                page = tif.pages.first
                return int(page.imagewidth), int(page.imagelength)
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:  # parses the header only
            return int(im.size[0]), int(im.size[1])
    except Exception as e:
        if type(e).__name__ == "DecompressionBombError":  # Pillow's own header check
            raise ImageDecodeError(
                f"image too large: {e} (rootflow's limit: {MAX_PIXELS / 1e6:.0f} Mpx, "
                "rootflow.io.images.MAX_PIXELS); refused before decoding") from None
        return None


def check_declared_size(data: bytes, max_pixels: int | None = None) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` (default MAX_PIXELS)."""
    limit = MAX_PIXELS if max_pixels is None else max_pixels
    size = declared_size(data)
    if size is not None and size[0] * size[1] > limit:
        w, h = size
        raise ImageDecodeError(
            f"image too large: the header declares {w}x{h} px ({w * h / 1e6:.0f} Mpx), over the "
            f"limit of {limit / 1e6:.0f} Mpx (rootflow.io.images.MAX_PIXELS); refused before "
            "decoding (possible decompression bomb)")


def _exif_orientation(data: bytes) -> int:
    """EXIF orientation tag (1..8; 1 = as stored) of a JPEG/PNG/WebP, 1 when absent."""
    if _is_tiff(data):
        return 1
    try:
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            value = im.getexif().get(0x0112, 1)
        return int(value) if int(value) in range(1, 9) else 1
    except Exception:
        return 1


def apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Turn a stored array into the upright view described by an EXIF orientation tag."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return np.swapaxes(arr, 0, 1)
    if orientation == 6:
        return np.rot90(arr, -1)
    if orientation == 7:
        return np.rot90(arr, 1)[::-1]
    if orientation == 8:
        return np.rot90(arr, 1)
    return arr


def _decode_tiff(data: bytes) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            page = tif.pages.first
            arr = page.asarray()
            photometric = int(page.photometric)
            colormap = page.colormap
            planar = int(page.planarconfig) == 2
    except Exception as e:
        raise ImageDecodeError(f"cannot decode TIFF: {e}") from e
    arr = np.asarray(arr)
    if planar and arr.ndim == 3:
        arr = np.moveaxis(arr, 0, -1)  # planar (C, H, W) -> (H, W, C)
    elif arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)
    if photometric == 3 and colormap is not None:  # PALETTE: indices through the colour map
        cmap = np.asarray(colormap)  # (3, 2**bits), 16-bit values
        arr = (cmap[:, arr].transpose(1, 2, 0) // 257).astype(np.uint8)
    elif photometric == 5 and arr.ndim == 3 and arr.shape[2] >= 4:  # SEPARATED: CMYK
        arr = cmyk_to_rgb(arr[..., :4])
    elif photometric == 0 and arr.ndim == 2:  # MINISWHITE: 0 is white
        hi = np.iinfo(arr.dtype).max if np.issubdtype(arr.dtype, np.integer) else 1.0
        arr = hi - arr
    return arr


def cmyk_to_rgb(cmyk: np.ndarray) -> np.ndarray:
    """8- or 16-bit CMYK (H, W, 4) -> RGB of the same dtype (R = (1 - C)(1 - K) ...)."""
    hi = float(np.iinfo(cmyk.dtype).max) if np.issubdtype(cmyk.dtype, np.integer) else 1.0
    c = cmyk.astype(np.float32) / hi
    rgb = (1.0 - c[..., :3]) * (1.0 - c[..., 3:4]) * hi
    return np.clip(rgb + (0.5 if hi > 1 else 0.0), 0, hi).astype(cmyk.dtype)


def _decode_any(data: bytes) -> np.ndarray:
    if _is_tiff(data):  # TIFF: tifffile keeps 16-bit, float and multi-sample data intact
        return _decode_tiff(data)
    return apply_orientation(_decode_raster(data), _exif_orientation(data))


def _decode_raster(data: bytes) -> np.ndarray:
    import cv2

    buf = np.frombuffer(data, np.uint8)
    arr = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if arr is None:
        # OpenCV returns None for truncated/garbage data; Pillow gives a better message.
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.load()
                im: Image.Image = opened
                if im.mode in ("P", "PA"):
                    im = im.convert("RGBA" if "transparency" in im.info else "RGB")
                elif im.mode == "CMYK":
                    im = im.convert("RGB")
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
    """Mask PNG/TIFF bytes -> bool (H, W): 0 is background, the one positive value is root.

    Raises:
        ImageDecodeError: empty or undecodable data, or a header declaring over MAX_PIXELS.
        rootflow.traits.binary.MaskError: the mask is not binary (a grey or JPEG-compressed
            mask: more than two values, or two values neither of which is 0).
    """
    from rootflow.traits.binary import MaskError, as_binary

    if not data:
        raise ImageDecodeError("empty mask file (0 bytes)")
    check_declared_size(data)
    arr = _decode_any(data)
    try:
        return np.asarray(as_binary(arr))
    except MaskError as e:
        raise _mask_error_type()(str(e)) from None


_MASK_ERROR: type | None = None


def _mask_error_type() -> type:
    """``NotBinaryMaskError``: both a :class:`ImageDecodeError` (callers that skip undecodable
    files skip it too) and the traits' ``MaskError`` (it is that error, with its message)."""
    global _MASK_ERROR
    if _MASK_ERROR is None:
        from rootflow.traits.binary import MaskError

        _MASK_ERROR = type("NotBinaryMaskError", (ImageDecodeError, MaskError),
                           {"__module__": __name__})
    return _MASK_ERROR
