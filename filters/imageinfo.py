"""Decode checks and fingerprints of one image, from bytes alone (no file I/O).

`inspect_image(data)` -> `ImageInfo` (size, format, mode, sha256, 64-bit pHash, frame count) or a `Reject`:
zero-byte, unreadable, truncated or corrupt bytes are `image_decode_failed`; more pixels than `max_pixels`
(decompression bomb, read from the header before any pixel is decoded) is `image_too_large`. CMYK, 16-bit,
palette, alpha and animated images are accepted: `to_rgb` turns them into plain 8-bit RGB (first frame, EXIF
orientation applied, alpha composited on white). The pHash (imagehash's 64-bit pHash) is computed, for every
format alike, on that image in grey, first reduced by 2, 4 or 8 while both sides stay >= PHASH_MIN_SIDE: a
JPEG is decoded at that scale (PIL draft: libjpeg's DCT scaling, which still reads the whole entropy-coded
stream, so truncation is still found, and skips most of the IDCT, colour conversion and resize work), other
formats are decoded fully and box-reduced. With `transforms=True` also the pHashes of its horizontal flip and
90/180/270-degree rotations, so dedup can catch flipped and rotated copies, which plain pHash cannot.
`header_info(data)` checks without decoding (header, orientation, end marker; no pHash).
`decode_rgb(data, max_pixels)` is the same size guard and full-size RGB conversion for callers that need the
pixels (CapFilt).
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass

from mmcorpus.filters.reasons import Reject

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own decompression-bomb warning limit
TRANSFORMS = ("hflip", "rot90", "rot180", "rot270")  # order of ImageInfo.phash_transforms
PHASH_MIN_SIDE = 64  # pHash input is reduced while both sides stay >= this: twice its 32x32 grid


@dataclass(frozen=True)
class ImageInfo:
    width: int  # after EXIF orientation
    height: int
    format: str  # PIL format name: JPEG, PNG, WEBP, GIF, ...
    mode: str  # mode as stored: RGB, L, CMYK, I;16, P, RGBA, ...
    sha256: str  # hex of the raw bytes
    phash: str | None  # 16 hex digits (imagehash 64-bit pHash of the reduced grey image, see above); None from
    # header_info
    n_frames: int
    phash_transforms: tuple[str, ...] = ()  # pHashes of the TRANSFORMS of the image, when asked for


def _open(data: bytes):
    from PIL import Image

    return Image.open(io.BytesIO(data))


def _oriented(img):
    """First frame of an opened image, EXIF orientation applied."""
    from PIL import ImageOps

    if getattr(img, "n_frames", 1) > 1:
        img.seek(0)
    return ImageOps.exif_transpose(img) or img


def _as_rgb(img):
    """An image of any mode as 8-bit RGB."""
    from PIL import Image

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


def _rgb(img):
    """First frame of an opened image as 8-bit RGB, EXIF orientation applied."""
    return _as_rgb(_oriented(img))


def _loaded_rgb(img):
    """Decode an opened image to 8-bit RGB, pixels loaded (raises on truncated/corrupt data)."""
    img.load()
    out = _rgb(img)
    out.load()
    return out


def to_rgb(data: bytes):
    """The image as an 8-bit RGB `PIL.Image.Image` (first frame, EXIF orientation applied). Raises on bad bytes;
    call `inspect_image` first to get a reason instead. PIL's warnings are left to the caller."""
    return _loaded_rgb(_open(data))


