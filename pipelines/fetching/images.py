"""Fetch the images of interleaved documents, check them, and join the results back.

Graph (every step a keyed shuffle, so it scales out; stage `fetch_images` counts image positions):
  docs -> refs (url, (doc_id, position, refusal))            URL policy: http(s) only, no private/loopback hosts
       -> grouped by hash(url) % groups (every reference of a URL in one group) -> each group's unique allowed
          URLs streamed through the worker's one long-lived downloader (fetching/downloader.py: a thread pool
          and pooled HTTP session built once per worker process, per-host connection cap, redirects checked,
          X-Robots-Tag honoured, timeouts; URLs that succeeded in an earlier run into the same output come from
          OUT/_image_fetch, the rest are fetched) -> each outcome (decoded with `inspect_image`, sized with
          `check_decoded_image`) handed to the URL's references there -> (doc_id, position result)
       -> CoGroupByKey(docs, results) by doc_id -> image_info filled (url, sha256, width, height, phash,
          bytes); a failed image's position is removed with a reject row, the text stays.
Two shuffles: the references (small), and the documents once to put their images back. Image bytes never
travel: an outcome carries the stored file's reference (sink.FileBytes) and the sink reads it.
With `fetched_dir` the outcomes come from img2dataset's files instead and meet the references in a join by URL.

Separate, resumable fetching: `image_url_rows` writes the run's unique image URLs (schema "url", kind
IMAGE_URL_KIND) so they can be fetched apart from the pipeline, e.g.
    img2dataset --url_list OUT/image_urls --input_format parquet --url_col url --output_format parquet \
        --output_folder IMAGES --resize_mode no --disable_all_reencoding True --compute_hash sha256
img2dataset resumes an interrupted run in the same output folder (incremental mode skips finished shards).
Then `FetchConfig(fetched_dir=IMAGES)` joins that folder's Parquet back instead of downloading.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

import apache_beam as beam
import pyarrow.parquet as pq

from mmcorpus.filters.imageinfo import ENCODE_FORMATS, RESIZE_MODES
from mmcorpus.filters.reasons import Reject
from mmcorpus.filters.urls import url_refusal
from mmcorpus.pipelines.fetching.downloader import DownloadConfig, FetchRecord, Result, fetch_with_record
from mmcorpus.pipelines.interleaved.dedup import key_by_doc_id, source_of
from mmcorpus.pipelines.fetching.hosts import HostResolver
from mmcorpus.pipelines.runtime.sink import FileBytes, spool, stable_hash
from mmcorpus.pipelines.runtime.stage import COUNTS, KEPT, REJECTS, Count, ItemReject, SummedCounts, split_tags

STAGE_FETCH = "fetch_images"
IMAGE_URL_KIND = "image_urls"  # sink kind for the URL list: Kind("url", "image_urls", shards)
DEFAULT_DIRECTIVES = DownloadConfig.disallowed_header_directives  # X-Robots-Tag values honoured (as img2dataset)


@dataclass(frozen=True)
class FetchConfig:
    groups: int = 16  # hash groups of unique URLs, spread over the workers (each worker keeps one downloader)
    threads: int = 16  # download threads of a worker's downloader
    host_connections: int = 16  # requests to one host at once from one worker process (politeness)
    timeout: int = 10  # seconds per request
    retries: int = 0  # more tries of a connection error or 429/5xx within the run (a rerun retries failures)
    max_image_bytes: int = 64 << 20
    image_size: int = 0  # 0: keep the original bytes; > 0: store a resized, re-encoded copy
    resize_mode: str = "keep_ratio"  # keep_ratio, keep_ratio_largest or center_crop when image_size > 0
    encode_format: str = "jpg"  # format of the resized copy: jpg, png or webp
    keep_bytes: bool = True  # store image bytes in image_info.bytes
    user_agent_token: str = "mmcorpus"
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DIRECTIVES
    fetched_dir: str = ""  # read an earlier img2dataset Parquet output instead of downloading
    rules: object = field(default=None)  # filters.documents.DocumentConfig for check_decoded_image; None = defaults
    # set by the command: kept bytes wait there as files (sink.FileBytes, read by the sink), not in the documents
    spool_dir: str = ""
    # set by the command: OUT/_image_fetch, the per-URL record a rerun resumes from ("" = none)
    record_dir: str = ""

    def __post_init__(self):
        if self.groups < 1:
            raise ValueError("groups must be at least 1")
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


def group_of(url: str, groups: int) -> int:
    return stable_hash(url) % groups


# ---- fetched bytes -> outcome ---------------------------------------------------------------------------

def _rules(cfg: FetchConfig):
    if cfg.rules is not None:
        return cfg.rules
    from mmcorpus.filters.documents import DocumentConfig

    return DocumentConfig()


def assess_bytes(url: str, data: bytes | None, cfg: FetchConfig, stored: FileBytes | None = None,
                 sha256: str | None = None) -> dict:
    """Outcome of one image's bytes: {"info": image_info} or {"reason", "detail"}. The decode rules apply to the
    image as downloaded; with `cfg.image_size` the kept copy is a resized one. `stored`: where the bytes already
    wait as a file (the fetch record), so they are not stored again; `sha256`: their digest, when known."""
    from mmcorpus.filters.documents import check_decoded_image
    from mmcorpus.filters.imageinfo import inspect_image, resize_image

    if not data:
        return {"reason": "image_fetch_failed", "detail": f"{url}: empty response"}
    info = inspect_image(data, sha256=sha256)
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


class _FetchGroup(SummedCounts, beam.DoFn):
    """One hash group of image references: its unique allowed URLs streamed through the worker's downloader,
    each outcome handed to every reference of its URL. Yields ("result", (doc_id, (position, url, result)))
    and fetch counters (urls_fetched / urls_failed: downloaded now and kept / not; urls_reused: from an
    earlier run), summed on the worker."""

    def __init__(self, cfg: FetchConfig, allow_private: bool):
        self.cfg, self.allow_private = cfg, allow_private

    def process(self, element):
        _, refs = element
        by_url: dict[str, list] = {}
        for url, ref in refs:
            by_url.setdefault(url, []).append(ref)
        allowed = [url for url, rs in by_url.items() if any(not refusal for _, _, refusal in rs)]
        for url in sorted(set(by_url) - set(allowed)):  # refused wherever it appears: nothing to fetch
            yield from _tagged_results(url, by_url[url], None)
        record = FetchRecord(self.cfg.record_dir)
        for result in fetch_with_record(allowed, self.cfg.download, self.allow_private, record, checked=True):
            outcome = assess_download(result, self.cfg)
            self._add((STAGE_FETCH, _counter(outcome, result.reused), ""))
            yield from _tagged_results(result.url, by_url[result.url], outcome)
            yield from self.flush()


def _tagged_results(url: str, refs: list, outcome: dict | None):
    for doc_id, pos, result in _position_results(url, refs, outcome):
        yield "result", (doc_id, (pos, url, result))


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


def _position_results(url: str, refs, outcome: dict | None):
    """(doc_id, position, result) for each reference (doc_id, position, refusal) of a URL with this outcome."""
    for doc_id, pos, refusal in refs:
        if refusal:
            result = {"reason": "url_not_allowed", "detail": f"{url}: {refusal}"}
        elif outcome is None:
            result = {"reason": "image_fetch_failed", "detail": f"{url}: no fetch result"}
        else:
            result = outcome
        yield doc_id, pos, result


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
    refs = docs | "FetchImages_Refs" >> beam.ParDo(_ImageRefs(allow_private))
    if cfg.fetched_dir:
        p = docs.pipeline
        tagged = (p | "FetchImages_Files" >> beam.Create(_fetched_files(cfg.fetched_dir))
                  | "FetchImages_ReadFetched" >> beam.ParDo(_ReadFetched(cfg)))
        parts = split_tags(tagged, ("outcome", COUNTS), label="FetchImages_")
        results = ({"ref": refs, "outcome": parts["outcome"]} | "FetchImages_JoinUrls" >> beam.CoGroupByKey()
                   | "FetchImages_PerPosition" >> beam.FlatMap(_per_position))
    else:  # the references grouped by URL hash: fetched and resolved in one step, no join by URL
        tagged = (refs | "FetchImages_Group" >> beam.Map(_ref_group, cfg.groups)
                  | "FetchImages_GroupRefs" >> beam.GroupByKey()
                  | "FetchImages_Download" >> beam.ParDo(_FetchGroup(cfg, allow_private)))
        parts = split_tags(tagged, ("result", COUNTS), label="FetchImages_")
        results = parts["result"]
    collector.add_counts(parts[COUNTS])
    keyed = docs | "FetchImages_KeyDocs" >> beam.Map(key_by_doc_id)
    assembled = ({"doc": keyed, "result": results} | "FetchImages_JoinDocs" >> beam.CoGroupByKey()
                 | "FetchImages_Assemble" >> beam.ParDo(_Assemble()))
    out = split_tags(assembled, label="FetchImages_Docs")
    collector.add(out[REJECTS])
    collector.add_counts(out[COUNTS])
    return out[KEPT]


def _ref_group(ref, groups: int):
    return group_of(ref[0], groups), ref


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

