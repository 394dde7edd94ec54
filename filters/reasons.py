"""Every reject reason mmcorpus can give, in one place: stable snake_case strings that cards, stats and users
filter on. A filter returns `Reject(reason, detail)`; `Reject` refuses reasons not listed here."""

from __future__ import annotations

from dataclasses import dataclass

REASONS: dict[str, str] = {
    # sources
    "warc_not_response": "WARC record is not an HTTP response (request, metadata, warcinfo, ...)",
    "warc_invalid_record": "WARC record could not be parsed (truncated, bad chunking, bad headers)",
    "warc_file_truncated": "WARC file ends in the middle of a record",
    "http_error_status": "HTTP status is not 200",
    "not_html": "payload is not HTML (content type or sniffed bytes)",
    "binary_payload": "payload declared as text but holds binary data",
    "too_large": "payload is larger than the configured limit",
    "decode_failed": "bytes could not be decoded with the declared or detected charset",
    "fetch_failed": "URL could not be fetched (timeout, connection error, redirect loop)",
    "url_not_allowed": "URL scheme or host is refused (non-http, private network, robots.txt)",
    "read_failed": "input file could not be read (remote: still failing after the bounded retries)",
    "listing_bad_line": "a line of a WARC listing (warc.paths.gz) is not a WARC path",
    # extraction
    "extraction_empty": "no main content was extracted",
    "extraction_failed": "the extractor raised an error",
    # language and quality
    "language_not_allowed": "identified language is not in the allowed list",
    "language_low_confidence": "language identification confidence below threshold",
    "too_few_words": "fewer words than the minimum",
    "too_many_words": "more words than the maximum",
    "mean_word_length": "mean word length out of bounds",
    "symbol_ratio": "too many symbols (#, ...) per word",
    "special_character_ratio": "too many special characters",
    "bullet_lines": "too many lines start with a bullet",
    "ellipsis_lines": "too many lines end with an ellipsis",
    "stop_words": "too few stop words",
    "flagged_words": "too many flagged words",
    "punctuation_ratio": "too little punctuation",
    "duplicate_lines": "too many duplicate lines",
    "duplicate_paragraphs": "too many duplicate paragraphs",
    "top_ngram_fraction": "the most frequent n-gram covers too many characters",
    "duplicate_ngram_fraction": "duplicated n-grams cover too many characters",
    "character_repetition": "character n-gram repetition ratio too high",
    "word_repetition": "word n-gram repetition ratio too high",
    "boilerplate_only": "page holds only boilerplate",
    "alphabetic_words": "too few words contain a letter (Gopher)",
    "gutted_by_paragraph_rules": "the paragraph rules removed more than the allowed share of the extracted words",
    # images
    "image_url_pattern": "image URL looks like a logo, icon, sprite, tracking pixel, svg or data URI",
    "image_declared_size": "declared image size is out of bounds",
    "image_fetch_failed": "image could not be downloaded",
    "image_opt_out": "the image's own X-Robots-Tag header disallows its use (noai, noimageai, noindex, noimageindex)",
    "image_decode_failed": "image bytes could not be decoded",
    "image_too_small": "image side shorter than the minimum",
    "image_too_large": "image side longer than the maximum, or decompression bomb",
    "image_aspect_ratio": "image aspect ratio out of bounds",
    "image_format": "image format not allowed",
    "image_too_many": "more images in the document than the maximum",
    "image_repeated": "image appears in too many documents (boilerplate)",
    "no_images": "document has fewer images than the minimum",
    # dedup
    "duplicate_exact": "exact duplicate of another item",
    "duplicate_near": "near duplicate of another item",
    "duplicate_phash": "perceptually identical image (pHash within distance)",
    "duplicate_semantic": "semantic duplicate (embedding cosine above threshold)",
    "contaminated": "image near-duplicate to an evaluation set",
    # captions and pairs
    "caption_empty": "caption is empty or not text",
    "caption_boilerplate": "caption is boilerplate (file name, 'image', 'click here', ...)",
    "caption_too_short": "caption shorter than the minimum",
    "caption_too_long": "caption longer than the maximum",
    "caption_language": "caption language not allowed",
    "clip_score_low": "CLIP image-text similarity below threshold",
    "clip_rank_low": "not in the top fraction by CLIP score",
    "itm_low": "image-text matching probability below threshold",
    "no_caption_kept": "no web or synthetic caption of the image passed the filter",
    "missing_image": "no image bytes or readable path",
    # export
    "no_image_bytes": "no image bytes stored (a --no-images run): nothing to ship in an export",
    # safety and opt-outs (filters/safety.py, filters/pii.py)
    "opt_out_noai": "the page opts out of AI training (noai in its meta robots tag or X-Robots-Tag header)",
    "opt_out_noimageai": "the page opts its images out of AI training (noimageai)",
    "opt_out_list": "page or image URL is on a user opt-out list (domain, subdomain or URL prefix)",
    "blocklist": "page or image URL is on a blocklist (e.g. UT1 adult)",
    "flagged_image_words": "flagged word in the image URL, alt text or caption",
    "nsfw_image": "NSFW classifier score of the image above the threshold",
    "nsfw_document": "an image of the document scores above the document NSFW threshold",
    "pii_found": "text holds e-mail addresses, IP addresses or phone numbers (with --pii reject)",
}


MAX_DETAIL = 2000  # characters of a reject's detail that are stored


def shorten(text: str, limit: int = MAX_DETAIL) -> str:
    """`text` cut to `limit` characters in the middle, so both ends survive: an echoed input (a 10,000-character
    URL) loses its middle, never the reason written before or after it."""
    if len(text) <= limit:
        return text
    marker = f" ...[{len(text) - limit} characters cut]... "
    keep = max(limit - len(marker), 0)
    return text[:keep - keep // 2] + marker + text[len(text) - keep // 2:]


@dataclass(frozen=True)
class Reject:
    """Why an item was dropped. `reason` is one of REASONS; `detail` is free text (a measured value)."""

    reason: str
    detail: str = ""

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown reject reason {self.reason!r}: add it to filters/reasons.py")
