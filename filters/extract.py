"""Main-content extraction that keeps images where they sat: HTML -> texts/images lists in reading order.

`normalise_images` rewrites lazy-loading markup (data-src, data-lazy-src, data-original, srcset/data-srcset
(largest candidate), <picture><source srcset>) into plain absolute `<img src>` (resolved against `<base href>`
and the page URL) and records declared sizes (pixels only; a srcset w descriptor is the real width);
trafilatura's `bare_extraction` (include_images=True) then keeps `<graphic src alt>` in place in the body it
returns, and `body_to_lists` turns that body into text chunks (one line per block: paragraphs, headings, list
items) separated by image positions. A malformed image URL is left as written for the image URL rules to
reject; the text stays.
"""

from __future__ import annotations

import re
from urllib.parse import urljoin

from lxml import etree
from lxml import html as lxml_html

from mmcorpus.filters.figures import recover_article_images
from mmcorpus.filters.images import pixels
from mmcorpus.filters.reasons import Reject

LAZY_ATTRS = ("data-src", "data-lazy-src", "data-original", "data-lazy", "data-url")
BLOCK = {"p", "head", "item", "list", "row", "cell", "quote", "code", "table", "div", "lb", "main"}
_PAGE_LINK = re.compile(r"(/|\.(?:html?|php|aspx?|jsp))(?:[?#].*)?$", re.I)  # a page, not an image
_WS = re.compile(r"\s+")
_INVISIBLE = re.compile("[\u00ad\u200b\u200c\u200d\u2060\ufeff]")  # soft hyphen, zero-width characters
# trafilatura's own parser settings (comments and processing instructions dropped at parse time)
_PARSER_OPTIONS = {"collect_ids": False, "default_doctype": False, "remove_comments": True, "remove_pis": True}
# Every element is an HtmlElement (trafilatura and readability use its methods), but chosen in C: lxml.html's
# default lookup calls Python for each element it touches (per tag name, for form classes), which cost about a
# fifth of extraction time on the trafilatura-eval pages, with identical output (bench/bench_extract_options.py).
_LOOKUP = etree.ElementDefaultClassLookup(element=lxml_html.HtmlElement, comment=lxml_html.HtmlComment,
                                          pi=lxml_html.HtmlProcessingInstruction, entity=lxml_html.HtmlEntity)
_PARSER = lxml_html.HTMLParser(**_PARSER_OPTIONS)
_UTF8_PARSER = lxml_html.HTMLParser(encoding="utf-8", **_PARSER_OPTIONS)
for _parser in (_PARSER, _UTF8_PARSER):
    _parser.set_element_class_lookup(_LOOKUP)


def largest_candidate(srcset: str) -> tuple[str | None, int | None]:
    """(URL, width) of the candidate with the largest width (w) or density (x) descriptor (the first if none
    is given); width is the w descriptor when there is one: the image's real pixel width."""
    best, best_size, best_w = None, -1.0, None
    for part in srcset.split(","):
        bits = part.strip().split()
        if not bits:
            continue
        size, width = 0.0, None
        if len(bits) > 1:
            d = bits[1].lower()
            try:
                size = float(d[:-1]) if d[-1] in "wx" else 0.0
            except ValueError:
                size = 0.0
            width = int(size) if d.endswith("w") and size > 0 else None
        if size > best_size:
            best, best_size, best_w = bits[0], size, width
    return best, best_w


def _join(base: str, src: str) -> str | None:
    """src resolved against base; None when either is malformed (urljoin raises on e.g. "http://[bad/")."""
    try:
        return urljoin(base, src)
    except ValueError:
        return None


