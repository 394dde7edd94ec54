"""Image downloads for `interleaved` and `pairs`: one long-lived downloader per worker process, and a per-URL
record beside the output so that a rerun fetches only what failed.

ImageDownloader (one per worker process and settings, built on first use and kept for every group the worker
is given): pooled urllib3 connections and `threads` download threads. `fetch(urls)` streams a result per URL
as downloads finish, with at most 2 x threads in flight, so a worker holds a bounded number of images whatever
the number of URLs. Per URL:
- the URL rules (filters.urls.url_refusal: http(s) only, no private, loopback or link-local address unless
  allowed) on the URL (fetch_with_record, unless the caller checked it) and on every redirect hop; loops and
  more than `max_redirects` hops fail;
- politeness: at most `host_connections` requests to one host at once from one worker process;
- `timeout` seconds per request, `retries` more tries of connection errors and 429/5xx in the same run;
- the image's own X-Robots-Tag header: one of `disallowed_header_directives` (for any crawler) refuses it
  (reason image_opt_out, bytes not kept), as img2dataset does;
- at most `max_bytes` bytes.
The download thread hashes the bytes and stores them under the record's images/ folder (sink.spool: named by
sha256, written once), so rows carry a file reference and the bytes never ride through a shuffle.

FetchRecord: OUT/_image_fetch/ (through schemas.storage, so an object-store output keeps it in the store):
status/*.parquet (schema "image_fetch", one row per attempt, written every `flush_every` results and at the end
of a group, so a killed run keeps what it finished) and images/ (the bytes). A rerun into the same output
(a killed run resumed, or --overwrite) takes every URL whose latest attempt succeeded from the record, without
a request, and fetches again only the URLs that failed or were never tried. Delete OUT/_image_fetch to fetch
everything again (or to free its disk: it holds a copy of every downloaded image).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import io
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass
from urllib.parse import urljoin

from mmcorpus.filters.reasons import shorten
from mmcorpus.filters.safety import header_directives
from mmcorpus.filters.urls import host_of, redirect_problem, url_refusal
from mmcorpus.pipelines.fetching.hosts import HostResolver
from mmcorpus.pipelines.runtime.sink import spool, stable_hash

RECORD_DIR = "_image_fetch"
USER_AGENT = "mmcorpus/0.1 (+https://github.com/mmcorpus; research crawler; {token})"
RETRY_STATUS = (429, 500, 502, 503, 504)
HOST_SLOTS = 4096


@dataclass(frozen=True)
class DownloadConfig:
    threads: int = 16
    host_connections: int = 16  # requests to one host at once from one worker process
    timeout: float = 10.0
    retries: int = 0
    max_redirects: int = 5
    max_bytes: int = 64 << 20
    user_agent_token: str = "mmcorpus"
    disallowed_header_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")

    def __post_init__(self):
        if self.threads < 1 or self.host_connections < 1 or self.timeout <= 0 or self.retries < 0:
            raise ValueError("threads and host_connections must be at least 1, timeout positive, retries >= 0")


@dataclass(frozen=True)
class Result:
    """One URL's download: status "success" with the stored file, or "failed" with a reason and error."""

    url: str
    status: str
    reason: str | None = None
    error: str | None = None
    http_status: int | None = None
    sha256: str | None = None
    size: int | None = None
    path: str | None = None  # the stored bytes (FileBytes path) of a success
    # the bytes themselves: of a download just made (stored or not), for the caller to use now without reading
    # the stored file back; None for a success taken from the record (read `path`). Never in the record.
    data: bytes | None = None
    reused: bool = False  # taken from the record of an earlier run, no request made
    checked: object = None  # what the caller's `check` made of it, in the download thread (fetch_with_record)

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def record_row(self) -> dict:
        return {"url": self.url, "status": self.status, "reason": self.reason, "error": self.error,
                "http_status": self.http_status, "sha256": self.sha256, "bytes": self.size,
                "fetched_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds")}


def _failed(url: str, reason: str, error: str, http_status: int | None = None) -> Result:
    return Result(url, "failed", reason, shorten(f"{url}: {error}", 500), http_status)


