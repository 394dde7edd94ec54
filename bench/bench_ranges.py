"""Bytes a remote WARC costs when `interleaved` reads it in byte ranges (`--warc-part-mb`) against reading it
whole: one .gz WARC of N real article pages (the trafilatura-eval pages in turn, a gzip member per record)
served by a loopback HTTP server that counts the bytes and requests it sends; every range read with
`read_part` as a worker reads it (the check of the file's first member, the scan for the range's first
member, the reads past its end). Reported: bytes served / file size, requests, and that the ranges together
yield the same records as the whole read. Merges "byte_ranges" into bench/results/remote.json.

    python bench/bench_ranges.py [--records 2304] [--part-mb 4]
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import pathlib
import re
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_interleaved import copies, write_warcs  # noqa: E402
from mmcorpus.pipelines.interleaved import sources  # noqa: E402

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class _Counting(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of the one file with single `Range` requests; counts what it sends."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self._serve(False)

    def do_GET(self):
        self._serve(True)

    def _serve(self, body: bool):
        path, size = self.server.path, os.path.getsize(self.server.path)
        start, end = 0, size - 1
        m = _RANGE.match(self.headers.get("Range", ""))
        if m:
            start, end = int(m.group(1)), min(int(m.group(2)), size - 1) if m.group(2) else size - 1
        self.send_response(206 if m else 200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        if m:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if body:
            with open(path, "rb") as f:
                f.seek(start)
                data = f.read(end - start + 1)
            self.server.sent += len(data)
            self.server.requests += 1
            self.wfile.write(data)


def measure(url: str, tasks: list, server) -> dict:
    server.sent = server.requests = 0
    t = time.time()
    records = sorted(r["source"] for task in tasks for r in sources.read_part(task))
    return {"tasks": len(tasks), "records": len(records), "bytes_served": server.sent, "requests": server.requests,
            "wall_s": round(time.time() - t, 2), "_sources": records}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=2304)
    ap.add_argument("--part-mb", type=float, default=sources.PART_BYTES / 2**20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (path,) = write_warcs(copies(args.records), pathlib.Path(tmp) / "pages", 1)
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
        server.path, server.sent, server.requests = path, 0, 0
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/{pathlib.Path(path).name}"
            item, size = ("warc", url), os.path.getsize(path)
            whole = measure(url, [sources.Part(item)], server)
            ranged = measure(url, sources.split_items([item], 2, int(args.part_mb * 2**20),
                                                      sources.file_sizes([url])), server)
        finally:
            server.shutdown()
    same = whole.pop("_sources") == ranged.pop("_sources")
    for run in (whole, ranged):
        run["served_over_file"] = round(run["bytes_served"] / size, 3)
    result = {"what": f"one .gz WARC of {args.records} real pages ({size / 2**20:.1f} MiB) over loopback HTTP, "
                      f"read whole and in {args.part_mb:g} MiB ranges ({sources.RANGE_BLOCK >> 10} KiB reads)",
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
