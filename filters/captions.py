"""Caption cleaning for image-text pairs: normalise, then keep or reject with a reason.

`clean_caption(text)` unescapes HTML entities (twice: alt texts are often double-escaped), drops tags and
control characters, normalises Unicode (NFKC) and collapses whitespace. `check_caption(text, cfg)` returns the
cleaned caption or a Reject: caption_empty (null, not a string, nothing left), caption_boilerplate (file
names, "image", "click here", "untitled", placeholder/stock alt texts), caption_too_short (DataComp's basic
rule: more than 2 words and more than 5 characters), caption_too_long.
"""

from __future__ import annotations

import html
import re
import unicodedata
from dataclasses import dataclass

from mmcorpus.filters.reasons import Reject


@dataclass(frozen=True)
class CaptionConfig:
    min_words: int = 3  # DataComp: more than 2 words
    min_chars: int = 6  # DataComp: more than 5 characters
    max_chars: int = 1000
    max_words: int = 200


_TAG_RE = re.compile(r"<[^>]{0,200}>")
_CONTROL_RE = re.compile(r"[\u0000-\u0008\u000b-\u001f\u007f-\u009f\u200b-\u200f\u2028\u2029\ufeff]")
_WS_RE = re.compile(r"\s+")
_FILE_RE = re.compile(
    r"^[\w\-. ()\[\]%+~]{0,200}\.(jpe?g|png|gif|webp|bmp|tiff?|svg|heic|avif|jfif|ico|pdf|html?|php|aspx?)$",
    re.IGNORECASE)
_CAMERA_RE = re.compile(r"^(img|dsc|dscn|dcim|pict?|p|photo|image|screenshot|screen shot|whatsapp image)"
                        r"[\s_\-]*[\d_\-. :]+(am|pm)?$", re.IGNORECASE)
_URL_RE = re.compile(r"^(https?://|www\.)\S+$", re.IGNORECASE)
_BOILERPLATE = {
    "image", "images", "img", "photo", "photos", "picture", "pictures", "pic", "thumbnail", "thumb", "icon",
    "logo", "banner", "untitled", "untitled image", "no title", "none", "null", "undefined", "nan", "n/a",
    "na", "alt", "alt text", "image alt text", "placeholder", "click here", "click to enlarge",
    "click image to enlarge", "click for larger image", "view larger image", "read more", "more", "see more",
    "learn more", "download", "loading", "spacer", "blank", "default", "featured image", "main image",
    "product image", "image description", "image of", "photo of", "picture of", "image not available",
    "no image available", "image unavailable", "stock photo", "stock image", "royalty free stock photo",
    "advertisement", "sponsored", "share", "facebook", "twitter", "pinterest", "instagram", "email", "print",
    "avatar", "profile picture", "user avatar", "gravatar", "button", "arrow", "previous", "next", "home",
}
_BOILERPLATE_PREFIX_RE = re.compile(r"^(click here|click to|tap to|image|photo|picture)\b.{0,20}$", re.IGNORECASE)


def clean_caption(text: str) -> str:
    """The caption with entities decoded, tags and control characters removed and whitespace collapsed."""
    for _ in range(2):
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    text = unicodedata.normalize("NFKC", text)
    text = _TAG_RE.sub(" ", text)
    text = _CONTROL_RE.sub(" ", text)
    return _WS_RE.sub(" ", text).strip()


def boilerplate(text: str) -> str | None:
    """What kind of boilerplate a cleaned caption is, or None."""
    low = text.lower().strip(" .:;,!-_|")
    if not low:
        return "punctuation only"
    if low in _BOILERPLATE:
        return f"boilerplate alt text {low!r}"
    if _FILE_RE.match(low):
        return "file name"
    if _CAMERA_RE.match(low):
        return "camera/upload file name"
    if _URL_RE.match(low):
        return "URL"
    if _BOILERPLATE_PREFIX_RE.match(low) and len(low.split()) <= 3 and ("click" in low or "tap" in low):
        return f"boilerplate alt text {low!r}"
    if not any(ch.isalpha() for ch in low):
        return "no letters"
    return None


def check_caption(text, cfg: CaptionConfig | None = None) -> str | Reject:
    """The cleaned caption, or a Reject saying why it is not usable."""
    cfg = cfg or CaptionConfig()
    if not isinstance(text, str):
        return Reject("caption_empty", f"caption is {type(text).__name__}, not text")
    cleaned = clean_caption(text)
    if not cleaned:
        return Reject("caption_empty", "empty after cleaning" if text else "empty")
    kind = boilerplate(cleaned)
    if kind:
        return Reject("caption_boilerplate", f"{kind}: {cleaned[:80]!r}")
    words = len(cleaned.split())
    if words < cfg.min_words or len(cleaned) < cfg.min_chars:
        return Reject("caption_too_short", f"{words} words, {len(cleaned)} chars (min {cfg.min_words} words, "
                                           f"{cfg.min_chars} chars): {cleaned[:80]!r}")
    if len(cleaned) > cfg.max_chars or words > cfg.max_words:
        return Reject("caption_too_long", f"{words} words, {len(cleaned)} chars (max {cfg.max_words} words, "
                                          f"{cfg.max_chars} chars)")
    return cleaned
