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
import statistics
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
start, cpu = time.perf_counter(), time.process_time()
for i, f in enumerate(sorted(glob.glob(src + "/data/*.parquet"))):
    with open(f"{out}/floor-{i}.tar", "wb") as fh:
        tar, k = TarStream(fh), 0
        for b in pq.ParquetFile(f).iter_batches(batch_size=64, columns=["image_bytes", "caption"]):
            for data, caption in zip(b.column(0).to_pylist(), b.column(1).to_pylist()):
                tar.add(f"{i}-{k}.jpg", data)
                tar.add(f"{i}-{k}.txt", caption.encode())
                k += 1
        tar.close()
print(time.perf_counter() - start, time.process_time() - cpu)
"""
WRITERS = r"""
import glob, os, sys, time
import pyarrow.parquet as pq
from mmcorpus.pipelines.export.samples import ExportConfig
from mmcorpus.pipelines.export.writers import HfShard, TarShard, plan
src, out, per_shard, fmt = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
start, cpu = time.perf_counter(), time.process_time()
files = [(f, pq.ParquetFile(f).metadata.num_rows) for f in sorted(glob.glob(src + "/data/*.parquet"))]
writer = (TarShard if fmt == "webdataset" else HfShard)(ExportConfig("pair"), per_shard, sum(n for _, n in files))
for task in plan(files, per_shard):
    writer.export(task, os.path.join(out, f"part-{task.index:05d}{writer.suffix}"), out, "bench")
print(time.perf_counter() - start, time.process_time() - cpu)
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


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds, CPU seconds (user + system), peak RSS in MB and stdout of a command in its own process."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-f", "%U %S %M", *cmd], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[:4]} failed: {proc.stderr[-2000:]}")
    user, system, rss = proc.stderr.strip().splitlines()[-1].split()
    return {"wall": wall, "cpu": float(user) + float(system), "rss": int(rss) // 1024, "stdout": proc.stdout}


def inner(got: dict) -> dict:
    """The timing a FLOOR / WRITERS script printed (its work only, not its imports)."""
    wall, cpu = (float(x) for x in got["stdout"].split())
    return dict(got, wall=wall, cpu=cpu)


def median(values: list[float]) -> float:
    return statistics.median(values)


def figures(n: int, mb: float, runs: list[dict], base: dict) -> dict:
    """Median wall and CPU seconds over the repeats, samples/s and MB/s (wall), ratios to warm cp (wall) and to the
    floor (wall, and CPU), peak RSS (max over repeats)."""
    wall, cpu = median([r["wall"] for r in runs]), median([r["cpu"] for r in runs])
    return {"seconds": round(wall, 2), "cpu_seconds": round(cpu, 2), "runs": [round(r["wall"], 2) for r in runs],
            "samples_per_s": round(n / wall, 1), "mb_per_s": round(mb / wall, 1),
            "vs_cp_warm": round(base["cp_warm"] / wall, 3), "vs_floor": round(base["floor_wall"] / wall, 3),
            "vs_floor_cpu": round(base["floor_cpu"] / cpu, 3), "peak_rss_mb": max(r["rss"] for r in runs)}


def baseline_tree(ref: str, where: pathlib.Path) -> dict:
    """An environment whose `mmcorpus` is git revision `ref` of this repository (its top folders mapped as
    pyproject.toml maps them), ahead of this checkout's editable install."""
    pkg = where / "mmcorpus"
    pkg.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "pipelines", "filters", "schemas", "trainer"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(pkg)], input=archive, check=True)
    return dict(os.environ, PYTHONPATH=str(where))


