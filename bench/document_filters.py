"""Throughput of the document filters against bare trafilatura on the bundled trafilatura-eval pages.

Measures, in one process and one core, pages/s of `trafilatura.bare_extraction` (images and tables, no
metadata: the call the pipeline makes) and of the whole filter chain (language, paragraph cleaning, document
quality, image URL rules, image count) on the documents the pipeline's extractor (filters/extract.py) makes,
and the filters' cost as a share of extraction time. Writes bench/results/document_filters.json.

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

from mmcorpus.filters.documents import (  # noqa: E402
    DocumentConfig,
    check_image_count,
    check_quality,
    clean_paragraphs,
    filter_image_urls,
    identify_language,
)
from mmcorpus.filters.extract import extract  # noqa: E402
from mmcorpus.filters.reasons import Reject  # noqa: E402


def run_filters(doc: dict, cfg: DocumentConfig) -> str:
    doc = identify_language(doc, cfg)
    if isinstance(doc, Reject):
        return doc.reason
    doc, _ = clean_paragraphs(doc, cfg)
    doc = check_quality(doc, cfg)
    if isinstance(doc, Reject):
        return doc.reason
    doc, _ = filter_image_urls(doc, cfg)
    doc = check_image_count(doc, cfg)
    return doc.reason if isinstance(doc, Reject) else "keep"


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
            trafilatura.bare_extraction(h, url=meta[n]["url"], include_images=True, include_tables=True,
                                        with_metadata=False)
        extract_s.append(time.process_time() - t)
        for n, h in html.items():
            result = extract(h, meta[n]["url"])
            if isinstance(result, tuple):
                texts, images, infos, extra = result
                docs[n] = {"doc_id": n, "url": meta[n]["url"], "texts": texts, "images": images,
                           "image_info": infos, "metadata": extra, "language": None, "language_score": None}
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
