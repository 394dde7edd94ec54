"""BLIP CapFilt as a Beam stage: synthetic captions + ITM filter over a pairs dataset.

Graph: pair rows (Parquet, schema "pair"; read in tasks of about 4,096 rows) -> keyed by image (sha256, else hash of the bytes, else path,
       else the row itself: rows without any image identity never share a key)
       -> GroupByKey (an image's web captions together) -> GroupByKey by hash(image) % groups (about 4 batches
       per group) -> CapFiltFn (models loaded once per worker in setup; runs the group in batches) -> kept (image, caption) rows, reject rows and counters -> the sink.

Counting (every stage balances; stats.json checks it):
- `candidates` (caption level, main chain): in = web rows read + synthetic captions generated; rejected =
  web rows of undecodable/missing images, unreadable rows (read_failed: a broken row group), empty synthetic
  captions, synthetic captions with a flagged word (flagged_image_words) or, with pii "reject", PII
  (pii_found); out = captions sent to the ITM filter. A synthetic caption's e-mails, IPs and phone numbers are
  masked by default (counters pii_masked_<kind>, documents_pii_masked of stage `safety`), as in `pairs`.
- `itm_filter` (caption level, main chain): in = candidates out; out = rows written; rejected `itm_low`.
  Counters web_kept / web_dropped / synthetic_kept / synthetic_dropped and score histograms (`hist_<source>_<bin>`).
- `capfilt_images` (image level): in = distinct images; out = images with at least one kept caption;
  rejected `no_caption_kept`, `image_decode_failed`, `image_too_large` (decompression bomb), `missing_image`.
Images are decoded with `filters.imageinfo.decode_rgb` (pixel-count guard against decompression bombs before
decoding, EXIF orientation, CMYK/16-bit/alpha handled), from the first row of the image's group that decodes
(a sibling row with a bad path does not sink the image).
Output rows: web rows keep their image_id; synthetic caption j of an image gets image_id
"<image_id of the row it was made from>#synthetic-<j>", so image_id stays unique per row (the image is
shared through sha256/image_bytes/image_path, and the metadata's capfilt.image_id).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import apache_beam as beam
import pyarrow.parquet as pq

from mmcorpus import schemas
from mmcorpus.filters.imageinfo import DEFAULT_MAX_PIXELS
from mmcorpus.filters.reasons import Reject, shorten
from mmcorpus.pipelines.runtime.sink import FileBytes, stable_hash
from mmcorpus.pipelines.runtime.stage import COUNTS, KEPT, REJECTS, reject_output
from mmcorpus.pipelines.safety.stages import pii_counts, screen_caption

log = logging.getLogger("mmcorpus.capfilt")

STAGE_CANDIDATES = "candidates"
STAGE_ITM = "itm_filter"
STAGE_IMAGES = "capfilt_images"
HIST_BINS = 20  # ITM score histogram: bin i covers [i/20, (i+1)/20)


@dataclass
class CapFiltConfig:
    captioner: str
    itm: str
    num_captions: int = 1
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    prompt: str = "a picture of "
    itm_threshold: float = 0.5
    max_new_tokens: int = 20
    batch_size: int = 16  # images per model batch (ITM pairs per batch: 4x this)
    seed: int = 0
    allow_random_weights: bool = False
    device: str = "auto"
    precision: str = "auto"
    max_pixels: int = DEFAULT_MAX_PIXELS  # larger images are rejects (decompression bombs)
    pii: str = "mask"  # synthetic captions: mask | reject | off (issue 17)
    flagged_words: bool = True  # synthetic captions with a flagged word are rejected
    extra: dict = field(default_factory=dict)

    def safety(self):
        from mmcorpus.pipelines.safety.stages import SafetySpec

        return SafetySpec(directives=False, flagged_image_words=self.flagged_words, pii=self.pii)

    def caption_config(self):
        from mmcorpus.pipelines.models.blip import CaptionConfig

        return CaptionConfig(num_captions=self.num_captions, top_p=self.top_p,
                             repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
                             prompt=self.prompt, seed=self.seed)


# ---- reading ----------------------------------------------------------------------------------------------

def read_tasks(files: list[str]) -> list[tuple]:
    """(file, chunk) read tasks: a large file's row groups in chunks of about 4,096 rows (pairs/chunks.py), each
    its own partition on the Dask runner, so no worker holds a whole file's rows."""
    from mmcorpus.pipelines.pairs.chunks import parquet_chunks

    out = []
    for f in files:
        parts = parquet_chunks(f)
        out += [(f, c) for c in (parts if len(parts) > 1 else [None])]
    return out


