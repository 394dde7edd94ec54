"""Throughput of `mmcorpus interleaved` on a large WARC built from the bundled pages, against bare trafilatura.

Builds WARCs (one file, and the same records in --files files) of --records response records (default 4,032:
the 144 trafilatura-eval pages, each copy under its own URL `...?copy=N`, so dedup_exact keeps one of each)
and reports, in one run on the same records (the machine is shared: compare ratios within a run):
- pages/s of the CLI (`--no-images`, every filter and dedup on) on one file with 1 worker and with --workers,
  on one file without splitting it (`--read-parts 1`, the old behaviour), with a reshuffle of the records after
  reading instead of the split (the alternative measured), and on several files; with --workers > 1 the default
  runner is a local Dask cluster, compared with `--runner direct` (Beam's multi-process DirectRunner);
- bare `trafilatura.extract(html, url=url)` (its defaults) over the same payloads in --workers processes;
- snippet accuracy (evaldata.json must/must-not snippets) of the kept documents against bare trafilatura's
  text of the same pages;
- peak RSS of the main process and the largest worker at 1x and 4x the input (a quarter of the records, all);
- CPU seconds per page beyond each runner's fixed start-up (4x minus 1x runs), Dask against the DirectRunner
  and bare trafilatura: what a page costs at crawl scale;
- CPU seconds per stage (stats.json) and the projections: one 40,000-record WARC on 2 cores, and 43M pages
  (Flamingo's M3W) in core-hours.
--logic-rounds N adds the older per-core comparison: everything the pipeline does per page but Beam, in one
process, against `trafilatura.bare_extraction` (the call the pipeline makes). Writes
bench/results/interleaved.json.

    python bench/bench_interleaved.py [--records 4032] [--workers 2] [--files 4] [--skip-dask] [--dask-several]
                                      [--skip-variants] [--logic-rounds 0]
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
from mmcorpus.pipelines.interleaved.dedup import DedupConfig  # noqa: E402
from mmcorpus.pipelines.interleaved.parking import doc_text  # noqa: E402
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
    x = ci.Precheck(steps[0].cfg)(x)
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


def _tree_peaks(root: int, peaks: dict, cpu: dict | None = None) -> None:
    """Record VmHWM (peak RSS, KiB) of `root` and all its descendants into peaks[pid], and their CPU seconds so
    far (user + system) into cpu[pid] (Linux /proc)."""
    parent, ticks = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                parent[int(d)] = int(fields[1])
                ticks[int(d)] = int(fields[11]) + int(fields[12])
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
        if cpu is not None and pid in ticks:
            cpu[pid] = max(cpu.get(pid, 0.0), ticks[pid] / os.sysconf("SC_CLK_TCK"))


def cli_run(args_extra: list[str], inputs: list[str], env: dict | None = None) -> dict:
    """Run the CLI once; peak RSS from /proc VmHWM of the main process and of every process under it (polled
    every 0.1 s; getrusage's ru_maxrss would carry the parent's peak across fork/exec); CPU seconds of the
    whole process tree (children's rusage) and per stage (stats.json)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "mmcorpus.pipelines.cli", "interleaved", *inputs, "-o", f"{tmp}/out",
               "--no-images", *args_extra]
        log = pathlib.Path(tmp) / "stderr.txt"  # a file, not a pipe: a full pipe would stall the polled CLI
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t = time.time()
        with open(log, "w") as err:
            p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT), **(env or {})))
            peaks: dict[int, int] = {}
            proc_cpu: dict[int, float] = {}
            while p.poll() is None:
                _tree_peaks(p.pid, peaks, proc_cpu)
                time.sleep(0.1)
        wall = time.time() - t
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if p.returncode != 0:
            raise SystemExit(f"CLI failed: {log.read_text()[-2000:]}")
        stats = json.loads(pathlib.Path(f"{tmp}/out/stats.json").read_text())
        texts = kept_texts(f"{tmp}/out")
    main_kib = peaks.get(p.pid, 0)
    workers = [v for pid, v in peaks.items() if pid != p.pid]
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return {"args": args_extra, "env": env or {}, "wall_s": round(wall, 2), "pages": stats["totals"]["read"],
            "written": stats["totals"]["written"], "pages_per_s": round(stats["totals"]["read"] / wall, 2),
            "cpu_s": round(cpu, 1), "cpu_percent": round(100 * cpu / wall), "load_average_after": round(os.getloadavg()[0], 2),
            "peak_rss_mib_main": round(main_kib / 1024, 1),
            "peak_rss_mib_largest_worker": round(max(workers, default=0) / 1024, 1),
            "processes_under_main": len(workers),
            # CPU seconds of each process under the main one, largest first (last poll): how evenly work spread
            "worker_cpu_s": sorted((round(v, 1) for pid, v in proc_cpu.items() if pid != p.pid), reverse=True),
            "stage_cpu_s": {s["stage"]: s.get("cpu_seconds") for s in stats["stages"] if s.get("cpu_seconds") is not None},
            "stage_in": {s["stage"]: s["in"] for s in stats["stages"]},
            "_texts": texts}


