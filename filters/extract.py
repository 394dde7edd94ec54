"""Main-content extraction that keeps images where they sat: HTML -> texts/images lists in reading order.

`normalise_images` rewrites lazy-loading markup (data-src, data-lazy-src, data-original, srcset/data-srcset
(largest candidate), <picture><source srcset>) into plain absolute `<img src>` (resolved against `<base href>`
and the page URL) and records declared width/height; trafilatura (include_images=True, XML output) then keeps
`<graphic src alt>` in place, and `xml_to_lists` turns that XML into text chunks (one line per block:
paragraphs, headings, list items) separated by image positions.
"""

from __future__ import annotations

import re
from urllib.parse import urljoin

from lxml import etree
from lxml import html as lxml_html

from filters.reasons import Reject

LAZY_ATTRS = ("data-src", "data-lazy-src", "data-original", "data-lazy", "data-url")
BLOCK = {"p", "head", "item", "list", "row", "cell", "quote", "code", "table", "div", "lb", "main"}
_WS = re.compile(r"\s+")
_INVISIBLE = re.compile("[\u00ad\u200b\u200c\u200d\u2060\ufeff]")  # soft hyphen, zero-width characters
_UTF8_PARSER = lxml_html.HTMLParser(encoding="utf-8")


def largest_srcset(srcset: str) -> str | None:
    """The candidate with the largest width (w) or density (x) descriptor; the first if none is given."""
    best, best_size = None, -1.0
    for part in srcset.split(","):
        bits = part.strip().split()
        if not bits:
            continue
        size = 0.0
        if len(bits) > 1:
            d = bits[1].lower()
            try:
                size = float(d[:-1]) if d[-1] in "wx" else 0.0
            except ValueError:
                size = 0.0
        if size > best_size:
            best, best_size = bits[0], size
    return best


def _int(value) -> int | None:
    m = re.match(r"\s*(\d+)", value or "")
    return int(m.group(1)) if m else None


def normalise_images(tree, page_url: str) -> dict[str, list]:
    """Rewrite every <img> to an absolute src in place; return declared sizes {url: [w, h]}."""
    base = page_url or ""
    for b in tree.iter("base"):
        if b.get("href"):
            base = urljoin(base, b.get("href").strip())
            break
    declared: dict[str, list] = {}
    for img in list(tree.iter("img")):
        src = None
        for attr in LAZY_ATTRS:
            if (img.get(attr) or "").strip():
                src = img.get(attr).strip()
                break
        for attr in ("data-srcset", "srcset"):
            if (img.get(attr) or "").strip():
                src = largest_srcset(img.get(attr)) or src
                break
        # libxml2 does not know <source> is void and may nest the <img> inside it: look two levels up
        picture = next((a for _, a in zip(range(3), img.iterancestors()) if a.tag == "picture"), None)
        if picture is not None:
            for source in picture.iter("source"):
                cand = largest_srcset(source.get("srcset") or source.get("data-srcset") or "")
                if cand and not src:
                    src = cand
        src = src or (img.get("src") or "").strip()
        if not src:
            continue
        absolute = src if src.startswith("data:") else urljoin(base, src)
        img.set("src", absolute)
        for attr in (*LAZY_ATTRS, "srcset", "data-srcset"):  # trafilatura would prefer these, unresolved
            if attr in img.attrib:
                del img.attrib[attr]
        w, h = _int(img.get("width")), _int(img.get("height"))
        if w or h:
            declared[absolute] = [w, h]
    return declared


def xml_to_lists(xml: str) -> tuple[list, list, list]:
    """trafilatura XML output -> (texts, images, image_info)."""
    return body_to_lists(etree.fromstring(xml.encode("utf-8")).find("main"))


def body_to_lists(main) -> tuple[list, list, list]:
    """trafilatura's extracted body (XML elements p, head, list/item, table, graphic, ...) -> (texts, images,
    image_info); one line per block, text chunks between images."""
    texts, images, infos, lines, cur = [], [], [], [], []

    def newline():
        s = _WS.sub(" ", _INVISIBLE.sub("", "".join(cur))).strip()
        if s:
            lines.append(s)
        cur.clear()

    def flush():
        newline()
        if lines:
            texts.append("\n".join(lines))
            images.append(None)
            infos.append(None)
            lines.clear()

    def walk(el):
        if el.tag == "graphic":
            src = (el.get("src") or "").strip()
            if src:
                flush()
                texts.append(None)
                images.append(src)
                infos.append(image_info(src, el.get("alt") or el.get("title") or ""))
            return
        if el.tag in BLOCK:
            newline()
            if el.tag == "item":
                cur.append("- ")
        if el.text:
            cur.append(el.text)
        for child in el:
            walk(child)
            if child.tail:
                cur.append(child.tail)
        if el.tag in BLOCK:
            newline()

    if main is not None:
        walk(main)
    flush()
    return texts, images, infos


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


def extract(html: str, url: str) -> tuple[list, list, list, dict] | Reject:
    """HTML -> (texts, images, image_info, metadata) or a Reject (extraction_empty / extraction_failed)."""
    import trafilatura

    try:
        try:
            tree = lxml_html.document_fromstring(html)
        except ValueError:  # str with an <?xml encoding=...?> declaration
            tree = lxml_html.document_fromstring(html.encode("utf-8"), parser=_UTF8_PARSER)
        canonical = None if url else canonical_url(tree)
        declared = normalise_images(tree, url or canonical or "")
        title = tree.findtext(".//title")
        # bare_extraction hands back the body as elements: no XML serialisation and re-parse (~15% faster)
        result = trafilatura.bare_extraction(tree, url=url, include_images=True, include_tables=True,
                                             with_metadata=False)
        body = getattr(result, "body", None)
        if body is None or not len(body) and not (body.text or "").strip():
            return Reject("extraction_empty", "trafilatura found no main content")
        texts, images, infos = body_to_lists(body)
    except Exception as exc:  # lxml/trafilatura raise many types on malformed pages
        if "Document is empty" in str(exc):
            return Reject("extraction_empty", "empty document")
        return Reject("extraction_failed", f"{type(exc).__name__}: {exc}")
    if not texts:
        return Reject("extraction_empty", "main content holds no text or images")
    used = {i for i in images if i}
    meta = {"title": _WS.sub(" ", title).strip() if title else None, "canonical_url": canonical,
            "declared_sizes": {u: s for u, s in declared.items() if u in used}}
    return texts, images, infos, meta
