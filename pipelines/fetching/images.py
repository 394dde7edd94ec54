"""Fetch the images of interleaved documents, check them, and fill them in where the documents are.

Graph (stage `fetch_images` counts image positions): no shuffle. Each worker takes the documents it has just
filtered in batches of up to about `batch_urls` image positions (`ImageFill`: in `interleaved` the last step of the
page-to-document DoFn, a batch downloading in a background thread while the next pages are extracted); a batch's
unique URLs that pass the URL policy (http(s) only, no private/loopback hosts) stream through the worker's one
long-lived downloader (fetching/downloader.py: a thread pool and pooled HTTP connections built once per worker
process, per-host connection cap, redirects checked, X-Robots-Tag honoured, timeouts); each outcome (decoded with
`inspect_image`, or with `decode` False checked with `header_info`; sized with `check_decoded_image`) fills its
positions: image_info (url, sha256, width, height, phash, bytes), or the position removed with a reject row while
the text stays. So a worker's CPU extracts pages while the network brings the images of the pages before them, and
documents never wait for the rest of the run (a GroupByKey of the URLs would). A URL in several documents is
fetched once per worker: the worker remembers the outcomes of its newest MEMO_URLS URLs; a URL that succeeded in an
earlier run into the same output comes from OUT/_image_fetch without a request. Image bytes never travel: an
outcome carries the stored file's reference (sink.FileBytes) and the sink reads it.
With `fetched_dir` the outcomes come from img2dataset's files instead and meet the references in a join by URL.

Separate, resumable fetching: `image_url_rows` writes the run's unique image URLs (schema "url", kind
IMAGE_URL_KIND) so they can be fetched apart from the pipeline, e.g.
    img2dataset --url_list OUT/image_urls --input_format parquet --url_col url --output_format parquet \
        --output_folder IMAGES --resize_mode no --disable_all_reencoding True --compute_hash sha256
img2dataset resumes an interrupted run in the same output folder (incremental mode skips finished shards).
Then `FetchConfig(fetched_dir=IMAGES)` joins that folder's Parquet back instead of downloading.
"""

from __future__ import annotations

import functools
import glob
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows
import pyarrow.parquet as pq

from mmcorpus.filters.imageinfo import ENCODE_FORMATS, RESIZE_MODES
from mmcorpus.filters.reasons import Reject
from mmcorpus.filters.urls import url_refusal
from mmcorpus.pipelines.fetching.downloader import DownloadConfig, FetchRecord, Result, fetch_with_record
from mmcorpus.pipelines.interleaved.dedup import key_by_doc_id, source_of
from mmcorpus.pipelines.fetching.hosts import HostResolver
from mmcorpus.pipelines.runtime.sink import FileBytes, spool
from mmcorpus.pipelines.runtime.shared import per_process
from mmcorpus.pipelines.runtime.stage import COUNTS, KEPT, REJECTS, Count, ItemReject, SummedCounts, split_tags

STAGE_FETCH = "fetch_images"
IMAGE_URL_KIND = "image_urls"  # sink kind for the URL list: Kind("url", "image_urls", shards)
DEFAULT_DIRECTIVES = DownloadConfig.disallowed_header_directives  # X-Robots-Tag values honoured (as img2dataset)
MEMO_URLS = 50_000  # outcomes a worker remembers, so a URL in many of its documents is fetched once
MIN_BATCH_PART = 8  # a batch starts with at least batch_urls // this positions (ImageFill)


