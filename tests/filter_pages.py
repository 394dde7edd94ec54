"""Real documents for the filter tests: the bundled trafilatura-eval pages, extracted once per test process
with the pipeline's extractor (filters/extract.py) into its document dict (text lines and images in reading
order)."""

from __future__ import annotations

import functools
import gzip
import json
import pathlib
from urllib.parse import urljoin

from lxml import html as lxml_html


@functools.lru_cache(maxsize=1)
def eval_pages(root: str) -> dict[str, dict]:
    """name -> {"url", "html", "doc"} for every bundled page trafilatura extracts something from."""
    from mmcorpus.filters.extract import extract

    base = pathlib.Path(root) / "trafilatura-eval"
    meta = json.loads((base / "evaldata.json").read_text())
    pages = {}
    for name, v in sorted(meta.items()):
        html = gzip.decompress((base / "pages" / f"{name}.gz").read_bytes()).decode("utf-8", "replace")
        result = extract(html, v["url"])  # the pipeline's extractor (lazy images, srcset, <base> resolved)
        if isinstance(result, tuple):
            texts, images, infos, meta = result
            doc = {"doc_id": name, "url": v["url"], "warc_record_id": None, "crawl_date": None, "source": name,
                   "language": None, "language_score": None, "texts": texts, "images": images,
                   # declared sizes left out: the filter tests set them where they test them
                   "image_info": infos, "metadata": {"title": meta["title"], "_units": meta["_units"]}}
            pages[name] = {"url": v["url"], "html": html, "doc": doc}
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


@functools.lru_cache(maxsize=1)
def warc_pages(root: str) -> dict[str, dict]:
    """"DIR/FILE:OFFSET" -> {"url", "doc"} for every page of the bundled WARCs that the pipeline's reader,
    decoder and extractor turn into a document (the same steps `mmcorpus interleaved` runs)."""
    from mmcorpus.filters.extract import extract
    from mmcorpus.filters.reasons import Reject
    from mmcorpus.pipelines.interleaved.sources import decode_page, expand_sources, read_items

    base = pathlib.Path(root)
    pages = {}
    for kind, path in expand_sources([str(base / d) for d in ("warcio-samples", "resiliparse-warcs", "cc-whirlwind",
                                                             "dolma-cc-warc")]):
        for rec in read_items((kind, path)):
            page = decode_page(rec) if "_reject" not in rec else None
            if page is None or isinstance(page, Reject):
                continue
            result = extract(page["html"], page["url"])
            if isinstance(result, tuple):
                texts, images, infos, _ = result
                name = str(pathlib.Path(page["source"]).relative_to(base))
                pages[name] = {"url": page["url"], "doc": {
                    "doc_id": name, "url": page["url"], "source": name, "language": None, "language_score": None,
                    "texts": texts, "images": images, "image_info": infos, "metadata": {}}}
    return pages
