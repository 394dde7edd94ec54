"""Pair-level global steps of `mmcorpus pairs`: top-fraction CLIP filter and image dedup (exact, pHash,
semantic), plus decontamination against an evaluation image set.

Dedup works on IMAGES, not pairs: the pairs sharing an `image_ref` (the captions of one COCO photo, the alt
and context captions of one web image) are one unit, kept or dropped together. Each image is ranked by its
best pair: highest clip_score (rounded to 1e-4), then smallest image_id; in a duplicate group the best-ranked image survives
and every image that has a better-ranked image within the threshold is dropped (deterministic, independent
of runner and order; in a chain A~B~C with A and C apart, B and C both go). A surviving pair whose
duplicates came from other input datasets gets `also_in_datasets` in its metadata.

Global steps that need the whole run in one place (top-fraction cut-off, semantic k-means) use a
constant-key GroupByKey: fine up to a few million pairs on one worker; beyond that, sample-then-assign
would be needed (not built). No side inputs (DaskRunner).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import apache_beam as beam
import numpy as np

from filters import phash_index
from filters.reasons import Reject
from pipelines.stage import COUNTS, KEPT, REJECTS, reject_output, split_tags

STAGE_TOP = "clip_filter"
STAGE_EXACT = "dedup_exact"
STAGE_PHASH = "dedup_phash"
STAGE_SEMANTIC = "dedup_semantic"
STAGE_DECON = "decontaminate"


@dataclass(frozen=True)
class DedupConfig:
    exact: bool = True
    phash: bool = True
    semantic: bool = False
    phash_distance: int = 10
    phash_blocks: int = 0  # 0: distance + 2 (two agreeing blocks per key, 66 keys at k=10)
    semantic_eps: float = 0.05  # duplicate when cosine > 1 - eps
    semantic_clusters: int = 0  # 0: about sqrt(number of images)
    seed: int = 0


def rank(row: dict) -> tuple:
    """Survivor order, best first: highest clip_score rounded to 1e-4 (batch-to-batch float noise cannot flip
    equal scores), then the smallest image_id."""
    score = row.get("clip_score")
    return (-round(score if score is not None else -2.0, 4), row["image_id"])


def _emit(collector, tagged, label):
    parts = split_tags(tagged, label=label)
    collector.add(parts[REJECTS])
    collector.add_counts(parts[COUNTS])
    return parts[KEPT]


# ---- top fraction over the whole run --------------------------------------------------------------------

def _score_key(row):
    return None, (rank(row), row["image_id"])


class _TopDecisions(beam.DoFn):
    def __init__(self, fraction: float):
        self.fraction = fraction

    def process(self, element):
        _, items = element
        items = sorted(items)
        keep = math.ceil(self.fraction * len(items) - 1e-9)
        cutoff = -items[keep - 1][0][0] if keep else None
        for i, (_, image_id) in enumerate(items):
            yield image_id, (i < keep, i + 1, len(items), cutoff)


class _ApplyTop(beam.DoFn):
    def process(self, element):
        _, grouped = element
        decisions = list(grouped["decision"])
        for row in grouped["pair"]:
            yield COUNTS, ((STAGE_TOP, "in", ""), 1)
            keep, position, total, cutoff = decisions[0]
            if keep:
                yield COUNTS, ((STAGE_TOP, "out", ""), 1)
                yield KEPT, row
            else:
                r = Reject("clip_rank_low", f"clip_score {row['clip_score']:.4f} ranks {position}/{total}; "
                                            f"top fraction ends at {cutoff:.4f}" if cutoff is not None
                           else f"clip_score {row['clip_score']:.4f}: top fraction keeps none of {total}")
                yield REJECTS, reject_output(STAGE_TOP, r, row["source"])
                yield COUNTS, ((STAGE_TOP, "rejected", r.reason), 1)


def keep_top_fraction(collector, pairs, fraction: float):
    """Keep the ceil(fraction * n) best pairs of the whole run by (clip_score desc, image_id)."""
    decisions = (pairs | "Top_Scores" >> beam.Map(_score_key) | "Top_Gather" >> beam.GroupByKey()
                 | "Top_Decide" >> beam.ParDo(_TopDecisions(fraction)))
    keyed = pairs | "Top_KeyPairs" >> beam.Map(lambda r: (r["image_id"], r))
    tagged = ({"pair": keyed, "decision": decisions} | "Top_Join" >> beam.CoGroupByKey()
              | "Top_Apply" >> beam.ParDo(_ApplyTop()))
    return _emit(collector, tagged, "Top_")


# ---- image summaries and applying drops -----------------------------------------------------------------

def image_summary(row):
    """(image_ref, (rank, sha256, phash, dataset, embedding)) for CombinePerKey(min): the image's best pair."""
    return row["image_ref"], (rank(row), row["sha256"], row["phash"], row["source_dataset"], row.get("clip_embedding"))


