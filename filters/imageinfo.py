"""Decode checks and fingerprints of one image, from bytes alone (no file I/O).

`inspect_image(data)` -> `ImageInfo` (size, format, mode, sha256, 64-bit pHash, frame count) or a `Reject`:
zero-byte, unreadable, truncated or corrupt bytes are `image_decode_failed`; more pixels than `max_pixels`
(decompression bomb, read from the header before any pixel is decoded) is `image_too_large`. CMYK, 16-bit,
palette, alpha and animated images are accepted: `to_rgb` turns them into plain 8-bit RGB (first frame, EXIF
orientation applied, alpha composited on white), and the pHash is computed on that RGB image.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from filters.reasons import Reject

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb warning limit


@dataclass(frozen=True)
class ImageInfo:
    width: int  # after EXIF orientation
    height: int
    format: str  # PIL format name: JPEG, PNG, WEBP, GIF, ...
    mode: str  # mode as stored: RGB, L, CMYK, I;16, P, RGBA, ...
    sha256: str  # hex of the raw bytes
    phash: str  # 16 hex digits (imagehash 64-bit pHash of the RGB image)
    n_frames: int


def _open(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


def _rgb(img):
    """First frame of an opened image as 8-bit RGB, EXIF orientation applied."""
    from PIL import Image, ImageOps

    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    img = ImageOps.exif_transpose(img) or img
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # 16/32-bit grey: scale to 8 bit
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    if mode == "F":
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        arr = (arr - lo) / ((hi - lo) or 1.0) * 255.0
        return Image.fromarray(arr.astype(np.uint8), "L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode in ("LA", "La", "PA"):
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "RGBa"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")  # CMYK (with its ICC-less naive conversion), L, 1, P, YCbCr, LAB, HSV


def to_rgb(data: bytes):
    """The image as an 8-bit RGB `PIL.Image.Image` (first frame, EXIF orientation applied). Raises on bad bytes;
    call `inspect_image` first to get a reason instead."""
    img = _open(data)
    img.load()
    out = _rgb(img)
    out.load()
    return out


def inspect_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo | Reject:
    """Check and fingerprint one image; see the module docstring for what is rejected."""
    import imagehash
    from PIL import Image

    if not isinstance(data, (bytes, bytearray, memoryview)):
        return Reject("image_decode_failed", f"not bytes: {type(data).__name__}")
    data = bytes(data)
    if not data:
        return Reject("image_decode_failed", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _open(data)
    except Image.DecompressionBombError as exc:
        return Reject("image_too_large", f"decompression bomb: {exc}")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for unreadable bytes
        return Reject("image_decode_failed", f"unreadable ({len(data)} bytes): {type(exc).__name__}: {exc}")
    width, height = img.size
    fmt = img.format or "unknown"
    if width <= 0 or height <= 0:
        return Reject("image_decode_failed", f"{fmt}: empty size {width}x{height}")
    if width * height > max_pixels:  # header only: no pixel decoded yet
        return Reject("image_too_large", f"decompression bomb: {width}x{height} = {width * height} pixels > {max_pixels}")
    mode = img.mode
    n_frames = int(getattr(img, "n_frames", 1) or 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            img.load()  # truncated or corrupt data raises here (LOAD_TRUNCATED_IMAGES stays False)
            rgb = _rgb(img)
            rgb.load()
            phash = str(imagehash.phash(rgb))
    except Image.DecompressionBombError as exc:
        return Reject("image_too_large", f"decompression bomb: {exc}")
    except Exception as exc:  # noqa: BLE001
        return Reject("image_decode_failed", f"{fmt} {width}x{height}: {type(exc).__name__}: {exc}")
    return ImageInfo(width=rgb.width, height=rgb.height, format=fmt, mode=mode,
                     sha256=hashlib.sha256(data).hexdigest(), phash=phash, n_frames=n_frames)


def phash_distance(a_hex: str, b_hex: str) -> int:
    """Hamming distance between two 64-bit pHashes given as 16 hex digits."""
    return (int(a_hex, 16) ^ int(b_hex, 16)).bit_count()
