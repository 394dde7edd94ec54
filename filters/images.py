"""Image rules for interleaved documents: URL patterns and declared sizes before fetching, the per-document
image count, and decoded size/aspect/format after fetching. Dropping an image removes only its position."""

from __future__ import annotations

import re
from urllib.parse import unquote

from mmcorpus.filters.reasons import Reject
from mmcorpus.filters.urls import split_url

# Words in the URL (path, file name or host) that mark site furniture rather than content images. Matched
# as whole tokens: "logo" in "site-logo_2x.png" but not "logos" inside "ecologos"; digits may touch them.
_FURNITURE = (
    r"logos?|icons?|favicons?|apple-touch-icon|sprites?|avatars?|gravatar|pixel|beacon|tracking|tracker|"
    r"spacer|blank|transparent|1x1|emojis?|emoticons?|smileys?|badges?|buttons?|btn|widgets?|"
    r"placeholder|lazy-?placeholder|loading|loader|spinner|ads|adserver|adview|adverts?|advertisement|"
    r"rss|arrows?|bullet|cta|partners?|sponsors?"  # cta: call-to-action buttons; partner/sponsor logo folders
)
_FURNITURE_RE = re.compile(rf"(?<![a-z])(?:{_FURNITURE})(?![a-z])")
# Hosts that only serve ads, tracking pixels or avatars.
_BAD_HOSTS_RE = re.compile(
    r"(^|\.)(doubleclick\.net|googlesyndication\.com|googleadservices\.com|google-analytics\.com|"
    r"googletagmanager\.com|adnxs\.com|amazon-adsystem\.com|scorecardresearch\.com|quantserve\.com|"
    r"gravatar\.com|pixel\.wp\.com|stats\.wp\.com|facebook\.com|feeds\.feedburner\.com|vgwort\.de|"
    r"ioam\.de|criteo\.com|taboola\.com|outbrain\.com|adform\.net|bat\.bing\.com|analytics\.[a-z.]+)$"
)
# Query parameters of tracking pixels (`?utm_...` alone is not enough: content images carry those too).
_TRACKING_QUERY_RE = re.compile(r"(^|&)(pixel|beacon|tracking|event|cb|rnd)=")
_EXT_RE = re.compile(r"\.([a-z0-9]{2,5})$")
_KNOWN_IMAGE_EXTS = {"jpg", "jpeg", "jpe", "png", "webp", "gif", "bmp", "tif", "tiff", "avif", "heic", "heif",
                     "ico", "svg", "svgz", "jxl", "jp2", "apng"}


def url_reject(url: str, cfg) -> Reject | None:
    """Reject for an image URL by scheme, pattern or extension, or None to keep it."""
    ic = cfg.images
    if not isinstance(url, str) or not url.strip():
        return Reject("url_not_allowed", "empty image URL")
    low = url.strip().lower()
    if low.startswith("data:"):
        return Reject("image_url_pattern", "data: URI")
    parts, malformed = split_url(low)
    if malformed:
        return Reject("url_not_allowed", malformed)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return Reject("url_not_allowed", f"scheme {parts.scheme or '(relative)'!r} is not http(s)")
    path = unquote(parts.path)
    m = _EXT_RE.search(path)
    ext = m.group(1) if m else None
    if ic.drop_url_patterns:
        if ext in ("svg", "svgz"):
            return Reject("image_url_pattern", "svg")
        if _BAD_HOSTS_RE.search(parts.hostname):
            return Reject("image_url_pattern", f"ad/tracking host {parts.hostname}")
        hit = _FURNITURE_RE.search(path)
        if hit:
            return Reject("image_url_pattern", f"{hit.group(0)!r} in path")
        if _TRACKING_QUERY_RE.search(parts.query):
            return Reject("image_url_pattern", "tracking query")
    for pattern in ic.extra_url_patterns:
        if re.search(pattern, low):
            return Reject("image_url_pattern", f"matches {pattern!r}")
    allowed = {f.lower().lstrip(".") for f in ic.formats}
    if ext in _KNOWN_IMAGE_EXTS and ext not in allowed and not ({"jpg", "jpeg"} & allowed and ext == "jpe"):
        return Reject("image_format", f".{ext} not in {sorted(allowed)}")
    return None


