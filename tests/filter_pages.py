"""Real documents for the filter tests: the bundled trafilatura-eval pages, extracted once per test process
into the pipeline's document dict (text lines and images in reading order)."""

from __future__ import annotations

import functools
import gzip
import json
import pathlib
import re
from urllib.parse import urljoin

from lxml import etree, html as lxml_html

BLOCK = {"p", "head", "item", "list", "row", "cell", "quote", "code", "table", "div", "lb", "main"}


def xml_to_doc(xml: str, url: str, name: str) -> dict:
    """trafilatura XML (include_images=True) -> {"texts", "images", "image_info", ...}; one line per block."""
    main = etree.fromstring(xml.encode()).find("main")
    texts, images, infos, lines, cur = [], [], [], [], []

    def newline():
        s = re.sub(r"\s+", " ", "".join(cur)).strip()
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
            flush()
            texts.append(None)
            images.append(el.get("src"))
            infos.append({"url": el.get("src"), "alt": el.get("alt") or ""})
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

    walk(main)
    flush()
    return {"doc_id": name, "url": url, "warc_record_id": None, "crawl_date": None, "source": name,
            "language": None, "language_score": None, "texts": texts, "images": images, "image_info": infos,
            "metadata": {}}


@functools.lru_cache(maxsize=1)
def eval_pages(root: str) -> dict[str, dict]:
    """name -> {"url", "html", "doc"} for every bundled page trafilatura extracts something from."""
    import trafilatura

    base = pathlib.Path(root) / "trafilatura-eval"
    meta = json.loads((base / "evaldata.json").read_text())
    pages = {}
    for name, v in sorted(meta.items()):
        html = gzip.decompress((base / "pages" / f"{name}.gz").read_bytes()).decode("utf-8", "replace")
        xml = trafilatura.extract(html, url=v["url"], include_images=True, output_format="xml")
        if xml:
            pages[name] = {"url": v["url"], "html": html, "doc": xml_to_doc(xml, v["url"], name)}
    return pages


def page_image_urls(html: str, url: str) -> list[str]:
    """Every <img src> (or data-src) of a page, resolved against the page URL."""
    tree = lxml_html.fromstring(html.encode("utf-8"))
    out = []
    for img in tree.iter("img"):
        src = (img.get("src") or img.get("data-src") or "").strip()
        if src:
            out.append(urljoin(url, src))
    return out
