"""Safety and opt-out decisions for documents and images. Pure: lists come parsed (filters/urllists.py), NSFW
heads come as weight arrays; the Beam stages that call these live in pipelines/safety/.

  - page directives: `noai` / `noimageai` in `<meta name="robots|ai|...bot" content=...>` or in the page's own
    `X-Robots-Tag` response header. `noai` drops the document, `noimageai` its images. A directive addressed to
    one crawler (`X-Robots-Tag: otherbot: noai`, `<meta name="googlebot">`) is honoured too: an opt-out from AI
    training addressed to any crawler is taken as meant for all. Other robots values (noindex, nofollow) are
    about search engines and are not acted on here (robots.txt is obeyed when pages are fetched);
  - URL lists: user opt-out lists and blocklists, on the page URL and every image URL;
  - flagged words (filters/wordlists.py) in image URLs and alt texts;
  - an NSFW head over CLIP image embeddings: a small MLP (Linear layers, ReLU between, one output logit) whose
    sigmoid is the image's NSFW score.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import unquote

import numpy as np

from mmcorpus.filters.reasons import Reject
from mmcorpus.filters.urllists import UrlList, first_match
from mmcorpus.filters.wordlists import FLAGGED_WORDS

NOAI, NOIMAGEAI = "noai", "noimageai"
_HINT = re.compile(r"no(?:image)?ai", re.I)  # pages without it hold no directive: one scan, no parsing
_META = re.compile(r"<[mM][eE][tT][aA]\b[^>]*>")
_ATTR = re.compile(r"""([a-zA-Z_:.-]+)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s"'>]+))""")
_TOKENS = re.compile(r"[\s,;]+")
_WORDS = re.compile(r"[^\W\d_]+")
META_NAMES = ("robots", "ai")  # and any name ending in "bot" (googlebot, ccbot, gptbot, ...)


def _tokens(value: str) -> set[str]:
    out = set()
    for token in _TOKENS.split(value.lower()):
        token = token.strip("\"'")
        out.add(token.rsplit(":", 1)[-1] if ":" in token else token)  # "otherbot:noai" -> "noai"
    return out & {NOAI, NOIMAGEAI}


def _header_tokens(value: str) -> set[str]:
    # "otherbot: noai, noimageai" -> the agent prefix sits before the first directive only
    return _tokens(re.sub(r"^\s*[\w.-]+\s*:\s*", "", value)) | _tokens(value)


def header_directives(values, wanted) -> list[str]:
    """Which of the `wanted` directives (lower case) the X-Robots-Tag header values carry, whichever crawler
    they address ("otherbot: noimageai" counts, as an opt-out from one crawler is one from all). Sorted."""
    found = set()
    for value in values or ():
        if isinstance(value, str):
            for token in _TOKENS.split(value.lower()):
                directive = token.strip("\"'").rsplit(":", 1)[-1]
                if directive in wanted:
                    found.add(directive)
    return sorted(found)


def page_directives(html: str | None, robots_headers: list[str] | tuple = ()) -> dict[str, str]:
    """{directive: where} for `noai` / `noimageai` found in the page's meta tags or its X-Robots-Tag header
    values (where: 'meta name=robots' or 'X-Robots-Tag'). Malformed tags and values yield nothing."""
    found: dict[str, str] = {}
    for value in robots_headers or ():
        if isinstance(value, str) and _HINT.search(value):
            for d in _header_tokens(value):
                found.setdefault(d, "X-Robots-Tag")
    if html:
        for tag in _META.findall(html):  # one scan for meta tags (a case-insensitive scan of the page is slower)
            if not _HINT.search(tag):
                continue
            attrs = {m.group(1).lower(): next(g for g in m.groups()[1:] if g is not None) for m in _ATTR.finditer(tag)}
            name = (attrs.get("name") or "").strip().lower()
            if name in META_NAMES or name.endswith("bot"):
                for d in _tokens(attrs.get("content") or ""):
                    found.setdefault(d, f"meta name={name}")
    return found


@dataclass(frozen=True)
class Lists:
    """The URL lists a run applies (each already parsed)."""

    opt_out: tuple[UrlList, ...] = ()
    block: tuple[UrlList, ...] = ()


