"""Cost of the safety stages (issue 17) and of URL-list matching.

1. Per document, on the bundled trafilatura-eval pages, in one process: the time of the interleaved safety
   work (`opt_out`: noai/noimageai directives + the page URL on the lists; `safety`: the page URL, every image
   URL and alt text on the lists and flagged words, PII masking of every text) as a fraction of extraction
   time (filters/extract.py, the call the pipeline makes). Lists: a 1M-entry opt-out list and a 1M-entry
   blocklist. The page URL is checked once (opt_out), as in the pipeline. No NSFW model. Target: <= 5%.
2. List matching per URL against lists of 1k .. 1M entries (half domains, half URL prefixes; half the URLs
   hit; sizes timed in alternating rounds): flat time per URL means O(1) in the list size. Also the time and
   memory to read a 1M-entry list.
3. The optional NSFW stage of `interleaved` (--nsfw-head): per image, reading its spooled bytes, the CLIP
   image embedding (open_clip ViT-B-32, the default --clip-model; random weights cost the same time as real
   ones) and the head, in batches as the stage runs them, on the coco-mini photos; compared with the
   extraction time per page of part 1 measured in the same run.

Writes bench/results/safety.json (parts not run keep their earlier figures). The machine may be shared:
compare the ratios, measured within one run; the load average is recorded.

    python bench/bench_safety.py [--rounds 3] [--parts matching,documents,nsfw]
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
                       "metadata": meta, "_record_url": url}  # the record's URL: checked by opt_out above
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


def bench_nsfw(rounds: int, n_images: int, batch_size: int, extract_ms_per_page: float | None) -> dict:
    """The interleaved NSFW stage's work per image: spooled bytes read, CLIP-embedded in batches, scored."""
    import tempfile

    import numpy as np

    from mmcorpus.pipelines.models.clip import ClipConfig, ClipScorer
    from mmcorpus.pipelines.runtime.sink import spool
    from mmcorpus.pipelines.safety.nsfw import load_nsfw_head

    photos = sorted((ROOT.parent / "shared" / "data" / "coco-mini" / "images").glob("*.jpg"))[:n_images]
    cfg = ClipConfig(model="ViT-B-32", allow_random=True, device="cpu", batch_size=batch_size)
    scorer = ClipScorer(cfg)
    head, _ = load_nsfw_head("random", True, int(scorer.model.visual.output_dim))
    with tempfile.TemporaryDirectory() as tmp:
        refs = [spool(tmp, p.read_bytes(), p.stem) for p in photos]  # as fetch_images leaves them
        scorer.embed_images([refs[0].read()])  # warm-up off the clock
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            for start in range(0, len(refs), batch_size):
                emb = scorer.embed_images([r.read() for r in refs[start:start + batch_size]])
                head.scores(np.stack(emb))
            times.append((time.perf_counter() - t0) / len(refs))
    ms = sorted(times)[len(times) // 2] * 1e3
    out = {"clip_model": "ViT-B-32", "device": "cpu", "images": len(refs), "batch_size": batch_size,
           "rounds": rounds, "ms_per_image_median": round(ms, 2)}
    if extract_ms_per_page:
        out["ms_per_image_over_extract_ms_per_page"] = round(ms / extract_ms_per_page, 3)
    print(f"nsfw: {ms:.1f} ms per image (ViT-B-32 on CPU, batches of {batch_size})"
          + (f" = {ms / extract_ms_per_page:.2f}x extraction per page" if extract_ms_per_page else ""), flush=True)
    return out


def load_average() -> list[float]:
    import os

    return [round(x, 2) for x in os.getloadavg()]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--urls", type=int, default=20_000)
    ap.add_argument("--sizes", default="1000,10000,100000,1000000")
    ap.add_argument("--parts", default="matching,documents,nsfw")
    ap.add_argument("--nsfw-images", type=int, default=64)
    ap.add_argument("--nsfw-batch-size", type=int, default=32)
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    sizes = [int(s) for s in args.sizes.split(",")]
    out = ROOT / "bench" / "results" / "safety.json"
    result = json.loads(out.read_text()) if out.exists() else {}
    result["machine"] = "shared 2-core machine (other jobs running); ratios are within one run"
    result.setdefault("load_average_1_5_15", {})["start"] = load_average()
    if "matching" in parts:
        matching = bench_matching(sizes, args.urls)
        flat = matching[-1]["us_per_url_median"] / matching[0]["us_per_url_median"]
        result.update(matching=matching, us_per_url_ratio_largest_to_smallest_list=round(flat, 3))
        print(f"matching: {matching[-1]['entries']:,}-entry list costs {flat:.2f}x the {matching[0]['entries']:,}-entry "
              "list per URL", flush=True)
    if "documents" in parts:
        result["documents"] = bench_documents(args.rounds, max(sizes))
    if "nsfw" in parts:
        extract = result["documents"]["extract_ms_per_page"] if "documents" in parts else None
        result["nsfw_interleaved"] = bench_nsfw(args.rounds, args.nsfw_images, args.nsfw_batch_size, extract)
    result["load_average_1_5_15"]["end"] = load_average()
    result["parts_measured_last"] = sorted(parts)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
