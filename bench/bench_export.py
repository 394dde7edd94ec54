"""`mmcorpus export` throughput and memory against plain copying of the same Parquet shards.

Builds a pairs output (data/part-*.parquet of schema `pair`, stats.json, _SUCCESS, as a pipeline writes) of N
rows from the coco-mini photos (real JPEGs, cycled, each with 32 random bytes after its end marker so no
row repeats another's bytes, as in a real crawl; each row its own image_id), then times, per N:
- `cp -r SOURCE/data` (the bytes a hand-off has to move at least),
- `mmcorpus export --format webdataset` and `--format hf` (direct runner, --workers 1: one core),
each in its own process, with its peak RSS (/usr/bin/time). Reported: samples/s, MB/s of image bytes, the
ratio to cp, and peak RSS per N (flat in N when no runner holds image bytes beyond a row group).

    python bench/bench_export.py [--sizes 1000,4000] [--samples-per-shard 500]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow.parquet as pq  # noqa: E402

from mmcorpus import schemas  # noqa: E402

COCO = ROOT.parent / "shared" / "data" / "coco-mini"


def make_source(folder: pathlib.Path, n: int, per_file: int = 1000) -> int:
    recs = [json.loads(line) for line in (COCO / "captions.jsonl").read_text().splitlines()]
    photos = [(r, (COCO / "images" / r["file_name"]).read_bytes()) for r in recs]
    (folder / "data").mkdir(parents=True)
    files = -(-n // per_file)
    total = 0
    for f in range(files):
        rows = []
        for i in range(f * per_file, min(n, (f + 1) * per_file)):
            rec, data = photos[i % len(photos)]
            data = data + os.urandom(32)  # bytes after the JPEG's end marker: unique rows, as a crawl has
            total += len(data)
            rows.append({"image_id": f"{rec['image_id']}-{i}", "url": f"http://example.com/{i}.jpg",
                         "image_bytes": data, "caption": rec["captions"][i % len(rec["captions"])],
                         "caption_source": "web", "source_dataset": "coco-mini", "width": None, "height": None})
        pq.write_table(schemas.to_table(rows, "pair"), folder / "data" / f"part-{f:05d}-of-{files:05d}.parquet",
                       row_group_size=512)
    (folder / "stats.json").write_text(json.dumps({"command": "bench"}))
    (folder / "_SUCCESS").write_text("bench\n")
    return total


def timed(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS in MB) of a command run in its own process."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:3]} failed: {proc.stderr[-2000:]}")
    return wall, int(proc.stderr.strip().splitlines()[-1]) // 1024


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,4000")
    ap.add_argument("--samples-per-shard", type=int, default=500)
    args = ap.parse_args()
    mm = [sys.executable, "-m", "mmcorpus.pipelines.cli"]
    results = []
    for n in [int(x) for x in args.sizes.split(",")]:
        with tempfile.TemporaryDirectory(prefix="bench-export-") as tmp:
            tmp = pathlib.Path(tmp)
            image_bytes = make_source(tmp / "src", n)
            parquet_mb = sum(p.stat().st_size for p in (tmp / "src" / "data").iterdir()) / 1e6
            row = {"samples": n, "image_mb": round(image_bytes / 1e6, 1), "parquet_mb": round(parquet_mb, 1)}
            cp_s, cp_rss = timed(["cp", "-r", str(tmp / "src" / "data"), str(tmp / "copy")])
            row["cp"] = {"seconds": round(cp_s, 3), "mb_per_s": round(parquet_mb / cp_s, 1)}
            shutil.rmtree(tmp / "copy")
            for fmt in ("webdataset", "hf"):
                s, rss = timed([*mm, "export", str(tmp / "src"), "--format", fmt, "-o", str(tmp / fmt),
                                "--samples-per-shard", str(args.samples_per_shard), "--workers", "1"])
                row[fmt] = {"seconds": round(s, 2), "samples_per_s": round(n / s, 1),
                            "mb_per_s": round(image_bytes / 1e6 / s, 1), "vs_cp": round(cp_s / s, 3),
                            "peak_rss_mb": rss}
                shutil.rmtree(tmp / fmt)
            print(json.dumps(row), flush=True)
            results.append(row)
    out = {"benchmark": "export", "machine": "shared: 2 cores, other jobs running; ratios measured within one run",
           "runner": "direct, --workers 1", "samples_per_shard": args.samples_per_shard, "results": results}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "export.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