class ImageDownloader:
    def __init__(self, cfg: DownloadConfig, allow_private: bool, images_dir: str):
        self.cfg, self.allow_private, self.images_dir = cfg, allow_private, images_dir
        self.http = _Connections(max(cfg.threads, cfg.host_connections))
        self.headers = {"User-Agent": USER_AGENT.format(token=cfg.user_agent_token), "Accept": "*/*",
                        "Accept-Encoding": "gzip, deflate"}
        self.pool = ThreadPoolExecutor(cfg.threads, thread_name_prefix="mmcorpus-images")
        self.resolve = HostResolver()
        self._slots = [threading.BoundedSemaphore(cfg.host_connections) for _ in range(HOST_SLOTS)]
        self._wanted = {d.lower() for d in cfg.disallowed_header_directives}

    def fetch(self, urls: Iterable[str], check=None) -> Iterator[Result]:
        """A Result per URL, in the order downloads finish; with `check`, each carries `check(result)` (computed in
        its download thread, so checks run in parallel: PIL decodes without the GIL) and no bytes."""
        task = self.download if check is None else functools.partial(self._download_checked, check)
        todo = iter(urls)
        window = 2 * self.cfg.threads
        pending = {self.pool.submit(task, u) for _, u in zip(range(window), todo)}
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield future.result()
            pending |= {self.pool.submit(task, u) for _, u in zip(range(len(done)), todo)}

    def _download_checked(self, check, url: str) -> Result:
        return with_check(self.download(url), check)

    def _host_slot(self, host: str) -> threading.BoundedSemaphore:
        """The host's connection cap: one of HOST_SLOTS semaphores by hash of the host (fixed memory on a crawl
        of millions of hosts; two hosts that share one share its cap, which only errs on the polite side)."""
        return self._slots[stable_hash(host) % HOST_SLOTS]

    def download(self, url: str) -> Result:
        """Download one URL the caller has checked with the URL rules (fetch_with_record does); every redirect
        hop is checked here."""
        try:
            return self._download(url)
        except Exception as exc:  # noqa: BLE001 - one URL's failure is its result, never the worker's
            return _failed(url, "image_fetch_failed", f"{type(exc).__name__}: {exc}")

    def _download(self, url: str) -> Result:
        from urllib3.exceptions import HTTPError

        chain, current = [url], url
        while True:
            why = None if current is url else url_refusal(current, self.allow_private, self.resolve)
            if why:
                return _failed(url, "url_not_allowed", f"redirect to {current} refused: {why}")
            try:
                status, headers, body = self._get(current)
            except HTTPError as exc:
                return _failed(url, "image_fetch_failed", f"{type(exc).__name__}: {exc}")
            if status in (301, 302, 303, 307, 308):
                chain.append(urljoin(current, headers.get("Location", "")))
                problem = redirect_problem(chain, self.cfg.max_redirects)
                if problem:
                    return _failed(url, "image_fetch_failed", problem, status)
                current = chain[-1]
                continue
            opted_out = header_directives([headers.get("X-Robots-Tag", "")], self._wanted)  # lines joined by ", "
            if opted_out:
                return _failed(url, "image_opt_out", f"X-Robots-Tag: {', '.join(opted_out)}", status)
            if status != 200:
                return _failed(url, "image_fetch_failed", f"HTTP {status}", status)
            if body is None:
                return _failed(url, "image_fetch_failed", f"over {self.cfg.max_bytes} bytes", status)
            if not body:
                return _failed(url, "image_fetch_failed", "empty response", status)
            sha = hashlib.sha256(body).hexdigest()
            if not self.images_dir:
                return Result(url, "success", http_status=status, sha256=sha, size=len(body), data=body)
            path = spool(self.images_dir, body, sha).path
            return Result(url, "success", http_status=status, sha256=sha, size=len(body), path=path, data=body)

    def _get(self, url: str):
        """(status, headers, body or None when over max_bytes), with in-run retries of transient failures."""
        from urllib3.exceptions import HTTPError

        slot = self._host_slot(host_of(url))
        for attempt in range(self.cfg.retries + 1):
            last = attempt == self.cfg.retries
            with slot:
                try:
                    r = self.http.for_url(url).request("GET", url, headers=self.headers, timeout=self.cfg.timeout,
                                                       retries=False, redirect=False, preload_content=False)
                    try:
                        if last or r.status not in RETRY_STATUS:
                            return r.status, r.headers, self._body(r) if r.status == 200 else b""
                    finally:
                        _release(r)
                except HTTPError:
                    if last:
                        raise
            time.sleep(0.5 * 2 ** attempt)  # back off outside the host's slot, then try again
        raise RuntimeError("unreachable")

    def _body(self, r) -> bytes | None:
        declared = r.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.cfg.max_bytes:
            return None
        body = io.BytesIO()
        for chunk in r.stream(1 << 16):
            body.write(chunk)
            if body.tell() > self.cfg.max_bytes:
                return None
        return body.getvalue()


