"""Polite page fetching for URL-list sources: robots.txt, a per-host delay, timeouts, retries with backoff,
manual redirects (each hop checked against the URL rules; loops and long chains fail), a size limit, and
private/loopback/link-local addresses refused unless allowed.

Scale-out: the URLs of all lists are keyed by a hash of their host into `groups` groups (GroupByKey), so one
host's URLs always meet in one group and the per-host delay holds across the whole run, while the groups
spread over the workers. Within a group, `threads` hosts are fetched at once, each host's URLs in order by
one thread. (A redirect to another host is fetched by the thread of the original host.) With `host_delay` 0
nothing needs a host's URLs together, so they are keyed by a hash of the URL instead: a list of one big site
is then fetched, extracted and filtered on every worker, not on the one that holds its host's group (a host
sees at most one request at a time from each group being fetched).
"""

from __future__ import annotations

import queue
import threading
import time
import urllib.robotparser
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urljoin

import apache_beam as beam

from mmcorpus.filters.reasons import shorten
from mmcorpus.filters.urls import host_of, redirect_problem, url_refusal
from mmcorpus.pipelines.fetching.hosts import HostResolver

USER_AGENT = "mmcorpus/0.1 (+https://github.com/mmcorpus; research crawler)"


@dataclass(frozen=True)
class PageFetchConfig:
    timeout: float = 10.0
    retries: int = 2
    backoff: float = 0.5  # seconds, doubled per retry
    host_delay: float = 1.0  # minimum seconds from the end of one request to a host to the start of the next
    max_redirects: int = 5
    obey_robots: bool = True
    groups: int = 64  # host groups: the unit of work spread over workers
    threads: int = 16  # hosts fetched at once within a group

    def __post_init__(self):
        if self.groups < 1 or self.threads < 1:
            raise ValueError("pages groups and threads must be at least 1")


class Fetcher:
    def __init__(self, cfg: PageFetchConfig, max_bytes: int, allow_private: bool):
        import requests

        self.cfg, self.max_bytes, self.allow_private = cfg, max_bytes, allow_private
        self.session = requests.Session()
        self.session.headers["User-Agent"] = USER_AGENT
        self.last: dict[str, float] = {}
        self.robots: dict[str, urllib.robotparser.RobotFileParser | None] = {}
        self.resolve = HostResolver()

    def _wait(self, host: str) -> None:
        gap = time.monotonic() - self.last.get(host, -1e9)
        if gap < self.cfg.host_delay:
            time.sleep(self.cfg.host_delay - gap)

    def _done(self, host: str) -> None:
        """The delay counts from the end of a request, so the host sees it between arrivals whatever the latency."""
        self.last[host] = time.monotonic()

    def _get(self, url: str):
        """One GET with retries; returns (response, body bytes or None when over the limit)."""
        import requests

        delay = self.cfg.backoff
        host = host_of(url)
        for attempt in range(self.cfg.retries + 1):
            self._wait(host)
            try:
                r = self.session.get(url, timeout=self.cfg.timeout, allow_redirects=False, stream=True)
                retry = r.status_code in (429, 500, 502, 503, 504) and attempt < self.cfg.retries
                if retry:
                    r.close()
                else:
                    return r, self._body(r)
            except requests.RequestException:
                if attempt >= self.cfg.retries:
                    raise
            finally:
                self._done(host)
            time.sleep(delay)
            delay *= 2
        raise RuntimeError("unreachable")

    def _body(self, r) -> bytes | None:
        body = bytearray()
        for chunk in r.iter_content(65536):
            body += chunk
            if len(body) > self.max_bytes:
                r.close()
                return None
        return bytes(body)

    def allowed_by_robots(self, url: str) -> bool:
        if not self.cfg.obey_robots:
            return True
        root = urljoin(url, "/")
        if root not in self.robots:
            parser = None
            try:
                r, body = self._get(urljoin(root, "robots.txt"))
                if r.status_code == 200 and body is not None:
                    parser = urllib.robotparser.RobotFileParser()
                    parser.parse(body.decode("utf-8", "replace").splitlines())
            except Exception:  # unreachable robots.txt: treated as no rules
                parser = None
            self.robots[root] = parser
        parser = self.robots[root]
        return parser is None or parser.can_fetch(USER_AGENT, url)

    def fetch(self, url: str, source: str) -> dict:
        """A page record for interleaved.sources.decode_page, or a bad marker."""
        from mmcorpus.pipelines.interleaved.sources import bad

        chain = [url]
        current = url
        while True:
            why = url_refusal(current, self.allow_private, self.resolve)
            if why:
                return bad(source, "url_not_allowed", f"{current}: {why}")
            if not self.allowed_by_robots(current):
                return bad(source, "url_not_allowed", f"{current}: disallowed by robots.txt")
            try:
                r, body = self._get(current)
            except Exception as exc:
                return bad(source, "fetch_failed", shorten(f"{current}: {type(exc).__name__}: {exc}", 500))
            if r.is_redirect or r.status_code in (301, 302, 303, 307, 308):
                nxt = urljoin(current, r.headers.get("Location", ""))
                chain.append(nxt)
                problem = redirect_problem(chain, self.cfg.max_redirects)
                if problem:
                    return bad(source, "fetch_failed", problem)
                current = nxt
                continue
            if body is None:
                return bad(source, "too_large", f"{current}: over {self.max_bytes} bytes")
            return {"source": source, "url": current, "warc_record_id": None,
                    "crawl_date": iso_date(r.headers.get("Date")), "status": r.status_code,
                    "content_type": r.headers.get("Content-Type", ""), "charset": _charset(r.headers),
                    "payload": body, "robots_tags": [r.headers["X-Robots-Tag"]] if "X-Robots-Tag" in r.headers else []}


