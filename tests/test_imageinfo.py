"""filters.imageinfo on real photos: every format of imagededup-ukbench, its corrupt copies, coco-mini, and
bad images built from real photos (truncated, CMYK, 16-bit, animated, decompression bomb). The pHash is
computed on a reduced decode (JPEG DCT scaling, box reduce otherwise): checked against imagehash on PIL's own
draft decode, and against imagehash at full resolution for how good a near-duplicate signal it stays."""

import hashlib
import io
import json
import struct
import zlib

import imagehash
import numpy as np
import pytest
from PIL import Image, ImageOps

from mmcorpus.filters.imageinfo import PHASH_MIN_SIDE, ImageInfo, inspect_image, phash_distance, phash_scale, to_rgb
from mmcorpus.filters.reasons import Reject


@pytest.fixture(scope="module")
def ukbench(shared_data):
    return shared_data / "imagededup-ukbench"


def reduced_reference(data):
    """imagehash.phash of the image reduced as filters.imageinfo documents it, built with PIL's public API:
    a JPEG through Image.draft, anything else decoded fully (to_rgb) and box-reduced."""
    img = Image.open(io.BytesIO(data))
    scale = phash_scale(*img.size)
    if img.format in ("JPEG", "MPO") and scale > 1:
        img.draft("L" if img.mode == "RGB" else None, (PHASH_MIN_SIDE, PHASH_MIN_SIDE))
        return str(imagehash.phash(ImageOps.exif_transpose(img)))  # RGB or L JPEGs here
    grey = to_rgb(data).convert("L")
    return str(imagehash.phash(grey.reduce(scale) if scale > 1 else grey))


def image_files(root):
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix not in (".json", ".md", ".txt"))


def test_ukbench_all_formats(ukbench):
    groups = json.loads((ukbench / "near_duplicates.json").read_text())["groups"]
    corrupt = {p for files in groups.values() for p in files if "corrupt" in p}
    seen = 0
    for path in image_files(ukbench):
        rel = path.relative_to(ukbench).as_posix()
        data = path.read_bytes()
        info = inspect_image(data)
        if rel in corrupt:
            assert isinstance(info, Reject) and info.reason == "image_decode_failed", rel
            continue
        assert isinstance(info, ImageInfo), (rel, info)
        seen += 1
        ref = Image.open(path)
        assert info.format == ref.format and info.mode == ref.mode
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        assert len(info.phash) == 16 and int(info.phash, 16) >= 0
        rgb = to_rgb(data)
        assert rgb.mode == "RGB" and rgb.size == (info.width, info.height)
        assert info.phash == reduced_reference(data), rel
        assert phash_distance(info.phash, str(imagehash.phash(rgb))) <= 4, rel  # vs full resolution
    assert seen >= 30


def test_ukbench_copies_have_close_hashes(ukbench):
    groups = json.loads((ukbench / "near_duplicates.json").read_text())["groups"]
    hashes = {}
    for gid, files in groups.items():
        for rel in files:
            info = inspect_image((ukbench / rel).read_bytes())
            if isinstance(info, ImageInfo):
                hashes[rel] = (gid, info.phash)
    # resized, grey and re-encoded copies sit within 10 bits of their original; flips/rotations do not (pHash
    # is not flip-invariant), so only the photometric/scale copies are asserted here
    for rel, (gid, h) in hashes.items():
        if any(t in rel for t in ("hflip", "rotation")):
            continue
        base = hashes[f"base_images/{gid}.jpg"][1]
        assert phash_distance(h, base) <= 10, rel
    bases = [h for rel, (g, h) in hashes.items() if rel.startswith("base_images/")]
    assert min(phash_distance(a, b) for i, a in enumerate(bases) for b in bases[i + 1:]) > 10


def test_coco_photos(coco):
    paths = sorted((coco / "images").glob("*.jpg"))
    assert len(paths) >= 100
    hashes, full = [], []
    for path in paths:
        data = path.read_bytes()
        info = inspect_image(data)
        assert isinstance(info, ImageInfo), path
        ref = Image.open(path)
        assert (info.width, info.height) == ref.size and info.n_frames == 1
        assert info.phash == reduced_reference(data), path
        hashes.append(info.phash)
        full.append(str(imagehash.phash(ref)))  # imagehash at full resolution
    assert len(set(hashes)) == len(hashes)
    to_full = [phash_distance(a, b) for a, b in zip(hashes, full)]
    assert max(to_full) <= 4 and sum(d == 0 for d in to_full) >= len(hashes) // 2
    # distinct photos stay as far apart as at full resolution: well beyond the dedup threshold (10)
    apart = [phash_distance(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1:]]
    apart_full = [phash_distance(a, b) for i, a in enumerate(full) for b in full[i + 1:]]
    assert min(apart) > 10 and min(apart) >= min(apart_full) - 2


