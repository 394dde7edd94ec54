"""Document fidelity: what the paragraph rules leave of an article, and which images stay with it.

1. Snippet accuracy on the bundled trafilatura-eval pages (evaldata.json: `with` snippets must be in the main
   text, `without` snippets must not): share of snippets right in the text mmcorpus keeps (extract, language,
   paragraph rules, gutted check, document rules; pages it rejects left out) against bare
   `trafilatura.extract` on the same pages, for the structure-aware rules and for OBELICS line-by-line rules.
2. Real WARC pages (cc-whirlwind, dolma-cc-warc, and the other bundled WARCs): share rejected by the text
   stages (language, paragraph rules, document rules) per reason, and the share of extracted words the
   paragraph rules removed, with the gutted threshold's effect at several values.
3. Image precision/recall against the hand labels (tests/data/article_images.json) before and after the
   article-image recovery.

    python bench/bench_fidelity.py            # writes bench/results/fidelity.json
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import pathlib
import re
import sys
from collections import Counter

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmcorpus.filters.documents import (  # noqa: E402
    DocumentConfig,
    check_quality,
    check_removed_share,
    clean_paragraphs,
    identify_language,
)
from mmcorpus.filters.extract import extract  # noqa: E402
from mmcorpus.filters.reasons import Reject  # noqa: E402

_WS = re.compile(r"\s+")


def as_doc(name: str, result) -> dict:
    texts, images, infos, meta = result
    return {"doc_id": name, "source": name, "texts": texts, "images": images, "image_info": infos,
            "metadata": dict(meta), "language": None}


def text_stages(doc: dict, cfg: DocumentConfig) -> dict | Reject:
    """The pipeline's text stages in order: language, paragraph rules, gutted check, document rules."""
    doc = identify_language(doc, cfg)
    if isinstance(doc, Reject):
        return doc
    doc, _ = clean_paragraphs(doc, cfg)
    doc = check_removed_share(doc, cfg)
    return doc if isinstance(doc, Reject) else check_quality(doc, cfg)


def flat(text: str) -> str:
    return _WS.sub(" ", text or "").strip()


def snippet_score(text: str, spec: dict) -> tuple[int, int]:
    """(right, total) over the page's `with` and `without` snippets."""
    text = flat(text)
    right = sum(flat(s) in text for s in spec.get("with", [])) + sum(flat(s) not in text
                                                                     for s in spec.get("without", []))
    return right, len(spec.get("with", [])) + len(spec.get("without", []))


def snippets(data: pathlib.Path, configs: dict[str, DocumentConfig]) -> dict:
    import trafilatura

    base = data / "trafilatura-eval"
    meta = json.loads((base / "evaldata.json").read_text())
    extracted, bare = {}, {}
    for name, spec in sorted(meta.items()):
        html = gzip.decompress((base / "pages" / f"{name}.gz").read_bytes()).decode("utf-8", "replace")
        result = extract(html, spec["url"])
        if isinstance(result, tuple):
            extracted[name] = as_doc(name, result)
        bare[name] = trafilatura.extract(html, url=spec["url"]) or ""
    out = {"pages": len(meta), "extracted": len(extracted)}
    for label, cfg in configs.items():
        kept, reasons = {}, Counter()
        for name, doc in extracted.items():
            r = text_stages(copy.deepcopy(doc), cfg)
            if isinstance(r, Reject):
                reasons[r.reason] += 1
            else:
                kept[name] = "\n".join(t for t in r["texts"] if t)
        mine = [snippet_score(kept[n], meta[n]) for n in kept]
        theirs = [snippet_score(bare[n], meta[n]) for n in kept]
        before = [snippet_score("\n".join(t for t in extracted[n]["texts"] if t), meta[n]) for n in kept]
        with_only = [(sum(flat(s) in flat(kept[n]) for s in meta[n].get("with", [])), len(meta[n].get("with", [])))
                     for n in kept]
        bare_with = [(sum(flat(s) in flat(bare[n]) for s in meta[n].get("with", [])), len(meta[n].get("with", [])))
                     for n in kept]
        acc = lambda pairs: round(sum(a for a, _ in pairs) / max(1, sum(b for _, b in pairs)), 4)  # noqa: E731
        out[label] = {"kept_pages": len(kept), "rejected": dict(reasons.most_common()),
                      "accuracy_kept": acc(mine), "accuracy_bare_trafilatura_same_pages": acc(theirs),
                      "accuracy_before_paragraph_rules": acc(before),
                      "with_recall_kept": acc(with_only), "with_recall_bare_trafilatura": acc(bare_with)}
    return out


def warc_docs(data: pathlib.Path) -> dict:
    from mmcorpus.pipelines.interleaved.sources import decode_page, expand_sources, read_items

    docs = {}
    folders = [str(data / d) for d in ("cc-whirlwind", "dolma-cc-warc", "warcio-samples", "resiliparse-warcs")]
    for kind, path in expand_sources([f for f in folders if pathlib.Path(f).exists()]):
        for rec in read_items((kind, path)):
            if "_reject" in rec:
                continue
            page = decode_page(rec)
            if isinstance(page, Reject):
                continue
            result = extract(page["html"], page.get("url"))
            if isinstance(result, tuple):
                docs[rec["source"]] = as_doc(rec["source"], result)
    return docs