def _release(response) -> None:
    """Back to the pool: a connection whose body was read whole is kept, any other one closed."""
    if not response.isclosed():
        response.close()
    response.release_conn()


class _Connections:
    """Pooled HTTP connections (urllib3, which `requests` is built on, used directly: a third of requests' CPU
    per image, measured) with requests' environment: HTTP(S)_PROXY / NO_PROXY and REQUESTS_CA_BUNDLE or
    CURL_CA_BUNDLE, else certifi's bundle."""

    def __init__(self, per_host: int):
        import os
        import urllib.request

        import certifi
        import urllib3

        self.kwargs = {"num_pools": 64, "maxsize": per_host,
                       "ca_certs": os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
                       or certifi.where()}
        self.direct = urllib3.PoolManager(**self.kwargs)
        self.proxies = {k: v for k, v in urllib.request.getproxies().items() if k in ("http", "https")}
        self.via: dict[str, object] = {}
        self.lock = threading.Lock()

    def for_url(self, url: str):
        import urllib.request
        from urllib.parse import urlsplit

        proxy = self.proxies.get(urlsplit(url).scheme)
        if not proxy or urllib.request.proxy_bypass(urlsplit(url).hostname or ""):
            return self.direct
        with self.lock:
            if proxy not in self.via:
                import urllib3

                self.via[proxy] = urllib3.ProxyManager(proxy, **self.kwargs)
            return self.via[proxy]


def shared_downloader(cfg: DownloadConfig, allow_private: bool, images_dir: str) -> ImageDownloader:
    """The worker process's downloader for these settings (built once, reused by every group and DoFn)."""
    from mmcorpus.pipelines.runtime.shared import per_process

    return per_process(("downloader", cfg, allow_private, images_dir),
                       lambda: ImageDownloader(cfg, allow_private, images_dir))


# ---- the per-URL record -----------------------------------------------------------------------------------

def fetch_record_folder(out_dir: str) -> str:
    """OUT/_image_fetch (kept by --overwrite, like an img2dataset output folder: delete it to fetch again)."""
    from mmcorpus.schemas import storage

    return storage.join(storage.abspath(out_dir), RECORD_DIR)


class FetchRecord:
    """OUT/_image_fetch: earlier results by URL, and a writer of this run's results (see the module docstring)."""

    def __init__(self, folder: str, flush_every: int = 2000, earlier_files: tuple[str, ...] | None = None):
        """`folder` "": no record (nothing reused or written; downloaded bytes stay in the Results).
        `earlier_files`: the status files earlier results come from (see `frozen`); None: every file there."""
        from mmcorpus.schemas import storage

        self.folder = folder
        self.images_dir = storage.join(folder, "images") if folder else ""
        self.status_dir = storage.join(folder, "status") if folder else ""
        self.flush_every = flush_every
        self.earlier_files = None if earlier_files is None else tuple(earlier_files)

    def status_files(self) -> list[str]:
        from mmcorpus.schemas import storage

        if not self.folder or not storage.isdir(self.status_dir):
            return []
        return sorted(storage.glob(storage.join(self.status_dir, "*.parquet")))

    def frozen(self) -> FetchRecord:
        """This record with its earlier results fixed to the status files there now (before the run): each worker
        process reads them once into an index of their latest successes, instead of reading every file at every
        lookup, and this run's own results are not looked up (the caller remembers those)."""
        return FetchRecord(self.folder, self.flush_every, tuple(self.status_files()))

    def earlier(self, urls: set[str]) -> dict[str, dict]:
        """{url: latest recorded row} for the given URLs (a frozen record: only their latest successes)."""
        if not urls or not self.folder:
            return {}
        if self.earlier_files is not None:
            from mmcorpus.pipelines.runtime.shared import per_process

            if not self.earlier_files:
                return {}
            index = per_process(("fetch_record", self.folder, hash(self.earlier_files)),
                                lambda: _latest_successes(self.earlier_files))
            return _rows_for(index, urls)
        return _rows_for(_latest_rows(self.status_files()), urls)

    def reusable(self, row: dict | None) -> Result | None:
        """The earlier success of a URL as a Result, when its bytes are still there; else None (fetch it)."""
        from mmcorpus.schemas import storage

        if not row or row["status"] != "success" or not row["sha256"]:
            return None
        path = storage.join(self.images_dir, row["sha256"][:2], row["sha256"])
        if not storage.exists(path):
            return None
        return Result(row["url"], "success", http_status=row["http_status"], sha256=row["sha256"],
                      size=row["bytes"], path=path, reused=True)

    def write(self, rows: list[dict]) -> None:
        from mmcorpus import schemas
        from mmcorpus.schemas import storage
        import pyarrow.parquet as pq

        if not rows or not self.folder:
            return
        buf = io.BytesIO()
        pq.write_table(schemas.to_table(rows, "image_fetch"), buf)
        storage.makedirs(self.status_dir)
        storage.write_bytes(storage.join(self.status_dir, f"part-{uuid.uuid4().hex}.parquet"), buf.getvalue())