def test_reencoded_resized_and_other_format_copies_stay_close(coco):
    paths = sorted((coco / "images").glob("*.jpg"))[:24]
    for path in paths:
        data = path.read_bytes()
        base = inspect_image(data).phash
        rgb = Image.open(io.BytesIO(data)).convert("RGB")
        half = rgb.resize((rgb.width // 2, rgb.height // 2), Image.Resampling.LANCZOS)
        for copy in (encode(half, "JPEG", quality=60), encode(rgb, "PNG"), encode(rgb, "WEBP")):
            info = inspect_image(copy)
            assert isinstance(info, ImageInfo) and phash_distance(info.phash, base) <= 4, path


def photo(coco):
    return sorted((coco / "images").glob("*.jpg"))[0].read_bytes()


def encode(img, fmt, **kw):
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def test_zero_truncated_garbage(coco):
    data = photo(coco)
    assert inspect_image(b"").reason == "image_decode_failed"
    assert inspect_image(b"not an image at all").reason == "image_decode_failed"
    rgb = Image.open(io.BytesIO(data)).convert("RGB")
    big = rgb.resize((3000, 2000), Image.Resampling.BICUBIC)  # decoded at 1/8 for the pHash
    jpegs = {"photo": data, "progressive": encode(rgb, "JPEG", quality=85, progressive=True),
             "grey": encode(rgb.convert("L"), "JPEG"), "3000x2000": encode(big, "JPEG", quality=90)}
    for name, jpeg in jpegs.items():
        assert isinstance(inspect_image(jpeg), ImageInfo), name
        for cut in (10, len(jpeg) // 3, len(jpeg) * 9 // 10, len(jpeg) - 200, len(jpeg) - 2):
            r = inspect_image(jpeg[:cut])
            assert isinstance(r, Reject) and r.reason == "image_decode_failed", (name, cut)
    png = encode(Image.open(io.BytesIO(data)), "PNG")
    assert inspect_image(png[: len(png) // 2]).reason == "image_decode_failed"


def test_large_and_tiny_images(coco):
    data = photo(coco)
    rgb = Image.open(io.BytesIO(data)).convert("RGB")
    base = inspect_image(data).phash
    big = rgb.resize((3000, 2000), Image.Resampling.BICUBIC)
    for fmt in ("JPEG", "PNG"):
        info = inspect_image(encode(big, fmt))
        assert (info.width, info.height) == (3000, 2000) and phash_distance(info.phash, base) <= 4, fmt
    for size in ((40, 30), (120, 90)):  # below 2 * PHASH_MIN_SIDE: not reduced, same as imagehash on the file
        small = encode(rgb.resize(size, Image.Resampling.LANCZOS), "JPEG")
        info = inspect_image(small)
        assert (info.width, info.height) == size
        assert info.phash == str(imagehash.phash(Image.open(io.BytesIO(small))))


def test_cmyk_16bit_animated_alpha_exif(coco):
    data = photo(coco)
    rgb = Image.open(io.BytesIO(data)).convert("RGB")
    base = inspect_image(data)

    cmyk = inspect_image(encode(rgb.convert("CMYK"), "JPEG", quality=95))
    assert isinstance(cmyk, ImageInfo) and cmyk.mode == "CMYK"
    assert to_rgb(encode(rgb.convert("CMYK"), "JPEG")).mode == "RGB"
    assert phash_distance(cmyk.phash, base.phash) <= 10

    grey16 = (np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    png16 = encode(Image.fromarray(grey16), "PNG")  # uint16 -> mode I;16
    info16 = inspect_image(png16)
    assert isinstance(info16, ImageInfo) and info16.mode.startswith("I")
    back = np.asarray(to_rgb(png16))
    assert back.shape == (rgb.height, rgb.width, 3)
    assert np.abs(back[..., 0].astype(int) - np.asarray(rgb.convert("L"), dtype=int)).max() <= 1
    assert phash_distance(info16.phash, base.phash) <= 10

    frames = [rgb, rgb.transpose(Image.Transpose.FLIP_TOP_BOTTOM), rgb.rotate(90)]
    gif = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)
    anim = inspect_image(gif)
    assert isinstance(anim, ImageInfo) and anim.n_frames == 3 and anim.format == "GIF"
    assert phash_distance(anim.phash, base.phash) <= 10  # first frame
    mpo = inspect_image(encode(rgb, "MPO", save_all=True, append_images=[frames[2]]))  # camera multi-picture JPEG
    assert isinstance(mpo, ImageInfo) and mpo.n_frames == 2 and mpo.format == "MPO"
    assert phash_distance(mpo.phash, base.phash) <= 4

    rgba = rgb.convert("RGBA")
    rgba.putalpha(128)
    assert to_rgb(encode(rgba, "PNG")).mode == "RGB"
    assert isinstance(inspect_image(encode(rgba, "PNG")), ImageInfo)

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated = inspect_image(encode(rgb, "JPEG", exif=exif.tobytes()))
    assert (rotated.width, rotated.height) == (rgb.height, rgb.width)
    turned = inspect_image(encode(rgb.transpose(Image.Transpose.ROTATE_270), "JPEG"))
    assert phash_distance(rotated.phash, turned.phash) <= 4 and phash_distance(rotated.phash, base.phash) > 10
    assert to_rgb(encode(rgb, "JPEG", exif=exif.tobytes())).size == (rgb.height, rgb.width)


def png_header_only(width, height):
    """A PNG that declares width x height pixels but carries a tiny compressed body: a decompression bomb."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_from_header(coco):
    bomb = png_header_only(30_000, 30_000)
    r = inspect_image(bomb)
    assert isinstance(r, Reject) and r.reason == "image_too_large"
    assert len(bomb) < 200
    small = inspect_image(photo(coco), max_pixels=1000)
    assert isinstance(small, Reject) and small.reason == "image_too_large"


def test_phash_distance():
    assert phash_distance("0" * 16, "f" * 16) == 64
    assert phash_distance("8000000000000001", "0000000000000000") == 2
    assert phash_distance("abcdef0123456789", "abcdef0123456789") == 0


def test_check_image_header_end_marker_and_decode(coco):
    from mmcorpus.filters.imageinfo import check_image

    data = photo(coco)
    width, height = Image.open(io.BytesIO(data)).size
    png = io.BytesIO()
    Image.open(io.BytesIO(data)).save(png, format="PNG")
    for decode in (False, True):
        assert check_image(data, decode=decode) == ("JPEG", width, height)
        assert check_image(data + b"trailing bytes after EOI", decode=decode) == ("JPEG", width, height)
        assert check_image(png.getvalue(), decode=decode) == ("PNG", width, height)
        for bad in (data[: len(data) // 2], png.getvalue()[:-200], b"\xff\xd8\xff\xe0 not a jpeg", b""):
            found = check_image(bad, decode=decode)
            assert isinstance(found, Reject) and found.reason == "image_decode_failed", (decode, len(bad))
    assert check_image(data, max_pixels=width * height - 1).reason == "image_too_large"


def test_header_size_agrees_with_pil(coco):
    """The header reader check_image uses for JPEG, PNG, GIF and WebP gives PIL's format and size; other
    formats and unusual headers are left to PIL (None)."""
    from mmcorpus.filters.imageinfo import header_size

    base = Image.open(io.BytesIO(photo(coco)))
    base.load()
    cases = [photo(coco), encode(base, "JPEG", progressive=True), encode(base.convert("L"), "JPEG"),
             encode(base.convert("CMYK"), "JPEG"), encode(base.convert("RGBA"), "PNG"),
             encode(base.convert("P"), "PNG"), encode(base.convert("I;16"), "PNG"), encode(base, "GIF"),
             encode(base, "WEBP"), encode(base, "WEBP", lossless=True), encode(base.convert("RGBA"), "WEBP")]
    for data in cases:
        img = Image.open(io.BytesIO(data))
        assert header_size(data) == (img.format, *img.size)
    for data in (encode(base, "BMP"), encode(base, "TIFF"), b"\xff\xd8\xff\xe0 not a jpeg", b""):
        assert header_size(data) is None


def test_header_info_is_inspect_image_without_decoding(ukbench, coco):
    """header_info (fetching with `decode: false`) gives inspect_image's size after EXIF orientation, format,
    mode, sha256 and frame count without decoding a pixel, and no pHash; cut-off and random bytes are still
    rejected, while damage inside the compressed data passes (it is what the decode finds)."""
    from mmcorpus.filters.imageinfo import header_info

    same = 0
    for path in image_files(ukbench):
        data = path.read_bytes()
        full, head = inspect_image(data), header_info(data)
        if isinstance(full, ImageInfo):
            assert isinstance(head, ImageInfo) and head.phash is None, path.name
            assert (head.width, head.height, head.format, head.mode, head.sha256, head.n_frames) == \
                (full.width, full.height, full.format, full.mode, full.sha256, full.n_frames), path.name
            same += 1
        elif isinstance(head, Reject):
            assert head.reason == full.reason, path.name
    assert same >= 30
    data = photo(coco)
    rgb = Image.open(io.BytesIO(data)).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    turned = header_info(encode(rgb, "JPEG", exif=exif.tobytes()))
    assert (turned.width, turned.height) == (rgb.height, rgb.width)
    for cut in (10, len(data) // 3, len(data) - 200, len(data) - 2):
        assert header_info(data[:cut]).reason == "image_decode_failed", cut
    assert header_info(b"not an image at all").reason == "image_decode_failed"
    assert header_info(png_header_only(30_000, 30_000)).reason == "image_too_large"
    damaged = bytearray(data)
    damaged[len(data) // 2: len(data) // 2 + 64] = bytes(64)  # zeroed entropy-coded data, end marker intact
    assert isinstance(header_info(bytes(damaged)), ImageInfo)