def size_problem(width, height, cfg) -> tuple[str, str] | None:
    """("small" | "large" | "aspect", detail) for the known sides (either may be None), or None."""
    ic = cfg.images
    sides = [s for s in (width, height) if s is not None]
    for s in sides:
        if s < ic.min_side:
            return "small", f"{width}x{height}: side {s} < min {ic.min_side}"
        if s > ic.max_side:
            return "large", f"{width}x{height}: side {s} > max {ic.max_side}"
    if len(sides) == 2:
        ratio = max(sides) / min(sides)
        if ratio > ic.max_aspect_ratio:
            return "aspect", f"{width}x{height}: aspect ratio {ratio:.2f} > max {ic.max_aspect_ratio}"
    return None


_DECODED_REASONS = {"small": "image_too_small", "large": "image_too_large", "aspect": "image_aspect_ratio"}


_PIXELS = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(?:px)?\s*", re.I)


def pixels(value) -> int | None:
    """A declared size in pixels (300, "300", "300px", "300.5"); None for "100%", "auto", "20em", None, ..."""
    m = _PIXELS.fullmatch("" if value is None else str(value))
    return int(float(m.group(1))) if m else None


def _declared(value) -> tuple[int | None, int | None]:
    def side(v):
        v = pixels(v)
        return v if v is not None and v > 0 else None

    if isinstance(value, dict):
        return side(value.get("width")), side(value.get("height"))
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return side(value[0]), side(value[1])
    return None, None


def filter_image_urls(doc: dict, cfg) -> tuple[dict, list[tuple[str, Reject]]]:
    """Drop images by URL rules and declared size, then keep at most `max_per_doc`. Text positions are left
    exactly as they were. Returns (doc, [(image_url, Reject), ...])."""
    declared = (doc.get("metadata") or {}).get("declared_sizes") or {}
    dropped: list[tuple[str, Reject]] = []
    keep = []
    kept_images = extra = 0
    infos = doc.get("image_info") or [None] * len(doc["texts"])
    for text, image, info in zip(doc["texts"], doc["images"], infos):
        if image is not None:
            r = url_reject(image, cfg)
            if r is None and image in declared:
                problem = size_problem(*_declared(declared[image]), cfg)
                if problem:
                    r = Reject("image_declared_size", "declared " + problem[1])
            if r is None and kept_images >= cfg.images.max_per_doc:
                extra += 1
                r = Reject("image_too_many", f"image {kept_images + extra} > max {cfg.images.max_per_doc} a document")
            if r is not None:
                dropped.append((image, r))
                continue
            kept_images += 1
        keep.append((text, image, info))
    if dropped:
        doc["texts"] = [k[0] for k in keep]
        doc["images"] = [k[1] for k in keep]
        doc["image_info"] = [k[2] for k in keep]
    return doc, dropped


def check_image_count(doc: dict, cfg) -> dict | Reject:
    ic = cfg.images
    n = sum(1 for i in doc["images"] if i is not None)
    if n < ic.min_per_doc:
        return Reject("no_images", f"{n} images < min {ic.min_per_doc}")
    if n > ic.max_per_doc:
        return Reject("image_too_many", f"{n} images > max {ic.max_per_doc}")
    return doc


_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
)


def sniff_format(data: bytes | None) -> str | None:
    """Image format from the first bytes (jpeg, png, gif, webp, bmp, tiff, avif), None if unknown."""
    if not data:
        return None
    head = bytes(data[:32])
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[4:8] == b"ftyp" and head[8:12] in (b"avif", b"avis"):
        return "avif"
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    return None


def check_decoded_image(info: dict, cfg) -> Reject | None:
    """After fetching: the decoded width/height (and format, from info["format"] or the bytes) against the
    image rules. None keeps the image."""
    w, h = info.get("width"), info.get("height")
    if not w or not h or w <= 0 or h <= 0:
        return Reject("image_decode_failed", f"no decoded size ({w}x{h})")
    problem = size_problem(w, h, cfg)
    if problem:
        return Reject(_DECODED_REASONS[problem[0]], "decoded " + problem[1])
    fmt = (info.get("format") or sniff_format(info.get("bytes")) or "").lower()
    fmt = {"jpg": "jpeg", "mpo": "jpeg"}.get(fmt, fmt)  # PIL names multi-picture JPEGs MPO
    allowed = {"jpeg" if f.lower() in ("jpg", "jpeg") else f.lower() for f in cfg.images.formats}
    if fmt and fmt not in allowed:
        return Reject("image_format", f"decoded format {fmt} not in {sorted(allowed)}")
    return None
