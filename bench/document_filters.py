"""Throughput of the document filters against bare trafilatura on the bundled trafilatura-eval pages.

Measures, in one process and one core, pages/s of `trafilatura.extract` (XML with images) and of the whole
filter chain (language, paragraph cleaning, image URL rules, document quality, image count) on the extracted
documents, and the filters' cost as a share of extraction time. Writes bench/results/document_filters.json.

    python bench/document_filters.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from filters.documents import (  # noqa: E402
    DocumentConfig,
    check_image_count,
    check_quality,
    clean_paragraphs,
    filter_image_urls,
    identify_language,
)
from filters.reasons import Reject  # noqa: E402
from tests.filter_pages import xml_to_doc  # noqa: E402  (until filters.extract lands: same XML walk)


def run_filters(doc: dict, cfg: DocumentConfig) -> str:
    doc = identify_language(doc, cfg)
    if isinstance(doc, Reject):
        return doc.reason
    doc, _ = clean_paragraphs(doc, cfg)
    doc, _ = filter_image_urls(doc, cfg)
    for step in (check_quality, check_image_count):
        doc = step(doc, cfg)
        if isinstance(doc, Reject):
            return doc.reason
    return "keep"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "trafilatura-eval"))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    import trafilatura

    base = pathlib.Path(args.data)
    meta = json.loads((base / "evaldata.json").read_text())
    html = {n: gzip.decompress((base / "pages" / f"{n}.gz").read_bytes()).decode("utf-8", "replace") for n in meta}
    cfg = DocumentConfig()
    identify_language({"texts": ["warm up the language model"]}, cfg)

    extract_s, filter_s, docs, outcomes = [], [], {}, {}
    for _ in range(args.rounds):
        t = time.process_time()
        for n, h in html.items():
            xml = trafilatura.extract(h, url=meta[n]["url"], include_images=True, output_format="xml")
            if xml:
                docs[n] = xml_to_doc(xml, meta[n]["url"], n)
        extract_s.append(time.process_time() - t)
        batch = [copy.deepcopy(d) for d in docs.values()]
        t = time.process_time()
        for d in batch:
            outcomes[d["doc_id"]] = run_filters(d, cfg)
        filter_s.append(time.process_time() - t)

    ext, fil = min(extract_s), min(filter_s)
    result = {
        "pages": len(html),
        "documents": len(docs),
        "trafilatura_pages_per_s": round(len(html) / ext, 1),
        "filters_docs_per_s": round(len(docs) / fil, 1),
        "filters_ms_per_doc": round(1000 * fil / len(docs), 2),
        "filters_share_of_extraction_time": round(fil / ext, 3),
        "outcomes": {k: sum(1 for v in outcomes.values() if v == k) for k in sorted(set(outcomes.values()))},
        "rounds": args.rounds,
        "clock": "process CPU time, best round",
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results" / "document_filters.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