@dataclass(frozen=True)
class FetchConfig:
    batch_urls: int = 1024  # most image positions a worker fetches at once (ImageFill: the next batch waits)
    threads: int = 16  # download threads of a worker's downloader
    host_connections: int = 16  # requests to one host at once from one worker process (politeness)
    timeout: int = 10  # seconds per request
    retries: int = 0  # more tries of a connection error or 429/5xx within the run (a rerun retries failures)
    max_image_bytes: int = 64 << 20
    image_size: int = 0  # 0: keep the original bytes; > 0: store a resized, re-encoded copy
    resize_mode: str = "keep_ratio"  # keep_ratio, keep_ratio_largest or center_crop when image_size > 0
    encode_format: str = "jpg"  # format of the resized copy: jpg, png or webp
    keep_bytes: bool = True  # store image bytes in image_info.bytes
    # decode every image (pHash; damage inside the data found). False: header, EXIF orientation and end marker
    # only, phash null: img2dataset's disable_all_reencoding check, 2.5 ms less CPU per photo (bench_scale.py)
    decode: bool = True
    user_agent_token: str = "mmcorpus"
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DIRECTIVES
    fetched_dir: str = ""  # read an earlier img2dataset Parquet output instead of downloading
    rules: object = field(default=None)  # filters.documents.DocumentConfig for check_decoded_image; None = defaults
    # set by the command: kept bytes wait there as files (sink.FileBytes, read by the sink), not in the documents
    spool_dir: str = ""
    # set by the command: OUT/_image_fetch, the per-URL record a rerun resumes from ("" = none)
    record_dir: str = ""

    def __post_init__(self):
        if self.batch_urls < 1:
            raise ValueError("batch_urls must be at least 1")
        self.download  # noqa: B018 - the downloader settings are checked here
        if self.resize_mode not in RESIZE_MODES or self.encode_format not in ENCODE_FORMATS:
            raise ValueError(f"resize_mode must be one of {', '.join(RESIZE_MODES)} and encode_format one of "
                             f"{', '.join(ENCODE_FORMATS)}")
        if self.fetched_dir and not os.path.isdir(self.fetched_dir):
            raise ValueError(f"fetched images folder {self.fetched_dir!r} does not exist")

    @property
    def download(self) -> DownloadConfig:
        return DownloadConfig(threads=self.threads, host_connections=self.host_connections, timeout=self.timeout,
                              retries=self.retries, max_bytes=self.max_image_bytes,
                              user_agent_token=self.user_agent_token,
                              disallowed_header_directives=tuple(self.disallowed_header_directives))


# ---- documents -> image references ----------------------------------------------------------------------

class _ImageRefs(beam.DoFn):
    """(url, (doc_id, position, refusal or None)) for every image position of a document."""

    def __init__(self, allow_private: bool):
        self.allow_private = allow_private

    def setup(self):
        self._resolve = HostResolver()

    def process(self, doc):
        for pos, url in enumerate(doc["images"]):
            if url is not None:
                yield url, (doc["doc_id"], pos, url_refusal(url, self.allow_private, self._resolve))


# ---- fetched bytes -> outcome ---------------------------------------------------------------------------

def _rules(cfg: FetchConfig):
    if cfg.rules is not None:
        return cfg.rules
    from mmcorpus.filters.documents import DocumentConfig

    return DocumentConfig()


def assess_bytes(url: str, data: bytes | None, cfg: FetchConfig, stored: FileBytes | None = None,
                 sha256: str | None = None) -> dict:
    """Outcome of one image's bytes: {"info": image_info} or {"reason", "detail"}. The decode rules apply to the
    image as downloaded (decoded, or with `cfg.decode` False its header: `header_info`); with `cfg.image_size`
    the kept copy is a resized one. `stored`: where the bytes already wait as a file (the fetch record), so they
    are not stored again; `sha256`: their digest, when known."""
    from mmcorpus.filters.documents import check_decoded_image
    from mmcorpus.filters.imageinfo import header_info, inspect_image, resize_image

    if not data:
        return {"reason": "image_fetch_failed", "detail": f"{url}: empty response"}
    info = inspect_image(data, sha256=sha256) if cfg.decode else header_info(data, sha256=sha256)
    if isinstance(info, Reject):
        return {"reason": info.reason, "detail": f"{url}: {info.detail}"}
    checked = {"width": info.width, "height": info.height, "format": info.format, "bytes": data}
    reject = check_decoded_image(checked, _rules(cfg))
    if reject is not None:
        return {"reason": reject.reason, "detail": f"{url}: {reject.detail}"}
    if cfg.image_size:
        data = resize_image(data, cfg.image_size, cfg.resize_mode, cfg.encode_format)
        info = data if isinstance(data, Reject) else inspect_image(data)
        if isinstance(info, Reject):
            return {"reason": info.reason, "detail": f"{url}: {info.detail}"}
        stored = None
    if not cfg.keep_bytes:
        kept = None
    elif stored is not None:
        kept = stored
    else:
        kept = spool(cfg.spool_dir, data, info.sha256) if cfg.spool_dir else data
    return {"info": {"url": url, "sha256": info.sha256, "width": info.width, "height": info.height,
                     "phash": info.phash, "bytes": kept, "path": None}}