def kept_texts(out: str) -> dict[str, str]:
    """url -> the kept document's text, from OUT/data."""
    import pyarrow.parquet as pq

    found = {}
    for f in sorted(pathlib.Path(out, "data").glob("*.parquet")):
        t = pq.read_table(f, columns=["url", "texts"]).to_pydict()
        for url, texts in zip(t["url"], t["texts"]):
            found[url] = "\n".join(x for x in texts if x)
    return found


# ---- the WARCs ---------------------------------------------------------------------------------------------

def warc_record(url: str, payload: bytes, i: int) -> bytes:
    """One gzip member: a WARC/1.0 response record of an HTTP 200 text/html response."""
    import uuid

    http = (b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: %d\r\n\r\n" % len(payload)) + payload
    head = (f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: {url}\r\nWARC-Date: 2026-01-01T00:00:00Z\r\n"
            f"WARC-Record-ID: <urn:uuid:{uuid.UUID(int=i + 1)}>\r\n"
            f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(http)}\r\n\r\n").encode()
    return gzip.compress(head + http + b"\r\n\r\n", 6)


def copies(n: int) -> list[tuple[str, bytes, dict]]:
    """n (url, payload, eval entry) from the eval pages in turn, copy k of a page under `url?copy=k`."""
    base = SHARED / "trafilatura-eval"
    meta = json.loads((base / "evaldata.json").read_text())
    pages = [(v["url"], gzip.decompress((base / "pages" / f"{name}.gz").read_bytes()), v)
             for name, v in sorted(meta.items())]
    out = []
    for i in range(n):
        url, payload, v = pages[i % len(pages)]
        out.append((f"{url}{'&' if '?' in url else '?'}copy={i // len(pages)}", payload, v))
    return out


def write_warcs(records, prefix: pathlib.Path, files: int) -> list[str]:
    paths = [f"{prefix}-{k:02d}.warc.gz" for k in range(files)]
    handles = [open(p, "wb") for p in paths]
    for i, (url, payload, _) in enumerate(records):
        handles[i * files // len(records)].write(warc_record(url, payload, i))  # contiguous runs per file
    for h in handles:
        h.close()
    return paths


# ---- bare trafilatura --------------------------------------------------------------------------------------

def _bare_extract(job) -> str:
    import trafilatura

    url, payload = job
    return trafilatura.extract(payload.decode("utf-8", "replace"), url=url) or ""


def bare_run(records, workers: int) -> dict:
    """trafilatura.extract with its defaults over the payloads in `workers` processes (payloads in memory)."""
    import multiprocessing as mp

    jobs = [(url, payload) for url, payload, _ in records]
    with mp.get_context("fork").Pool(workers) as pool:
        pool.map(_bare_extract, jobs[:workers * 4])  # start-up and imports out of the timing
        t = time.time()
        timed = pool.map(_bare_timed, jobs, chunksize=16)
        wall = time.time() - t
    cpu = sum(c for _, c in timed)
    return {"workers": workers, "wall_s": round(wall, 2), "pages": len(jobs),
            "pages_per_s": round(len(jobs) / wall, 2), "cpu_s": round(cpu, 1),
            "cpu_s_per_page": round(cpu / len(jobs), 4),
            "_texts": dict(zip((u for u, _ in jobs), (text for text, _ in timed)))}


def _bare_timed(job) -> tuple[str, float]:
    t = time.process_time()
    text = _bare_extract(job)
    return text, time.process_time() - t


def accuracy(texts: dict[str, str], records, urls) -> dict:
    """Share of `with` snippets found and of `without` snippets kept out, over the pages in `urls`."""
    meta = {url: v for url, _, v in records}
    found = total = out = total_out = 0
    for url in urls:
        text = " ".join(texts.get(url, "").split())
        v = meta[url]
        found += sum(" ".join(w.split()) in text for w in v.get("with") or [])
        total += len(v.get("with") or [])
        out += sum(" ".join(w.split()) not in text for w in v.get("without") or [])
        total_out += len(v.get("without") or [])
    return {"pages": len(urls), "with_snippets_found": round(found / max(total, 1), 4),
            "without_snippets_kept_out": round(out / max(total_out, 1), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=4032)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--skip-dask", action="store_true", help="no DirectRunner run to compare the default (Dask) with")
    ap.add_argument("--dask-several", action="store_true", help="also compare Dask and direct on the several files")
    ap.add_argument("--skip-variants", action="store_true", help="no --read-parts 1 / reshuffle runs")
    ap.add_argument("--logic-rounds", type=int, default=0)
    a = ap.parse_args()
    w = str(a.workers)
    result: dict = {"records": a.records, "workers": a.workers, "cpu_count": os.cpu_count(),
                    "note": "one run on the same records; the 2-core machine was shared with other jobs "
                            "(load average per run below): compare ratios within this run"}
    records = copies(a.records)
    partial = ROOT / "bench" / "results" / "interleaved.partial.json"
    with tempfile.TemporaryDirectory() as tmp:
        one = write_warcs(records, pathlib.Path(tmp) / "one", 1)
        several = write_warcs(records, pathlib.Path(tmp) / "several", a.files)
        quarter = write_warcs(records[: a.records // 4], pathlib.Path(tmp) / "quarter", 1)
        result["warc_mib"] = round(os.path.getsize(one[0]) / 2**20, 1)
        runs: dict[str, dict] = {}


        def run(name, extra, inputs, env=None):
            runs[name] = cli_run(extra, inputs, env)
            print(name, {k: v for k, v in runs[name].items() if not k.startswith("_")}, flush=True)
            partial.write_text(json.dumps({**result, "runs": {k: {x: y for x, y in v.items() if not x.startswith("_")}
                                                              for k, v in runs.items()}}, indent=2) + "\n")

        bare = bare_run(records, a.workers)
        result["bare_trafilatura"] = {k: v for k, v in bare.items() if not k.startswith("_")}
        print("bare", result["bare_trafilatura"], flush=True)
        run("one_file_1_worker", ["--workers", "1"], one)
        run("one_file", ["--workers", w], one)
        run("several_files", ["--workers", w], several)
        if not a.skip_variants:
            run("one_file_unsplit", ["--workers", w, "--read-parts", "1"], one)
            run("one_file_reshuffled_records", ["--workers", w, "--read-parts", "1"], one,
                {"MMCORPUS_BENCH_RESHUFFLE_RECORDS": "1"})
        if not a.skip_dask:  # the default for several workers is a local Dask cluster: against the DirectRunner's
            run("direct_one_file", ["--runner", "direct", "--workers", w], one)
            if a.dask_several:
                run("direct_several_files", ["--runner", "direct", "--workers", w], several)
        run("quarter_file", ["--workers", w], quarter)
        if not a.skip_dask:
            run("direct_quarter_file", ["--runner", "direct", "--workers", w], quarter)
    kept = sorted(runs["one_file"]["_texts"])
    result["runs"] = {k: {x: y for x, y in v.items() if not x.startswith("_")} for k, v in runs.items()}
    rate = {k: v["pages_per_s"] for k, v in runs.items()}
    one_rate = rate["one_file"]
    result["ratios"] = {
        "one_file_vs_its_1_worker_rate": round(one_rate / rate["one_file_1_worker"], 3),
        "one_file_vs_bare_trafilatura": round(one_rate / bare["pages_per_s"], 3),
        "several_files_vs_bare_trafilatura": round(rate["several_files"] / bare["pages_per_s"], 3),
        **({"one_file_vs_unsplit": round(one_rate / rate["one_file_unsplit"], 3),
            "reshuffled_records_vs_split": round(rate["one_file_reshuffled_records"] / one_rate, 3)}
           if "one_file_unsplit" in rate else {}),
        **({"dask_vs_direct_one_file": round(one_rate / rate["direct_one_file"], 3)} if "direct_one_file" in rate else {}),
        **({"dask_vs_direct_several_files": round(rate["several_files"] / rate["direct_several_files"], 3)}
           if "direct_several_files" in rate else {}),
    }
    result["accuracy_on_kept_pages"] = {"pipeline": accuracy(runs["one_file"]["_texts"], records, kept),
                                        "bare_trafilatura": accuracy(bare["_texts"], records, kept)}
    result["cpu_s_per_page"] = {k: round(v["cpu_s"] / v["pages"], 4) for k, v in runs.items()}
    result["cpu_s_per_page"]["bare_trafilatura"] = bare["cpu_s_per_page"]
    per_page = result["cpu_s_per_page"]
    result["ratios_per_cpu_second"] = {  # load from other jobs moves these far less than the wall-clock rates
        "one_file_vs_bare_trafilatura": round(per_page["bare_trafilatura"] / per_page["one_file"], 3),
        **({"dask_vs_direct_one_file": round(per_page["direct_one_file"] / per_page["one_file"], 3)}
           if "direct_one_file" in per_page else {}),
    }
    if "direct_quarter_file" in runs:  # CPU per page beyond each runner's fixed start-up: the cost at crawl scale
        def marginal(full_run, quarter_run):
            return (full_run["cpu_s"] - quarter_run["cpu_s"]) / max(full_run["pages"] - quarter_run["pages"], 1)

        dask_m = marginal(runs["one_file"], runs["quarter_file"])
        direct_m = marginal(runs["direct_one_file"], runs["direct_quarter_file"])
        result["marginal_cpu_s_per_page"] = {"dask": round(dask_m, 4), "direct": round(direct_m, 4),
                                             "dask_vs_direct": round(direct_m / dask_m, 3),
                                             "bare_trafilatura": bare["cpu_s_per_page"],
                                             "dask_vs_bare": round(bare["cpu_s_per_page"] / dask_m, 3),
                                             "direct_vs_bare": round(bare["cpu_s_per_page"] / direct_m, 3)}
        result["fixed_cpu_s"] = {  # a run's CPU seconds less its pages at the marginal cost: start-up and teardown
            "dask": round(runs["one_file"]["cpu_s"] - dask_m * runs["one_file"]["pages"], 1),
            "direct": round(runs["direct_one_file"]["cpu_s"] - direct_m * runs["direct_one_file"]["pages"], 1)}
    result["busiest_worker_share_of_cpu"] = {  # 1/workers when the work spreads evenly, 1.0 when one does it all
        k: round(v["worker_cpu_s"][0] / sum(v["worker_cpu_s"]), 3) for k, v in runs.items()
        if len(v["worker_cpu_s"]) > 1 and sum(v["worker_cpu_s"])}
    q, f = runs["quarter_file"], runs["one_file"]
    result["rss_growth_4x"] = {"main": round(f["peak_rss_mib_main"] / max(q["peak_rss_mib_main"], 1), 2),
                               "largest_worker": round(f["peak_rss_mib_largest_worker"]
                                                       / max(q["peak_rss_mib_largest_worker"], 1), 2)}
    cpu_s_per_page = f["cpu_s"] / f["pages"]
    result["projections"] = {
        "one_40000_record_warc_on_2_cores_minutes": round(40000 / one_rate / 60 * a.workers / 2, 1),
        "one_40000_record_warc_on_2_cores_minutes_from_cpu_seconds": round(40000 * cpu_s_per_page / 2 / 60, 1),
        "m3w_43M_pages_core_hours": round(43e6 * a.workers / one_rate / 3600),
        "m3w_43M_pages_core_hours_from_cpu_seconds": round(43e6 * cpu_s_per_page / 3600),
        "note": "from the one-file rate with --workers processes (wall-clock, shared machine) and from the CPU "
                "seconds the run's processes used per page",
    }
    if a.logic_rounds:
        result["logic"] = logic_ratio(a.logic_rounds)
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs",)}, indent=2))
    out = ROOT / "bench" / "results" / "interleaved.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    partial.unlink(missing_ok=True)
    print(f"wrote {out}")


def logic_ratio(rounds: int) -> dict:
    """Per core, in one process: everything `mmcorpus interleaved --no-images` does per page but Beam, against
    trafilatura.bare_extraction (the call the pipeline makes); median of the per-round ratios."""
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
    for r in range(rounds):
        b, f, _, _ = timed_round(pages, r, run_full)
        t_bare.append(b)
        t_full.append(f)
        ratios.append(b / f)
    n = len(pages) * rounds
    return {"pages": len(pages), "rounds": rounds,
            "bare_extraction_pages_per_cpu_s": round(n / sum(t_bare), 2),
            "full_pipeline_logic_pages_per_cpu_s": round(n / sum(t_full), 2),
            "ratio_full_vs_bare": round(statistics.median(ratios), 3),
            "ratio_min_max": [round(min(ratios), 3), round(max(ratios), 3)]}


if __name__ == "__main__":
    main()