def _latest_rows(files):
    """One table of the latest recorded row of each URL in these status files (a damaged file is skipped: its
    URLs are fetched again), or None. Ties go to the later file."""
    from mmcorpus import schemas
    import pyarrow as pa
    import pyarrow.compute as pc

    tables = []
    for path in files:
        try:
            tables.append(schemas.read_table(path, "image_fetch"))
        except schemas.SchemaError:
            continue
    if not tables:
        return None
    table = pa.concat_tables(tables)
    table = table.take(pc.sort_indices(table, [("url", "ascending"), ("fetched_at", "ascending")]))  # stable
    urls = table["url"]
    last = pc.not_equal(urls.slice(0, len(table) - 1), urls.slice(1))  # a URL's last row: the next URL differs
    return table.filter(pa.concat_arrays([*last.chunks, pa.array([True])]))


def _latest_successes(files):
    import pyarrow.compute as pc

    latest = _latest_rows(files)
    return None if latest is None else latest.filter(pc.equal(latest["status"], "success"))


def _rows_for(table, urls: set[str]) -> dict[str, dict]:
    import pyarrow as pa
    import pyarrow.compute as pc

    if table is None or not urls:
        return {}
    wanted = pa.array(sorted(urls), pa.string())
    return {row["url"]: row for row in table.filter(pc.is_in(table["url"], value_set=wanted)).to_pylist()}


def with_check(result: Result, check) -> Result:
    """`result` carrying `check(result)`, without its bytes (the check had them; the stored file keeps them)."""
    return dataclasses.replace(result, checked=check(result), data=None)


def fetch_with_record(urls: Iterable[str], cfg: DownloadConfig, allow_private: bool, record: FetchRecord,
                      checked: bool = False, check=None):
    """A Result per unique URL: refused by the URL rules (unless the caller `checked` them), an earlier success
    from the record, else a download by the worker's downloader. This run's results join the record as they
    come. `check`: a function of a Result whose value each result carries (`Result.checked`), computed in the
    download threads for downloads."""
    urls = sorted(set(urls))
    earlier = record.earlier(set(urls))
    downloader = shared_downloader(cfg, allow_private, record.images_dir)
    todo, rows = [], []
    for url in urls:
        why = None if checked else url_refusal(url, allow_private, downloader.resolve)
        if why:
            refused = _failed(url, "url_not_allowed", why)
            rows.append(refused.record_row())
            yield refused if check is None else with_check(refused, check)
            continue
        reused = record.reusable(earlier.get(url))
        if reused is not None:
            yield reused if check is None else with_check(reused, check)
        else:
            todo.append(url)
    try:
        for result in downloader.fetch(todo, check):
            rows.append(result.record_row())
            if len(rows) >= record.flush_every:
                record.write(rows)
                rows = []
            yield result
    finally:
        record.write(rows)
