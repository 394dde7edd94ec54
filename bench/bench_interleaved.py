"""Pages/s per core of the interleaved pipeline logic against bare trafilatura, on the bundled pages.

In one process on one core, alternating rounds over the 144 trafilatura-eval pages:
- bare: `trafilatura.bare_extraction(html, url=..., include_images=True, include_tables=True,
  with_metadata=False)` on the page text: the call the pipeline makes (it hands trafilatura a tree it parsed
  itself), with trafilatura parsing the string; the cheapest trafilatura call that yields the same body
  (text blocks and images in order). `extract(output_format="xml")` would add serialisation on top;
- full: charset decode + parse + lazy-image normalisation + extraction + body-to-lists + language + paragraph
  cleaning + quality + image URL rules + image count + dedup work per document (normalised text hash, 5-gram
  MinHash signature, LSH band keys) + the image recount, i.e. everything `mmcorpus interleaved --no-images`
  does per page except Beam.
The ratio bare/full CPU time is the figure of merit (target >= 0.8): the median of the per-round ratios, with
min and max; within a round every page runs through both back to back, so load from other jobs hits both. Then the real CLI runs once under DirectRunner
(--workers 1) and under Dask (--workers 2) on the same pages; their wall time and peak RSS per worker are
reported (Beam start-up included). With --memory-scale K the CLI also runs (DirectRunner with 2 worker
processes, and Dask with 2 workers) over the pages and over K copies of them, and reports how peak RSS of the
main process and of the largest worker grow with the input. Writes bench/results/interleaved.json.

    python bench/bench_interleaved.py [--rounds 7] [--skip-cli] [--memory-scale 4]
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmcorpus.filters import minhash  # noqa: E402
from mmcorpus.filters.documents import DocumentConfig  # noqa: E402
from mmcorpus.filters.reasons import Reject  # noqa: E402
from mmcorpus.pipelines.interleaved import command as ci  # noqa: E402
from mmcorpus.pipelines.interleaved.dedup import DedupConfig, doc_text  # noqa: E402
from mmcorpus.pipelines.interleaved.sources import decode_page, read_html_file  # noqa: E402

SHARED = pathlib.Path(os.environ.get("MMCORPUS_SHARED", ROOT.parent / "shared")) / "data"


def load_pages():
    base = SHARED / "trafilatura-eval"
    meta = json.loads((base / "evaldata.json").read_text())
    pages = []
    for name, v in sorted(meta.items()):
        rec = read_html_file(str(base / "pages" / f"{name}.gz"), 5_000_000)
        rec["url"] = v["url"]
        pages.append(rec)
    return pages


def bare(rec) -> bool:
    import trafilatura

    html = rec["payload"].decode("utf-8", "replace")
    result = trafilatura.bare_extraction(html, url=rec["url"], include_images=True, include_tables=True,
                                         with_metadata=False)
    return getattr(result, "body", None) is not None


def full(rec, steps, dedup: DedupConfig, bands_rows, recount) -> bool:
    """One page through everything `mmcorpus interleaved --no-images` does to it but Beam; True if kept."""
    x = decode_page(rec)
    if isinstance(x, Reject):
        return False
    x = ci.extract_record(x)
    for step in steps:
        if isinstance(x, Reject):
            return False
        x = step(x)
        if isinstance(x, list):
            x = x[0]
    if isinstance(x, Reject):
        return False
    normalized = minhash.normalize_text(doc_text(x))
    minhash.text_hash(normalized)
    sig = minhash.text_signature(doc_text(x), dedup.ngram, dedup.num_perm, dedup.seed)
    minhash.band_keys(sig, *bands_rows)
    return not isinstance(recount(x), Reject)


def timed_round(pages, r: int, run_full) -> tuple[float, float, int, int]:
    """CPU seconds of bare and full over all pages, each page run by both back to back (who goes first
    alternates), so load from other jobs falls on both alike. Returns (bare_s, full_s, extracted, kept)."""
    t_bare = t_full = 0.0
    extracted = kept = 0
    for i, rec in enumerate(pages):
        for which in (("bare", "full") if (i + r) % 2 == 0 else ("full", "bare")):
            t = time.process_time()
            if which == "bare":
                extracted += bare(rec)
                t_bare += time.process_time() - t
            else:
                kept += run_full(rec)
                t_full += time.process_time() - t
    return t_bare, t_full, extracted, kept


def _tree_peaks(root: int, peaks: dict) -> None:
    """Record VmHWM (peak RSS, KiB) of `root` and all its descendants into peaks[pid] (Linux /proc)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    parent[int(d)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, grew = {root}, True
    while grew:
        new = {pid for pid, pp in parent.items() if pp in tree} - tree
        grew, tree = bool(new), tree | new
    for pid in tree:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peaks[pid] = max(peaks.get(pid, 0), int(line.split()[1]))
        except OSError:
            continue


def cli_run(args_extra: list[str], pages_dir: str) -> dict:
    """Run the CLI once; peak RSS from /proc VmHWM of the main process and of every process under it (polled
    every 0.1 s; getrusage's ru_maxrss would carry the parent's peak across fork/exec)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mmcorpus.pipelines.cli", "interleaved", pages_dir, "-o", f"{tmp}/out", "--no-images",
               *args_extra]
        log = pathlib.Path(tmp) / "stderr.txt"  # a file, not a pipe: a full pipe would stall the polled CLI
        t = time.time()
        with open(log, "w") as err:
            p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)))
            peaks: dict[int, int] = {}
            while p.poll() is None:
                _tree_peaks(p.pid, peaks)
                time.sleep(0.1)
        wall = time.time() - t
        if p.returncode != 0:
            raise SystemExit(f"CLI failed: {log.read_text()[-2000:]}")
        stats = json.loads(pathlib.Path(f"{tmp}/out/stats.json").read_text())
    main_kib = peaks.get(p.pid, 0)
    workers = [v for pid, v in peaks.items() if pid != p.pid]
    return {"args": args_extra, "wall_s": round(wall, 2), "pages": stats["totals"]["read"],
            "written": stats["totals"]["written"], "pages_per_s": round(stats["totals"]["read"] / wall, 2),
            "peak_rss_mib_main": round(main_kib / 1024, 1),
            "peak_rss_mib_largest_worker": round(max(workers, default=0) / 1024, 1),
            "processes_under_main": len(workers)}


def memory_growth(k: int) -> dict:
    """Peak RSS (main, largest worker) for the pages once and K times (copies under new names)."""
    import shutil

    src = SHARED / "trafilatura-eval" / "pages"
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        big = pathlib.Path(tmp) / "pages"
        big.mkdir()
        for r in range(k):
            for f in sorted(src.glob("*.html*")):
                shutil.copyfile(f, big / f"copy{r}-{f.name}")
        for name, extra in (("direct_2_workers", ["--workers", "2"]), ("dask_2_workers", ["--runner", "dask", "--workers", "2"])):
            once, scaled = cli_run(extra, str(src)), cli_run(extra, str(big))
            out[name] = {"x1": once, f"x{k}": scaled,
                         "main_rss_growth": round(scaled["peak_rss_mib_main"] / max(once["peak_rss_mib_main"], 1), 2),
                         "worker_rss_growth": round(scaled["peak_rss_mib_largest_worker"]
                                                    / max(once["peak_rss_mib_largest_worker"], 1), 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--skip-cli", action="store_true")
    ap.add_argument("--memory-scale", type=int, default=0, help="also measure peak RSS at K times the input")
    a = ap.parse_args()
    pages = load_pages()
    cfg, dedup = DocumentConfig(), DedupConfig()
    steps = [ci.DocStep(n, cfg) for n in (ci.STAGE_LANGUAGE, ci.STAGE_PARAGRAPHS, ci.STAGE_QUALITY,
                                          ci.STAGE_IMAGE_RULES, ci.STAGE_IMAGE_COUNT)]
    recount = ci.DocStep(ci.STAGE_IMAGE_RECOUNT, cfg)
    bands_rows = dedup.lsh()
    def run_full(rec):
        return full(rec, steps, dedup, bands_rows, recount)

    timed_round(pages[:5], 0, run_full)  # warm up imports, models and tables
    t_bare, t_full, ratios = [], [], []
    kept = extracted = 0
    load_before = os.getloadavg()[0]
    for r in range(a.rounds):
        b, f, extracted, kept = timed_round(pages, r, run_full)
        t_bare.append(b)
        t_full.append(f)
        ratios.append(b / f)
    n = len(pages) * a.rounds
    result = {
        "pages": len(pages), "rounds": a.rounds,
        "baseline": "trafilatura.bare_extraction(html, url, include_images=True, include_tables=True, "
                    "with_metadata=False), the call the pipeline makes",
        "bare_trafilatura_pages_per_cpu_s": round(n / sum(t_bare), 2),
        "full_pipeline_logic_pages_per_cpu_s": round(n / sum(t_full), 2),
        "ratio_full_vs_bare": round(statistics.median(ratios), 3),
        "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)],
        "ratio_of_totals": round(sum(t_bare) / sum(t_full), 3),
        "bare_extracted": extracted, "full_kept": kept,
        "peak_rss_mib_bench_process": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "load_average_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "note": "CPU seconds (process_time) on one core; the 2-core machine was shared with other jobs",
    }
    print(json.dumps(result, indent=2))
    if not a.skip_cli:
        pages_dir = str(SHARED / "trafilatura-eval" / "pages")
        result["cli"] = [cli_run(["--workers", "1"], pages_dir), cli_run(["--runner", "dask", "--workers", "2"], pages_dir)]
        print(json.dumps(result["cli"], indent=2))
    if a.memory_scale > 1:
        result["memory_growth"] = memory_growth(a.memory_scale)
        print(json.dumps(result["memory_growth"], indent=2))
    out = ROOT / "bench" / "results" / "interleaved.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
