"""Document dedup as Beam transforms that scale out: exact text hash, MinHash LSH near duplicates, and images
repeated across too many documents.

Every decision is a shuffle on a key (text hash, LSH band key, doc_id, image URL), never a set on one worker:
- exact (`dedup_exact`): group by the hash of the normalised text; the smallest doc_id survives.
- near (`dedup_near`): each document's MinHash signature is emitted under its `bands` band keys (as its low
  bytes: b-bit minwise hashing); documents sharing a band key are candidates and a candidate pair only counts
  when the Jaccard estimate from those bytes is >= threshold. Rule (deterministic, order-free, one pass): a
  document is dropped iff it has a verified near duplicate with a smaller doc_id; the reject names the smallest
  such doc_id and the estimate. The kept set then holds no verified pair. With A~B, B~C and A!~C (A<B<C) both B
  and C go (C is named a duplicate of B, B of A): following the named ids always ends at a kept document. Greedy
  "keep unless similar to a kept document" would keep C, but needs sequential rounds; on near duplicates at
  Jaccard >= 0.8 such chains are rare and the rule errs towards dropping.
- images (`dedup_images`, an image-level sub-stage): an image URL found in more than `max_image_repeats`
  documents (after the document dedups) is boilerplate; its positions are removed, the documents stay (the
  command then counts each document's images again: one left with too few is rejected there, even if it was
  the survivor a duplicate's reject names).
Documents with no text (no shingles) are never exact or near duplicates of each other.
The shuffles carry stubs, not documents: see parking.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import apache_beam as beam
import numpy as np

from mmcorpus.filters import minhash
from mmcorpus.filters.reasons import Reject
from mmcorpus.pipelines.interleaved.parking import Park, Unpark
from mmcorpus.pipelines.runtime.stage import COUNTS, KEPT, REJECTS, Count, ItemReject, reject_output, split_tags

STAGE_EXACT = "dedup_exact"
STAGE_NEAR = "dedup_near"
STAGE_IMAGES = "dedup_images"


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    near: bool = True
    images: bool = True
    threshold: float = 0.8  # Jaccard similarity of word-shingle sets
    ngram: int = 5  # words per shingle
    num_perm: int = 128
    seed: int = 1
    # Band layout: 0 = derived from threshold and num_perm, minimising fp_weight * FP + (1 - fp_weight) * FN
    # areas of the band-collision curve. Candidates are verified on their signatures, so a false positive
    # costs one comparison while a false negative is a missed duplicate: FN weighs more (128 perms at 0.8
    # give 14 bands x 9 rows: 87% recall at J=0.8, 97.5% at 0.85, 99.9% at 0.9; 2.7% candidates at J=0.5).
    bands: int = 0
    rows: int = 0
    fp_weight: float = 0.1
    max_image_repeats: int = 10  # an image in more than K documents is dropped from all of them

    def __post_init__(self):
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"near-duplicate threshold must be between 0 and 1, got {self.threshold}")
        if self.ngram < 1 or self.num_perm < 1:
            raise ValueError("ngram and num_perm must be at least 1")
        if (self.bands > 0) != (self.rows > 0):
            raise ValueError("give both bands and rows, or neither")
        if self.bands * self.rows > self.num_perm:
            raise ValueError(f"bands x rows ({self.bands * self.rows}) exceeds num_perm ({self.num_perm})")
        if self.max_image_repeats < 1:
            raise ValueError(f"max_image_repeats must be at least 1, got {self.max_image_repeats}")

    def lsh(self) -> tuple[int, int]:
        if self.bands:
            return self.bands, self.rows
        return minhash.lsh_params(self.threshold, self.num_perm, self.fp_weight, 1.0 - self.fp_weight)


def document_stages(cfg: DedupConfig) -> list[str]:
    """Document-level stage names `dedup_documents` adds, in order (for RunSpec.stages)."""
    return [name for name, on in ((STAGE_EXACT, cfg.exact), (STAGE_NEAR, cfg.near)) if on]


def source_of(doc: dict) -> str:
    return doc.get("source") or doc["doc_id"]


def key_by_doc_id(doc: dict) -> tuple[str, dict]:
    return doc["doc_id"], doc


def _order(doc: dict) -> tuple:
    return doc["doc_id"], doc.get("source") or "", doc.get("url") or ""


def _emit_tags(collector, tagged, label: str):
    parts = split_tags(tagged, label=label)
    collector.add(parts[REJECTS])
    collector.add_counts(parts[COUNTS])
    return parts[KEPT]


# ---- exact ----------------------------------------------------------------------------------------------

def exact_key(stub: dict) -> tuple[str, dict]:
    return stub["exact"], stub


class _ExactSurvivor(beam.DoFn):
    def process(self, element):
        _, group = element
        docs = sorted(group, key=_order)
        kept = docs[0]
        yield COUNTS, ((STAGE_EXACT, "in", ""), len(docs))
        yield COUNTS, ((STAGE_EXACT, "out", ""), 1)
        yield KEPT, kept
        for doc in docs[1:]:
            reject = Reject("duplicate_exact", f"same normalised text as doc {kept['doc_id']}")
            yield REJECTS, reject_output(STAGE_EXACT, reject, source_of(doc))
            yield COUNTS, ((STAGE_EXACT, "rejected", reject.reason), 1)


def exact_dedup(collector, docs):
    tagged = (docs | "DedupExact_Key" >> beam.Map(exact_key)
              | "DedupExact_Group" >> beam.GroupByKey()
              | "DedupExact_Survivor" >> beam.ParDo(_ExactSurvivor()))
    return _emit_tags(collector, tagged, "DedupExact_")


# ---- near -----------------------------------------------------------------------------------------------

class _BandKeys(beam.DoFn):
    """(band_key, (doc_id, low bytes of the signature)) for each band of a document with text (its stub's
    signature): the bands' join carries a quarter of the signature (128 bytes, not 512) in each of a document's
    band records, and candidates are verified on the low bytes (`minhash.low_byte_estimates`)."""

    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg

    def process(self, stub):
        packed = stub["sig"]
        if packed is None:
            return
        bands, rows = self.cfg.lsh()
        sig = np.frombuffer(packed, dtype=np.uint32)
        low = minhash.low_bytes(sig)
        for key in minhash.band_keys(sig, bands, rows):
            yield key, (stub["doc_id"], low)


class _VerifyBucket(beam.DoFn):
    """For each member of an LSH bucket: the smallest smaller doc_id whose signature estimate >= threshold."""

    def __init__(self, threshold: float):
        self.threshold = threshold

    def process(self, element):
        _, members = element
        unique = dict(sorted(members))  # doc_id -> signature; sorted so the bucket is ordered by doc_id
        if len(unique) < 2:
            return
        ids = list(unique)
        sigs = np.stack([np.frombuffer(unique[i], dtype=np.uint8) for i in ids])
        for j in range(1, len(ids)):
            estimates = minhash.low_byte_estimates(sigs[:j], sigs[j])
            hits = np.flatnonzero(estimates >= self.threshold)
            if hits.size:
                i = int(hits[0])
                yield ids[j], (ids[i], round(float(estimates[i]), 4))


class _ApplyNear(beam.DoFn):
    def process(self, element):
        _, grouped = element
        matches = sorted(grouped["match"])
        for doc in sorted(grouped["doc"], key=_order):
            yield COUNTS, ((STAGE_NEAR, "in", ""), 1)
            if matches:
                kept_id, estimate = matches[0]
                reject = Reject("duplicate_near", f"near duplicate of doc {kept_id} (estimated Jaccard {estimate:.3f})")
                yield REJECTS, reject_output(STAGE_NEAR, reject, source_of(doc))
                yield COUNTS, ((STAGE_NEAR, "rejected", reject.reason), 1)
            else:
                yield COUNTS, ((STAGE_NEAR, "out", ""), 1)
                yield KEPT, doc


def near_dedup(collector, docs, cfg: DedupConfig):
    matches = (docs | "DedupNear_Bands" >> beam.ParDo(_BandKeys(cfg))
               | "DedupNear_GroupBands" >> beam.GroupByKey()
               | "DedupNear_Verify" >> beam.ParDo(_VerifyBucket(cfg.threshold))
               | "DedupNear_Smallest" >> beam.CombinePerKey(min))
    keyed = docs | "DedupNear_KeyDocs" >> beam.Map(key_by_doc_id)
    tagged = ({"doc": keyed, "match": matches} | "DedupNear_Join" >> beam.CoGroupByKey()
              | "DedupNear_Apply" >> beam.ParDo(_ApplyNear()))
    return _emit_tags(collector, tagged, "DedupNear_")


# ---- repeated images ------------------------------------------------------------------------------------

def image_urls_of(doc: dict) -> list[tuple[str, str]]:
    """(url, doc_id) once per distinct image URL of the document."""
    return [(url, doc["doc_id"]) for url in sorted({u for u in doc["images"] if u is not None})]


class _RepeatedUrls(beam.DoFn):
    def __init__(self, max_repeats: int):
        self.max_repeats = max_repeats

    def process(self, element):
        url, doc_ids = element
        doc_ids = sorted(set(doc_ids))
        if len(doc_ids) > self.max_repeats:
            for doc_id in doc_ids:
                yield doc_id, (url, len(doc_ids))


def drop_image_positions(stub: dict, drop: dict[str, str], stage: str, reason: str) -> tuple[dict, list]:
    """The stub without the image positions whose URL is in `drop` (url -> detail): its `images` shortened and
    `keep` listing the positions of the document that stay (`Unpark` applies them). Returns the new stub and the
    ItemReject/Count events (in/out per image position) for `stage`."""
    positions = [i for i, u in enumerate(stub["images"]) if u is not None]
    gone = [i for i in positions if stub["images"][i] in drop]
    events: list = [Count(stage, "in", len(positions)), Count(stage, "out", len(positions) - len(gone))]
    for i in gone:
        url = stub["images"][i]
        events.append(ItemReject(stage, Reject(reason, f"{url}: {drop[url]}"), source_of(stub)))
    if not gone:
        return stub, events
    dropped = set(gone)
    keep = [i for i in range(len(stub["images"])) if i not in dropped]
    before = stub["keep"] if stub["keep"] is not None else range(len(stub["images"]))
    return {**stub, "images": [stub["images"][i] for i in keep], "keep": [before[i] for i in keep]}, events


class _ApplyRepeated(beam.DoFn):
    def __init__(self, max_repeats: int):
        self.max_repeats = max_repeats

    def process(self, element):
        _, grouped = element
        drop = {url: f"in {n} documents (max {self.max_repeats})" for url, n in grouped["drop"]}
        for doc in sorted(grouped["doc"], key=_order):
            new, events = drop_image_positions(doc, drop, STAGE_IMAGES, "image_repeated")
            yield from events_to_tags(events)
            yield KEPT, new


def events_to_tags(events):
    """Turn Count/ItemReject events into the (tag, value) stream `split_tags` splits."""
    for item in events:
        if isinstance(item, Count):
            if item.n:
                yield COUNTS, ((item.stage, item.metric, item.reason), item.n)
        else:
            yield REJECTS, reject_output(item.stage, item.reject, item.source)
            yield COUNTS, ((item.stage, "rejected", item.reject.reason), 1)


def drop_repeated_images(collector, docs, cfg: DedupConfig):
    drops = (docs | "DedupImages_Urls" >> beam.FlatMap(image_urls_of)
             | "DedupImages_GroupUrls" >> beam.GroupByKey()
             | "DedupImages_Repeated" >> beam.ParDo(_RepeatedUrls(cfg.max_image_repeats)))
    keyed = docs | "DedupImages_KeyDocs" >> beam.Map(key_by_doc_id)
    tagged = ({"doc": keyed, "drop": drops} | "DedupImages_Join" >> beam.CoGroupByKey()
              | "DedupImages_Apply" >> beam.ParDo(_ApplyRepeated(cfg.max_image_repeats)))
    return _emit_tags(collector, tagged, "DedupImages_")


def dedup_documents(collector, docs, cfg: DedupConfig | None = None, park_dir: str | None = None):
    """Exact, near and repeated-image dedup (each when on in `cfg`); returns the surviving documents. With
    `park_dir` the documents wait in run files there while only their stubs cross the shuffles (parking.py)."""
    cfg = cfg or DedupConfig()
    if not (cfg.exact or cfg.near or cfg.images):
        return docs
    stubs = docs | "Dedup_Park" >> beam.ParDo(Park(park_dir, cfg))
    if cfg.exact:
        stubs = exact_dedup(collector, stubs)
    if cfg.near:
        stubs = near_dedup(collector, stubs, cfg)
    if cfg.images:
        stubs = drop_repeated_images(collector, stubs, cfg)
    return stubs | "Dedup_Unpark" >> beam.ParDo(Unpark())