def read_pair_file(task: tuple, spool_dir: str | None = None):
    """Rows of one read task (a pairs Parquet file, or a chunk of one), streamed, each with `_row` = "file:index"
    (unique in the run); a row that cannot be read comes as {"_row", "_bad": why} (a reject), and the file goes
    on. With `spool_dir`, image bytes are stored there once (named by their blake2b digest) and rows carry a
    `FileBytes` reference, which the model stage and the sink read: the shuffles after this move no image bytes."""
    from mmcorpus.pipelines.pairs.sources import BadRecord, parquet_rows
    from mmcorpus.pipelines.runtime.sink import spool

    path, chunk = task
    base = os.path.basename(path)
    for i, row in parquet_rows(path, batch_size=64, chunk=chunk):
        if isinstance(row, BadRecord):
            yield {"_row": f"{base}:{i}", "_bad": str(row)}
        else:
            row["_row"] = f"{base}:{i}"
            if spool_dir and row.get("image_bytes"):
                row["image_bytes"] = spool(spool_dir, row["image_bytes"], _digest(row["image_bytes"]))
            yield row


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def is_readable(row) -> bool:
    return "_bad" not in row


def unreadable(row):
    """Reject tuples for a row that could not be read."""
    if "_bad" in row:
        yield from _reject(STAGE_CANDIDATES, "read_failed", row["_bad"], row["_row"])


def image_key(row: dict) -> str:
    """Identity of the image a row points at: rows with the same image share their synthetic captions."""
    if row.get("sha256"):
        return "sha256:" + row["sha256"]
    if isinstance(row.get("image_bytes"), FileBytes):  # spooled under its blake2b digest
        return "blake2b:" + os.path.basename(row["image_bytes"].path)
    if row.get("image_bytes"):
        return "blake2b:" + _digest(row["image_bytes"])
    if row.get("image_path"):
        return "path:" + row["image_path"]
    return "row:" + str(row.get("_row"))  # no image identity: this row alone


def key_row(row):
    return image_key(row), row


def web_read_counts(_row):
    """Every web row read is a caption candidate."""
    yield (STAGE_CANDIDATES, "in", ""), 1
    yield (STAGE_CANDIDATES, "web", ""), 1


def group_to_list(item):
    key, rows = item
    return key, list(rows)


class ToBatchGroup(beam.DoFn):
    """Key an image by `hash(image key) % groups`: a GroupByKey then forms the model batches.
    (beam.BatchElements lost its last batches under Beam 2.77's DaskRunner, so batches come from a shuffle.)"""

    def __init__(self, groups: int):
        self.groups = groups

    def process(self, item):
        yield stable_hash(item[0]) % self.groups, item


def group_images(item):
    """A batch group's images in a stable order."""
    _, images = item
    return sorted(images, key=lambda kv: kv[0])