def assess(url: str, row: dict, cfg: FetchConfig) -> dict:
    """Outcome of one img2dataset result row (the `fetched_dir` path)."""
    status = row.get("status")
    if status != "success":
        reason = "image_decode_failed" if status == "failed_to_resize" else "image_fetch_failed"
        return {"reason": reason, "detail": f"{url}: {row.get('error_message') or status or 'no result'}"}
    return assess_bytes(url, row.get("jpg") or row.get(cfg.encode_format), cfg)


def assess_download(result: Result, cfg: FetchConfig) -> dict:
    """Outcome of one download of the worker's downloader."""
    if not result.ok:
        return {"reason": result.reason, "detail": result.error}
    if result.path is None:
        return assess_bytes(result.url, result.data, cfg, sha256=result.sha256)
    stored = FileBytes(result.path)  # a fresh download brings its bytes along: the file is not read back
    if result.data is None:  # from the record of an earlier run: read, and hashed again
        return assess_bytes(result.url, stored.read(), cfg, stored)
    return assess_bytes(result.url, result.data, cfg, stored, sha256=result.sha256)


def iter_rows(path: str, rows_per_batch: int = 64):
    """(url, row) for each row of an img2dataset Parquet output file, a few rows in memory at a time."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=rows_per_batch):
        for row in batch.to_pylist():
            yield row.get("url"), row


class _Outcomes:
    """The outcomes of this run's URLs on one worker process, the newest `size` kept (shared by its threads)."""

    def __init__(self, size: int):
        self.size, self.lock, self.items = size, threading.Lock(), OrderedDict()

    def get(self, url: str) -> dict | None:
        with self.lock:
            outcome = self.items.get(url)
            if outcome is not None:
                self.items.move_to_end(url)
            return outcome

    def put(self, url: str, outcome: dict) -> None:
        with self.lock:
            self.items[url] = outcome
            while len(self.items) > self.size:
                self.items.popitem(last=False)