def normalise_images(tree, page_url: str) -> dict[str, list]:
    """Rewrite every <img> to an absolute src in place; return declared sizes {url: [w, h]}. A src that cannot
    be resolved (malformed URL) is left as written: the image URL rules reject it, the text stays."""
    base = page_url or ""
    for b in tree.iter("base"):
        if b.get("href"):
            base = _join(base, b.get("href").strip()) or base  # a malformed <base> is ignored
            break
    declared: dict[str, list] = {}
    for img in list(tree.iter("img")):
        src, src_w, swapped = None, None, True  # swapped: the URL is not the plain src (lazy/srcset/picture)
        for attr in LAZY_ATTRS:
            value = (img.get(attr) or "").strip()
            if value and not _PAGE_LINK.search(value):  # data-url may hold the link the image leads to
                src = value
                break
        for attr in ("data-srcset", "srcset"):
            if (img.get(attr) or "").strip():
                cand, cand_w = largest_candidate(img.get(attr))
                if cand:
                    src, src_w = cand, cand_w
                break
        # libxml2 does not know <source> is void and may nest the <img> inside it: look two levels up
        picture = next((a for _, a in zip(range(3), img.iterancestors()) if a.tag == "picture"), None)
        if picture is not None and not src:
            for source in picture.iter("source"):
                src, src_w = largest_candidate(source.get("srcset") or source.get("data-srcset") or "")
                if src:
                    break
        if not src:
            src, swapped = (img.get("src") or "").strip(), False
        if not src:
            continue
        absolute = src if src.startswith("data:") else (_join(base, src) or src)
        img.set("src", absolute)
        for attr in (*LAZY_ATTRS, "srcset", "data-srcset"):  # trafilatura would prefer these, unresolved
            if attr in img.attrib:
                del img.attrib[attr]
        size = declared_size(pixels(img.get("width")), pixels(img.get("height")), src_w, swapped)
        if size:
            declared[absolute] = size
    return declared


def declared_size(w: int | None, h: int | None, srcset_w: int | None, swapped: bool) -> list | None:
    """[width, height] an <img> declares for the URL it loads, or None. A srcset w descriptor is the real
    width (width/height attributes then give the aspect ratio: `width=16 height=9` on a 1440w candidate). On a
    lazy-loaded image, sides under 50 px describe the placeholder or an aspect ratio, not the image."""
    if srcset_w:
        return [srcset_w, round(srcset_w * h / w) if w and h else None]
    if swapped and max(w or 0, h or 0) < 50:
        return None
    return [w, h] if w or h else None


def body_to_lists(main) -> tuple[list, list, list, list]:
    """trafilatura's extracted body (XML elements p, head, list/item, table/row/cell, graphic, ...) -> (texts,
    images, image_info, units); one line per block, text chunks between images. A table row is one line, its
    cells joined by " | "; a list item one line starting "- ". `units` holds, per text position, the unit of each
    line: "p" (paragraph), "h" (heading), "li:N" (an item of list N), "tr:N" (a row of table N), "code:N" (a line of
    code block N)."""
    texts, images, infos, units, lines, labels, cur = [], [], [], [], [], [], []
    counter = [0]

    def newline(unit):
        s = _WS.sub(" ", _INVISIBLE.sub("", "".join(cur))).strip()
        if s and s != "-":
            lines.append(s)
            labels.append(unit)
        cur.clear()

    def flush(unit="p"):
        newline(unit)
        if lines:
            texts.append("\n".join(lines))
            units.append(list(labels))
            images.append(None)
            infos.append(None)
            lines.clear()
            labels.clear()

    def walk(el, unit):
        tag = el.tag
        if tag == "graphic":
            src = (el.get("src") or "").strip()
            if src:
                flush(unit)
                texts.append(None)
                units.append(None)
                images.append(src)
                infos.append(image_info(src, el.get("alt") or el.get("title") or ""))
            return
        if tag in ("list", "table") and ":" not in unit:  # a nested list or table joins its parent
            counter[0] += 1
            unit = f"{'li' if tag == 'list' else 'tr'}:{counter[0]}"
        elif tag == "code" and unit == "p" and el.getparent() is not None and el.getparent().tag != "p":
            counter[0] += 1
            unit = f"code:{counter[0]}"  # a code block (inline code inside a paragraph stays part of it)
        elif tag == "head" and unit == "p":
            unit = "h"
        in_row = unit.startswith("tr:") and tag not in ("table", "row")  # inside a row: cells, not lines
        if tag == "cell" and "".join(cur).strip():
            cur.append(" | ")
        elif tag in BLOCK and not in_row:
            newline(unit)
            if tag == "item":
                cur.append("- ")
        if el.text:
            cur.append(el.text)
        for child in el:
            walk(child, unit)
            if child.tail:
                cur.append(child.tail)
        if tag in BLOCK and not in_row:
            newline(unit)
        elif in_row:
            cur.append(" ")

    if main is not None:
        walk(main, "p")
    flush()
    return texts, images, infos, units


