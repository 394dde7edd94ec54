"""`mmcorpus export` throughput and memory against plain copying of the same Parquet shards.

Builds a pairs output as `mmcorpus pairs` writes one (data/part-*.parquet of schema `pair`, zstd, row groups of
512 rows, image bytes with their sha256, width and height stored; stats.json, _SUCCESS) of N rows from the
coco-mini photos (real JPEGs, cycled, each with 32 random bytes after its end marker so no row repeats
another's bytes, as in a real crawl). Then, per N, each in its own process, its peak RSS by /usr/bin/time:
- `cp -r SOURCE/data`, page cache cold (the source's pages dropped with posix_fadvise DONTNEED after an
  fsync: only this benchmark's files, nothing else on the machine) and warm (read just before);
- `mmcorpus export --format webdataset` and `--format hf` on `--runner direct --workers 1` (one core), warm;
  webdataset also cold, and on the default runner (a local Dask cluster, one worker per core);
- the floor: the same bytes read with pyarrow and written as tar members (no Beam, no check, no index), and
  the export's own shard writers called directly (no Beam, no CLI), each in one process, warm;
- with --baseline REF: the export of that git revision (e.g. the one before the bulk writers), same source.
Reported: samples/s, MB/s of image bytes, ratios to warm cp and to the floor, peak RSS per N (flat in N), and
the fixed cost (process start, imports, Beam) and the per-sample cost, from the two sizes.

    python bench/bench_export.py [--sizes 1000,4000] [--samples-per-shard 1000] [--baseline REF]
"""

from __future__ import annotations

import argparse
import hashlib
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
FLOOR = r"""
import glob, sys, time
import pyarrow.parquet as pq
from mmcorpus.pipelines.export.writers import TarStream
src, out = sys.argv[1], sys.argv[2]
start = time.perf_counter()
for i, f in enumerate(sorted(glob.glob(src + "/data/*.parquet"))):
    with open(f"{out}/floor-{i}.tar", "wb") as fh:
        tar, k = TarStream(fh), 0
        for b in pq.ParquetFile(f).iter_batches(batch_size=64, columns=["image_bytes", "caption"]):
            for data, caption in zip(b.column(0).to_pylist(), b.column(1).to_pylist()):
                tar.add(f"{i}-{k}.jpg", data)
                tar.add(f"{i}-{k}.txt", caption.encode())
                k += 1
        tar.close()
print(time.perf_counter() - start)
"""
WRITERS = r"""
import glob, os, sys, time
import pyarrow.parquet as pq
from mmcorpus.pipelines.export.samples import ExportConfig
from mmcorpus.pipelines.export.writers import HfShard, TarShard, plan
src, out, per_shard, fmt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
files = [(f, pq.ParquetFile(f).metadata.num_rows) for f in sorted(glob.glob(src + "/data/*.parquet"))]
writer = (TarShard if fmt == "webdataset" else HfShard)(ExportConfig("pair"), per_shard, sum(n for _, n in files))
for task in plan(files, per_shard):
    writer.export(task, os.path.join(out, f"part-{task.index:05d}{writer.suffix}"), out, "bench")
print(time.perf_counter() - start)
"""


