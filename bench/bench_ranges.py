"""Bytes a remote WARC costs when `interleaved` reads it in byte ranges (`--warc-part-mb`) against reading it
whole: one .gz WARC of N real article pages (the trafilatura-eval pages in turn, a gzip member per record)
served by the tests' loopback range server (tests/remote_servers.py), which counts the bytes and requests it
sends; the ranges planned as `interleaved` plans them (`ranged_sizes`: the file's first member checked once)
and each read with `read_part` as a worker reads it (the scan for the range's first member, the reads past its
end). Reported: bytes served / file size, requests, and that the ranges together yield the same records as the
whole read. Merges "byte_ranges" into bench/results/remote.json.

    python bench/bench_ranges.py [--records 2304] [--part-mb 4]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from bench_interleaved import copies, write_warcs  # noqa: E402
from mmcorpus.pipelines.interleaved import sources  # noqa: E402
from tests.remote_servers import range_server  # noqa: E402


def measure(tasks: list, server) -> dict:
    server.sent = 0
    server.requests.clear()
    t = time.time()
    records = sorted(r["source"] for task in tasks for r in sources.read_part(task))
    return {"tasks": len(tasks), "records": len(records), "bytes_served": server.sent,
            "requests": len(server.requests), "wall_s": round(time.time() - t, 2), "_sources": records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=2304)
    ap.add_argument("--part-mb", type=float, default=sources.PART_BYTES / 2**20)
    args = ap.parse_args()
    part_bytes = int(args.part_mb * 2**20)
    with tempfile.TemporaryDirectory() as tmp, range_server(tmp) as server:
        (path,) = write_warcs(copies(args.records), pathlib.Path(tmp) / "pages", 1)
        item, size = ("warc", f"{server.url}/files/{pathlib.Path(path).name}"), os.path.getsize(path)
        whole = measure([sources.Part(item)], server)
        plan = sources.ranged_sizes([item], sources.file_sizes([item[1]]), part_bytes)
        ranged = measure(sources.split_items([item], 2, part_bytes, plan), server)
    same = whole.pop("_sources") == ranged.pop("_sources")
    for run in (whole, ranged):
        run["served_over_file"] = round(run["bytes_served"] / size, 3)
    result = {"what": f"one .gz WARC of {args.records} real pages ({size / 2**20:.1f} MiB) over loopback HTTP, "
                      f"read whole and in {args.part_mb:g} MiB ranges ({sources.RANGE_BLOCK >> 10} KiB reads; the "
                      "run's check of the file's first member not counted)",
              "whole": whole, "ranges": ranged, "same_records": same,
              "taken": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "command": " ".join(["bench_ranges.py", *sys.argv[1:]])}
    print(json.dumps(result, indent=1))
    out = ROOT / "bench" / "results" / "remote.json"
    data = json.loads(out.read_text()) if out.exists() else {}
    data["byte_ranges"] = result
    out.write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