def image_info(url: str, alt: str) -> dict:
    return {"url": url, "alt": alt, "sha256": None, "width": None, "height": None, "phash": None, "bytes": None,
            "path": None}


def canonical_url(tree) -> str | None:
    """<link rel=canonical href> or <meta property=og:url content>, when absolute http(s)."""
    for link in tree.iter("link"):
        if "canonical" in (link.get("rel") or "").lower().split() and (link.get("href") or "").startswith("http"):
            return link.get("href").strip()
    for meta in tree.iter("meta"):
        if (meta.get("property") or "").lower() == "og:url" and (meta.get("content") or "").startswith("http"):
            return meta.get("content").strip()
    return None


def extract(html: str, url: str, options: dict | None = None,
            article_images: bool = True) -> tuple[list, list, list, dict] | Reject:
    """HTML -> (texts, images, image_info, metadata) or a Reject (extraction_empty / extraction_failed).
    `options`: trafilatura settings (ExtractConfig.trafilatura_options(): fast, favor_precision, ...); None:
    ExtractConfig's defaults. `article_images`: put back the article images trafilatura left out
    (filters/figures.py); metadata "article_images_added" counts them."""
    import trafilatura

    try:
        try:
            tree = lxml_html.document_fromstring(html, parser=_PARSER)
        except ValueError:  # str with an <?xml encoding=...?> declaration
            tree = lxml_html.document_fromstring(html.encode("utf-8"), parser=_UTF8_PARSER)
        canonical = None if url else canonical_url(tree)
        declared = normalise_images(tree, url or canonical or "")
        title = tree.findtext(".//title")
        # bare_extraction hands back the body as elements: no XML serialisation and re-parse (~15% faster)
        if options is None:
            from mmcorpus.filters.documents import ExtractConfig

            options = ExtractConfig().trafilatura_options()
        result = trafilatura.bare_extraction(tree, url=url, include_images=True, with_metadata=False, **options)
        body = getattr(result, "body", None)
        if body is None or not len(body) and not (body.text or "").strip():
            return Reject("extraction_empty", "trafilatura found no main content")
        added = recover_article_images(tree, body) if article_images else 0
        texts, images, infos, units = body_to_lists(body)
    except Exception as exc:  # lxml/trafilatura raise many types on malformed pages
        if "Document is empty" in str(exc):
            return Reject("extraction_empty", "empty document")
        return Reject("extraction_failed", f"{type(exc).__name__}: {exc}")
    if not texts:
        return Reject("extraction_empty", "main content holds no text or images")
    used = {i for i in images if i}
    meta = {"title": _WS.sub(" ", title).strip() if title else None, "canonical_url": canonical,
            "declared_sizes": {u: s for u, s in declared.items() if u in used},
            "article_images_added": added, "_units": units}  # line units for the paragraph rules; "_" keys are never written
    return texts, images, infos, meta


# Markup an image of the extracted document can come from (normalise_images reads <img> elements, trafilatura
# keeps <graphic> from them); <picture>, srcset and <image>/<amp-img> too, so markup an extractor may learn to
# read is never judged image-free. Checked on the HTML text before parsing.
_IMAGE_MARKUP = re.compile(r"<(?:img|image|picture|amp-img)[\s/>]|srcset", re.I)


def may_hold_images(html: str) -> bool:
    """False only when the page has no image markup at all, so extraction cannot yield an image."""
    return "<img" in html or _IMAGE_MARKUP.search(html) is not None  # plain search first: most pages have one
