"""Cost of the safety stages (issue 17) and of URL-list matching.

1. Per document, on the bundled trafilatura-eval pages, in one process: the time of the interleaved safety
   work (`opt_out`: noai/noimageai directives + the page URL on the lists; `safety`: the page URL, every image
   URL and alt text on the lists and flagged words, PII masking of every text) as a fraction of extraction
   time (filters/extract.py, the call the pipeline makes). Lists: a 1M-entry opt-out list and a 1M-entry
   blocklist. No NSFW model (interleaved runs none). Target: <= 5%.
2. List matching per URL against lists of 1k .. 1M entries (half domains, half URL prefixes; half the URLs
   hit; sizes timed in alternating rounds): flat time per URL means O(1) in the list size. Also the time and
   memory to read a 1M-entry list.

Writes bench/results/safety.json. The machine may be shared: compare the ratios, measured within one run.

    python bench/bench_safety.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import gzip
import json
import pathlib
import random
import resource
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmcorpus.filters.extract import extract  # noqa: E402
from mmcorpus.filters.safety import Lists, page_directives, url_reject  # noqa: E402
from mmcorpus.filters.urllists import parse_list  # noqa: E402
from mmcorpus.pipelines.interleaved.sources import decode_bytes  # noqa: E402
from mmcorpus.pipelines.safety.stages import DocSafety, SafetySpec  # noqa: E402

PAGES = ROOT.parent / "shared" / "data" / "trafilatura-eval" / "pages"


def list_lines(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        host = f"h{i}-{rng.randrange(10**6)}.example{i % 97}.test"
        out.append(host if i % 2 else f"{host}/p/{i}/")
    return out


def urls_for(lines: list[str], n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if i % 2:  # a hit: under a listed domain or prefix, as a subdomain, with port and credentials
            entry = rng.choice(lines)
            host, _, path = entry.partition("/")
            out.append(f"https://u:p@img.{host}:8443/{path}x/{i}.jpg")
        else:
            out.append(f"https://cdn{i}.nowhere{i % 13}.test/a/b/c/{i}.jpg?size=large")
    return out


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_matching(sizes: list[int], n_urls: int, rounds: int = 5) -> list[dict]:
    """Build every list first, then time the sizes in alternating rounds so each ratio compares time windows
    under the same machine load; the median round per size is reported."""
    built = []
    for size in sizes:
        lines = list_lines(size)
        before = rss_mb()
        t0 = time.perf_counter()
        lst = parse_list(f"synthetic-{size}", lines)
        built.append((size, lst, urls_for(lines, n_urls), time.perf_counter() - t0, rss_mb() - before))
        print(f"list {size:>9,} entries: parse {built[-1][3]:6.2f} s, max RSS +{built[-1][4]:.0f} MB", flush=True)
    times: dict[int, list[float]] = {size: [] for size in sizes}
    hits: dict[int, int] = {}
    for _ in range(rounds):
        for size, lst, urls, _, _ in built:
            t0 = time.perf_counter()
            hits[size] = sum(lst.match(u) is not None for u in urls)
            times[size].append((time.perf_counter() - t0) / len(urls))
    out = []
    for size, lst, urls, parse_s, grown in built:
        us = sorted(times[size])[len(times[size]) // 2] * 1e6
        out.append({"entries": size, "parse_seconds": round(parse_s, 3), "parse_us_per_entry": round(parse_s / size * 1e6, 2),
                    "urls": len(urls), "hits": hits[size], "rounds": rounds, "us_per_url_median": round(us, 3),
                    "max_rss_growth_mb": round(grown, 1)})
        print(f"list {size:>9,} entries: match {us:.2f} us/URL (median of {rounds} rounds, {hits[size]:,} hits of "
              f"{len(urls):,})", flush=True)
    return out


def load_pages() -> list[tuple[str, str]]:
    pages = []
    for p in sorted(PAGES.glob("*.html*")):
        raw = p.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        html = decode_bytes(raw, None)
        if isinstance(html, str):
            pages.append((p.name, html))
    return pages


def bench_documents(rounds: int, list_size: int) -> dict:
    pages = load_pages()
    lines = list_lines(list_size)
    lists = Lists(opt_out=(parse_list("opt-out", lines),), block=(parse_list("block", list_lines(list_size, 7)),))
    stage = DocSafety(SafetySpec(pii="mask"), lists)
    warm = extract(pages[0][1], "https://warm.test/")  # imports (Beam's, via the stage's counters) off the clock
    stage({"url": "https://warm.test/", "source": "warm", "texts": warm[0], "images": warm[1], "image_info": warm[2],
           "metadata": warm[3]})
    extract_s = safety_s = 0.0
    docs = 0
    for _ in range(rounds):
        for name, html in pages:
            url = f"https://www.{name.split('.html')[0].lower()}.test/article"
            t0 = time.perf_counter()
            result = extract(html, url)
            t1 = time.perf_counter()
            extract_s += t1 - t0
            page_directives(html, ["noindex"])  # opt_out stage: directives + the page URL
            url_reject(url, lists, "page URL")
            if isinstance(result, tuple):
                texts, images, infos, meta = result
                doc = {"url": url, "source": name, "texts": texts, "images": images, "image_info": infos,
                       "metadata": meta}
                stage(doc)
                docs += 1
            safety_s += time.perf_counter() - t1
    n = len(pages) * rounds
    out = {"pages": len(pages), "rounds": rounds, "documents_extracted": docs, "list_entries_each": list_size,
           "extract_ms_per_page": round(extract_s / n * 1e3, 3), "safety_ms_per_page": round(safety_s / n * 1e3, 4),
           "safety_fraction_of_extract": round(safety_s / extract_s, 4), "target_fraction": 0.05}
    print(f"documents: extract {out['extract_ms_per_page']} ms/page, safety {out['safety_ms_per_page']} ms/page "
          f"= {out['safety_fraction_of_extract']:.2%} of extraction (target <= 5%)", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--urls", type=int, default=20_000)
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    matching = bench_matching(sizes, args.urls)
    documents = bench_documents(args.rounds, max(sizes))
    flat = matching[-1]["us_per_url_median"] / matching[0]["us_per_url_median"]
    result = {"machine": "shared 2-core machine (other jobs running); ratios are within this run",
              "documents": documents, "matching": matching,
              "us_per_url_ratio_largest_to_smallest_list": round(flat, 3)}
    print(f"matching: {matching[-1]['entries']:,}-entry list costs {flat:.2f}x the {matching[0]['entries']:,}-entry "
          "list per URL", flush=True)
    out = ROOT / "bench" / "results" / "safety.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