def iso_date(http_date: str | None) -> str | None:
    import datetime as dt
    from email.utils import parsedate_to_datetime

    try:
        return parsedate_to_datetime(http_date).isoformat() if http_date else None
    except (TypeError, ValueError):
        return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _charset(headers) -> str | None:
    for part in (headers.get("Content-Type") or "").split(";")[1:]:
        k, _, v = part.strip().partition("=")
        if k.lower() == "charset" and v:
            return v.strip("\"' ")
    return None


def url_tasks(path: str):
    """Fetch tasks of one URL list, {"source": "PATH:LINE", "_url": URL, "_order": (PATH, LINE)} per URL line
    (blank lines and # comments skipped), or one bad marker when the file cannot be read."""
    from mmcorpus.pipelines.interleaved.sources import bad
    from mmcorpus.schemas import storage

    try:
        fh = storage.open(path, "r", encoding="utf-8", errors="replace")  # local or remote (s3://, https://)
    except OSError as exc:
        yield bad(path, "read_failed", str(exc))
        return
    with fh:
        for lineno, line in enumerate(fh, 1):
            url = line.strip()
            if url and not url.startswith("#"):
                yield {"source": f"{path}:{lineno}", "_url": url, "_order": (path, lineno)}


def host_group(task: dict, groups: int, by_host: bool = True):
    """(group, task): the URLs of one host share a group (`by_host`; else a URL's group is a hash of the URL);
    bad markers go to group 0 and pass through."""
    from mmcorpus.pipelines.runtime.sink import stable_hash

    url = task.get("_url")
    return (stable_hash(host_of(url) if by_host else url) % groups if url else 0), task


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class FetchHostGroup(beam.DoFn):
    """(group, tasks) -> page records / bad markers, `threads` hosts at a time, each host in order."""

    _DONE = object()

    def __init__(self, cfg: PageFetchConfig, max_bytes: int, allow_private: bool):
        self.cfg, self.max_bytes, self.allow_private = cfg, max_bytes, allow_private

    def process(self, element):
        _, tasks = element
        by_host: dict[str, list[dict]] = defaultdict(list)
        for task in tasks:
            if "_url" in task:
                by_host[host_of(task["_url"])].append(task)
            else:
                yield task  # a bad marker from reading the list
        if not by_host:
            return
        results: queue.Queue = queue.Queue(maxsize=4 * self.cfg.threads)  # bounded: pages are big
        stop = threading.Event()

        def put(item) -> None:
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.2)
                    return
                except queue.Full:
                    continue

        def fetch_host(host_tasks: list[dict]) -> None:
            try:
                fetcher = Fetcher(self.cfg, self.max_bytes, self.allow_private)
                for task in host_tasks:
                    if stop.is_set():
                        return
                    put(fetcher.fetch(task["_url"], task["source"]))
            except Exception as exc:  # noqa: BLE001 - re-raised in the Beam thread
                put(_Failure(exc))
            finally:
                put(self._DONE)

        pool = ThreadPoolExecutor(min(self.cfg.threads, len(by_host)), thread_name_prefix="mmcorpus-fetch")
        try:
            for host in sorted(by_host):
                pool.submit(fetch_host, sorted(by_host[host], key=lambda t: t["_order"]))
            running = len(by_host)
            while running:
                item = results.get()
                if item is self._DONE:
                    running -= 1
                elif isinstance(item, _Failure):
                    raise item.exc
                else:
                    yield item
        finally:
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)


def url_task_part(element: tuple[str, int, int]):
    """The tasks of one part of a URL list: every part reads the list through and keeps every parts-th URL
    line (part 0 also any bad marker), so the parts together yield each task once."""
    path, part, parts = element
    for i, task in enumerate(url_tasks(path)):
        if i % parts == part or ("_url" not in task and part == 0):
            yield task


def fetch_url_lists(p, lists: list[str], max_bytes: int, allow_private: bool, cfg: PageFetchConfig,
                    parts: int = 1):
    """PCollection of page records / bad markers for the URL lists at `lists`. Each list is read in `parts`
    parts, each its own partition on the Dask runner (a list read whole was one partition, and before
    GroupByKeys spread to the runner's bound, every page and image fetch after it stayed on one worker)."""
    items = [(path, k, parts) for path in sorted(lists) for k in range(parts)]
    return (p | "UrlLists" >> beam.Create(items) | "UrlTasks" >> beam.FlatMap(url_task_part)
            | "HostKey" >> beam.Map(host_group, cfg.groups, cfg.host_delay > 0) | "HostGroup" >> beam.GroupByKey()
            | "FetchPages" >> beam.ParDo(FetchHostGroup(cfg, max_bytes, allow_private)))