def summaries(pairs, label):
    return pairs | f"{label}_Summary" >> beam.Map(image_summary) | f"{label}_BestPair" >> beam.CombinePerKey(min)


class _ApplyDrops(beam.DoFn):
    """Join of pairs (by image_ref) with drops (reason, detail, order) and cross-dataset marks."""

    def __init__(self, stage: str):
        self.stage = stage

    def process(self, element):
        _, grouped = element
        drops = sorted(grouped["drop"])
        marks = sorted({d for d in grouped["mark"]})
        for row in sorted(grouped["pair"], key=lambda r: r["image_id"]):
            yield COUNTS, ((self.stage, "in", ""), 1)
            if drops:
                _, reason, detail = drops[0]
                r = Reject(reason, detail)
                yield REJECTS, reject_output(self.stage, r, row["source"])
                yield COUNTS, ((self.stage, "rejected", reason), 1)
                continue
            if marks:
                meta = dict(row["metadata"])
                meta["also_in_datasets"] = sorted(set(meta.get("also_in_datasets", [])) | set(marks))
                row = dict(row, metadata=meta)
                yield COUNTS, ((self.stage, "marked_cross_dataset", ""), 1)
            yield COUNTS, ((self.stage, "out", ""), 1)
            yield KEPT, row


def _apply(collector, pairs, found, label, stage):
    drops = found | f"{label}_PickDrops" >> beam.ParDo(_Pick("drop"))
    marks = found | f"{label}_PickMarks" >> beam.ParDo(_Pick("mark"))
    keyed = pairs | f"{label}_KeyPairs" >> beam.Map(lambda r: (r["image_ref"], r))
    tagged = ({"pair": keyed, "drop": drops, "mark": marks} | f"{label}_Join" >> beam.CoGroupByKey()
              | f"{label}_Apply" >> beam.ParDo(_ApplyDrops(stage)))
    return _emit(collector, tagged, f"{label}_")


class _Pick(beam.DoFn):
    def __init__(self, tag):
        self.tag = tag

    def process(self, element):
        tag, value = element
        if tag == self.tag:
            yield value


def _marks(members):
    """('mark', (ref, other dataset)) for members of one duplicate group that come from different datasets."""
    datasets = {m[1][3] for m in members}
    if len(datasets) < 2:
        return
    for ref, s in members:
        for other in sorted(datasets - {s[3]}):
            yield "mark", (ref, other)


# ---- exact ----------------------------------------------------------------------------------------------

class _ExactGroups(beam.DoFn):
    def process(self, element):
        _, members = element
        members = sorted(members, key=lambda m: m[1][0])
        if len(members) < 2:
            return
        winner = members[0][0]
        for ref, _ in members[1:]:
            yield "drop", (ref, (0, "duplicate_exact", f"same sha256 as image {winner}"))
        yield from _marks(members)


def exact_dedup(collector, pairs):
    found = (summaries(pairs, "Exact") | "Exact_BySha" >> beam.Map(lambda kv: (kv[1][1], kv))
             | "Exact_Group" >> beam.GroupByKey() | "Exact_Groups" >> beam.ParDo(_ExactGroups()))
    return _apply(collector, pairs, found, "Exact", STAGE_EXACT)


# ---- pHash ----------------------------------------------------------------------------------------------

class _PhashKeys(beam.DoFn):
    def __init__(self, plan):
        self.plan = plan

    def process(self, kv):
        ref, s = kv
        if not s[2]:
            return
        for key in phash_index.keys_of(int(s[2], 16), self.plan):
            yield key, (ref, s)


class _PhashBucket(beam.DoFn):
    """Verify one bucket: each pair within k is reported in its first agreeing combo's bucket only."""

    def __init__(self, plan):
        self.plan = plan

    def process(self, element):
        key, members = element
        members = sorted(members, key=lambda m: m[0])
        if len(members) < 2:
            return
        combo = int(key.split(":", 1)[0])
        hashes = np.array([int(m[1][2], 16) for m in members], dtype=np.uint64)
        for a, b, d in phash_index.bucket_pairs(hashes, self.plan.k, self.plan, combo):
            (ra, sa), (rb, sb) = members[a], members[b]
            (wr, ws), (lr, ls) = ((ra, sa), (rb, sb)) if sa[0] < sb[0] else ((rb, sb), (ra, sa))
            yield "drop", (lr, (d, "duplicate_phash", f"pHash distance {d} to image {wr}"))
            yield from _marks([(wr, ws), (lr, ls)])