class ImageFill:
    """The fetch step of one DoFn: documents in; out, each document with its images filled in
    (`fill_image_info`) and the Count/ItemReject events of stage `fetch_images`, plus per URL urls_fetched /
    urls_failed (downloaded now and kept / not) or urls_reused (an earlier run's success from the record).

    Pipelined: a batch runs in one background thread (each image checked, decoded and hashed in its download
    thread, so several decode at once: `fetch_with_record`'s `check`) while the caller goes on with the next
    documents (in `interleaved`, extracting the next pages of the partition: see
    `Collector.chain`'s `tail`), so a worker's CPU does not wait on the network. A batch starts as soon as the
    previous one is done and at least `cfg.batch_urls` // MIN_BATCH_PART image positions wait; the caller waits
    only when `cfg.batch_urls` positions wait while one still runs. So batches grow while downloads are slower
    than extraction, and at most 2 x `batch_urls` positions are held."""

    def __init__(self, cfg: FetchConfig, allow_private: bool, record: FetchRecord, run: str):
        self.cfg, self.allow_private, self.record, self.run = cfg, allow_private, record, run
        self._pool = None

    def setup(self):
        self._resolve = HostResolver()

    def start(self):
        self._docs, self._positions, self._running = [], 0, None
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="mmcorpus-fill")

    def teardown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None

    def add(self, doc) -> Iterator:
        self._docs.append(doc)
        self._positions += sum(url is not None for url in doc["images"])
        running = self._running
        if running is not None and (running[1].done() or self._positions >= self.cfg.batch_urls):
            yield from self._collect()
        if self._running is None and self._positions >= max(1, self.cfg.batch_urls // MIN_BATCH_PART):
            self._submit()

    def finish(self) -> Iterator:
        if self._running is not None:
            yield from self._collect()
        if self._docs:
            self._submit()
            yield from self._collect()

    def _submit(self):
        docs, self._docs, self._positions = self._docs, [], 0
        self._running = docs, self._pool.submit(self._fetch, docs)

    def _collect(self) -> Iterator:
        (docs, future), self._running = self._running, None
        refusals, known, events = future.result()
        yield from events
        for doc in docs:
            results = [(pos, url, _result(url, refusals[url], known.get(url)))
                       for pos, url in enumerate(doc["images"]) if url is not None]
            filled, doc_events = fill_image_info(doc, results)
            yield from doc_events
            yield filled

    def _fetch(self, docs: list[dict]) -> tuple[dict, dict, list]:
        """(URL refusals, outcomes, per-URL counter events) of a batch: the background thread's work."""
        refusals: dict[str, str | None] = {}
        for doc in docs:
            for url in doc["images"]:
                if url is not None and url not in refusals:
                    refusals[url] = url_refusal(url, self.allow_private, self._resolve)
        outcomes = per_process(("image_outcomes", self.run), lambda: _Outcomes(MEMO_URLS))
        known = {url: outcomes.get(url) for url, why in refusals.items() if not why}
        todo = sorted(url for url, outcome in known.items() if outcome is None)
        events = {}
        check = functools.partial(assess_download, cfg=self.cfg)  # decoded in the download threads, in parallel
        for result in fetch_with_record(todo, self.cfg.download, self.allow_private, self.record, checked=True,
                                        check=check):
            known[result.url] = outcome = result.checked
            outcomes.put(result.url, outcome)
            metric = _counter(outcome, result.reused)
            events[metric] = events.get(metric, 0) + 1
        return refusals, known, [Count(STAGE_FETCH, metric, n) for metric, n in events.items()]


def image_fill(cfg: FetchConfig | None, allow_private: bool) -> ImageFill | None:
    """The pipelined fetch step for `Collector.chain`'s `tail`; None with `cfg.fetched_dir` (a join instead:
    use `fetch_images`)."""
    cfg = cfg or FetchConfig()
    if cfg.fetched_dir:
        return None
    return ImageFill(cfg, allow_private, FetchRecord(cfg.record_dir).frozen(), uuid.uuid4().hex)


class _FetchDocs(SummedCounts, beam.DoFn):
    """`ImageFill` as a DoFn of its own (documents from any stage). Yields (KEPT, document), reject rows and
    counters summed on the worker."""

    def __init__(self, fill: ImageFill):
        self.fill = fill

    def setup(self):
        self.fill.setup()

    def start_bundle(self):
        super().start_bundle()
        self.fill.start()

    def process(self, doc):
        yield from self.kept_and_events(self.fill.add(doc))
        yield from self.flush()

    def finish_bundle(self):
        for item in self.kept_and_events(self.fill.finish()):
            yield GlobalWindows.windowed_value(item)
        yield from super().finish_bundle()

    def teardown(self):
        self.fill.teardown()


def _counter(outcome: dict, reused: bool = False) -> str:
    return "urls_reused" if reused else "urls_fetched" if "info" in outcome else "urls_failed"


def _outcome_tags(url: str, row: dict, cfg: FetchConfig):
    outcome = assess(url, row, cfg)
    yield "outcome", (url, outcome)
    yield COUNTS, ((STAGE_FETCH, _counter(outcome), ""), 1)


def _fetched_files(folder: str) -> list[str]:
    files = sorted(glob.glob(os.path.join(folder, "**", "*.parquet"), recursive=True))
    if not files:
        raise ValueError(f"no img2dataset Parquet output in {folder!r}")
    return files


class _ReadFetched(beam.DoFn):
    """(url, outcome) for the rows of one img2dataset output file (a URL listed twice is resolved in the join)."""

    def __init__(self, cfg: FetchConfig):
        self.cfg = cfg

    def process(self, path):
        for url, row in iter_rows(path):
            if url:
                yield from _outcome_tags(url, row, self.cfg)


def _first_outcome(outcomes: list[dict]) -> dict | None:
    """Several img2dataset files may hold the same URL: a kept image first, then the smallest detail."""
    if not outcomes:
        return None
    return sorted(outcomes, key=lambda o: ("info" not in o, o.get("detail", ""), o.get("info", {}).get("sha256") or ""))[0]


def _result(url: str, refusal: str | None, outcome: dict | None) -> dict:
    """An image position's result: the URL policy's refusal, else the URL's outcome."""
    if refusal:
        return {"reason": "url_not_allowed", "detail": f"{url}: {refusal}"}
    if outcome is None:
        return {"reason": "image_fetch_failed", "detail": f"{url}: no fetch result"}
    return outcome


def _position_results(url: str, refs, outcome: dict | None):
    """(doc_id, position, result) for each reference (doc_id, position, refusal) of a URL with this outcome."""
    for doc_id, pos, refusal in refs:
        yield doc_id, pos, _result(url, refusal, outcome)


def _per_position(element):
    """CoGroupByKey(url) -> (doc_id, (position, url, outcome)) for each reference of the URL (fetched_dir)."""
    url, grouped = element
    outcome = _first_outcome(list(grouped["outcome"]))
    for doc_id, pos, result in _position_results(url, grouped["ref"], outcome):
        yield doc_id, (pos, url, result)


def fill_image_info(doc: dict, results: list[tuple]) -> tuple[dict, list]:
    """Apply per-position outcomes: fill image_info where fetched, remove failed positions (text stays).
    Returns the document and its Count/ItemReject events for stage `fetch_images`."""
    by_pos = {pos: result for pos, _, result in results}
    infos = list(doc.get("image_info") or [None] * len(doc["images"]))
    keep, rejects, positions = [], [], 0
    for pos, url in enumerate(doc["images"]):
        if url is None:
            keep.append(pos)
            continue
        positions += 1
        result = by_pos.get(pos, {"reason": "image_fetch_failed", "detail": f"{url}: not looked up"})
        if "info" in result:
            infos[pos] = {**result["info"], "alt": (infos[pos] or {}).get("alt"), "url": url}
            keep.append(pos)
        else:
            rejects.append(ItemReject(STAGE_FETCH, Reject(result["reason"], result["detail"]), source_of(doc)))
    filled = dict(doc, texts=[doc["texts"][i] for i in keep], images=[doc["images"][i] for i in keep],
                  image_info=[infos[i] for i in keep])
    events = [Count(STAGE_FETCH, "in", positions), Count(STAGE_FETCH, "out", positions - len(rejects)), *rejects]
    return filled, events


class _Assemble(SummedCounts, beam.DoFn):
    def process(self, element):
        _, grouped = element
        results = sorted(grouped["result"], key=lambda r: r[0])
        for doc in sorted(grouped["doc"], key=lambda d: (d["doc_id"], source_of(d))):
            filled, events = fill_image_info(doc, results)
            yield from self.count_events(events)
            yield KEPT, filled
        yield from self.flush()


def fetch_images(collector, docs, cfg: FetchConfig | None = None, allow_private: bool = False):
    """Fetch every image of `docs` (or read `cfg.fetched_dir`), fill image_info, drop failed image positions."""
    cfg = cfg or FetchConfig()
    if cfg.fetched_dir:
        p = docs.pipeline
        refs = docs | "FetchImages_Refs" >> beam.ParDo(_ImageRefs(allow_private))
        tagged = (p | "FetchImages_Files" >> beam.Create(_fetched_files(cfg.fetched_dir))
                  | "FetchImages_ReadFetched" >> beam.ParDo(_ReadFetched(cfg)))
        parts = split_tags(tagged, ("outcome", COUNTS), label="FetchImages_")
        results = ({"ref": refs, "outcome": parts["outcome"]} | "FetchImages_JoinUrls" >> beam.CoGroupByKey()
                   | "FetchImages_PerPosition" >> beam.FlatMap(_per_position))
        collector.add_counts(parts[COUNTS])
        keyed = docs | "FetchImages_KeyDocs" >> beam.Map(key_by_doc_id)
        assembled = ({"doc": keyed, "result": results} | "FetchImages_JoinDocs" >> beam.CoGroupByKey()
                     | "FetchImages_Assemble" >> beam.ParDo(_Assemble()))
    else:  # fetched where the documents are: no shuffle (the record's earlier files are listed once, now)
        assembled = docs | "FetchImages_Fetch" >> beam.ParDo(_FetchDocs(image_fill(cfg, allow_private)))
    out = split_tags(assembled, label="FetchImages_Docs")
    collector.add(out[REJECTS])
    collector.add_counts(out[COUNTS])
    return out[KEPT]


def _allowed_url_key(ref):
    url, (_, _, refusal) = ref
    if not refusal:
        yield url, None


def _url_row(url_group) -> tuple[str, str, dict]:
    url = url_group[0]
    return IMAGE_URL_KIND, url, {"url": url}


def image_url_rows(collector, docs, allow_private: bool = False) -> None:
    """Add the run's unique, allowed image URLs to the sink as kind IMAGE_URL_KIND (schema "url")."""
    urls = (docs | "ImageUrls_Refs" >> beam.ParDo(_ImageRefs(allow_private))
            | "ImageUrls_Allowed" >> beam.FlatMap(_allowed_url_key)
            | "ImageUrls_Distinct" >> beam.GroupByKey()
            | "ImageUrls_Rows" >> beam.Map(_url_row))
    collector.add(urls)

