"""Remote reading against local files: the bundled WARCs read from moto's S3 server (its own process) and from
a loopback HTTP server (a thread here), both on 127.0.0.1 and started here, as a ratio of the same reads from local files; and peak RSS of a
worker process reading one remote WARC as the WARC grows 4x.

Throughput: in one process, rounds over every bundled WARC, each WARC read from the three sources back to back (warcio-samples, resiliparse-warcs,
cc-whirlwind, dolma-cc-warc): `read_items` (what a pipeline worker runs per WARC) followed by decode + extract
of each page (the per-page work of the read/decode/extract stages), from local paths, s3:// URLs and http://
URLs. Reported: pages/s per source and the median of the per-round ratios remote/local (target >= 0.9), plus
the read-only ratio (records/s without extraction: the I/O overhead alone, which per-file request latency
dominates for these small files).

Memory: a WARC made of the bundled records repeated (gzip members concatenate) at 1x and 4x size is read
whole by a fresh worker process (`read_items` + decode, records consumed one at a time) from S3 and from HTTP;
its peak RSS (VmHWM: ru_maxrss would carry the parent's peak over fork + exec) at 1x and 4x, next to the same read of the local file. Writes
bench/results/remote.json.

    python bench/bench_remote.py [--rounds 5] [--base-mb 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mmcorpus.pipelines.interleaved.command import extract_record  # noqa: E402
from mmcorpus.pipelines.interleaved.sources import decode_page, read_items  # noqa: E402
from mmcorpus.schemas import storage  # noqa: E402
from tests.remote_servers import S3_ENV, free_port, range_server  # noqa: E402

SHARED = pathlib.Path(os.environ.get("MMCORPUS_SHARED", ROOT.parent / "shared")) / "data"
WARC_DIRS = ("warcio-samples", "resiliparse-warcs", "cc-whirlwind", "dolma-cc-warc")

CHILD = """
import sys, time
from mmcorpus.pipelines.interleaved.sources import decode_page, read_items
t, n, pages = time.time(), 0, 0
for rec in read_items(("warc", sys.argv[1]), 5_000_000):
    n += 1
    if "_reject" not in rec:
        pages += not isinstance(decode_page(rec), Exception) and 1
hwm = [line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0]
print(n, pages, hwm, time.time() - t)
"""


def bundled() -> list[pathlib.Path]:
    files = []
    for d in WARC_DIRS:
        files += sorted(p for p in (SHARED / d).rglob("*") if p.is_file() and ".warc" in p.name.lower()
                        and not p.name.endswith(".md"))
    return files


def read_pages(path: str, extract: bool) -> int:
    pages = 0
    for rec in read_items(("warc", path), 5_000_000):
        if "_reject" in rec:
            continue
        page = decode_page(rec)
        if extract and isinstance(page, dict):
            extract_record(page)
        pages += 1
    return pages


def one_round(sources: dict[str, list[str]], extract: bool) -> dict[str, tuple[int, float]]:
    """(pages, seconds) per source; each WARC is read from every source back to back, so load from other jobs
    falls on all of them alike."""
    totals = {name: [0, 0.0] for name in sources}
    for i in range(len(next(iter(sources.values())))):
        for name, paths in sources.items():
            t = time.perf_counter()
            totals[name][0] += read_pages(paths[i], extract)
            totals[name][1] += time.perf_counter() - t
    return {k: (v[0], v[1]) for k, v in totals.items()}


def grow(files: list[pathlib.Path], target: int) -> bytes:
    """Whole gzip members of the bundled .warc.gz files, repeated until about `target` bytes."""
    parts = [f.read_bytes() for f in files if f.name.endswith(".warc.gz") and "bad" not in f.name
             and "clipped" not in f.name and "wrong" not in f.name]
    unit = b"".join(parts)
    return unit * max(1, target // len(unit))


def child_rss(url: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    out = subprocess.run([sys.executable, "-c", CHILD, url], capture_output=True, text=True, env=env, timeout=900)
    records, pages, rss_kb, seconds = out.stdout.split()
    return {"records": int(records), "pages": int(pages), "peak_rss_mb": round(int(rss_kb) / 1024, 1),
            "seconds": round(float(seconds), 2)}


@contextlib.contextmanager
def moto_process():
    """moto's S3 server in its own process (as a store is another machine: its work does not share this
    process's interpreter lock), reached through AWS_ENDPOINT_URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--base-mb", type=int, default=32,
                    help="size of the 1x WARC of the memory test (the reader's buffers reach their steady size "
                         "within the first few blocks of 4 MB: smaller WARCs show that warm-up, not growth)")
    args = ap.parse_args()
    os.environ.setdefault("MMCORPUS_PROGRESS", "0")
    files = bundled()
    result: dict = {"machine": "shared 2-core machine, other jobs running: ratios within one run only",
                    "warcs": len(files), "bytes": sum(f.stat().st_size for f in files)}
    with moto_process(), tempfile.TemporaryDirectory() as tmp, range_server(SHARED) as http:
        import boto3

        boto3.client("s3").create_bucket(Bucket="bench")
        for f in files:
            storage.write_bytes(f"s3://bench/{f.relative_to(SHARED)}", f.read_bytes())
        sources = {"local": [str(f) for f in files],
                   "s3": [f"s3://bench/{f.relative_to(SHARED)}" for f in files],
                   "http": [f"{http.url}/files/{f.relative_to(SHARED)}" for f in files]}
        for extract in (True, False):
            key = "with_extraction" if extract else "read_only"
            rates: dict = {k: [] for k in sources}
            for _ in range(args.rounds):
                for name, (pages, seconds) in one_round(sources, extract).items():
                    rates[name].append(pages / seconds)
            section = {f"{k}_pages_per_s": round(statistics.median(v), 1) for k, v in rates.items()}
            for remote in ("s3", "http"):
                ratios = [r / loc for r, loc in zip(rates[remote], rates["local"])]
                section[f"{remote}_ratio_median"] = round(statistics.median(ratios), 3)
                section[f"{remote}_ratio_min_max"] = [round(min(ratios), 3), round(max(ratios), 3)]
            section["pages_per_pass"] = pages
            result[key] = section
            print(key, json.dumps(section))
        memory = {}
        for scale in (1, 4):
            data = grow(files, args.base_mb * scale << 20)
            name = f"grown-{scale}x.warc.gz"
            storage.write_bytes(f"s3://bench/{name}", data)
            pathlib.Path(tmp, name).write_bytes(data)
            with range_server(tmp) as local_http:
                memory[f"{scale}x"] = {"warc_mb": round(len(data) / 2**20, 1),
                                       "local": child_rss(str(pathlib.Path(tmp, name))),
                                       "s3": child_rss(f"s3://bench/{name}"),
                                       "http": child_rss(f"{local_http.url}/files/{name}")}
            print(f"{scale}x", json.dumps(memory[f"{scale}x"]))
        for remote in ("local", "s3", "http"):
            memory[f"{remote}_rss_ratio_4x_over_1x"] = round(memory["4x"][remote]["peak_rss_mb"]
                                                             / memory["1x"][remote]["peak_rss_mb"], 3)
        result["memory"] = memory
    out = ROOT / "bench" / "results" / "remote.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
