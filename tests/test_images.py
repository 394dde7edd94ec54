"""Image fetching from a local HTTP server (127.0.0.1) serving real photos and broken files: image_info matches
PIL/hashlib/imagehash on the served file, failures are rejects with reasons, text stays; the downloader's
per-URL results (X-Robots-Tag, redirects, errors) and a rerun that fetches only the URLs that failed."""

import argparse
import collections
import functools
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time

import apache_beam as beam
import imagehash
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmcorpus.filters.imageinfo import phash_distance
from mmcorpus.filters.urls import url_refusal
from mmcorpus.pipelines.fetching.downloader import DownloadConfig, FetchRecord, ImageDownloader
from mmcorpus.pipelines.fetching.images import (IMAGE_URL_KIND, STAGE_FETCH, FetchConfig, ImageFill, fetch_images,
                                                image_url_rows)
from mmcorpus.pipelines.runtime.stage import Count
from mmcorpus.pipelines.runtime.run import RunSpec, execute
from mmcorpus.pipelines.runtime.runner import add_runner_args
from mmcorpus.pipelines.runtime.sink import Kind
from mmcorpus.pipelines.runtime.stage import Collector
from tests.test_dedup import doc_row, make_doc

SLOW_SECONDS = 4
GATE = threading.Event()  # /gate/<path> answers once this is set (or after GATE_SECONDS)
GATE_SECONDS = 60
TIMEOUT = 2
RUNNER = "dask"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `files`; /redirect/<URL> redirects, /slow/<path> answers late, /robots/<value>/<path> sends
    `X-Robots-Tag: <value>` (':' written '~'), /flaky/<path> answers 503 to its first request; `hits` counts
    the requests of each path."""

    def __init__(self, *args, files, hits, **kwargs):
        self.files, self.hits = files, hits
        super().__init__(*args, **kwargs)

    def do_GET(self):
        path = self.path
        self.hits[path] += 1
        robots = None
        if path.startswith("/robots/"):
            robots, path = path.removeprefix("/robots/").split("/", 1)
            robots, path = robots.replace("~", ":").replace("%20", " "), "/" + path
        if path.startswith("/flaky/"):
            path = path.removeprefix("/flaky")
            if self.hits[self.path] == 1:
                self.send_error(503)
                return
        if path.startswith("/redirect/"):  # /redirect/<target URL>
            self.send_response(302)
            self.send_header("Location", path.removeprefix("/redirect/"))
            self.end_headers()
            return
        if path.startswith("/slow/"):
            time.sleep(SLOW_SECONDS)
            path = path.removeprefix("/slow")
        if path.startswith("/gate/"):
            GATE.wait(GATE_SECONDS)
            path = path.removeprefix("/gate")
        target = self.files.get(path)
        if target is None:
            self.send_error(404)
            return
        data = target.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        if robots:
            self.send_header("X-Robots-Tag", robots)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def site(shared_data, tmp_path_factory):
    """URL path -> real file, served on 127.0.0.1; thumbnails are real photos scaled to fit 100 px."""
    coco = shared_data / "coco-mini" / "images"
    ukb = shared_data / "imagededup-ukbench"
    files = {f"/coco/{p.name}": p for p in sorted(coco.glob("*.jpg"))}
    files.update({f"/ukb/{p.relative_to(ukb)}": p for p in sorted(ukb.rglob("*")) if p.is_file()})
    thumbs = tmp_path_factory.mktemp("thumbs")
    for p in sorted(coco.glob("*.jpg"))[:2]:
        img = Image.open(p)
        img.thumbnail((100, 100))
        img.save(thumbs / p.name, quality=85)
        files[f"/thumb/{p.name}"] = thumbs / p.name
    hits = collections.Counter()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, files=files, hits=hits))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield base, files, hits
    server.shutdown()
    server.server_close()


def captions(coco_dir, n):
    return [json.loads(line)["captions"] for line in (coco_dir / "captions.jsonl").read_text().splitlines()[:n]]


def documents(base, coco_dir):
    """Real photos that pass, and every kind of failure, spread over three documents."""
    photos = [f"{base}/coco/{n}" for n in ("000000000790.jpg", "000000018575.jpg", "000000019221.jpg")]
    ok = {
        "d-coco": photos,
        "d-ukb": [f"{base}/ukb/base_images/ukbench00120.jpg", f"{base}/ukb/formats_images/ukbench09380.webp",
                  f"{base}/ukb/formats_images/ukbench09380.png", f"{base}/ukb/ukbench00120_gray.jpg",
                  photos[0]],  # the .png holds JPEG bytes; photos[0] is also in d-coco (fetched once)
        "d-fail": [],
    }
    bad = {
        "d-ukb": {f"{base}/ukb/mixed_images/ukbench09268_corrupt.jpg": {"image_decode_failed"},
                  f"{base}/ukb/formats_images/giphy.gif": {"image_format", "image_decode_failed"},
                  f"{base}/ukb/formats_images/Iggy.1024.ppm": {"image_format"}},
        "d-fail": {f"{base}/missing.jpg": {"image_fetch_failed"},
                   f"{base}/slow/coco/000000000790.jpg": {"image_fetch_failed"},
                   f"{base}/thumb/000000000790.jpg": {"image_too_small"},
                   f"{base}/coco/000000161044.jpg": {"image_aspect_ratio"},
                   "ftp://127.0.0.1/coco/000000000790.jpg": {"url_not_allowed"}},
    }
    texts = captions(coco_dir, 3)
    docs = []
    for (doc_id, good), text in zip(ok.items(), texts):
        failing = list(bad.get(doc_id, {}))
        images = [u for i in range(max(len(good), len(failing))) for u in (good[i:i + 1] + failing[i:i + 1])]
        docs.append(make_doc(doc_id, text, images))
    return docs, ok, bad


def run_args(runner, workers):
    parser = argparse.ArgumentParser()
    add_runner_args(parser)
    return parser.parse_args(["--runner", runner, "--workers", str(workers)])


def build_for(docs, cfg, allow_private, url_list=False, fetch=True):
    def build(p):
        c = Collector()
        src = p | "Read" >> beam.Create(docs)
        c.count(src, "read", "in")
        c.count(src, "read", "out")
        if url_list:
            image_url_rows(c, src, allow_private)
        kept = fetch_images(c, src, cfg, allow_private) if fetch else src
        c.add(kept | "ToSink" >> beam.Map(lambda d: ("data", d["doc_id"], doc_row(d))))
        return c.finish()
    return build


def run_fetch(out, docs, cfg, allow_private=True, runner="direct", workers=1, url_list=False, fetch=True,
              overwrite=False):
    kinds = {"data": Kind("interleaved", "data", 1)}
    if url_list:
        kinds[IMAGE_URL_KIND] = Kind("url", "image_urls", 1)
    spec = RunSpec(command="test-images", out_dir=str(out), config={}, inputs=[], kinds=kinds, stages=["read"],
                   overwrite=overwrite)
    stats = execute(spec, run_args(runner, workers), build_for(docs, cfg, allow_private, url_list, fetch))
    kept = {r["doc_id"]: r for r in pq.read_table(out / "data").to_pylist()}
    rejects = pq.read_table(out / "rejects").to_pylist()
    return stats, kept, rejects


def served_file(url, base, files):
    return files[url.removeprefix(base)]


def check_result(stats, kept, rejects, docs, ok, bad, base, files):
    for doc in docs:
        row = kept[doc["doc_id"]]
        assert [t for t in row["texts"] if t] == [t for t in doc["texts"] if t]  # text intact
        assert [u for u in row["images"] if u] == ok[doc["doc_id"]]  # failed positions gone, order kept
        for url, info in zip(row["images"], row["image_info"]):
            if url is None:
                assert info is None
                continue
            path = served_file(url, base, files)
            data = path.read_bytes()
            img = Image.open(path)
            assert info["url"] == url and info["bytes"] == data
            assert (info["width"], info["height"]) == img.size
            assert info["sha256"] == hashlib.sha256(data).hexdigest()
            # pHash of a reduced decode (filters.imageinfo.phash_scale): within a few bits of full-size imagehash
            assert phash_distance(info["phash"], str(imagehash.phash(img))) <= 4
    image_rejects = [r for r in rejects if r["stage"] == STAGE_FETCH]
    got = {(r["source"], r["detail"].split(": ", 1)[0]): r["reason"] for r in image_rejects}
    expected = {(f"test:{doc_id}", url): reasons for doc_id, urls in bad.items() for url, reasons in urls.items()}
    assert set(got) == set(expected)
    for key, reason in got.items():
        assert reason in expected[key], (key, reason)
    stage = {s["stage"]: s for s in stats["stages"]}[STAGE_FETCH]
    positions = sum(u is not None for d in docs for u in d["images"])
    assert stage["in"] == positions == stage["out"] + stage["rejected"]
    assert stage["out"] == sum(len(v) for v in ok.values())
    assert stats["totals"]["read"] == stats["totals"]["written"] == len(docs)


def test_url_policy():
    for url in ("http://127.0.0.1/a.jpg", "http://10.1.2.3/a.jpg", "http://192.168.0.10:8080/a.jpg",
                "http://[::1]/a.jpg", "http://localhost/a.jpg", "http://169.254.169.254/latest",
                "http://[::ffff:10.0.0.1]/a.jpg", "http://0.0.0.0/a.jpg", "http://100.64.0.1/a.jpg"):
        assert url_refusal(url) is not None, url
        assert url_refusal(url, allow_private=True) is None, url
    assert url_refusal("http://93.184.216.34/a.jpg") is None
    assert "resolves to" in url_refusal("http://intranet.example/a.jpg", resolve=lambda host: ["10.0.0.5"])
    assert url_refusal("http://photos.example/a.jpg", resolve=lambda host: ["93.184.216.34"]) is None
    for url in ("ftp://example.com/a.jpg", "data:image/png;base64,AAAA", "http:///a.jpg", "http://a b/c.jpg",
                "http://example.com:99999/a.jpg"):
        assert url_refusal(url, allow_private=True) is not None, url


def test_fetch_images_under_dask(tmp_path, site, coco):
    base, files, hits = site
    docs, ok, bad = documents(base, coco)
    cfg = FetchConfig(timeout=TIMEOUT, batch_urls=3)
    started, before = time.time(), collections.Counter(hits)
    stats, kept, rejects = run_fetch(tmp_path / "dask", docs, cfg, runner=RUNNER, workers=2)
    print(f"fetch pipeline under dask: {time.time() - started:.1f} s")
    check_result(stats, kept, rejects, docs, ok, bad, base, files)
    counters = {s["stage"]: s for s in stats["stages"]}[STAGE_FETCH]["counters"]
    unique = {u for d in docs for u in d["images"] if u and not u.startswith("ftp:")}
    fetched = counters["urls_fetched"] + counters["urls_failed"]
    assert len(unique) <= fetched <= len(unique) + 1  # photos[0] is in two documents: once per worker at most
    assert sum(hits.values()) - sum(before.values()) == fetched
    # the image files are stored as they came (compressed formats already), the other columns zstd-compressed
    (shard,) = (tmp_path / "dask" / "data").glob("*.parquet")
    group = pq.ParquetFile(shard).metadata.row_group(0)
    codecs = {group.column(i).path_in_schema: group.column(i).compression for i in range(group.num_columns)}
    assert codecs.pop("image_info.list.element.bytes") == "UNCOMPRESSED"
    assert set(codecs.values()) == {"ZSTD"}


def test_fetching_without_decoding_keeps_the_same_images_without_a_phash(tmp_path, site, coco):
    """fetch.decode false (img2dataset's disable_all_reencoding check): the same images as the decoding fetch,
    with the same sizes and bytes and no pHash, except one whose damage only a decode finds; the same rejects
    otherwise (the cut-off, the unsupported format, the too small, the too wide, the missing)."""
    base, files, _ = site
    docs, ok, bad = documents(base, coco)
    _, decoded, decoded_rejects = run_fetch(tmp_path / "decoded", docs, FetchConfig(timeout=TIMEOUT))
    stats, headers, header_rejects = run_fetch(tmp_path / "headers", docs, FetchConfig(timeout=TIMEOUT, decode=False))
    only_decoded = {(r["detail"].split(": ", 1)[0], r["reason"]) for r in decoded_rejects} - \
        {(r["detail"].split(": ", 1)[0], r["reason"]) for r in header_rejects}
    assert {reason for _, reason in only_decoded} <= {"image_decode_failed"}
    for doc in docs:
        full, head = decoded[doc["doc_id"]], headers[doc["doc_id"]]
        infos = {i["url"]: i for i in full["image_info"] if i}
        for info in (i for i in head["image_info"] if i):
            assert info["phash"] is None
            if info["url"] in infos:
                assert {k: info[k] for k in ("width", "height", "sha256", "bytes")} == \
                    {k: infos[info["url"]][k] for k in ("width", "height", "sha256", "bytes")}
            else:
                assert (info["url"], "image_decode_failed") in only_decoded
    assert stats["totals"]["read"] == stats["totals"]["written"] == len(docs)


def test_a_url_in_many_documents_is_fetched_once_per_worker(tmp_path, site, coco):
    """Documents fetched where they are, in batches: a URL in documents of different batches of one worker takes
    its first outcome, success or failure, without another request; every document gets it."""
    base, files, hits = site
    photo, missing = f"{base}/coco/000000018575.jpg", f"{base}/missing-many.jpg"
    texts = captions(coco, 6)
    docs = [make_doc(f"d-many-{i}", texts[i], [photo, missing, f"{base}/coco/000000019221.jpg"] if i % 2 else
                     [photo, missing]) for i in range(6)]
    before = collections.Counter(hits)
    stats, kept, rejects = run_fetch(tmp_path, docs, FetchConfig(timeout=TIMEOUT, batch_urls=2))
    requested = {p: n - before[p] for p, n in hits.items() if n > before[p]}
    assert requested == {"/coco/000000018575.jpg": 1, "/missing-many.jpg": 1, "/coco/000000019221.jpg": 1}
    data = files["/coco/000000018575.jpg"].read_bytes()
    for doc in docs:
        row = kept[doc["doc_id"]]
        assert [u for u in row["images"] if u] == [u for u in doc["images"] if u and u != missing]
        assert [i["bytes"] for i in row["image_info"] if i][0] == data
    assert sorted(r["detail"] for r in rejects) == [f"{missing}: HTTP 404"] * 6
    stage = {s["stage"]: s for s in stats["stages"]}[STAGE_FETCH]
    assert stage["counters"] == {"urls_fetched": 2, "urls_failed": 1}
    assert stage["in"] == 15 and stage["out"] == 9 and stage["rejected"] == 6


def test_documents_go_on_while_their_images_download(tmp_path, site, coco):
    """ImageFill, the fetch step at the end of `interleaved`'s page-to-document DoFn: `add` hands a batch to a
    background thread and returns while its images download (the server holds them until GATE is set), so the
    worker goes on extracting; when they arrive every document comes out once, filled, with its counters."""
    base, files, hits = site
    names = ("000000000790.jpg", "000000018575.jpg", "000000019221.jpg")
    texts = captions(coco, 4)
    docs = [make_doc(f"d-gate-{i}", texts[i], [f"{base}/gate/coco/{names[i % 3]}"]) for i in range(4)]
    fill = ImageFill(FetchConfig(timeout=GATE_SECONDS, batch_urls=4), True, FetchRecord(str(tmp_path / "rec")),
                     "gate-test")
    GATE.clear()
    fill.setup()
    fill.start()
    try:
        early = [out for doc in docs for out in fill.add(doc)]  # the first document's batch starts at once
        assert early == []  # nothing waited for the held downloads (add would have waited GATE_SECONDS)
        deadline = time.time() + 10
        while not hits[f"/gate/coco/{names[0]}"] and time.time() < deadline:
            time.sleep(0.05)
        assert hits[f"/gate/coco/{names[0]}"] == 1  # its download is under way, held by the server
    finally:
        GATE.set()
    outs = list(fill.finish())
    fill.teardown()
    filled = [o for o in outs if isinstance(o, dict)]
    assert [d["doc_id"] for d in filled] == [d["doc_id"] for d in docs]
    for doc in filled:
        (url,), (info,) = [u for u in doc["images"] if u], [i for i in doc["image_info"] if i]
        data = files[url.removeprefix(base + "/gate")].read_bytes()
        assert info["sha256"] == hashlib.sha256(data).hexdigest() and info["bytes"].read() == data
    counts = collections.Counter()
    for o in outs:
        if isinstance(o, Count):
            counts[o.metric] += o.n
    assert counts == {"in": 4, "out": 4, "urls_fetched": 3}


def test_private_urls_refused_without_fetching(tmp_path, site, coco):
    base, _, _ = site
    docs, _, _ = documents(base, coco)
    stats, kept, rejects = run_fetch(tmp_path, docs, FetchConfig(timeout=TIMEOUT), allow_private=False)
    assert all(u is None for row in kept.values() for u in row["images"])
    assert {r["reason"] for r in rejects} == {"url_not_allowed"}
    assert len(rejects) == sum(u is not None for d in docs for u in d["images"])
    assert all(kept[d["doc_id"]]["texts"] == [t for t in d["texts"] if t] for d in docs)
    assert "urls_fetched" not in {s["stage"]: s for s in stats["stages"]}[STAGE_FETCH]["counters"]


def test_url_list_then_img2dataset_then_join(tmp_path, site, coco):
    """The separate, resumable step: the pipeline writes the URL list, img2dataset's own CLI fetches it, and
    `fetched_dir` joins the result back with the same checks as the in-pipeline fetch."""
    base, files, _ = site
    docs, ok, bad = documents(base, coco)
    run_fetch(tmp_path / "list", docs, FetchConfig(), url_list=True, fetch=False)
    url_files = sorted((tmp_path / "list" / "image_urls").glob("*.parquet"))
    urls = pq.read_table(url_files).column("url").to_pylist()
    assert sorted(urls) == sorted({u for d in docs for u in d["images"] if u and not u.startswith("ftp:")})
    cmd = [os.path.join(os.path.dirname(sys.executable), "img2dataset"),
           "--url_list", str(url_files[0]), "--input_format", "parquet", "--url_col", "url",
           "--output_format", "parquet", "--output_folder", str(tmp_path / "images"), "--resize_mode", "no",
           "--disable_all_reencoding", "True", "--compute_hash", "sha256", "--timeout", str(TIMEOUT),
           "--processes_count", "1", "--thread_count", "16"]
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"))
    stats, kept, rejects = run_fetch(tmp_path / "joined", docs,
                                     FetchConfig(fetched_dir=str(tmp_path / "images")))
    check_result(stats, kept, rejects, docs, ok, bad, base, files)


def test_downloader_gives_each_url_its_result(site, tmp_path):
    """One downloader, many URLs: successes stored by sha256, and every failure its own reason and error: the
    image's X-Robots-Tag (for any crawler), HTTP errors, a timeout, redirects to private or non-http targets
    (the first URL is the caller's to check: the pipeline did, as fetch_with_record does)."""
    base, files, hits = site
    photo = f"{base}/coco/000000000790.jpg"
    data = files["/coco/000000000790.jpg"].read_bytes()
    urls = {
        photo: ("success", None),
        f"{base}/robots/noindex,%20nofollow/coco/000000000790.jpg": ("image_opt_out", "X-Robots-Tag: noindex"),
        f"{base}/robots/otherbot~%20noai/coco/000000000790.jpg": ("image_opt_out", "X-Robots-Tag: noai"),
        f"{base}/robots/nofollow/coco/000000000790.jpg": ("success", None),  # not a directive that refuses
        f"{base}/missing.jpg": ("image_fetch_failed", "HTTP 404"),
        f"{base}/slow/coco/000000000790.jpg": ("image_fetch_failed", "Timeout"),
        f"{base}/redirect/{photo}": ("url_not_allowed", f"redirect to {photo} refused: address 127.0.0.1 is private"),
        f"{base}/redirect/ftp://127.0.0.1/x.jpg": ("url_not_allowed", "scheme 'ftp' is not http(s)"),
    }
    cfg = DownloadConfig(threads=4, host_connections=2, timeout=TIMEOUT)
    got = {r.url: r for r in ImageDownloader(cfg, False, str(tmp_path / "images")).fetch(urls)}
    assert set(got) == set(urls)
    for url, (status, why) in urls.items():
        result = got[url]
        if status == "success":
            assert result.ok and result.sha256 == hashlib.sha256(data).hexdigest(), result
            assert open(result.path, "rb").read() == data
            assert result.data == data  # a fresh download brings its bytes: the caller need not read the file
        else:
            assert (result.status, result.reason) == ("failed", status) and why in result.error, result
            assert result.error.startswith(f"{url}: ") and result.path is None
    # private addresses allowed: the redirect is followed; the ftp target is still refused
    loose = ImageDownloader(cfg, True, "")
    followed = {r.url: r for r in loose.fetch([f"{base}/redirect/{photo}", f"{base}/redirect/ftp://127.0.0.1/x.jpg"])}
    assert followed[f"{base}/redirect/{photo}"].data == data
    assert followed[f"{base}/redirect/ftp://127.0.0.1/x.jpg"].reason == "url_not_allowed"
    # retries within the run: a 503 is tried again after a back-off
    flaky = f"{base}/flaky/coco/000000018575.jpg"
    retried = list(ImageDownloader(DownloadConfig(timeout=TIMEOUT, retries=1), True, "").fetch([flaky]))
    assert retried[0].ok and hits["/flaky/coco/000000018575.jpg"] == 2
    # a check runs in the download threads (several at once) and its result replaces the bytes
    checked = list(ImageDownloader(cfg, False, str(tmp_path / "images")).fetch(
        [photo, f"{base}/missing.jpg"], check=lambda r: (threading.current_thread().name, r.ok, len(r.data or b""))))
    assert {r.url: r.checked[1:] for r in checked} == {photo: (True, len(data)), f"{base}/missing.jpg": (False, 0)}
    assert all(r.checked[0].startswith("mmcorpus-images") and r.data is None for r in checked)


def test_rerun_into_the_same_output_fetches_only_the_urls_that_failed(site, coco, tmp_path):
    """A first run where one URL answers 503 and one is missing; the rerun into the same output (the fetch
    record under OUT/_image_fetch) requests only those two again, and gets the now-working one."""
    base, files, hits = site
    ok = [f"{base}/coco/{n}" for n in ("000000018575.jpg", "000000019221.jpg")]
    flaky, missing = f"{base}/flaky/coco/000000000790.jpg", f"{base}/missing-rerun.jpg"
    docs = [make_doc("d-rerun", captions(coco, 1)[0], ok + [flaky, missing])]
    out = tmp_path / "out"
    cfg = FetchConfig(timeout=TIMEOUT, record_dir=str(out / "_image_fetch"), spool_dir=str(out / "_tmp" / "images"))
    before = collections.Counter(hits)
    first, kept, rejects = run_fetch(out, docs, cfg)
    assert [u for u in kept["d-rerun"]["images"] if u] == ok
    assert {r["detail"].split(": ")[0]: r["reason"] for r in rejects} == {flaky: "image_fetch_failed",
                                                                         missing: "image_fetch_failed"}
    assert {s["stage"]: s for s in first["stages"]}[STAGE_FETCH]["counters"] == {"urls_fetched": 2, "urls_failed": 2}
    second, kept, rejects = run_fetch(out, docs, cfg, overwrite=True)  # --overwrite keeps the fetch record
    requested = {p: n - before[p] for p, n in hits.items() if n > before[p]}
    assert requested == {"/coco/000000018575.jpg": 1, "/coco/000000019221.jpg": 1,
                         "/flaky/coco/000000000790.jpg": 2, "/missing-rerun.jpg": 2}
    assert [u for u in kept["d-rerun"]["images"] if u] == ok + [flaky]
    info = [i for i in kept["d-rerun"]["image_info"] if i]
    assert [i["sha256"] for i in info] == [hashlib.sha256(files[u.removeprefix(base).removeprefix("/flaky")]
                                                          .read_bytes()).hexdigest() for u in ok + [flaky]]
    assert info[0]["bytes"] == files["/coco/000000018575.jpg"].read_bytes()  # reused bytes reach the output
    assert [r["reason"] for r in rejects] == ["image_fetch_failed"]
    counters = {s["stage"]: s for s in second["stages"]}[STAGE_FETCH]["counters"]
    assert counters == {"urls_reused": 2, "urls_fetched": 1, "urls_failed": 1}


def test_a_frozen_record_reuses_only_latest_successes_of_the_files_there_before(tmp_path):
    """FetchRecord.frozen(): the status files present now are the earlier results; per URL the latest attempt
    counts (a later failure hides an earlier success); a damaged file is skipped; files added later (this run's
    own results) are not looked up."""
    from mmcorpus.pipelines.fetching.downloader import FetchRecord

    record = FetchRecord(str(tmp_path / "_image_fetch"))
    def row(url, status, at, sha=None):
        return {"url": url, "status": status, "reason": None if status == "success" else "image_fetch_failed",
                "error": None, "http_status": 200 if status == "success" else 404, "sha256": sha, "bytes": 3,
                "fetched_at": at}
    record.write([row("http://a/1", "success", "2026-01-01T00:00:00", "aa"),
                  row("http://a/2", "failed", "2026-01-01T00:00:00")])
    record.write([row("http://a/1", "failed", "2026-01-02T00:00:00"),
                  row("http://a/2", "success", "2026-01-02T00:00:00", "bb"),
                  row("http://a/3", "success", "2026-01-02T00:00:00", "cc")])
    (tmp_path / "_image_fetch" / "status" / "part-damaged.parquet").write_bytes(b"not parquet")
    frozen = record.frozen()
    assert len(frozen.earlier_files) == 3
    record.write([row("http://a/4", "success", "2026-01-03T00:00:00", "dd")])  # after the freeze
    urls = {f"http://a/{i}" for i in range(1, 6)}
    got = frozen.earlier(urls)
    assert {u: r["sha256"] for u, r in got.items()} == {"http://a/2": "bb", "http://a/3": "cc"}
    assert record.earlier(urls)["http://a/1"]["status"] == "failed"  # unfrozen: every file, latest rows
    assert record.earlier(urls)["http://a/4"]["sha256"] == "dd"
    assert FetchRecord("").frozen().earlier(urls) == {}