def batch_groups(files: list[str], batch_size: int, batches_per_group: int = 4) -> int:
    rows = sum(schemas.open_parquet(f).metadata.num_rows for f in files)
    return max(1, -(-rows // (batch_size * batches_per_group)))


# ---- decoding ---------------------------------------------------------------------------------------------

def load_image(row: dict, max_pixels: int = DEFAULT_MAX_PIXELS):
    """(PIL RGB image, None) or (None, Reject)."""
    from mmcorpus.filters.imageinfo import decode_rgb
    from mmcorpus.pipelines.pairs.sources import load_bytes

    where = row.get("image_path") or "image_bytes"
    try:
        data = load_bytes(row)
    except OSError as exc:
        return None, Reject("missing_image", f"{row['image_path']}: {exc.strerror or exc}")
    if data is None:
        return None, Reject("missing_image", "no image_bytes and no image_path")
    image = decode_rgb(data, max_pixels)
    if isinstance(image, Reject):
        return None, Reject(image.reason, shorten(f"{where}: {image.detail}", 300))
    return image, None


def first_decodable(rows: list, max_pixels: int):
    """(image, row it came from, None) for the first row of an image group that decodes, else
    (None, None, Reject) with the first row's problem (and how many rows were tried)."""
    first = None
    for r in rows:
        image, problem = load_image(r, max_pixels)
        if problem is None:
            return image, r, None
        if first is None:
            first = problem
    more = f" ({len(rows)} rows of this image tried, none decodes)" if len(rows) > 1 else ""
    return None, None, Reject(first.reason, first.detail + more)


# ---- the model stage --------------------------------------------------------------------------------------

def hist_bin(score: float) -> int:
    return min(HIST_BINS - 1, max(0, int(score * HIST_BINS)))


def _count(stage, metric, n=1, reason=""):
    return COUNTS, ((stage, metric, reason), n)


def _reject(stage, reason, detail, source):
    r = Reject(reason, detail)
    return [(REJECTS, reject_output(stage, r, source)), _count(stage, "rejected", 1, reason)]


def _merge_metadata(row: dict, extra: dict) -> str:
    try:
        meta = json.loads(row.get("metadata") or "{}")
        if not isinstance(meta, dict):
            meta = {"original": meta}
    except ValueError:
        meta = {"original": row.get("metadata")}
    meta.update(extra)
    return schemas.metadata_json(meta)


class CapFiltFn(beam.DoFn):
    """Takes a list of `(image_key, [pair rows])`, runs it in batches of `batch_size`; yields `(tag, value)` (kept rows, reject tuples, counts)."""

    def __init__(self, cfg: CapFiltConfig):
        self.cfg = cfg

    def setup(self):
        from mmcorpus.pipelines.models.blip import Captioner, Matcher

        from mmcorpus.pipelines.runtime.shared import file_stamp, per_process

        c = self.cfg  # each model loaded once per worker process (setup runs for every bundle)
        common = (c.allow_random_weights, c.device, c.precision)
        self.captioner = per_process(
            ("blip-captioner", c.captioner, file_stamp(c.captioner), *common, c.batch_size),
            lambda: Captioner.load(c.captioner, c.allow_random_weights, c.device, c.precision, c.batch_size)) \
            if c.num_captions > 0 else None
        self.matcher = per_process(
            ("blip-itm", c.itm, file_stamp(c.itm), *common, c.batch_size * 4),
            lambda: Matcher.load(c.itm, c.allow_random_weights, c.device, c.precision, c.batch_size * 4))
        self.caption_cfg = c.caption_config()
        self.safety = c.safety()
        self.done = 0
        self.started = time.time()
        self.last_report = self.started

    def process(self, group):
        for i in range(0, len(group), self.cfg.batch_size):
            yield from self._batch(group[i:i + self.cfg.batch_size])

    def _batch(self, batch):
        images, keys, groups, bases, out = [], [], [], [], []
        for key, rows in batch:
            rows = sorted(rows, key=lambda r: (str(r.get("image_id")), r.get("caption") or "", r.get("_row") or ""))
            source = str(rows[0].get("image_id") or key)
            out.append(_count(STAGE_IMAGES, "in"))
            image, base, problem = first_decodable(rows, self.cfg.max_pixels)
            if problem is not None:
                out += _reject(STAGE_IMAGES, problem.reason, problem.detail, source)
                for r in rows:
                    out += _reject(STAGE_CANDIDATES, problem.reason, problem.detail, f"{r.get('image_id')}#web")
                continue
            images.append(image)
            keys.append(key)
            groups.append(rows)
            bases.append(base)
        yield from out
        if images:
            yield from self._filter(images, keys, groups, bases)
        self._progress(len(batch))

    def _filter(self, images, keys, groups, bases):
        c = self.cfg
        synthetic = self.captioner.captions(images, keys, self.caption_cfg) if self.captioner else [[] for _ in images]
        candidates = []  # per image: [(source, index, caption, row)]
        for rows, caps, key, base in zip(groups, synthetic, keys, bases):
            cands = []
            for i, r in enumerate(rows):
                if (r.get("caption") or "").strip():
                    cands.append(("web", i, r["caption"], r))
                else:
                    yield from _reject(STAGE_CANDIDATES, "caption_empty", "web caption is empty", f"{r.get('image_id')}#web")
            yield _count(STAGE_CANDIDATES, "synthetic", len(caps))
            yield _count(STAGE_CANDIDATES, "in", len(caps))
            for j, text in enumerate(caps):
                tag = f"{base.get('image_id') or key}#synthetic-{j}"
                if not text:
                    yield from _reject(STAGE_CANDIDATES, "caption_empty", "captioner produced no words", tag)
                    continue
                screened = screen_caption(text, self.safety)
                if isinstance(screened, Reject):
                    yield from _reject(STAGE_CANDIDATES, screened.reason, screened.detail, tag)
                    continue
                text, pii = screened
                for e in pii_counts(pii) if pii else ():
                    yield _count(e.stage, e.metric, e.n)
                cands.append(("synthetic", j, text, base))
            candidates.append(cands)
        scores = self.matcher.score(images, [[cand[2] for cand in cands] for cands in candidates])
        for key, rows, image, cands, image_scores, base in zip(keys, groups, images, candidates, scores, bases):
            kept = 0
            for (src, idx, text, row), score in zip(cands, image_scores):
                yield _count(STAGE_CANDIDATES, "out")
                yield _count(STAGE_ITM, "in")
                yield _count(STAGE_ITM, f"hist_{src}_{hist_bin(score):02d}")
                tag = f"{row.get('image_id') or key}#{src}" + (f"-{idx}" if src == "synthetic" else "")
                if score >= c.itm_threshold:
                    kept += 1
                    yield _count(STAGE_ITM, "out")
                    yield _count(STAGE_ITM, f"{src}_kept")
                    yield KEPT, (f"{key}\x00{src}\x00{idx:04d}", self._row(row, image, src, idx, text, score, key, base))
                else:
                    yield _count(STAGE_ITM, f"{src}_dropped")
                    yield from _reject(STAGE_ITM, "itm_low", f"itm {score:.4f} < {c.itm_threshold}: {text[:200]}", tag)
            if kept:
                yield _count(STAGE_IMAGES, "out")
            else:
                yield from _reject(STAGE_IMAGES, "no_caption_kept", f"{len(cands)} captions, none >= {c.itm_threshold}",
                                   str(rows[0].get("image_id") or key))

    def _row(self, row, image, src, idx, text, score, key, base):
        out = {k: row.get(k) for k in schemas.PAIR.names}
        out.update(caption=text, caption_source=src, itm_score=float(score))
        if src == "web" and row is not base:  # same image (same key); this row's own bytes/path may be broken
            out["image_bytes"], out["image_path"] = base.get("image_bytes"), base.get("image_path")
        out["width"] = out["width"] or image.width
        out["height"] = out["height"] or image.height
        if src == "synthetic":
            base_id = row.get("image_id") or key
            out["image_id"] = f"{base_id}#synthetic-{idx}"
            out["clip_score"] = None
            out["clip_embedding"] = row.get("clip_embedding")
            out["metadata"] = _merge_metadata(row, {"capfilt": {"captioner": self.captioner.source,
                                                                "caption_index": idx, "seed": self.cfg.seed,
                                                                "image_id": row.get("image_id"),
                                                                "web_caption": row.get("caption")}})
        return out

    def _progress(self, n):
        self.done += n
        now = time.time()
        if now - self.last_report >= 30:
            self.last_report = now
            print(f"capfilt[{os.getpid()}]: {self.done} images, {self.done / (now - self.started):.1f} img/s",
                  file=sys.stderr, flush=True)


def to_data(item):
    key, row = item
    return "data", key, row


def build_capfilt(pipeline, files: list[str], cfg: CapFiltConfig, spool_dir: str | None = None, tasks=None):
    """The CapFilt graph; returns the sink tuples (for `Collector`-style `finish`). `spool_dir`: where image
    bytes wait as files (see read_pair_file); None keeps them in the rows."""
    from mmcorpus.pipelines.runtime.stage import Collector, split_tags

    c = Collector()
    read = (pipeline | "ReadTasks" >> beam.Create(tasks or read_tasks(sorted(files)))
            | "ReadPairs" >> beam.FlatMap(read_pair_file, spool_dir))
    c.add_counts(read | "CountWeb" >> beam.FlatMap(web_read_counts))
    bad = split_tags(read | "Unreadable" >> beam.FlatMap(unreadable), (REJECTS, COUNTS), label="Read")
    c.add(bad[REJECTS])
    c.add_counts(bad[COUNTS])
    rows = read | "Readable" >> beam.Filter(is_readable)
    tagged = (rows | "KeyByImage" >> beam.Map(key_row)
              | "GroupByImage" >> beam.GroupByKey()
              | "ToList" >> beam.Map(group_to_list)
              | "ToBatchGroup" >> beam.ParDo(ToBatchGroup(batch_groups(files, cfg.batch_size)))
              | "GroupBatches" >> beam.GroupByKey()
              | "SortGroup" >> beam.Map(group_images)
              | "CapFilt" >> beam.ParDo(CapFiltFn(cfg)))
    parts = split_tags(tagged, label="CapFilt")
    c.add(parts[KEPT] | "ToData" >> beam.Map(to_data))
    c.add(parts[REJECTS])
    c.add_counts(parts[COUNTS])
    return c.finish()


def histograms(stages: list[dict]) -> dict:
    """ITM score histograms per caption source from the itm_filter counters: {source: {edges, counts}}."""
    counters = next((s["counters"] for s in stages if s["stage"] == STAGE_ITM), {})
    out = {}
    for src in schemas.CAPTION_SOURCES:
        counts = [int(counters.get(f"hist_{src}_{i:02d}", 0)) for i in range(HIST_BINS)]
        out[src] = {"edges": [round(i / HIST_BINS, 4) for i in range(HIST_BINS + 1)], "counts": counts}
    return out


def config_dict(cfg: CapFiltConfig) -> dict:
    return asdict(cfg)
