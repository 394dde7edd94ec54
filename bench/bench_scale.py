"""Real sizes on one machine: rows kept, wall time and peak RSS per process of `mmcorpus pairs` as the input
grows, and image fetching inside `pairs` against bare img2dataset on the same loopback URL list.

- scale: `pairs` over N x each scale factor caption rows built from the bundled COCO photos (each row its own
  symlinked file name, so no two rows share a path), tiny random CLIP, no dedup, under each runner given
  (`auto` is the default: a local Dask cluster for 2 workers; `direct2` is Beam's multi-process DirectRunner,
  which lost rows at these sizes: its exit code and rows written are recorded as they come). Peak RSS of the
  main process and of the largest process under it (Beam/Dask workers, img2dataset) from /proc VmHWM.
  Flat memory: the largest process's peak stays about the same from the smallest to the largest scale.
- fetch: the bundled photos under `--fetch-urls` distinct URLs on a 127.0.0.1 HTTP server; bare img2dataset
  (2 processes x 16 threads, no re-encoding) against `pairs` over the same URLs as {url, caption} rows, minus
  `pairs` over the same rows from local files (so CLIP and the rest cancel out): ratio = bare / fetch overhead.

    python bench/bench_scale.py [--rows 1000] [--scales 1,4] [--runners auto,direct1] [--fetch-urls 956]

Writes bench/results/scale.json. Runs on a shared machine: ratios within one run, times vary with its load.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_interleaved import SHARED, _tree_peaks  # noqa: E402

COCO = SHARED / "coco-mini"
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
RUNNERS = {"auto": [], "dask": ["--runner", "dask", "--workers", "2"], "direct1": ["--workers", "1"],
           "direct2": ["--runner", "direct", "--workers", "2"]}


def photos() -> list[tuple[str, list[str]]]:
    recs = [json.loads(line) for line in (COCO / "captions.jsonl").read_text().splitlines() if line.strip()]
    return [(str(COCO / "images" / r["file_name"]), r["captions"]) for r in recs]


def write_rows(folder: pathlib.Path, n: int, url_base: str | None = None) -> pathlib.Path:
    """n caption rows, row i over photo i % 165 under its own name (a symlink, or a URL on the server)."""
    pics = photos()
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    rows = folder / "rows.jsonl"
    with open(rows, "w") as f:
        for i in range(n):
            path, caps = pics[i % len(pics)]
            link = folder / "imgs" / f"{i:07d}.jpg"
            if not link.exists():
                link.symlink_to(path)
            where = {"url": f"{url_base}/{i:07d}.jpg"} if url_base else {"path": str(link)}
            f.write(json.dumps({**where, "caption": caps[(i // len(pics)) % len(caps)]}) + "\n")
    return rows


def measured(cmd: list[str], cwd: str) -> dict:
    """Run a command; wall time, exit code and peak RSS (MiB) of it and of the largest process under it."""
    t = time.time()
    with open(os.path.join(cwd, "log.txt"), "w") as log:
        p = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                             env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"))
        peaks: dict[int, int] = {}
        while p.poll() is None:
            _tree_peaks(p.pid, peaks)
            time.sleep(0.2)
    others = sorted((v for pid, v in peaks.items() if pid != p.pid), reverse=True)
    return {"exit": p.returncode, "wall_s": round(time.time() - t, 1),
            "peak_rss_mib_main": round(peaks.get(p.pid, 0) / 1024, 1),
            "peak_rss_mib_largest_worker": round(max(others, default=0) / 1024, 1),
            "peak_rss_mib_each_child": [round(v / 1024, 1) for v in others], "processes": len(peaks)}


def pairs_run(rows: pathlib.Path, work: pathlib.Path, runner: list[str], *extra: str) -> dict:
    clip = work / "tiny-clip.json"
    clip.write_text(json.dumps(TINY_CLIP))
    out = work / "out"
    cmd = [sys.executable, "-m", "mmcorpus.pipelines.cli", "pairs", str(rows), "-o", str(out), "--clip-model",
           str(clip), "--allow-random-weights", "--min-clip-score", "-1", "--dedup", "none", "--overwrite",
           *runner, *extra]
    res = measured(cmd, str(work))
    stats = out / "stats.json"
    if stats.exists():
        t = json.loads(stats.read_text())["totals"]
        res.update(read=t["read"], written=t["written"], rows_per_s=round(t["read"] / res["wall_s"], 1))
    else:
        res["log_tail"] = (work / "log.txt").read_text()[-400:]
    return res


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(folder: pathlib.Path):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def fetch_bench(n: int, tmp: pathlib.Path) -> dict:
    site = tmp / "site"
    local = write_rows(site, n)  # the symlinks under site/imgs are what the server serves
    server = serve(site / "imgs")
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        remote = write_rows(tmp / "remote", n, url_base=base)
        urls = tmp / "urls.txt"
        urls.write_text("".join(json.loads(line)["url"] + "\n" for line in remote.read_text().splitlines()))
        bare_dir = tmp / "bare"
        bare_dir.mkdir()
        code = ("from img2dataset import download; download(url_list=%r, output_folder=%r, input_format='txt', "
                "output_format='parquet', processes_count=2, thread_count=16, resize_mode='no', "
                "disable_all_reencoding=True, compute_hash='sha256', enable_wandb=False, timeout=10)"
                % (str(urls), str(bare_dir / "out")))
        bare = measured([sys.executable, "-c", code], str(bare_dir))
        runs = {}
        for name, rows in (("pairs_local", local), ("pairs_urls", remote)):
            work = tmp / name
            work.mkdir()
            runs[name] = pairs_run(rows, work, [], "--allow-private-urls")
    finally:
        server.shutdown()
    overhead = runs["pairs_urls"]["wall_s"] - runs["pairs_local"]["wall_s"]
    return {"urls": n, "bare_img2dataset": bare, **runs, "fetch_overhead_s": round(overhead, 1),
            "ratio_vs_img2dataset": round(bare["wall_s"] / max(overhead, 0.1), 2),
            "note": "ratio = bare img2dataset wall / (pairs over URLs - pairs over the same local files); >= 0.9 is "
                    "the target; an overhead at or under 0 means fetching hid under the rest of the run"}


def scale_bench(sizes: list[int], runners: list[str], tmp: pathlib.Path, save) -> dict:
    out: dict = {"runs": []}
    for n in sizes:
        rows = write_rows(tmp / f"rows-{n}", n)
        for runner in runners:
            work = tmp / f"run-{n}-{runner}"
            work.mkdir()
            res = {"rows": n, "runner": runner, **pairs_run(rows, work, RUNNERS[runner])}
            print(json.dumps(res), flush=True)
            out["runs"].append(res)
            save(out)  # kept if cut short
    for runner in runners:
        runs = [r for r in out["runs"] if r["runner"] == runner and r["exit"] == 0]
        if len(runs) > 1:
            top = [max(r["peak_rss_mib_main"], r["peak_rss_mib_largest_worker"]) for r in (runs[0], runs[-1])]
            out.setdefault("largest_process_rss_growth", {})[runner] = {
                "rows": [runs[0]["rows"], runs[-1]["rows"]], "ratio": round(top[1] / max(top[0], 1), 2)}
            rate = runs[-1]["rows_per_s"]
            out.setdefault("projected_50000_rows_s", {})[runner] = round(50_000 / rate) if rate else None
    return out


SECTIONS = ("scale", "fetch", "interleaved", "capfilt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    ap.add_argument("--sizes", default="500,2000,8000", help="pairs rows per scale run (1x, 4x, 16x)")
    ap.add_argument("--runners", default="auto", help=f"comma list of {', '.join(RUNNERS)}")
    ap.add_argument("--fetch-urls", type=int, default=956, help="URLs for the fetch comparison")
    ap.add_argument("--pages", default="200,800", help="interleaved: loopback pages per run")
    ap.add_argument("--capfilt-rows", default="250,1000", help="capfilt: pairs per run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    args = ap.parse_args()
    out = pathlib.Path(args.out)
    result = json.loads(out.read_text()) if out.exists() else {}
    result["machine"] = f"{os.cpu_count()} cores, shared with other jobs"

    def save_section(name):
        def save(value):
            result[name] = {**value, "load_average_after": [round(x, 2) for x in os.getloadavg()]}
            out.write_text(json.dumps(result, indent=2) + "\n")
        return save

    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp_name:
        tmp = pathlib.Path(tmp_name)
        if "scale" in sections:
            save = save_section("scale")
            save(scale_bench([int(n) for n in args.sizes.split(",")], args.runners.split(","), tmp / "scale", save))
        if "fetch" in sections:
            save_section("fetch")(fetch_bench(args.fetch_urls, tmp / "fetch"))
        if "interleaved" in sections:
            save_section("interleaved")(interleaved_bench([int(n) for n in args.pages.split(",")], tmp / "il"))
        if "capfilt" in sections:
            save_section("capfilt")(capfilt_bench([int(n) for n in args.capfilt_rows.split(",")], tmp / "cf"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
