"""Fetch the images of interleaved documents with img2dataset, check them, and join the results back.

Graph (every step a keyed shuffle, so it scales out; stage `fetch_images` counts image positions):
  docs -> refs (url, (doc_id, position, refusal))            URL policy: http(s) only, no private/loopback hosts
       -> unique allowed URLs, grouped by hash(url) % groups -> img2dataset in batches (a subprocess per batch:
          its multiprocessing distributor cannot start inside a daemonic Dask worker, and a crash there cannot
          take the worker down) -> (url, outcome): decoded with `inspect_image`, sized with `check_decoded_image`
       -> CoGroupByKey(refs, outcomes) by URL -> (doc_id, position result)
       -> CoGroupByKey(docs, results) by doc_id -> image_info filled (url, sha256, width, height, phash,
          bytes); a failed image's position is removed with a reject row, the text stays.

Separate, resumable fetching: `image_url_rows` writes the run's unique image URLs (schema "url", kind
IMAGE_URL_KIND) so they can be fetched apart from the pipeline, e.g.
    img2dataset --url_list OUT/image_urls --input_format parquet --url_col url --output_format parquet \
        --output_folder IMAGES --resize_mode no --disable_all_reencoding True --compute_hash sha256
img2dataset resumes an interrupted run in the same output folder (incremental mode skips finished shards).
Then `FetchConfig(fetched_dir=IMAGES)` joins that folder's Parquet back instead of downloading.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field

import apache_beam as beam
import pyarrow.parquet as pq

from mmcorpus.filters.reasons import Reject, shorten
from mmcorpus.filters.urls import url_refusal
from mmcorpus.pipelines.runtime.childenv import child_env
from mmcorpus.pipelines.interleaved.dedup import events_to_tags, key_by_doc_id, source_of
from mmcorpus.pipelines.fetching.hosts import HostResolver
from mmcorpus.pipelines.runtime.sink import spool, stable_hash
from mmcorpus.pipelines.runtime.stage import COUNTS, KEPT, REJECTS, Count, ItemReject, split_tags

STAGE_FETCH = "fetch_images"
IMAGE_URL_KIND = "image_urls"  # sink kind for the URL list: Kind("url", "image_urls", shards)
DEFAULT_DIRECTIVES = ("noai", "noimageai", "noindex", "noimageindex")  # X-Robots-Tag values img2dataset honours


@dataclass(frozen=True)
class FetchConfig:
    groups: int = 16  # hash groups of unique URLs: the fetch runs at most this many batches in parallel
    # URLs per img2dataset call: each call costs ~6 s of start-up (two interpreters importing img2dataset);
    # results stream back, so memory does not grow with it
    batch_size: int = 2000
    threads: int = 32  # img2dataset download threads per call
    timeout: int = 10  # seconds per image (img2dataset default)
    retries: int = 0
    image_size: int = 0  # 0: keep the original bytes; > 0: store img2dataset's resized, re-encoded copy
    resize_mode: str = "keep_ratio"  # img2dataset resize mode when image_size > 0
    encode_format: str = "jpg"  # format of the resized copy
    keep_bytes: bool = True  # store image bytes in image_info.bytes
    user_agent_token: str = "mmcorpus"
    disallowed_header_directives: tuple[str, ...] = DEFAULT_DIRECTIVES
    fetched_dir: str = ""  # read an earlier img2dataset Parquet output instead of downloading
    batch_timeout: float = 0  # seconds one img2dataset call may run; 0 = derived from batch size and timeout
    rules: object = field(default=None)  # filters.documents.DocumentConfig for check_decoded_image; None = defaults
    # set by the command: kept bytes wait there as files (sink.FileBytes, read by the sink), not in the documents
    spool_dir: str = ""

    def __post_init__(self):
        if self.groups < 1 or self.batch_size < 1 or self.threads < 1:
            raise ValueError("groups, batch_size and threads must be at least 1")
        if self.batch_timeout < 0:
            raise ValueError(f"batch_timeout must be 0 (derived) or positive, got {self.batch_timeout}")
        if self.fetched_dir and not os.path.isdir(self.fetched_dir):
            raise ValueError(f"fetched images folder {self.fetched_dir!r} does not exist")


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


def assess(url: str, row: dict, cfg: FetchConfig) -> dict:
    """Outcome of one img2dataset result row: {"info": image_info} or {"reason", "detail"}."""
    from mmcorpus.filters.documents import check_decoded_image
    from mmcorpus.filters.imageinfo import inspect_image

    status = row.get("status")
    if status != "success":
        reason = "image_decode_failed" if status == "failed_to_resize" else "image_fetch_failed"
        return {"reason": reason, "detail": f"{url}: {row.get('error_message') or status or 'no result'}"}
    data = row.get(cfg.encode_format) if cfg.image_size else (row.get(cfg.encode_format) or row.get("jpg"))
    if not data:
        return {"reason": "image_fetch_failed", "detail": f"{url}: empty response"}
    info = inspect_image(data)
    if isinstance(info, Reject):
        return {"reason": info.reason, "detail": f"{url}: {info.detail}"}
    checked = {"width": info.width, "height": info.height, "format": info.format, "bytes": data}
    if cfg.image_size and row.get("original_width"):  # rules apply to the original, not the resized copy
        checked.update(width=row["original_width"], height=row["original_height"])
    reject = check_decoded_image(checked, _rules(cfg))
    if reject is not None:
        return {"reason": reject.reason, "detail": f"{url}: {reject.detail}"}
    kept = (spool(cfg.spool_dir, data, info.sha256) if cfg.spool_dir else data) if cfg.keep_bytes else None
    return {"info": {"url": url, "sha256": info.sha256, "width": info.width, "height": info.height,
                     "phash": info.phash, "bytes": kept, "path": None}}


def img2dataset_options(cfg: FetchConfig, url_list: str, out_dir: str) -> dict:
    """Arguments for `img2dataset.download` over one batch."""
    resize = cfg.image_size > 0
    return {
        "url_list": url_list, "output_folder": out_dir, "input_format": "txt", "output_format": "parquet",
        "distributor": "multiprocessing", "processes_count": 1, "thread_count": cfg.threads,
        "resize_mode": cfg.resize_mode if resize else "no", "image_size": cfg.image_size or 256,
        "disable_all_reencoding": not resize, "encode_format": cfg.encode_format, "compute_hash": "sha256",
        "extract_exif": False, "timeout": cfg.timeout, "retries": cfg.retries,
        "number_sample_per_shard": 10_000, "incremental_mode": "incremental", "enable_wandb": False,
        "user_agent_token": cfg.user_agent_token,
        "disallowed_header_directives": list(cfg.disallowed_header_directives),
    }


_RUN_IMG2DATASET = (
    "import json, os, sys\n"
    "os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')\n"
    "from img2dataset import download\n"
    "download(**json.load(open(sys.argv[1])))\n"
)


def download_batch(urls: list[str], cfg: FetchConfig, allow_private: bool = False):
    """Download `urls` with img2dataset in a subprocess; yield (url, result row) streaming from its Parquet
    output, so a worker holds one record batch of images at a time, not the whole batch. When img2dataset
    exits non-zero or runs past its time budget, the URLs it gave no result for get a failed row naming why
    (each becomes an image_fetch_failed reject); the run goes on. Redirects img2dataset follows are checked with
    the URL rules (private addresses refused unless `allow_private`; see child-site/sitecustomize.py)."""
    with tempfile.TemporaryDirectory(prefix="mmcorpus-img2dataset-") as tmp:
        url_list = os.path.join(tmp, "urls.txt")
        with open(url_list, "w", encoding="utf-8") as f:
            f.write("\n".join(urls) + "\n")
        out_dir = os.path.join(tmp, "out")
        options = os.path.join(tmp, "options.json")
        with open(options, "w") as f:
            json.dump(img2dataset_options(cfg, url_list, out_dir), f)
        failure = run_img2dataset(options, tmp, batch_budget(len(urls), cfg), allow_private)
        answered = set()
        for path in sorted(glob.glob(os.path.join(out_dir, "*.parquet"))):
            try:
                for url, row in iter_rows(path):
                    answered.add(url)
                    yield url, row
            except (OSError, ValueError) as exc:  # a shard cut short by the failure
                failure = failure or f"unreadable img2dataset output {os.path.basename(path)}: {exc}"
        if failure is None and not answered:
            failure = "img2dataset wrote no output"
        for url in urls:
            if url not in answered:
                yield url, {"status": None, "error_message": failure or "no result from img2dataset"}


def batch_budget(n: int, cfg: FetchConfig) -> float:
    """Seconds one img2dataset call may take: start-up plus every URL's timeout and retries over the threads."""
    if cfg.batch_timeout:
        return cfg.batch_timeout
    return 300 + (n // cfg.threads + 1) * cfg.timeout * (cfg.retries + 1) * 2


def run_img2dataset(options: str, cwd: str, budget: float, allow_private: bool = False) -> str | None:
    """Run img2dataset on an options file in its own process group; None on success, else why it failed
    (exit status or time-out, with the last lines it printed). On time-out the whole group is killed."""
    env = child_env(NO_ALBUMENTATIONS_UPDATE="1", MMCORPUS_IMG_REDIRECTS="any" if allow_private else "public")
    proc = subprocess.Popen([sys.executable, "-c", _RUN_IMG2DATASET, options], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=budget)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return f"img2dataset timed out after {budget:g} s{_tail(output)}"
    if proc.returncode != 0:
        return f"img2dataset failed (exit {proc.returncode}){_tail(output)}"
    return None


def _tail(output: str | None) -> str:
    lines = [line for line in (output or "").strip().splitlines() if line.strip()][-3:]
    return shorten(": " + " | ".join(lines), 500) if lines else ""


def iter_rows(path: str, rows_per_batch: int = 64):
    """(url, row) for each row of an img2dataset Parquet output file, a few rows in memory at a time."""
    for batch in pq.ParquetFile(path).iter_batches(batch_size=rows_per_batch):
        for row in batch.to_pylist():
            yield row.get("url"), row


class _FetchGroup(beam.DoFn):
    """Downloads one hash group of unique URLs in batches; yields (url, outcome) and fetch counters."""

    def __init__(self, cfg: FetchConfig, allow_private: bool):
        self.cfg, self.allow_private = cfg, allow_private

    def process(self, element):
        _, urls = element
        urls = sorted(set(urls))
        for start in range(0, len(urls), self.cfg.batch_size):
            batch = urls[start:start + self.cfg.batch_size]
            pending = set(batch)  # download_batch answers every URL of the batch; a second answer is skipped
            for url, row in download_batch(batch, self.cfg, self.allow_private):
                if url in pending:
                    pending.discard(url)
                    yield from _outcome_tags(url, row, self.cfg)


def _outcome_tags(url: str, row: dict, cfg: FetchConfig):
    outcome = assess(url, row, cfg)
    yield "outcome", (url, outcome)
    yield COUNTS, ((STAGE_FETCH, "urls_fetched" if "info" in outcome else "urls_failed", ""), 1)


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


def _per_position(element):
    """CoGroupByKey(url) -> (doc_id, (position, url, outcome)) for each reference of the URL."""
    url, grouped = element
    outcome = _first_outcome(list(grouped["outcome"]))
    for doc_id, pos, refusal in grouped["ref"]:
        if refusal:
            result = {"reason": "url_not_allowed", "detail": f"{url}: {refusal}"}
        elif outcome is None:
            result = {"reason": "image_fetch_failed", "detail": f"{url}: no fetch result"}
        else:
            result = outcome
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


class _Assemble(beam.DoFn):
    def process(self, element):
        _, grouped = element
        results = sorted(grouped["result"], key=lambda r: r[0])
        for doc in sorted(grouped["doc"], key=lambda d: (d["doc_id"], source_of(d))):
            filled, events = fill_image_info(doc, results)
            yield from events_to_tags(events)
            yield KEPT, filled


def fetch_images(collector, docs, cfg: FetchConfig | None = None, allow_private: bool = False):
    """Fetch every image of `docs` (or read `cfg.fetched_dir`), fill image_info, drop failed image positions."""
    cfg = cfg or FetchConfig()
    refs = docs | "FetchImages_Refs" >> beam.ParDo(_ImageRefs(allow_private))
    if cfg.fetched_dir:
        p = docs.pipeline
        tagged = (p | "FetchImages_Files" >> beam.Create(_fetched_files(cfg.fetched_dir))
                  | "FetchImages_ReadFetched" >> beam.ParDo(_ReadFetched(cfg)))
    else:
        tagged = (refs | "FetchImages_Allowed" >> beam.FlatMap(_allowed_url, cfg.groups)
                  | "FetchImages_GroupUrls" >> beam.GroupByKey()
                  | "FetchImages_Download" >> beam.ParDo(_FetchGroup(cfg, allow_private)))
    parts = split_tags(tagged, ("outcome", COUNTS), label="FetchImages_")
    collector.add_counts(parts[COUNTS])
    results = ({"ref": refs, "outcome": parts["outcome"]} | "FetchImages_JoinUrls" >> beam.CoGroupByKey()
               | "FetchImages_PerPosition" >> beam.FlatMap(_per_position))
    keyed = docs | "FetchImages_KeyDocs" >> beam.Map(key_by_doc_id)
    assembled = ({"doc": keyed, "result": results} | "FetchImages_JoinDocs" >> beam.CoGroupByKey()
                 | "FetchImages_Assemble" >> beam.ParDo(_Assemble()))
    out = split_tags(assembled, label="FetchImages_Docs")
    collector.add(out[REJECTS])
    collector.add_counts(out[COUNTS])
    return out[KEPT]


def _allowed_url(ref, groups: int):
    url, (_, _, refusal) = ref
    if not refusal:
        yield group_of(url, groups), url


def _url_key(group_url):
    return group_url[1], None


def _url_row(url_group) -> tuple[str, str, dict]:
    url = url_group[0]
    return IMAGE_URL_KIND, url, {"url": url}


def image_url_rows(collector, docs, allow_private: bool = False) -> None:
    """Add the run's unique, allowed image URLs to the sink as kind IMAGE_URL_KIND (schema "url")."""
    urls = (docs | "ImageUrls_Refs" >> beam.ParDo(_ImageRefs(allow_private))
            | "ImageUrls_Allowed" >> beam.FlatMap(_allowed_url, 1)
            | "ImageUrls_Key" >> beam.Map(_url_key)
            | "ImageUrls_Distinct" >> beam.GroupByKey()
            | "ImageUrls_Rows" >> beam.Map(_url_row))
    collector.add(urls)

