"""BLIP CapFilt as a Beam stage: synthetic captions + ITM filter over a pairs dataset.

Graph: pair rows (Parquet, schema "pair") -> keyed by image (sha256, else hash of the bytes, else path)
       -> GroupByKey (an image's web captions together) -> GroupByKey by hash(image) % groups (about 4 batches
       per group) -> CapFiltFn (models loaded once per worker in setup; runs the group in batches) -> kept (image, caption) rows, reject rows and counters -> the sink.

Counting (every stage balances; stats.json checks it):
- `candidates` (caption level, main chain): in = web rows read + synthetic captions generated; rejected =
  web rows of undecodable/missing images, empty synthetic captions; out = captions sent to the ITM filter.
- `itm_filter` (caption level, main chain): in = candidates out; out = rows written; rejected `itm_low`.
  Counters web_kept / web_dropped / synthetic_kept / synthetic_dropped and score histograms (`hist_<source>_<bin>`).
- `capfilt_images` (image level): in = distinct images; out = images with at least one kept caption;
  rejected `no_caption_kept`, `image_decode_failed`, `image_too_large` (decompression bomb), `missing_image`.
Images are decoded with `filters.imageinfo.to_rgb` (EXIF orientation, CMYK/16-bit/alpha handled).
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

import schemas
from filters.reasons import Reject
from pipelines.sink import stable_hash
from pipelines.stage import COUNTS, KEPT, REJECTS, reject_output

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
    extra: dict = field(default_factory=dict)

    def caption_config(self):
        from pipelines.capfilt_models import CaptionConfig

        return CaptionConfig(num_captions=self.num_captions, top_p=self.top_p,
                             repetition_penalty=self.repetition_penalty, max_new_tokens=self.max_new_tokens,
                             prompt=self.prompt, seed=self.seed)


# ---- reading ----------------------------------------------------------------------------------------------

def read_pair_file(path: str):
    """Yield the rows of one pairs Parquet file, a row group at a time (image bytes can be large)."""
    schemas.read_table(path, "pair", columns=["image_id"])  # checks the schema name and version
    f = pq.ParquetFile(path)
    for i in range(f.num_row_groups):
        yield from f.read_row_group(i).to_pylist()


def image_key(row: dict) -> str:
    """Identity of the image a row points at: rows with the same image share their synthetic captions."""
    if row.get("sha256"):
        return "sha256:" + row["sha256"]
    if row.get("image_bytes"):
        return "blake2b:" + hashlib.blake2b(row["image_bytes"], digest_size=16).hexdigest()
    if row.get("image_path"):
        return "path:" + row["image_path"]
    return "id:" + str(row.get("image_id"))


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
    rows = sum(pq.ParquetFile(f).metadata.num_rows for f in files)
    return max(1, -(-rows // (batch_size * batches_per_group)))


# ---- decoding ---------------------------------------------------------------------------------------------

def load_image(row: dict):
    """(PIL RGB image, None) or (None, Reject)."""
    data = row.get("image_bytes")
    if data is None and row.get("image_path"):
        try:
            with open(row["image_path"], "rb") as f:
                data = f.read()
        except OSError as exc:
            return None, Reject("missing_image", f"{row['image_path']}: {exc.strerror or exc}")
    if data is None:
        return None, Reject("missing_image", "no image_bytes and no image_path")
    if not data:
        return None, Reject("image_decode_failed", "zero bytes")
    from PIL import Image

    from filters.imageinfo import to_rgb

    try:
        return to_rgb(data), None
    except Image.DecompressionBombError as exc:
        return None, Reject("image_too_large", f"decompression bomb: {exc}"[:300])
    except Exception as exc:  # PIL raises many types on bad bytes
        return None, Reject("image_decode_failed", f"{len(data)} bytes: {type(exc).__name__}: {exc}"[:300])


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
        from pipelines.capfilt_models import Captioner, Matcher

        c = self.cfg
        self.captioner = Captioner.load(c.captioner, c.allow_random_weights, c.device, c.precision, c.batch_size) \
            if c.num_captions > 0 else None
        self.matcher = Matcher.load(c.itm, c.allow_random_weights, c.device, c.precision, c.batch_size * 4)
        self.caption_cfg = c.caption_config()
        self.done = 0
        self.started = time.time()
        self.last_report = self.started

    def process(self, group):
        for i in range(0, len(group), self.cfg.batch_size):
            yield from self._batch(group[i:i + self.cfg.batch_size])

    def _batch(self, batch):
        images, keys, groups, out = [], [], [], []
        for key, rows in batch:
            rows = sorted(rows, key=lambda r: (str(r.get("image_id")), r.get("caption") or ""))
            source = str(rows[0].get("image_id") or key)
            out.append(_count(STAGE_IMAGES, "in"))
            image, problem = load_image(rows[0])
            if problem is not None:
                out += _reject(STAGE_IMAGES, problem.reason, problem.detail, source)
                for r in rows:
                    out += _reject(STAGE_CANDIDATES, problem.reason, problem.detail, f"{r.get('image_id')}#web")
                continue
            images.append(image)
            keys.append(key)
            groups.append(rows)
        yield from out
        if images:
            yield from self._filter(images, keys, groups)
        self._progress(len(batch))

    def _filter(self, images, keys, groups):
        c = self.cfg
        synthetic = self.captioner.captions(images, keys, self.caption_cfg) if self.captioner else [[] for _ in images]
        candidates = []  # per image: [(source, index, caption, row)]
        for rows, caps, key in zip(groups, synthetic, keys):
            cands = []
            for i, r in enumerate(rows):
                if (r.get("caption") or "").strip():
                    cands.append(("web", i, r["caption"], r))
                else:
                    yield from _reject(STAGE_CANDIDATES, "caption_empty", "web caption is empty", f"{r.get('image_id')}#web")
            yield _count(STAGE_CANDIDATES, "synthetic", len(caps))
            yield _count(STAGE_CANDIDATES, "in", len(caps))
            for j, text in enumerate(caps):
                if text:
                    cands.append(("synthetic", j, text, rows[0]))
                else:
                    yield from _reject(STAGE_CANDIDATES, "caption_empty", "captioner produced no words",
                                       f"{rows[0].get('image_id')}#synthetic-{j}")
            candidates.append(cands)
        scores = self.matcher.score(images, [[cand[2] for cand in cands] for cands in candidates])
        for key, rows, image, cands, image_scores in zip(keys, groups, images, candidates, scores):
            kept = 0
            for (src, idx, text, row), score in zip(cands, image_scores):
                yield _count(STAGE_CANDIDATES, "out")
                yield _count(STAGE_ITM, "in")
                yield _count(STAGE_ITM, f"hist_{src}_{hist_bin(score):02d}")
                tag = f"{row.get('image_id')}#{src}" + (f"-{idx}" if src == "synthetic" else "")
                if score >= c.itm_threshold:
                    kept += 1
                    yield _count(STAGE_ITM, "out")
                    yield _count(STAGE_ITM, f"{src}_kept")
                    yield KEPT, (f"{key}\x00{src}\x00{idx:04d}", self._row(row, image, src, idx, text, score))
                else:
                    yield _count(STAGE_ITM, f"{src}_dropped")
                    yield from _reject(STAGE_ITM, "itm_low", f"itm {score:.4f} < {c.itm_threshold}: {text[:200]}", tag)
            if kept:
                yield _count(STAGE_IMAGES, "out")
            else:
                yield from _reject(STAGE_IMAGES, "no_caption_kept", f"{len(cands)} captions, none >= {c.itm_threshold}",
                                   str(rows[0].get("image_id") or key))

    def _row(self, row, image, src, idx, text, score):
        out = {k: row.get(k) for k in schemas.PAIR.names}
        out.update(caption=text, caption_source=src, itm_score=float(score))
        out["width"] = out["width"] or image.width
        out["height"] = out["height"] or image.height
        if src == "synthetic":
            out["clip_score"] = None
            out["clip_embedding"] = row.get("clip_embedding")
            out["metadata"] = _merge_metadata(row, {"capfilt": {"captioner": self.captioner.source,
                                                                "caption_index": idx, "seed": self.cfg.seed,
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


def build_capfilt(pipeline, files: list[str], cfg: CapFiltConfig):
    """The CapFilt graph; returns the sink tuples (for `Collector`-style `finish`)."""
    from pipelines.stage import Collector, split_tags

    c = Collector()
    rows = (pipeline | "ListFiles" >> beam.Create(sorted(files))
            | "ReadPairs" >> beam.FlatMap(read_pair_file))
    c.add_counts(rows | "CountWeb" >> beam.FlatMap(web_read_counts))
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