def make_source(folder: pathlib.Path, n: int, per_file: int = 1000) -> int:
    recs = [json.loads(line) for line in (COCO / "captions.jsonl").read_text().splitlines()]
    photos = []
    from PIL import Image

    for r in recs:
        data = (COCO / "images" / r["file_name"]).read_bytes()
        photos.append((r, data, Image.open(COCO / "images" / r["file_name"]).size))
    (folder / "data").mkdir(parents=True)
    files = -(-n // per_file)
    total = 0
    for f in range(files):
        rows = []
        for i in range(f * per_file, min(n, (f + 1) * per_file)):
            rec, data, (width, height) = photos[i % len(photos)]
            data = data + os.urandom(32)  # bytes after the JPEG's end marker: unique rows, as a crawl has
            total += len(data)
            rows.append({"image_id": f"{rec['image_id']}-{i}", "url": f"http://example.com/{i}.jpg",
                         "image_bytes": data, "caption": rec["captions"][i % len(rec["captions"])],
                         "caption_source": "web", "source_dataset": "coco-mini", "width": width, "height": height,
                         "sha256": hashlib.sha256(data).hexdigest()})
        pq.write_table(schemas.to_table(rows, "pair"), folder / "data" / f"part-{f:05d}-of-{files:05d}.parquet",
                       row_group_size=512, compression="zstd")  # as the pipelines' sink writes
    (folder / "stats.json").write_text(json.dumps({"command": "bench"}))
    (folder / "_SUCCESS").write_text("bench\n")
    return total


def drop_cache(folder: pathlib.Path) -> None:
    """Evict this folder's files from the page cache (theirs only; written back first)."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm(folder: pathlib.Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass


def timed(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in MB, stdout) of a command run in its own process."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%M", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr[-2000:]}")
    return wall, int(proc.stderr.strip().splitlines()[-1]) // 1024, proc.stdout


def figures(n: int, mb: float, seconds: float, cp_s: float, floor_s: float, rss: int | None = None) -> dict:
    out = {"seconds": round(seconds, 2), "samples_per_s": round(n / seconds, 1), "mb_per_s": round(mb / seconds, 1),
           "vs_cp_warm": round(cp_s / seconds, 3), "vs_floor": round(floor_s / seconds, 3)}
    if rss is not None:
        out["peak_rss_mb"] = rss
    return out


def baseline_tree(ref: str, where: pathlib.Path) -> dict:
    """An environment whose `mmcorpus` is git revision `ref` of this repository (its top folders mapped as
    pyproject.toml maps them), ahead of this checkout's editable install."""
    pkg = where / "mmcorpus"
    pkg.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "pipelines", "filters", "schemas", "trainer"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(pkg)], input=archive, check=True)
    return dict(os.environ, PYTHONPATH=str(where))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,4000")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--baseline", default="", help="git revision whose export to time on the same source")
    args = ap.parse_args()
    mm = [sys.executable, "-m", "mmcorpus.pipelines.cli"]
    py = [sys.executable, "-c"]
    per = str(args.samples_per_shard)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as top:
        env = baseline_tree(args.baseline, pathlib.Path(top) / "baseline") if args.baseline else None
        for n in [int(x) for x in args.sizes.split(",")]:
            tmp = pathlib.Path(top) / str(n)
            src = tmp / "src"
            image_bytes = make_source(src, n)
            image_mb = image_bytes / 1e6
            parquet_mb = sum(p.stat().st_size for p in (src / "data").iterdir()) / 1e6
            row = {"samples": n, "image_mb": round(image_mb, 1), "parquet_mb": round(parquet_mb, 1),
                   "load_average_before": round(os.getloadavg()[0], 2)}

            def run(name, cmd, cold=False, environ=None):
                out = tmp / name
                out.mkdir(parents=True, exist_ok=True)
                (drop_cache if cold else warm)(src)
                got = timed([c.replace("{out}", str(out)) for c in cmd], environ)
                shutil.rmtree(out)
                return got

            cp_cold, _, _ = run("cp", ["cp", "-r", str(src / "data"), "{out}/data"], cold=True)
            cp_warm, _, _ = run("cp", ["cp", "-r", str(src / "data"), "{out}/data"])
            _, _, floor_out = run("floor", [*py, FLOOR, str(src), "{out}"])
            floor_s = float(floor_out.strip().splitlines()[-1])
            row["cp"] = {"cold_seconds": round(cp_cold, 3), "warm_seconds": round(cp_warm, 3),
                         "cold_mb_per_s": round(parquet_mb / cp_cold, 1), "warm_mb_per_s": round(parquet_mb / cp_warm, 1)}
            row["floor_pyarrow_to_tar"] = {"seconds": round(floor_s, 3), "mb_per_s": round(image_mb / floor_s, 1),
                                           "vs_cp_warm": round(cp_warm / floor_s, 3)}
            for fmt in ("webdataset", "hf"):
                _, _, got = run("writers", [*py, WRITERS, str(src), "{out}", per, fmt])
                row[f"{fmt}_writers_no_beam"] = figures(n, image_mb, float(got.strip().splitlines()[-1]), cp_warm,
                                                        floor_s)
                export = [*mm, "export", str(src), "--format", fmt, "-o", "{out}/x", "--samples-per-shard", per]
                s, rss, _ = run("export", [*export, "--runner", "direct", "--workers", "1"])
                row[f"{fmt}_direct_1_worker"] = figures(n, image_mb, s, cp_warm, floor_s, rss)
                if fmt == "webdataset":
                    s, rss, _ = run("export", [*export, "--runner", "direct", "--workers", "1"], cold=True)
                    row["webdataset_direct_1_worker_cold"] = dict(figures(n, image_mb, s, cp_warm, floor_s, rss),
                                                                  vs_cp_cold=round(cp_cold / s, 3))
                    s, rss, _ = run("export", export)
                    row["webdataset_default_runner"] = figures(n, image_mb, s, cp_warm, floor_s, rss)
                    if env is not None:
                        s, rss, _ = run("export", [*export, "--workers", "1"], environ=env)
                        row["webdataset_baseline_direct_1_worker"] = figures(n, image_mb, s, cp_warm, floor_s, rss)
            row["load_average_after"] = round(os.getloadavg()[0], 2)
            print(json.dumps(row), flush=True)
            results.append(row)
            shutil.rmtree(tmp)
    fixed = {}
    if len(results) >= 2:  # per-sample and fixed cost of the export process, from the smallest and largest size
        a, b = results[0], results[-1]
        for key in ("webdataset_direct_1_worker", "hf_direct_1_worker"):
            per_sample = (b[key]["seconds"] - a[key]["seconds"]) / (b["samples"] - a["samples"])
            fixed[key] = {"fixed_seconds": round(a[key]["seconds"] - per_sample * a["samples"], 2),
                          "marginal_samples_per_s": round(1 / per_sample, 1) if per_sample > 0 else None,
                          "marginal_mb_per_s": round((b["image_mb"] - a["image_mb"]) /
                                                     (b[key]["seconds"] - a[key]["seconds"]), 1)
                          if per_sample > 0 else None}
    out = {"benchmark": "export",
           "machine": f"shared: {os.cpu_count()} cores, other jobs running (load average in each row); ratios "
                      "measured within one run",
           "page_cache": "cp cold: the source's pages dropped (fsync + posix_fadvise DONTNEED, this benchmark's files "
                         "only) before the copy; every other run warm (source read just before); outputs are "
                         "written to the page cache and not synced, for cp and export alike",
           "floor": "pyarrow iter_batches of the image and caption columns written as tar members with the export's "
                    "TarStream, one process, no Beam, no checks, no index: the least a Python export does",
           "samples_per_shard": args.samples_per_shard, "baseline": args.baseline or None,
           "results": results, "fixed_and_marginal_cost": fixed}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "export.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