def _open_checked(data, max_pixels: int):
    """(opened image, None) or (None, Reject): bytes check, header parse and the pixel-count guard, all before
    any pixel is decoded."""
    from PIL import Image

    if not isinstance(data, (bytes, bytearray, memoryview)):
        return None, Reject("image_decode_failed", f"not bytes: {type(data).__name__}")
    data = bytes(data)
    if not data:
        return None, Reject("image_decode_failed", "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = _open(data)
    except Image.DecompressionBombError as exc:
        return None, Reject("image_too_large", f"decompression bomb: {exc}")
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for unreadable bytes
        return None, Reject("image_decode_failed", f"unreadable ({len(data)} bytes): {type(exc).__name__}: {exc}")
    width, height = img.size
    if width <= 0 or height <= 0:
        return None, Reject("image_decode_failed", f"{img.format or 'unknown'}: empty size {width}x{height}")
    if width * height > max_pixels:  # header only: no pixel decoded yet
        return None, Reject("image_too_large",
                            f"decompression bomb: {width}x{height} = {width * height} pixels > {max_pixels}")
    return img, None


def _ends_whole(data: bytes, fmt: str) -> bool:
    """Whether the bytes reach the format's end marker (JPEG EOI, PNG IEND, the RIFF size of a WebP): a cut-off
    file fails this without a pixel decoded. Other formats pass."""
    if fmt == "JPEG":
        return b"\xff\xd9" in data[-4096:]  # encoders and editors may leave bytes after the end marker
    if fmt == "PNG":
        return b"IEND" in data[-64:]
    if fmt == "WEBP":
        return int.from_bytes(data[4:8], "little") + 8 <= len(data)
    return True


def _cut_off(data: bytes, fmt: str, width: int, height: int) -> Reject | None:
    """The reject of bytes that stop before the format's end marker (`_ends_whole`), else None."""
    if _ends_whole(data, fmt):
        return None
    return Reject("image_decode_failed", f"{fmt} {width}x{height}: cut off (no end marker)")


_JPEG_FRAMES = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman frames: what every decoder reads
_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}  # colour type -> depths


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a JPEG's frame header, walking the marker segments before it."""
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # segments without a length
            i += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA):  # a second start, the end or a scan before any frame header
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _JPEG_FRAMES:
            if length < 8 or i + 2 + length > n or data[i + 4] != 8 or data[i + 9] not in (1, 3, 4):
                return None
            return int.from_bytes(data[i + 7:i + 9], "big"), int.from_bytes(data[i + 5:i + 7], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or length < 2:
            return None  # another frame type (lossless, arithmetic, ...) or a broken segment
        i += 2 + length
    return None


def header_size(data: bytes) -> tuple[str, int, int] | None:
    """(PIL format name, width, height) read from the first bytes of a plain 8-bit JPEG, a PNG, a GIF or a WebP,
    without PIL (a few microseconds instead of PIL's full header parse); None for any other format or anything
    unusual in the header, so the caller asks PIL. A JPEG that PIL would call MPO (a multi-picture JPEG) is a
    JPEG here: its first picture is a plain JPEG stream."""
    if data[:3] == b"\xff\xd8\xff":
        size = _jpeg_size(data)
        return None if size is None else ("JPEG", *size)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 26:
        if data[24] not in _PNG_DEPTHS.get(data[25], ()):
            return None
        return "PNG", int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return "GIF", int.from_bytes(data[6:8], "little"), int.from_bytes(data[8:10], "little")
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP" and len(data) >= 30:
        chunk = data[12:16]
        if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
            width, height = int.from_bytes(data[26:28], "little"), int.from_bytes(data[28:30], "little")
            return "WEBP", width & 0x3FFF, height & 0x3FFF
        if chunk == b"VP8L" and data[20] == 0x2F:
            bits = int.from_bytes(data[21:25], "little")
            return "WEBP", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X":
            return "WEBP", int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def check_image(data, max_pixels: int = DEFAULT_MAX_PIXELS, decode: bool = False) -> tuple[str, int, int] | Reject:
    """(PIL format name, width, height) of image bytes that pass, or a Reject (image_decode_failed,
    image_too_large). Without `decode`: the header, the pixel guard and the format's end marker (catches
    random bytes and truncation, no pixel decoded); the header of a JPEG, PNG, GIF or WebP is read by
    `header_size`, any other (or an unusual one) by PIL. With `decode`: the pixels too; a JPEG at 1/8 scale (PIL
    draft: the whole entropy-coded stream is still read, so corruption inside is found)."""
    if not decode and isinstance(data, bytes):
        found = header_size(data)
        if found is not None and found[1] > 0 and found[2] > 0:
            fmt, width, height = found
            if width * height > max_pixels:
                return Reject("image_too_large",
                              f"decompression bomb: {width}x{height} = {width * height} pixels > {max_pixels}")
            return _cut_off(data, fmt, width, height) or found
    img, problem = _open_checked(data, max_pixels)
    if problem is not None:
        return problem
    fmt, width, height = img.format or "", img.width, img.height
    if not decode:
        return _cut_off(bytes(data), fmt, width, height) or (fmt, width, height)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if fmt == "JPEG":
                img.draft("L", (max(1, width // 8), max(1, height // 8)))
            img.load()
    except Exception as exc:  # noqa: BLE001
        return Reject("image_decode_failed", f"{fmt or 'unknown'} {width}x{height}: {type(exc).__name__}: {exc}")
    return fmt, width, height


def _decoded_rgb(img):
    """`_loaded_rgb` with PIL's warnings silenced (LOAD_TRUNCATED_IMAGES stays False: truncation still raises)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _loaded_rgb(img)


def decode_rgb(data, max_pixels: int = DEFAULT_MAX_PIXELS):
    """The image as an 8-bit RGB `PIL.Image.Image`, or a Reject (image_decode_failed, image_too_large)."""
    from PIL import Image

    img, problem = _open_checked(data, max_pixels)
    if problem is not None:
        return problem
    try:
        return _decoded_rgb(img)
    except Image.DecompressionBombError as exc:
        return Reject("image_too_large", f"decompression bomb: {exc}")
    except Exception as exc:  # noqa: BLE001
        return Reject("image_decode_failed", f"{img.format or 'unknown'} {img.width}x{img.height}: "
                                             f"{type(exc).__name__}: {exc}")


def _hash_hex(pixels) -> str:
    """imagehash.phash's 64 bits of a 32x32 grey array, as its 16 hex digits."""
    import numpy as np
    import scipy.fftpack

    dct = scipy.fftpack.dct(scipy.fftpack.dct(pixels, axis=0), axis=1)[:8, :8]
    bits = (dct > np.median(dct)).flatten()
    return f"{int(''.join('1' if b else '0' for b in bits), 2):016x}"


def phash_scale(width: int, height: int) -> int:
    """The reduction (1, 2, 4 or 8) a width x height image's pHash is computed at: the largest that keeps both
    sides >= PHASH_MIN_SIDE."""
    fit = min(width, height) // PHASH_MIN_SIDE
    return next((s for s in (8, 4, 2) if fit >= s), 1)


def _phash_input(img):
    """(grey image the pHash is computed on, (width, height) of the full image after EXIF orientation) of an
    opened, not yet loaded image. First frame, EXIF orientation applied, reduced by `phash_scale`: a JPEG by
    its decoder (DCT scaling; colour JPEGs decoded straight to their Y channel), which still reads the whole
    entropy-coded stream, so truncated data still raises; other formats are decoded fully and box-reduced."""
    from PIL import JpegImagePlugin

    width, height = img.size
    scale, done = phash_scale(width, height), 1
    if scale > 1 and isinstance(img, JpegImagePlugin.JpegImageFile):
        drafted = img.draft("L" if img.mode == "RGB" else None, (PHASH_MIN_SIDE, PHASH_MIN_SIDE))
        if drafted is not None:
            done = round(width / drafted[1][2])
    img.load()
    if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # what exif_transpose turns by 90 degrees
        width, height = height, width
    img = _oriented(img)
    grey = img if img.mode == "L" else _as_rgb(img).convert("L")
    if scale > done:
        grey = grey.reduce(scale // done)
    return grey, (width, height)


def phash_hexes(rgb, transforms: bool = False) -> tuple[str, tuple[str, ...]]:
    """(pHash, pHashes of TRANSFORMS or ()) of an RGB or grey image: imagehash.phash, on one 32x32 grey
    resize."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(rgb.convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    if not transforms:
        return _hash_hex(pixels), ()
    variants = (np.fliplr(pixels), np.rot90(pixels, 1), np.rot90(pixels, 2), np.rot90(pixels, 3))
    return _hash_hex(pixels), tuple(_hash_hex(v) for v in variants)


def inspect_image(data, max_pixels: int = DEFAULT_MAX_PIXELS, transforms: bool = False,
                  sha256: str | None = None) -> ImageInfo | Reject:
    """Check and fingerprint one image; see the module docstring for what is rejected. `sha256`: the hex digest
    of `data` when the caller has it already (a downloader hashes what it stores), so it is not computed again."""
    from PIL import Image

    img, problem = _open_checked(data, max_pixels)
    if problem is not None:
        return problem
    width, height = img.size
    fmt = img.format or "unknown"
    mode = img.mode
    n_frames = int(getattr(img, "n_frames", 1) or 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            grey, (width, height) = _phash_input(img)
        phash, variants = phash_hexes(grey, transforms)
    except Image.DecompressionBombError as exc:
        return Reject("image_too_large", f"decompression bomb: {exc}")
    except Exception as exc:  # noqa: BLE001
        return Reject("image_decode_failed", f"{fmt} {width}x{height}: {type(exc).__name__}: {exc}")
    return ImageInfo(width=width, height=height, format=fmt, mode=mode,
                     sha256=sha256 or hashlib.sha256(bytes(data)).hexdigest(), phash=phash, n_frames=n_frames,
                     phash_transforms=variants)


def header_info(data, max_pixels: int = DEFAULT_MAX_PIXELS, sha256: str | None = None) -> ImageInfo | Reject:
    """`inspect_image` without decoding a pixel (what img2dataset's disable_all_reencoding keeps): the header, the
    pixel guard, the EXIF orientation and the format's end marker, so random bytes and cut-off files are
    rejected but damage inside the compressed data is not found; `phash` is None."""
    img, problem = _open_checked(data, max_pixels)
    if problem is not None:
        return problem
    fmt, (width, height) = img.format or "unknown", img.size
    data = bytes(data)
    cut = _cut_off(data, fmt, width, height)
    if cut is not None:
        return cut
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if img.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # what exif_transpose turns by 90 degrees
                width, height = height, width
            n_frames = int(getattr(img, "n_frames", 1) or 1)
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block or frame table
        return Reject("image_decode_failed", f"{fmt} {width}x{height}: {type(exc).__name__}: {exc}")
    return ImageInfo(width=width, height=height, format=fmt, mode=img.mode,
                     sha256=sha256 or hashlib.sha256(data).hexdigest(), phash=None, n_frames=n_frames)


def phash_distance(a_hex: str, b_hex: str) -> int:
    """Hamming distance between two 64-bit pHashes given as 16 hex digits."""
    return (int(a_hex, 16) ^ int(b_hex, 16)).bit_count()


RESIZE_MODES = ("keep_ratio", "keep_ratio_largest", "center_crop")
ENCODE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


def resize_image(data: bytes, size: int, mode: str = "keep_ratio", fmt: str = "jpg",
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> bytes | Reject:
    """A re-encoded copy (`fmt`: jpg, png or webp) of an image with its shorter side `size` (keep_ratio), its
    longer side `size` (keep_ratio_largest), or cut to a centred `size` x `size` square (center_crop)."""
    from PIL import Image

    img, problem = _open_checked(data, max_pixels)
    if problem is not None:
        return problem
    try:
        rgb = _as_rgb(_oriented(img))
        w, h = rgb.size
        scale = size / (max(w, h) if mode == "keep_ratio_largest" else min(w, h))
        rgb = rgb.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        if mode == "center_crop":
            w, h = rgb.size
            left, top = (w - size) // 2, (h - size) // 2
            rgb = rgb.crop((left, top, left + size, top + size))
        out = io.BytesIO()
        rgb.save(out, ENCODE_FORMATS[fmt], quality=95)
        return out.getvalue()
    except Exception as exc:  # noqa: BLE001
        return Reject("image_decode_failed", f"resize to {size} ({mode}): {type(exc).__name__}: {exc}")
