"""`mmcorpus interleaved` end to end: bundled WARCs + HTML pages under both runners, a URL list served from
127.0.0.1 (redirect loop, 404, binary, huge, latin-1, real photos fetched), private addresses, kill + resume."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pyarrow.parquet as pq
import pytest

from mmcorpus import schemas
from mmcorpus.pipelines.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
WARCS = ("warcio-samples", "resiliparse-warcs", "cc-whirlwind/whirlwind.warc.gz", "dolma-cc-warc")


def run_cli(*argv) -> int:
    return main(["interleaved", *map(str, argv)])


def stats_of(out) -> dict:
    return json.loads((pathlib.Path(out) / "stats.json").read_text())


def data_rows(out) -> list[dict]:
    rows = []
    for f in sorted((pathlib.Path(out) / "data").glob("*.parquet")):
        rows += schemas.read_table(str(f), "interleaved").to_pylist()
    return rows


def check_balanced(out) -> dict:
    s = stats_of(out)
    t = s["totals"]
    assert t["read"] == t["written"] + t["rejected"]
    rejects = pq.read_table(pathlib.Path(out) / "rejects").num_rows
    assert rejects == t["reject_rows"]
    return s


@pytest.fixture(scope="module")
def bundled(shared_data, tmp_path_factory):
    """The bundled WARCs and the 144 trafilatura-eval pages, run under DirectRunner and DaskRunner."""
    tmp = tmp_path_factory.mktemp("bundled")
    inputs = [shared_data / w for w in WARCS] + [shared_data / "trafilatura-eval" / "pages"]
    direct, dask = tmp / "direct", tmp / "dask"
    assert run_cli(*inputs, "-o", direct, "--no-images", "--workers", "1", "--emit-m3w-text") == 0
    # Dask reads every .gz WARC in byte ranges of 20 kB (one partition each; the real Common Crawl sample in 11):
    # the same files as reading them whole
    assert run_cli(*inputs, "-o", dask, "--no-images", "--runner", "dask", "--workers", "2", "--warc-part-mb",
                   "0.02") == 0
    return direct, dask


def test_bundled_warcs_and_pages_both_runners(bundled):
    direct, dask = bundled
    s = check_balanced(direct)
    stages = {st["stage"]: st for st in s["stages"]}
    assert stages["read"]["in"] >= 300 and stages["read"]["reasons"]["warc_not_response"] >= 100
    assert stages["read"]["reasons"]["warc_file_truncated"] >= 1 and stages["read"]["reasons"]["warc_invalid_record"] >= 5
    assert s["main_stages"][-1] == "image_count_after_dedup"
    # pages without any image markup go before extraction; the stages that call a function are timed
    assert s["main_stages"][2:5] == ["opt_out", "precheck", "extract"] and stages["precheck"]["reasons"]["no_images"] >= 10
    assert stages["extract"]["in"] == stages["precheck"]["out"] and stages["extract"]["cpu_seconds"] > 0
    assert all(stages[name]["cpu_seconds"] is not None for name in ("decode", "language", "quality"))
    rows = data_rows(direct)
    assert len(rows) == s["totals"]["written"] >= 40
    for f in sorted((direct / "data").glob("*.parquet")):
        assert pq.read_table(f).equals(pq.read_table(dask / "data" / f.name)), f.name
    assert stats_of(dask)["totals"] == s["totals"]
    warc_docs = [r for r in rows if r["warc_record_id"]]
    assert warc_docs and all(r["crawl_date"] and r["url"].startswith("http") for r in warc_docs)
    for r in rows:
        assert all(i is None or i.startswith(("http://", "https://")) for i in r["images"])
        assert sum(i is not None for i in r["images"]) >= 1  # default min_per_doc = 1
        assert "declared_sizes" in json.loads(r["metadata"])
    m3w = [json.loads(line) for f in sorted((direct / "m3w").glob("*.txt")) for line in f.read_text().splitlines()]
    assert len(m3w) == len(rows) and all("<image>" in d["text"] and "<|endofchunk|>" in d["text"] for d in m3w)


# Read by hand from the pages' HTML: each content image in reading order, with a snippet of the text that
# ends right before it and/or of the text between it and the next image (None: not checked, e.g. a title the
# extractor leaves out).
KNOWN_PAGES = {
    # <base href="https://www.alacarte.at/">; the lead photo sits above the headline "Der historische Purzelbaum"
    # (3 words: removed by the paragraph rule, min 4) and the first paragraph
    "alacarte.at-purzelbaum.html": [
        ("https://www.alacarte.at/fileadmin/user_upload/Seiler_Leipzig.jpg", None,
         "Auf dem Weg durch zwei bedeutende deutsche Städte"),
        ("https://www.alacarte.at/fileadmin/user_upload/Seiler_Leipzig_3.jpg",
         "Ich begann langsam, mich daran zu gewöhnen.", None),
        ("https://www.alacarte.at/fileadmin/user_upload/Seiler_Leipzig_2.jpg",
         "vor allem die britischen Minzbällchen hatten es mir angetan.", None),
    ],
    "next2games.de.anno.html": [  # ISO-8859-1 page; og:url https://www.next2games.de/...; captions follow
        ("https://www.next2games.de/uploads/inline/pic-3964.jpg", "um sie bei Laune zu halten.",
         "Eurer Fantasie ist beim Städtebau keine Grenzen gesetzt"),
        ("https://www.next2games.de/uploads/inline/pic-3963.jpg", "gemeinsame Allianzen zu erreichen.",
         "Das Beziehungsoverlay zeigt euch schnell, wer euch gewogen ist und wer nicht"),
        ("https://www.next2games.de/uploads/inline/pic-3966.jpg", "mehr zahlende Besucher auf eure Insel.",
         "Um die Attraktivität eurer Insel zu gewährleisten"),  # its caption fails the stop-word rule
        ("https://www.next2games.de/uploads/inline/pic-3965.jpg",
         "über das Gelingen oder Scheitern eurer verschiedenen Expeditionen bestimmen können.",
         "Dieses Mal mit vom Schuss: Südamerika"),
    ],
    "caktusgroup.com.django.html": [  # the HubSpot call-to-action button at the end is not content
        ("https://cw-production-assetsbucket-8j84s7jns7p2.s3.amazonaws.com/media/blog-categories/technical.jpg",
         None, "I had the opportunity to give a webcast for O’Reilly Media"),
        ("https://s3.amazonaws.com/caktus-website-production-2015/media/blog-images/test-failure.png",
         "run one last time. And it failed.", "I quickly abandoned the idea of attempting to live debug"),
        ("https://s3.amazonaws.com/caktus-website-production-2015/media/blog-images/test-passing.png",
         "There it was and I ran it again.", "It passed! I’m not crazy!"),
        ("https://s3.amazonaws.com/caktus-website-production-2015/media/blog-images/tests-all-passing.png",
         None, "Fixing at the Source"),
    ],
    "schweizerjaeger.ch-steinkauz.html": [  # the two sponsor banners (/skin/images/partners/) are not content
        ("https://schweizerjaeger.ch/image/300/168/2/551/steinkauz-martinbecker.jpg",
         "Der Steinkauz ist der Vogel des Jahres 2021", "BirdLife Schweiz hat den Steinkauz zum Vogel des Jahres"),
    ],
}


def _flat(text: str) -> str:
    return " ".join(text.split())


def test_known_pages_images_in_reading_order(bundled):
    direct, _ = bundled
    rows = {pathlib.Path(r["source"]).name.removesuffix(".gz"): r for r in data_rows(direct)}
    for name, expected in KNOWN_PAGES.items():
        row = rows[name]
        assert [i for i in row["images"] if i] == [url for url, _, _ in expected], name
        for url, before, after in expected:
            pos = row["images"].index(url)
            if before:
                assert pos > 0 and _flat(row["texts"][pos - 1]).endswith(before), (name, url)
            if after:
                assert after in _flat(row["texts"][pos + 1]), (name, url)


# ---- URL lists from a local server ------------------------------------------------------------------------

class _Handler(http.server.BaseHTTPRequestHandler):
    def __init__(self, *a, routes=None, **kw):
        self.routes = routes
        super().__init__(*a, **kw)

    def log_message(self, *a):
        pass

    def do_GET(self):
        route = self.routes.get(self.path)
        if route is None:
            self.send_response(404)
            self.end_headers()
            return
        status, headers, body = route
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def article(title: str, paragraphs: list[str], images: list[str], charset="utf-8") -> bytes:
    body = []
    for i, p in enumerate(paragraphs):
        body.append(f"<p>{p}</p>")
        if i < len(images):
            body.append(f'<figure><img src="{images[i]}" alt="photo {i}"></figure>')
    return (f"<html><head><meta charset={charset}><title>{title}</title></head><body><article><h1>{title}</h1>"
            + "".join(body) + "</article></body></html>").encode(charset)


@pytest.fixture(scope="module")
def server(coco):
    captions = [json.loads(line) for line in (coco / "captions.jsonl").read_text().splitlines()][:16]
    routes = {}
    for c in captions:
        routes[f"/img/{c['file_name']}"] = (200, {"Content-Type": "image/jpeg"}, (coco / "images" / c["file_name"]).read_bytes())
    for n in range(4):
        group = captions[n * 3:(n + 1) * 3]
        paras = [" ".join(x["captions"]) for x in group]  # real captions as prose
        routes[f"/page{n}.html"] = (200, {"Content-Type": "text/html; charset=utf-8"},
                                    article(f"Photo story {n}", paras, [f"/img/{x['file_name']}" for x in group]))
    latin = ["Le café est une boisson très appréciée en France, où les élèves et leurs parents la boivent le matin "
             "avant l'école, et chacun a son avis sur la meilleure façon de la préparer."] * 1 + \
            ["À Noël, les familles préparent une bûche et se réunissent autour de la table pour partager un repas "
             "long et joyeux avec des amis et des voisins venus de toute la région."]
    routes["/latin.html"] = (200, {"Content-Type": "text/html; charset=iso-8859-1"},
                             article("Café", latin, [f"/img/{captions[12]['file_name']}"], charset="iso-8859-1"))
    # page3's last photo again, on a page of its own (with --config dedup.max_image_repeats: 1 it is boilerplate)
    routes["/repost.html"] = (200, {"Content-Type": "text/html"},
                              article("Repost", [" ".join(captions[13]["captions"]), " ".join(captions[14]["captions"])],
                                      [f"/img/{captions[11]['file_name']}"]))
    routes["/broken-images.html"] = (200, {"Content-Type": "text/html"},  # its only image is a 404
                                     article("Broken", [" ".join(captions[15]["captions"])], ["/img/missing.jpg"]))
    routes["/loop-a"] = (302, {"Location": "/loop-b"}, b"")
    routes["/loop-b"] = (302, {"Location": "/loop-a"}, b"")
    routes["/binary.html"] = (200, {"Content-Type": "text/html"}, b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 64)
    routes["/huge.html"] = (200, {"Content-Type": "text/html"}, b"<html><body>" + b"<p>word </p>" * 200_000 + b"</body></html>")
    routes["/robots.txt"] = (200, {"Content-Type": "text/plain"}, b"User-agent: *\nDisallow: /private/\n")
    routes["/private/secret.html"] = routes["/page0.html"]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Handler, routes=routes))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def write_list(path, base, paths):
    path.write_text("\n".join(base + p for p in paths) + "\n")
    return path


def test_url_list_with_image_fetching(server, coco, tmp_path):
    urls = write_list(tmp_path / "urls.txt", server, ["/page0.html", "/page1.html", "/page2.html", "/page3.html",
                                                      "/latin.html", "/loop-a", "/missing.html", "/binary.html",
                                                      "/huge.html", "/private/secret.html", "/repost.html",
                                                      "/broken-images.html"])
    config = tmp_path / "c.yaml"
    config.write_text("pages: {host_delay: 0.0, retries: 0, timeout: 5}\nfetch: {batch_urls: 4}\n"
                      "quality: {max_duplicate_ngram_chars: {}}\ndedup: {max_image_repeats: 1}\n")
    out = tmp_path / "out"
    assert run_cli(urls, "-o", out, "--allow-private-network", "--config", config, "--max-page-bytes", 1_000_000,
                   "--workers", "1") == 0
    s = check_balanced(out)
    reasons = {st["stage"]: st["reasons"] for st in s["stages"]}
    assert reasons["read"] == {"fetch_failed": 1, "too_large": 1, "url_not_allowed": 1}
    assert reasons["decode"] == {"http_error_status": 1, "binary_payload": 1}
    # a document whose images all went is rejected after the stage that took them: the fetch (a 404) and
    # dedup_images (its one photo also on page3, so in 2 > max_image_repeats documents)
    assert reasons["fetch_images"] == {"image_fetch_failed": 1}
    assert reasons["image_count"] == {"no_images": 1} and reasons["image_count_after_dedup"] == {"no_images": 1}
    assert reasons["dedup_images"] == {"image_repeated": 2}
    rejects = pq.read_table(out / "rejects").to_pylist()
    doc_rejects = {(r["stage"], r["source"].rsplit("/", 1)[-1]) for r in rejects if r["reason"] == "no_images"}
    # sources name the list line: 11 is /repost.html, 12 is /broken-images.html
    assert doc_rejects == {("image_count", "urls.txt:12"), ("image_count_after_dedup", "urls.txt:11")}
    rows = {r["url"].rsplit("/", 1)[-1]: r for r in data_rows(out)}
    assert "repost.html" not in rows and "broken-images.html" not in rows
    assert all(sum(i is not None for i in r["images"]) >= 1 for r in rows.values())
    page3 = rows["page3.html"]
    photos = [json.loads(line)["file_name"] for line in (coco / "captions.jsonl").read_text().splitlines()]
    assert [u.rsplit("/", 1)[-1] for u in page3["images"] if u] == photos[9:11]  # its last photo went, text stayed
    assert len([t for t in page3["texts"] if t]) == 3
    assert "latin.html" in rows and "café est une boisson très appréciée" in " ".join(t for t in rows["latin.html"]["texts"] if t)
    assert rows["latin.html"]["crawl_date"].startswith("20")  # ISO 8601 from the HTTP Date header
    page = rows["page0.html"]
    infos = [i for i in page["image_info"] if i is not None]
    assert len(infos) == 3 and all(i["sha256"] and i["width"] >= 150 and i["height"] >= 150 and i["phash"] for i in infos)
    assert [i["alt"] for i in infos] == ["photo 0", "photo 1", "photo 2"]
    kinds = "".join("i" if i else "t" for i in page["images"])
    assert kinds.startswith("ti") and kinds.count("i") == 3  # text first, then images in page order
    assert [i["url"].rsplit("/", 1)[-1] for i in infos] == [u.rsplit("/", 1)[-1] for u in page["images"] if u]


class _TimedHandler(http.server.BaseHTTPRequestHandler):
    """Serves a small page for every path and records (host, path, time) of each request."""

    def __init__(self, *a, log=None, **kw):
        self.log = log
        super().__init__(*a, **kw)

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.log.append((self.server.server_address[0], self.path, time.monotonic()))
        body = f"<html><body><p>page {self.path}</p></body></html>".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_url_lists_fetch_hosts_in_parallel_and_each_host_politely(tmp_path):
    """Two hosts (127.0.0.1 and 127.0.0.2): each host's URLs in list order with the per-host delay between
    requests, the two hosts at once, every URL answered exactly once; URL tasks of several lists meet by host."""
    from mmcorpus.pipelines.fetching.pages import FetchHostGroup, PageFetchConfig, host_group, url_task_part, url_tasks

    log: list = []
    servers = []
    for address in ("127.0.0.1", "127.0.0.2"):
        try:
            httpd = http.server.ThreadingHTTPServer((address, 0), functools.partial(_TimedHandler, log=log))
        except OSError as exc:
            pytest.skip(f"cannot bind {address}: {exc}")
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
    bases = [f"http://{h.server_address[0]}:{h.server_address[1]}" for h in servers]
    lists = [write_list(tmp_path / "a.txt", bases[0], ["/a1", "/a2", "/a3"] + [f"/a{i}" for i in range(5, 13)]),
             write_list(tmp_path / "b.txt", bases[1], ["/b1", "/b2", "/b3"])]
    (tmp_path / "c.txt").write_text(f"# a comment\n\n{bases[0]}/a4\n")
    lists.append(tmp_path / "c.txt")
    tasks = [t for path in lists for t in url_tasks(str(path))]
    assert len(tasks) == 15 and {host_group(t, 8)[0] for t in tasks if "a" in t["_url"].rsplit("/", 1)[-1]} == \
        {host_group(tasks[0], 8)[0]}  # one host, one group, across lists
    spread = {host_group(t, 8, by_host=False)[0] for t in tasks if "a" in t["_url"].rsplit("/", 1)[-1]}
    assert len(spread) > 2  # without a per-host delay a host's URLs spread over the groups
    for parts in (2, 3):  # a list read in parts (--read-parts): each task once over the parts, a bad file once
        split = [t for path in lists for k in range(parts) for t in url_task_part((str(path), k, parts))]
        assert sorted(t["source"] for t in split) == sorted(t["source"] for t in tasks)
        missing = [t for k in range(parts) for t in url_task_part((str(tmp_path / "none.txt"), k, parts))]
        assert [t["_reject"][0] for t in missing] == ["read_failed"]
    delay = 0.15
    cfg = PageFetchConfig(host_delay=delay, obey_robots=False, retries=0, threads=4)
    try:
        pages = list(FetchHostGroup(cfg, 1_000_000, allow_private=True).process((0, tasks)))
    finally:
        for h in servers:
            h.shutdown()
    a_paths = ["/a1", "/a2", "/a3"] + [f"/a{i}" for i in range(5, 13)] + ["/a4"]  # list order: a.txt, then c.txt
    assert sorted(p["url"].rsplit("/", 1)[-1] for p in pages) == sorted([x[1:] for x in a_paths] + ["b1", "b2", "b3"])
    assert all(p["status"] == 200 and b"page" in p["payload"] for p in pages)
    by_host = {}
    for host, path, at in log:
        by_host.setdefault(host, []).append((at, path))
    times = {host: sorted(v) for host, v in by_host.items()}
    assert [p for _, p in times["127.0.0.1"]] == a_paths  # list order: (file, line number)
    for v in times.values():
        assert all(b[0] - a[0] >= delay * 0.95 for a, b in zip(v, v[1:]))  # the per-host delay held
    assert times["127.0.0.2"][0][0] < times["127.0.0.1"][-1][0]  # host b started before host a finished


def test_private_address_refused_without_flag(server, tmp_path):
    urls = write_list(tmp_path / "urls.txt", server, ["/page0.html"])
    out = tmp_path / "out"
    assert run_cli(urls, "-o", out, "--no-images", "--workers", "1") == 0
    s = check_balanced(out)
    assert s["totals"]["written"] == 0
    assert {st["stage"]: st["reasons"] for st in s["stages"]}["read"] == {"url_not_allowed": 1}
    assert run_cli(tmp_path / "does-not-exist", "-o", tmp_path / "o2") == 2
    (tmp_path / "bad.yaml").write_text("quality: {no_such_rule: 1}\n")
    assert run_cli(urls, "-o", tmp_path / "o3", "--config", tmp_path / "bad.yaml") == 2


def test_killed_run_resumes_with_every_document_once(shared_data, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mmcorpus.pipelines.cli", "interleaved", str(shared_data / "trafilatura-eval" / "pages"),
           str(shared_data / "dolma-cc-warc"), "-o", str(out), "--no-images", "--workers", "1", "--num-shards", "16"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if list((out / "data").glob("*.parquet")) or list((out / "rejects").glob("*.parquet")):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    killed = not (out / "_SUCCESS").exists()
    assert subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True).returncode == (0 if killed else 2)
    s = check_balanced(out)
    assert s["resumed"] is killed
    rows = data_rows(out)
    ids = [r["doc_id"] for r in rows]
    assert len(ids) == len(set(ids)) == s["totals"]["written"] >= 40


def test_plan_scales_partitions_and_shards_with_the_input(tmp_path):
    """Read partitions, URL-list host groups and output shards grow with the input (a worker holds a partition's
    pages and a shard's rows), and stay at their floors for a small one."""
    from mmcorpus.pipelines.interleaved.command import PAGES_PER_PARTITION, auto_shards, dask_partitions
    from mmcorpus.pipelines.interleaved.sources import line_count, split_items, task_batches

    urls = tmp_path / "urls.txt"
    urls.write_text("# a comment\n" + "".join(f"http://example.org/{i}\n" for i in range(10_000)) + "http://x/last")
    assert line_count(str(urls)) == 10_002 and line_count(str(tmp_path / "missing.txt")) == 0
    warc = ("warc", "big.warc.gz")
    tasks = split_items([warc, ("html", "a.html")], 4, 4 << 20, {"big.warc.gz": 1 << 30})
    assert len(tasks) == 257  # 256 ranges of 4 MiB and the HTML file
    batches = task_batches(tasks, PAGES_PER_PARTITION)
    assert len(batches) == 257 and dask_partitions(len(batches), 10_002, 2) == 257 + -(-10_002 // PAGES_PER_PARTITION)
    assert dask_partitions(len(task_batches(split_items([("html", "a.html")], 4))), 0, 2) == 4
    assert auto_shards([warc, ("urls", str(urls))], {"big.warc.gz": 1 << 30}, 10_002) == 8 + 3
    assert auto_shards([("html", "a.html")], {}, 0) == 4