# Hand verdicts on the bundled WARC pages the text stages reject (read page by page, 2026-12-06): True where
# the page holds an article or other content worth keeping, False for spam, error pages and link lists.
HAND_VERDICTS = {
    "dolma-cc-warc/sample-0000.warc.gz:865": (True, "Semantic Scholar team page: two paragraphs and a roster"),
    "resiliparse-warcs/warcfile.warc.gz:940": (False, "mojibake Chinese news spam"),
    "resiliparse-warcs/warcfile.warc.gz:32353": (False, "car portal 404 page and its menus"),
    "resiliparse-warcs/warcfile.warc.gz:42891": (False, "company card and lottery-forum spam list"),
    "resiliparse-warcs/warcfile.warc.gz:48321": (False, "gambling spam"),
    "resiliparse-warcs/warcfile.warc.gz:87298": (False, "tipping-game navigation menu"),
    "resiliparse-warcs/warcfile.warc.gz:99077": (False, "product thumbnails with click counts"),
    "resiliparse-warcs/warcfile.warc.gz:106585": (False, "blog listing of lottery spam"),
    "resiliparse-warcs/warcfile.warc.gz:110823": (False, "job board table"),
    "resiliparse-warcs/warcfile.warc.gz:120465": (False, "lottery spam"),
    "resiliparse-warcs/warcfile.warc.gz:132240": (False, "porn site menu"),
}


def real_pages(docs: dict, configs: dict[str, DocumentConfig]) -> dict:
    out = {"pages_extracted": len(docs)}
    for label, cfg in configs.items():
        reasons, shares, rejected = Counter(), [], {}
        for name, doc in docs.items():
            r = identify_language(copy.deepcopy(doc), cfg)
            if isinstance(r, Reject):
                reasons[r.reason] += 1
                rejected[name] = r.reason
                continue
            r, _ = clean_paragraphs(r, cfg)
            shares.append(r["metadata"]["removed_word_share"])
            r = check_removed_share(r, cfg)
            r = r if isinstance(r, Reject) else check_quality(r, cfg)
            reasons[r.reason if isinstance(r, Reject) else "keep"] += 1
            if isinstance(r, Reject):
                rejected[name] = f"{r.reason}: {r.detail}"
        n = sum(reasons.values())
        shares.sort()
        out[label] = {"outcomes": dict(reasons.most_common()),
                      "rejected_share": round(1 - reasons["keep"] / n, 4) if n else None,
                      "removed_word_share_quantiles": {q: shares[min(len(shares) - 1, int(q * len(shares)))]
                                                       for q in (0.5, 0.75, 0.9, 0.95)} if shares else {},
                      "pages_over_share": {str(t): sum(s > t for s in shares) for t in (0.3, 0.4, 0.5, 0.6, 0.7)},
                      "rejected_pages": {k.split("/data/")[-1]: v for k, v in sorted(rejected.items())}}
        names = [k.split("/data/")[-1] for k in rejected]
        unjudged = [k for k in names if k not in HAND_VERDICTS]
        worth = [k for k in names if HAND_VERDICTS.get(k, (None,))[0]]
        out[label]["hand_inspected"] = {"rejected_worth_keeping": worth, "not_inspected": unjudged,
                                        "share_of_pages_wrongly_rejected": round(len(worth) / n, 4) if n else None}
    return out


def image_scores(data: pathlib.Path, labels_path: pathlib.Path, cfg: DocumentConfig) -> dict:
    """Image precision and recall against the hand labels, for extraction without and with the article-image
    recovery, on the images extracted and on those left after the image URL rules (patterns, declared sizes)."""
    from mmcorpus.filters.documents import filter_image_urls

    base = data / "trafilatura-eval"
    meta = json.loads((base / "evaldata.json").read_text())
    labels = json.loads(labels_path.read_text())["pages"]
    out = {"pages": len(labels), "article_images": sum(len(v["article"]) for v in labels.values())}
    for label, recover in (("before", False), ("after", True)):
        counts = {"extracted": Counter(), "after_url_rules": Counter()}
        per_doc = []
        for name, lab in labels.items():
            html = gzip.decompress((base / "pages" / f"{name}.gz").read_bytes()).decode("utf-8", "replace")
            result = extract(html, meta[name]["url"], article_images=recover)
            if not isinstance(result, tuple):
                continue
            doc = as_doc(name, result)
            doc["metadata"]["declared_sizes"] = result[3]["declared_sizes"]
            extracted = {i for i in doc["images"] if i}
            kept, _ = filter_image_urls(copy.deepcopy(doc), cfg)
            per_doc.append(len(extracted))
            for stage, found in (("extracted", extracted), ("after_url_rules", {i for i in kept["images"] if i})):
                c = counts[stage]
                article = set(lab["article"])
                c["true"] += len(found & article)
                c["false"] += len(found - article)
                c["missed"] += len(article - found)
        out[label] = {"images_per_labelled_page": round(sum(per_doc) / max(1, len(per_doc)), 3)}
        for stage, c in counts.items():
            out[label][stage] = {"precision": round(c["true"] / max(1, c["true"] + c["false"]), 4),
                                 "recall": round(c["true"] / max(1, c["true"] + c["missed"]), 4), **c}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "fidelity.json"))
    args = ap.parse_args()
    data = pathlib.Path(args.data)
    configs = {"units": DocumentConfig(),
               "lines_obelics": DocumentConfig.from_dict({"paragraphs": {"units": False, "max_removed_share": 1.0}})}
    results = {"images": image_scores(data, ROOT / "tests" / "data" / "article_images.json", configs["units"])}
    print(json.dumps(results, indent=1), flush=True)
    results.update({"snippets": snippets(data, configs), "real_pages": real_pages(warc_docs(data), configs)})
    print(json.dumps(results, indent=1))
    pathlib.Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