def measure(n: int, tmp: pathlib.Path, args, env: dict | None) -> dict:
    mm = [sys.executable, "-m", "mmcorpus.pipelines.cli"]
    py = [sys.executable, "-c"]
    per = str(args.samples_per_shard)
    src = tmp / "src"
    image_mb = make_source(src, n) / 1e6
    parquet_mb = sum(p.stat().st_size for p in (src / "data").iterdir()) / 1e6

    def run(cmd, cold=False, environ=None):
        out = tmp / "out"
        out.mkdir(parents=True, exist_ok=True)
        (drop_cache if cold else warm)(src)
        got = timed([c.replace("{out}", str(out)) for c in cmd], environ)
        shutil.rmtree(out)
        return got

    cases = {
        "cp_cold": (["cp", "-r", str(src / "data"), "{out}/data"], True, None),
        "cp_warm": (["cp", "-r", str(src / "data"), "{out}/data"], False, None),
        "floor": ([*py, FLOOR, str(src), "{out}"], False, None),
    }
    for fmt in ("webdataset", "hf"):
        export = [*mm, "export", str(src), "--format", fmt, "-o", "{out}/x", "--samples-per-shard", per]
        cases[f"{fmt}_writers_no_beam"] = ([*py, WRITERS, str(src), "{out}", per, fmt], False, None)
        cases[f"{fmt}_direct_1_worker"] = ([*export, "--runner", "direct", "--workers", "1"], False, None)
    export = [*mm, "export", str(src), "--format", "webdataset", "-o", "{out}/x", "--samples-per-shard", per]
    cases["webdataset_direct_1_worker_cold"] = ([*export, "--runner", "direct", "--workers", "1"], True, None)
    cases["webdataset_default_runner"] = (export, False, None)
    if env is not None:
        cases["webdataset_baseline_direct_1_worker"] = ([*export, "--workers", "1"], False, env)
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    load = [os.getloadavg()[0]]
    for _ in range(args.repeat):  # rounds: every case once per round, so load changes hit all cases alike
        for name, (cmd, cold, environ) in cases.items():
            got = run(cmd, cold, environ)
            runs[name].append(inner(got) if name == "floor" or name.endswith("_no_beam") else got)
        load.append(os.getloadavg()[0])
    base = {"cp_warm": median([r["wall"] for r in runs["cp_warm"]]),
            "cp_cold": median([r["wall"] for r in runs["cp_cold"]]),
            "floor_wall": median([r["wall"] for r in runs["floor"]]),
            "floor_cpu": median([r["cpu"] for r in runs["floor"]])}
    row = {"samples": n, "image_mb": round(image_mb, 1), "parquet_mb": round(parquet_mb, 1),
           "load_average_1min": [round(x, 2) for x in load],
           "cp": {"cold_seconds": round(base["cp_cold"], 3), "warm_seconds": round(base["cp_warm"], 3),
                  "cold_mb_per_s": round(parquet_mb / base["cp_cold"], 1),
                  "warm_mb_per_s": round(parquet_mb / base["cp_warm"], 1),
                  "warm_cpu_seconds": round(median([r["cpu"] for r in runs["cp_warm"]]), 3)},
           "floor_pyarrow_to_tar": {"seconds": round(base["floor_wall"], 3), "cpu_seconds": round(base["floor_cpu"], 3),
                                    "mb_per_s": round(image_mb / base["floor_wall"], 1),
                                    "vs_cp_warm": round(base["cp_warm"] / base["floor_wall"], 3)}}
    for name in cases:
        if name.startswith(("webdataset", "hf")):
            row[name] = figures(n, image_mb, runs[name], base)
    row["webdataset_direct_1_worker_cold"]["vs_cp_cold"] = round(
        base["cp_cold"] / row["webdataset_direct_1_worker_cold"]["seconds"], 3)
    return row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1000,4000")
    ap.add_argument("--samples-per-shard", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3, help="rounds of every measurement (medians reported)")
    ap.add_argument("--baseline", default="", help="git revision whose export to time on the same source")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-export-") as top:
        env = baseline_tree(args.baseline, pathlib.Path(top) / "baseline") if args.baseline else None
        for n in [int(x) for x in args.sizes.split(",")]:
            row = measure(n, pathlib.Path(top) / str(n), args, env)
            print(json.dumps(row), flush=True)
            results.append(row)
            shutil.rmtree(pathlib.Path(top) / str(n))
    fixed = {}
    if len(results) >= 2:  # per-sample and fixed cost of the export process, from the smallest and largest size
        a, b = results[0], results[-1]
        for key in ("webdataset_direct_1_worker", "hf_direct_1_worker", "webdataset_default_runner"):
            dt, dn = b[key]["seconds"] - a[key]["seconds"], b["samples"] - a["samples"]
            fixed[key] = {"fixed_seconds": round(a[key]["seconds"] - dt / dn * a["samples"], 2),
                          "marginal_samples_per_s": round(dn / dt, 1) if dt > 0 else None,
                          "marginal_mb_per_s": round((b["image_mb"] - a["image_mb"]) / dt, 1) if dt > 0 else None}
    out = {"benchmark": "export",
           "machine": f"shared: {os.cpu_count()} cores, other jobs running (1-minute load average per round in each "
                      "row); ratios measured within one run; medians of the rounds",
           "page_cache": "cp cold and export cold: the source's pages dropped (fsync + posix_fadvise DONTNEED, this "
                         "benchmark's files only) before the run; every other run warm (source read just before); "
                         "outputs are written to the page cache and not synced, for cp and export alike",
           "floor": "pyarrow iter_batches of the image and caption columns written as tar members with the export's "
                    "TarStream, one process, no Beam, no checks, no index, its imports not timed: the least a "
                    "Python export does; *_writers_no_beam: the export's shard writers called the same way",
           "samples_per_shard": args.samples_per_shard, "repeat": args.repeat, "baseline": args.baseline or None,
           "results": results, "fixed_and_marginal_cost": fixed}
    (ROOT / "bench" / "results").mkdir(exist_ok=True)
    (ROOT / "bench" / "results" / "export.json").write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