def url_reject(url: str | None, lists: Lists, what: str) -> Reject | None:
    """Reject when `url` falls under an opt-out list ('opt_out_list') or a blocklist ('blocklist')."""
    if not url or not (lists.opt_out or lists.block):
        return None
    hit = first_match(lists.opt_out, url)
    if hit:
        return Reject("opt_out_list", f"{what} under {hit[1]!r} of opt-out list {hit[0]}")
    hit = first_match(lists.block, url)
    if hit:
        return Reject("blocklist", f"{what} under {hit[1]!r} of blocklist {hit[0]}")
    return None


def flagged_word(text: str | None) -> str | None:
    """The first flagged word of `text` (split at non-letters, lower-cased), or None."""
    for word in _WORDS.findall((text or "").lower()):
        if word in FLAGGED_WORDS:
            return word
    return None


def flagged_in(url: str | None, alt: str | None) -> str | None:
    """The first flagged word among the words of an image URL (decoded, split at non-letters) or its alt text."""
    for where, text in (("URL", unquote(url or "")), ("alt text", alt or "")):
        word = flagged_word(text)
        if word:
            return f"flagged word {word!r} in image {where}"
    return None


def image_reject(url: str | None, alt: str | None, lists: Lists, flagged_words: bool = True,
                 noimageai: str | None = None) -> Reject | None:
    """Why one image of a document is dropped (page's noimageai, lists, flagged words), or None."""
    if noimageai:
        return Reject("opt_out_noimageai", f"noimageai in the page's {noimageai}")
    r = url_reject(url, lists, "image URL")
    if r is not None:
        return r
    if flagged_words:
        why = flagged_in(url, alt)
        if why:
            return Reject("flagged_image_words", why)
    return None


# ---- NSFW head over CLIP image embeddings ---------------------------------------------------------------

@dataclass
class NsfwHead:
    """An MLP over L2-normalised CLIP image embeddings: Linear layers `(weight [out, in], bias [out])`, ReLU
    between them, one output logit; the score is its sigmoid."""

    layers: list[tuple[np.ndarray, np.ndarray]]

    def __post_init__(self):
        if not self.layers:
            raise ValueError("NSFW head has no layers")
        width = None
        for i, (w, b) in enumerate(self.layers):
            if w.ndim != 2 or b.shape != (w.shape[0],):
                raise ValueError(f"NSFW head layer {i}: weight {w.shape} and bias {b.shape} do not fit a Linear layer")
            if width is not None and w.shape[1] != width:
                raise ValueError(f"NSFW head layer {i} takes {w.shape[1]} inputs, the layer before gives {width}")
            width = w.shape[0]
        if width != 1:
            raise ValueError(f"NSFW head ends in {width} outputs; one logit is expected")

    @property
    def input_dim(self) -> int:
        return int(self.layers[0][0].shape[1])

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        """NSFW probability per row of `embeddings` [n, d], float32."""
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"NSFW head takes {self.input_dim}-dimensional embeddings, got shape {x.shape}")
        for i, (w, b) in enumerate(self.layers):
            x = x @ w.T.astype(np.float32) + b.astype(np.float32)
            if i < len(self.layers) - 1:
                x = np.maximum(x, 0)
        return (1.0 / (1.0 + np.exp(-x[:, 0]))).astype(np.float32)


@dataclass(frozen=True)
class NsfwPolicy:
    """Images scoring above `image_threshold` are dropped; with `document_threshold` set, a document with any
    image above it is dropped whole (OBELICS dropped such documents). For pairs an image is the row."""

    image_threshold: float = 0.5
    document_threshold: float | None = None

    def __post_init__(self):
        for name in ("image_threshold", "document_threshold"):
            v = getattr(self, name)
            if v is not None and not 0.0 <= v <= 1.0:
                raise ValueError(f"NSFW {name.replace('_', ' ')} {v} is not in [0, 1]")

    def image(self, score: float) -> Reject | None:
        if score > self.image_threshold:
            return Reject("nsfw_image", f"nsfw_score {score:.4f} > {self.image_threshold}")
        return None

    def document(self, scores: list[float]) -> Reject | None:
        if self.document_threshold is None or not scores:
            return None
        top = max(scores)
        if top > self.document_threshold:
            return Reject("nsfw_document", f"an image's nsfw_score {top:.4f} > {self.document_threshold}")
        return None
