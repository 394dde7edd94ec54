"""Real sizes on one machine: rows kept, wall time and peak RSS of every process (the command and each process
under it: Dask workers and nannies, Beam workers, from /proc VmHWM) as the input grows, and image fetching
against bare img2dataset on the same loopback URL list. Sections (--sections):

- scale: `pairs` over --sizes caption rows (1x, 4x, 16x) built from the bundled COCO photos (each row its own
  symlinked file name, so no two rows share a path), tiny random CLIP, no dedup, under each of --runners
  (`auto` is the default: a local Dask cluster for 2 workers; `direct1` the in-memory DirectRunner; `direct2`
  Beam's multi-process DirectRunner, which lost rows at these sizes). Flat memory: the largest process's peak
  stays about the same from the smallest to the largest size; rows/s at the largest size projects 50,000 rows.
- fetch: the bundled photos under --fetch-urls distinct URLs on a 127.0.0.1 HTTP server. (a) bare img2dataset
  (2 processes x 16 threads, no re-encoding, sha256) and mmcorpus's downloader run the same way (2 processes x
  16 threads, each one fetch_with_record call: the mechanism inside `pairs` and `interleaved`), alternating
  --fetch-repeats times: ratio of the median walls. (b) `pairs` over the URLs minus `pairs` over the same local
  files (so CLIP and the rest cancel out): ratio = bare / fetch overhead.
- interleaved: `interleaved` over a loopback site of --pages photo-story pages (4 photos each, every photo its
  own URL and its own bytes, pages distinct so dedup keeps them: photo_site) with image fetching; at the
  largest size --interleaved-repeats alternating rounds of --no-images, with images, bare img2dataset over
  its image URLs (ratio of medians) and img2dataset decoding every image (skip_reencode: the check
  `interleaved` makes too), and `interleaved` with `fetch.decode: false` (header check, no pHash: what bare
  img2dataset checks). --pages 312,1250,5000 gives peak RSS per process at 1x, 4x, 16x.
- latency: the interleaved comparison at --latency-pages with the server waiting --image-latency-ms before each
  image, as remote hosts do (pages served at once): what overlapping downloads with extraction is for.
- capfilt: `capfilt` with a tiny random BLIP over `pairs` outputs of --capfilt-rows rows, each its own photo.
- warc: `interleaved --no-images` over one .gz WARC of --warc-records real article pages (the trafilatura-eval
  pages in turn, a gzip member per record, as Common Crawl writes them), read in byte ranges (the default) and,
  at the sizes of --warc-stride-records, in two interleaved parts per worker (--read-parts 4: how every WARC was
  read before byte ranges): peak RSS per process as one file grows.

    python bench/bench_scale.py [--sections scale,fetch,interleaved,capfilt] [--sizes 500,2000,8000]

Writes (merges its sections into) bench/results/scale.json. Runs on a shared machine: compare ratios within
one run; wall times vary with its load (each section records the load average when it ended).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench_interleaved import SHARED, _tree_peaks, copies, write_warcs  # noqa: E402

COCO = SHARED / "coco-mini"
TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
RUNNERS = {"auto": [], "dask": ["--runner", "dask", "--workers", "2"], "direct1": ["--workers", "1"],
           "direct2": ["--runner", "direct", "--workers", "2"]}


def photos() -> list[tuple[str, list[str]]]:
    recs = [json.loads(line) for line in (COCO / "captions.jsonl").read_text().splitlines() if line.strip()]
    return [(str(COCO / "images" / r["file_name"]), r["captions"]) for r in recs]


def write_rows(folder: pathlib.Path, n: int, url_base: str | None = None, distinct: bool = False) -> pathlib.Path:
    """n caption rows, row i over photo i % 165 under its own name (a symlink, or a URL on the server); with
    `distinct`, each row's photo is its own re-encoded crop (_page_photo): n distinct images."""
    from concurrent.futures import ProcessPoolExecutor

    pics = photos()
    (folder / "imgs").mkdir(parents=True, exist_ok=True)
    rows = folder / "rows.jsonl"
    jobs = []
    with open(rows, "w") as f:
        for i in range(n):
            path, caps = pics[i % len(pics)]
            link = folder / "imgs" / f"{i:07d}.jpg"
            if distinct:
                jobs.append((path, str(link), f"row-{i}"))
            elif not link.exists():
                link.symlink_to(path)
            where = {"url": f"{url_base}/{i:07d}.jpg"} if url_base else {"path": str(link)}
            f.write(json.dumps({**where, "caption": caps[(i // len(pics)) % len(caps)]}) + "\n")
    if jobs:
        with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
            list(pool.map(_page_photo, jobs, chunksize=64))
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
    image_delay = 0.0  # seconds before each answer under /img/: a remote host's latency (section latency)

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.image_delay and self.path.startswith("/img/"):
            time.sleep(self.image_delay)
        super().do_GET()


class _Server(http.server.ThreadingHTTPServer):
    # listen backlog of a real web server, not socketserver's 5: with 32 clients connecting at once (2 processes x
    # 16 threads, every request a new connection to this HTTP/1.0 server) the kernel dropped SYNs, each a 1 s
    # retransmit for the client, and more for the faster client (ListenOverflows in /proc/net/netstat: 390 in one
    # 1,250-page `interleaved` run against 87 in bare img2dataset over the same images; 0 and 0 with 128)
    request_queue_size = 128


def serve(folder: pathlib.Path, image_delay: float = 0.0):
    handler = type("_Handler", (_Quiet,), {"image_delay": image_delay})
    server = _Server(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# mmcorpus's downloader alone, as bare img2dataset is run: 2 processes x 16 threads over the URL list, each
# process one fetch_with_record call (the mechanism inside `pairs` and `interleaved`: stores every image by
# sha256 and writes the per-URL record)
FETCH_ONLY = """
import multiprocessing, sys
from mmcorpus.pipelines.fetching.downloader import DownloadConfig, FetchRecord, fetch_with_record

def part(urls, folder):
    got = sum(r.ok for r in fetch_with_record(urls, DownloadConfig(threads=16, timeout=10), True, FetchRecord(folder)))
    print(got, "of", len(urls), "fetched", flush=True)

if __name__ == "__main__":
    urls = open(sys.argv[1]).read().split()
    procs = [multiprocessing.Process(target=part, args=(urls[i::2], sys.argv[2])) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
"""


def bare_img2dataset(urls: pathlib.Path, work: pathlib.Path, decode: bool = False) -> dict:
    """img2dataset as its users fetch originals: no resize, no re-encoding (`disable_all_reencoding`: the bytes
    are not even decoded), or with `decode` its checked variant (`skip_reencode`: every image decoded, by
    OpenCV, to check it and read its size; a JPEG is kept as downloaded), the check `interleaved` also makes.
    Four shards, so both processes work at any size (its default of 10,000 URLs a shard leaves one idle below
    10,000 URLs)."""
    work.mkdir()
    reencoding = "skip_reencode=True" if decode else "disable_all_reencoding=True"
    per_shard = max(1, -(-len(urls.read_text().split()) // 4))
    code = ("from img2dataset import download; download(url_list=%r, output_folder=%r, input_format='txt', "
            "output_format='parquet', processes_count=2, thread_count=16, resize_mode='no', "
            "%s, compute_hash='sha256', enable_wandb=False, timeout=10, number_sample_per_shard=%d)"
            % (str(urls), str(work / "out"), reencoding, per_shard))
    res = measured([sys.executable, "-c", code], str(work))
    stats = list((work / "out").glob("*_stats.json"))
    res["fetched"] = sum(json.loads(f.read_text()).get("successes", 0) for f in stats)
    return res


def downloader_only(urls: pathlib.Path, work: pathlib.Path) -> dict:
    work.mkdir()
    res = measured([sys.executable, "-c", FETCH_ONLY, str(urls), str(work / "_image_fetch")], str(work))
    res["fetched"] = sum(int(line.split()[0]) for line in (work / "log.txt").read_text().splitlines()
                         if line.endswith(" fetched"))
    return res


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2]


def fetch_bench(n: int, tmp: pathlib.Path, repeats: int = 3) -> dict:
    """Bare img2dataset and mmcorpus's downloader alternately `repeats` times on the same loopback URL list
    (ratio of the median walls), then `pairs` over those URLs and over the same local files (fetch overhead)."""
    site = tmp / "site"
    local = write_rows(site, n)  # the symlinks under site/imgs are what the server serves
    server = serve(site / "imgs")
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        remote = write_rows(tmp / "remote", n, url_base=base)
        urls = tmp / "urls.txt"
        urls.write_text("".join(json.loads(line)["url"] + "\n" for line in remote.read_text().splitlines()))
        bare, ours = [], []
        for i in range(repeats):
            bare.append(bare_img2dataset(urls, tmp / f"bare-{i}"))
            ours.append(downloader_only(urls, tmp / f"ours-{i}"))
            print(json.dumps({"bare_s": bare[-1]["wall_s"], "mmcorpus_s": ours[-1]["wall_s"]}), flush=True)
        runs = {}
        for name, rows in (("pairs_local", local), ("pairs_urls", remote)):
            work = tmp / name
            work.mkdir()
            runs[name] = pairs_run(rows, work, [], "--allow-private-urls")
    finally:
        server.shutdown()
    bare_s, ours_s = _median([r["wall_s"] for r in bare]), _median([r["wall_s"] for r in ours])
    overhead = runs["pairs_urls"]["wall_s"] - runs["pairs_local"]["wall_s"]
    return {"urls": n, "bare_img2dataset": bare, "mmcorpus_downloader": ours,
            "ratio_downloader_vs_img2dataset": round(bare_s / ours_s, 2),
            "ratio_note": "median wall of bare img2dataset / median wall of mmcorpus's downloader (2 processes x "
                          "16 threads each, alternating runs, same URL list and server): >= 0.9 is the target",
            **runs, "pairs_fetch_overhead_s": round(overhead, 1),
            # no ratio when the URL run was not slower: the fetch hid under the rest of the run
            "ratio_pairs_vs_img2dataset": round(bare_s / overhead, 2) if overhead > 0 else None,
            "pairs_urls_over_local_wall": round(runs["pairs_urls"]["wall_s"] / runs["pairs_local"]["wall_s"], 3),
            "pairs_note": "bare img2dataset median wall / (pairs over URLs - pairs over the same local files); one "
                          "run each, so the noise of two ~minute-long runs on a shared machine is in it"}


def _mm(*args: str) -> list[str]:
    return [sys.executable, "-m", "mmcorpus.pipelines.cli", *args]


def _totals(res: dict, out: pathlib.Path, work: pathlib.Path) -> dict:
    stats = out / "stats.json"
    if stats.exists():
        data = json.loads(stats.read_text())
        t = data["totals"]
        res.update(read=t["read"], written=t["written"], rows_per_s=round(t["read"] / res["wall_s"], 2))
        fetch = {s["stage"]: s for s in data["stages"]}.get("fetch_images")
        if fetch:
            res["fetch_images"] = {"in": fetch["in"], "out": fetch["out"], "counters": fetch.get("counters", {})}
    else:
        res["log_tail"] = (work / "log.txt").read_text()[-400:]
    return res


def _page_photo(job: tuple[str, str, str]) -> None:
    """One page's copy of a bundled photo: a crop of 85-100% of each side at a seeded offset, re-encoded as JPEG
    at a seeded quality (85-92), so no two page photos share bytes (every download, hash, decode and stored
    file is its own, as on a real site) while the aspect ratio stays the photo's."""
    import random

    from PIL import Image

    src, dst, seed = job
    rng = random.Random(seed)
    with Image.open(src) as img:
        img = img.convert("RGB")
        w, h = img.size
        f = rng.uniform(0.85, 1.0)
        cw, ch = max(1, round(w * f)), max(1, round(h * f))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img.crop((x, y, x + cw, y + ch)).save(dst, "JPEG", quality=rng.randint(85, 92))


def photo_site(folder: pathlib.Path, pages: int, per_page: int = 4) -> list[str]:
    """`pages` photo-story pages (demo/photo_pages.py's layout), distinct at any size: page n shows `per_page`
    bundled photos drawn with a seed of n, each as its own re-encoded crop under its own URL (_page_photo), with
    its captions in a seeded order (alt text, then the prose), so neither the document dedups nor the image
    dedup nor the byte-level stores find repeats, and written stays near read. Returns the page names."""
    import random
    from concurrent.futures import ProcessPoolExecutor

    sys.path.insert(0, str(ROOT / "demo"))
    from photo_pages import page

    pics = photos()
    (folder / "img").mkdir(parents=True, exist_ok=True)
    names, jobs = [], []
    for n in range(pages):
        rng = random.Random(f"page-{n}")
        group = []
        for k, i in enumerate(rng.sample(range(len(pics)), per_page)):
            path, caps = pics[i]
            name = f"p{n:05d}-{k}.jpg"
            jobs.append((path, str(folder / "img" / name), f"{n}-{k}"))
            group.append({"file_name": name, "captions": rng.sample(caps, len(caps))})
        names.append(f"page-{n:05d}.html")
        (folder / names[-1]).write_text(page(group[0]["captions"][0], group), encoding="utf-8")
    with ProcessPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(_page_photo, jobs, chunksize=64))
    return names


def decode_cost(n_images: int) -> dict:
    """CPU seconds of the per-image work `interleaved` adds with images beyond the download (inspect_image:
    decode, sha256, pHash; one thread) over n_images photos cycled like the site's: part of its fetch overhead
    that bare img2dataset (no decode) does not do."""
    from mmcorpus.filters.imageinfo import inspect_image

    datas = [pathlib.Path(path).read_bytes() for path, _ in photos()]
    t = time.process_time()
    for i in range(n_images):
        inspect_image(datas[i % len(datas)])
    return {"images": n_images, "inspect_image_cpu_s": round(time.process_time() - t, 1)}


def interleaved_bench(sizes: list[int], tmp: pathlib.Path, repeats: int = 1, latency_ms: float = 0.0,
                      decoding: bool = True) -> dict:
    """`interleaved` over a loopback site of N pages x 4 photos with image fetching (default runner); at the
    largest N, `repeats` alternating rounds of --no-images, with images and bare img2dataset over the site's
    image URLs (and img2dataset decoding, with `decoding`): ratio = median bare wall / (median with-images wall
    - median --no-images wall). `latency_ms`: the server waits that long before each image (pages at once)."""
    config = tmp / "site.yaml"
    tmp.mkdir(parents=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    config.write_text("pages: {host_delay: 0.0}\n")  # our own server: no politeness delay
    header_only = tmp / "site-no-decode.yaml"  # fetch.decode false: img2dataset's disable_all_reencoding check
    header_only.write_text("pages: {host_delay: 0.0}\nfetch: {decode: false}\n")
    out: dict = {"runs": []}
    bare: list[dict] = []
    bare_decoding: list[dict] = []
    top = sizes[-1]
    for n in sizes:
        site = tmp / f"site-{n}"
        t = time.time()
        names = photo_site(site, n)
        print(f"site of {n} pages written in {time.time() - t:.0f} s", flush=True)
        server = serve(site, latency_ms / 1000)
        try:
            base = f"http://127.0.0.1:{server.server_address[1]}"
            urls = tmp / f"pages-{n}.txt"
            urls.write_text("".join(f"{base}/{name}\n" for name in names))
            images = tmp / f"images-{n}.txt"
            images.write_text("".join(f"{base}/img/p{i:05d}-{k}.jpg\n" for i in range(n) for k in range(4)))
            variants = [("no_images", ["--no-images"]), ("images", []), ("images_no_decode", []), ("bare", None)] \
                + [("bare_decoding", None)] * decoding if n == top else [("images", [])]
            for rnd in range(repeats if n == top else 1):
                for label, extra in variants:
                    work = tmp / f"run-{n}-{label}-{rnd}"
                    if extra is None:
                        done = {**bare_img2dataset(images, work, decode=label == "bare_decoding"), "round": rnd,
                                "load_average": [round(x, 2) for x in os.getloadavg()]}
                        (bare if label == "bare" else bare_decoding).append(done)
                        print(json.dumps({f"{label}_img2dataset": done}), flush=True)
                        shutil.rmtree(work / "out", ignore_errors=True)
                        continue
                    work.mkdir()
                    settings = header_only if label == "images_no_decode" else config
                    cmd = _mm("interleaved", str(urls), "--output", str(work / "out"), "--config", str(settings),
                              "--allow-private-network", "--overwrite", *extra)
                    res = {"pages": n, "variant": label, "round": rnd,
                           **_totals(measured(cmd, str(work)), work / "out", work),
                           "load_average": [round(x, 2) for x in os.getloadavg()]}
                    print(json.dumps(res), flush=True)
                    out["runs"].append(res)
                    shutil.rmtree(work / "out", ignore_errors=True)  # the stored images: disk, not memory
        finally:
            server.shutdown()
    out["bare_img2dataset_same_images"] = bare
    out["bare_img2dataset_decoding_same_images"] = bare_decoding
    out["decode_cost"] = decode_cost(4 * top)
    walls = {label: [r["wall_s"] for r in out["runs"] if r["pages"] == top and r["variant"] == label
                     and r["exit"] == 0] for label in ("images", "images_no_decode", "no_images")}
    if walls["images"] and walls["no_images"] and bare:
        import statistics

        base = statistics.median(walls["no_images"])
        overhead = statistics.median(walls["images"]) - base
        bare_s = statistics.median([b["wall_s"] for b in bare])
        out["fetch_overhead_s"] = round(overhead, 1)
        out["ratio_vs_img2dataset"] = round(bare_s / overhead, 2) if overhead > 0 else None  # None: fetch hidden
        out["ratio_per_round"] = [round(b["wall_s"] / (i - n), 2) if i > n else None
                                  for i, n, b in zip(walls["images"], walls["no_images"], bare)]
        if bare_decoding and overhead > 0:
            out["ratio_vs_img2dataset_decoding"] = round(
                statistics.median([b["wall_s"] for b in bare_decoding]) / overhead, 2)
        if walls["images_no_decode"]:
            no_decode = statistics.median(walls["images_no_decode"]) - base
            out["fetch_overhead_no_decode_s"] = round(no_decode, 1)
            out["ratio_no_decode_vs_img2dataset"] = round(bare_s / no_decode, 2) if no_decode > 0 else None
        out["note"] = (f"ratio = median bare img2dataset wall over the site's image URLs / (median interleaved "
                       f"with images - median interleaved --no-images) at {top} pages, {repeats} alternating "
                       "round(s); like for like: the default (every image decoded, pHash) against img2dataset "
                       "decoding every image (skip_reencode), fetch.decode false (header check, no pHash) "
                       "against bare img2dataset (disable_all_reencoding: no decode)")
    out["taken"] = f"{started} - {time.strftime('%H:%M:%S', time.gmtime())} UTC"
    out["command"] = " ".join(["bench_scale.py", *sys.argv[1:]])
    out["image_latency_ms"] = latency_ms
    ok = [r for r in out["runs"] if r["variant"] == "images" and r["exit"] == 0]
    out["peak_rss_mib_by_pages"] = {r["pages"]: {"main": r["peak_rss_mib_main"],
                                                 "largest_worker": r["peak_rss_mib_largest_worker"]} for r in ok}
    if len(ok) > 1:
        top_rss = [max(r["peak_rss_mib_main"], r["peak_rss_mib_largest_worker"]) for r in (ok[0], ok[-1])]
        out["largest_process_rss_growth"] = {"pages": [ok[0]["pages"], ok[-1]["pages"]],
                                             "ratio": round(top_rss[1] / max(top_rss[0], 1), 2)}
    return out


def capfilt_bench(sizes: list[int], tmp: pathlib.Path) -> dict:
    """`capfilt` with a tiny random BLIP (demo/tiny_models.py) over pairs outputs of N rows (default runner),
    each row its own photo (a re-encoded crop), so capfilt captions N distinct images."""
    sys.path.insert(0, str(ROOT / "demo"))
    from tiny_models import captions, tiny_blip

    tmp.mkdir(parents=True)
    blip = tmp / "blip"
    tiny_blip(captions(COCO), blip)
    out: dict = {"runs": []}
    for n in sizes:
        rows = write_rows(tmp / f"rows-{n}", n, distinct=True)
        work = tmp / f"pairs-{n}"
        work.mkdir()
        made = pairs_run(rows, work, [])
        if made["exit"] != 0:
            out["runs"].append({"rows": n, "pairs_input_failed": made})
            continue
        work = tmp / f"capfilt-{n}"
        work.mkdir()
        cmd = _mm("capfilt", str(tmp / f"pairs-{n}" / "out"), "--captioner", str(blip), "--itm", str(blip),
                  "--allow-random-weights", "--itm-threshold", "0", "--output", str(work / "out"), "--overwrite")
        res = {"rows": n, **_totals(measured(cmd, str(work)), work / "out", work)}
        print(json.dumps(res), flush=True)
        out["runs"].append(res)
    ok = [r for r in out["runs"] if r.get("exit") == 0]
    if len(ok) > 1:
        top_rss = [max(r["peak_rss_mib_main"], r["peak_rss_mib_largest_worker"]) for r in (ok[0], ok[-1])]
        out["largest_process_rss_growth"] = {"rows": [ok[0]["rows"], ok[-1]["rows"]],
                                             "ratio": round(top_rss[1] / max(top_rss[0], 1), 2)}
    return out


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


SECTIONS = ("scale", "fetch", "interleaved", "latency", "capfilt", "warc")


def warc_bench(sizes: list[int], stride_sizes: list[int], tmp: pathlib.Path) -> dict:
    """`interleaved --no-images` (default runner) over one .gz WARC of N real pages: byte ranges (default) at
    every N, --read-parts 4 at the stride sizes."""
    tmp.mkdir(parents=True)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    runs = []
    for n in sorted(set(sizes) | set(stride_sizes)):
        folder = tmp / f"warc-{n}"
        folder.mkdir()
        (path,) = write_warcs(copies(n), folder / "pages", 1)
        variants = [("byte_ranges", [])] * (n in sizes) + [("read_parts_4", ["--read-parts", "4"])] * (n in stride_sizes)
        for label, extra in variants:
            work = tmp / f"run-{n}-{label}"
            work.mkdir()
            cmd = _mm("interleaved", path, "--output", str(work / "out"), "--no-images", "--overwrite", *extra)
            res = {"records": n, "warc_mib": round(os.path.getsize(path) / 2**20, 1), "variant": label,
                   **_totals(measured(cmd, str(work)), work / "out", work),
                   "load_average": [round(x, 2) for x in os.getloadavg()]}
            print(json.dumps(res), flush=True)
            runs.append(res)
            shutil.rmtree(work / "out", ignore_errors=True)
        shutil.rmtree(folder)
    out: dict = {"runs": runs, "taken": f"{started} - {time.strftime('%H:%M:%S', time.gmtime())} UTC",
                 "command": " ".join(["bench_scale.py", *sys.argv[1:]])}
    for label in ("byte_ranges", "read_parts_4"):
        ok = [r for r in runs if r["variant"] == label and r["exit"] == 0]
        if len(ok) > 1:
            out[f"largest_worker_growth_{label}"] = {
                "records": [ok[0]["records"], ok[-1]["records"]],
                "ratio": round(ok[-1]["peak_rss_mib_largest_worker"] / max(ok[0]["peak_rss_mib_largest_worker"], 1), 2)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma list of " + ", ".join(SECTIONS))
    ap.add_argument("--sizes", default="500,2000,8000", help="pairs rows per scale run (1x, 4x, 16x)")
    ap.add_argument("--runners", default="auto", help=f"comma list of {', '.join(RUNNERS)}")
    ap.add_argument("--fetch-urls", type=int, default=3000, help="URLs for the fetch comparison")
    ap.add_argument("--fetch-repeats", type=int, default=2, help="alternating runs of img2dataset and ours")
    ap.add_argument("--pages", default="100,400", help="interleaved: loopback pages per run (e.g. 312,1250,5000 "
                    "for 1x, 4x, 16x)")
    ap.add_argument("--interleaved-repeats", type=int, default=2,
                    help="interleaved: alternating rounds of --no-images / images / bare img2dataset at the "
                         "largest size")
    ap.add_argument("--latency-pages", type=int, default=1250, help="latency: pages of the site")
    ap.add_argument("--image-latency-ms", type=float, default=200.0, help="latency: the server's wait per image")
    ap.add_argument("--capfilt-rows", default="312,1250,5000", help="capfilt: pairs per run")
    ap.add_argument("--warc-records", default="576,2304,9216", help="warc: records of the one WARC per run")
    ap.add_argument("--warc-stride-records", default="576,2304", help="warc: sizes also run with --read-parts 4")
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
            save_section("fetch")(fetch_bench(args.fetch_urls, tmp / "fetch", args.fetch_repeats))
        if "interleaved" in sections:
            save_section("interleaved")(interleaved_bench([int(n) for n in args.pages.split(",")], tmp / "il",
                                                          args.interleaved_repeats))
        if "latency" in sections:
            save_section("interleaved_latency")(interleaved_bench([args.latency_pages], tmp / "lat",
                                                                  args.interleaved_repeats, args.image_latency_ms,
                                                                  decoding=False))
        if "capfilt" in sections:
            save_section("capfilt")(capfilt_bench([int(n) for n in args.capfilt_rows.split(",")], tmp / "cf"))
        if "warc" in sections:
            save_section("warc")(warc_bench([int(n) for n in args.warc_records.split(",")],
                                            [int(n) for n in args.warc_stride_records.split(",") if n], tmp / "warc"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