def phash_dedup(collector, pairs, cfg: DedupConfig):
    plan = phash_index.make_plan(cfg.phash_distance, cfg.phash_blocks or min(64, cfg.phash_distance + 2))
    found = (summaries(pairs, "Phash") | "Phash_Keys" >> beam.ParDo(_PhashKeys(plan))
             | "Phash_Group" >> beam.GroupByKey() | "Phash_Verify" >> beam.ParDo(_PhashBucket(plan)))
    return _apply(collector, pairs, found, "Phash", STAGE_PHASH)


# ---- semantic (SemDeDup) --------------------------------------------------------------------------------

def semantic_duplicates(emb: np.ndarray, ranks: list, eps: float, n_clusters: int = 0, seed: int = 0):
    """[(loser index, winner index, cosine)]: k-means (faiss) over L2-normalised embeddings, then inside each
    cluster an item is dropped when a better-ranked item has cosine > 1 - eps. Pure."""
    import faiss

    n = len(emb)
    if n < 2:
        return []
    x = np.ascontiguousarray(emb, dtype=np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    k = n_clusters or max(1, int(round(math.sqrt(n))))
    k = min(k, n)
    if k > 1:
        km = faiss.Kmeans(x.shape[1], k, niter=20, seed=seed, spherical=True, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=100_000)
        km.train(x)
        _, labels = km.index.search(x, 1)
        labels = labels[:, 0]
    else:
        labels = np.zeros(n, dtype=np.int64)
    order = sorted(range(n), key=lambda i: ranks[i])
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[np.argsort(position[idx])]  # best first
        if len(idx) < 2:
            continue
        sims = x[idx] @ x[idx].T
        for j in range(1, len(idx)):
            better = sims[j, :j]
            hit = int(np.argmax(better))
            if better[hit] > 1 - eps:
                out.append((int(idx[j]), int(idx[hit]), float(better[hit])))
    return out


class _SemanticGroups(beam.DoFn):
    def __init__(self, cfg: DedupConfig):
        self.cfg = cfg

    def process(self, element):
        _, members = element
        members = sorted((m for m in members if m[1][4]), key=lambda m: m[0])
        if len(members) < 2:
            return
        from pipelines.clip_score import embedding

        emb = np.stack([embedding(m[1][4]) for m in members])
        ranks = [m[1][0] for m in members]
        for loser, winner, cos in semantic_duplicates(emb, ranks, self.cfg.semantic_eps,
                                                      self.cfg.semantic_clusters, self.cfg.seed):
            yield "drop", (members[loser][0], (-cos, "duplicate_semantic",
                                               f"CLIP cosine {cos:.4f} to image {members[winner][0]}"))
            yield from _marks([members[winner], members[loser]])


def semantic_dedup(collector, pairs, cfg: DedupConfig):
    found = (summaries(pairs, "Semantic") | "Semantic_All" >> beam.Map(lambda kv: (None, kv))
             | "Semantic_Gather" >> beam.GroupByKey() | "Semantic_Groups" >> beam.ParDo(_SemanticGroups(cfg)))
    return _apply(collector, pairs, found, "Semantic", STAGE_SEMANTIC)


# ---- decontamination ------------------------------------------------------------------------------------

class Decontaminate:
    """Stage function: Reject('contaminated') when the pair's image is within k (pHash) of, or byte-identical
    to, an evaluation image. `refs` = [(name, sha256, phash)] of the evaluation set."""

    def __init__(self, refs: list[tuple[str, str, str]], k: int):
        self.refs = refs
        self.k = k
        self.index = None

    def __call__(self, row):
        if self.index is None:
            self.index = phash_index.PHashIndex([r[2] for r in self.refs], self.k, [r[0] for r in self.refs])
            self.shas = {r[1]: r[0] for r in self.refs}
        if row["sha256"] in self.shas:
            return Reject("contaminated", f"same bytes as evaluation image {self.shas[row['sha256']]}")
        hits = self.index.query(row["phash"]) if row.get("phash") else []
        if hits:
            name, d = hits[0]
            return Reject("contaminated", f"pHash distance {d} to evaluation image {name}")
        return row


def dedup_pairs(collector, pairs, cfg: DedupConfig) -> tuple:
    """Run the enabled dedup steps in order; returns (pairs, stage names used)."""
    stages = []
    if cfg.exact:
        pairs = exact_dedup(collector, pairs)
        stages.append(STAGE_EXACT)
    if cfg.phash:
        pairs = phash_dedup(collector, pairs, cfg)
        stages.append(STAGE_PHASH)
    if cfg.semantic:
        pairs = semantic_dedup(collector, pairs, cfg)
        stages.append(STAGE_SEMANTIC)
    return pairs, stages
