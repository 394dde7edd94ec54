"""trafilatura's options measured on the bundled trafilatura-eval pages: pages/s and snippet accuracy.

Each of the 144 pages goes through `filters.extract.extract` (the pipeline's extraction: parse, lazy-image
normalisation, trafilatura, body to lists) once per option set, the sets alternating page by page so load from
other jobs falls on all alike. Accuracy uses evaldata.json: a `with` snippet found in the extracted text is a
hit, a `without` snippet found is a leak. Reported per option set: CPU pages/s, its ratio to the default, the
share of `with` snippets found (recall), the share of `without` snippets kept out, and pages extracted.
Writes bench/results/extract_options.json.

    python bench/bench_extract_options.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmcorpus.filters.documents import ExtractConfig  # noqa: E402
from mmcorpus.filters.extract import extract  # noqa: E402
from mmcorpus.pipelines.interleaved.sources import decode_page, read_html_file  # noqa: E402

SHARED = pathlib.Path(os.environ.get("MMCORPUS_SHARED", ROOT.parent / "shared")) / "data"

VARIANTS = {  # ExtractConfig's defaults, and each option changed from them
    "default": {},
    "with_comments": {"include_comments": True},
    "fast": {"fast": True},
    "favor_precision": {"favor_precision": True},
    "favor_recall": {"favor_recall": True},
    "no_tables": {"include_tables": False},
    "fast_with_comments": {"fast": True, "include_comments": True},
}


def load():
    base = SHARED / "trafilatura-eval"
    meta = json.loads((base / "evaldata.json").read_text())
    pages = []
    for name, v in sorted(meta.items()):
        rec = read_html_file(str(base / "pages" / f"{name}.gz"), 5_000_000)
        page = decode_page(rec)
        pages.append((page["html"], v["url"], v.get("with") or [], v.get("without") or []))
    return pages


def text_of(result) -> str:
    if not isinstance(result, tuple):
        return ""
    return "\n".join(t for t in result[0] if t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    pages = load()
    opts = {name: {**ExtractConfig().trafilatura_options(), **v} for name, v in VARIANTS.items()}
    cpu = dict.fromkeys(VARIANTS, 0.0)
    acc = {name: {"with_found": 0, "with_total": 0, "without_kept_out": 0, "without_total": 0, "extracted": 0}
           for name in VARIANTS}
    extract(pages[0][0], pages[0][1])  # warm up
    names = list(VARIANTS)
    for r in range(a.rounds):
        for i, (html, url, with_, without) in enumerate(pages):
            order = names[(i + r) % len(names):] + names[:(i + r) % len(names)]
            for name in order:
                t = time.process_time()
                result = extract(html, url, opts[name])
                cpu[name] += time.process_time() - t
                if r == 0:
                    text = " ".join(text_of(result).split())
                    s = acc[name]
                    s["extracted"] += isinstance(result, tuple)
                    s["with_total"] += len(with_)
                    s["with_found"] += sum(" ".join(w.split()) in text for w in with_)
                    s["without_total"] += len(without)
                    s["without_kept_out"] += sum(" ".join(w.split()) not in text for w in without)
    n = len(pages) * a.rounds
    out = {"pages": len(pages), "rounds": a.rounds,
           "note": "CPU seconds (process_time) in one process; the 2-core machine was shared with other jobs",
           "variants": {}}
    for name in VARIANTS:
        s = acc[name]
        out["variants"][name] = {
            "options": VARIANTS[name], "pages_per_cpu_s": round(n / cpu[name], 2),
            "speed_vs_default": round(cpu["default"] / cpu[name], 3),
            "with_snippets_found": round(s["with_found"] / s["with_total"], 4),
            "without_snippets_kept_out": round(s["without_kept_out"] / s["without_total"], 4),
            "pages_extracted": s["extracted"]}
        print(f"{name:18} {out['variants'][name]}")
    target = ROOT / "bench" / "results" / "extract_options.json"
    target.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
