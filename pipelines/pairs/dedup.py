"""Pair-level global steps of `mmcorpus pairs`: top-fraction CLIP filter and image dedup (exact, pHash,
semantic), plus decontamination against an evaluation image set.

Dedup works on IMAGES, not pairs: the pairs sharing an `image_ref` (the captions of one COCO photo, the alt
and context captions of one web image) are one unit, kept or dropped together. Each image is ranked by its
best pair: highest clip_score (rounded to 1e-4), then smallest image_id, then smallest row_key (unique per
row, so no two pairs tie); in a duplicate group the best-ranked image survives
and every image that has a better-ranked image within the threshold is dropped (deterministic, independent
of runner and order; in a chain A~B~C with A and C apart, B and C both go). A surviving pair whose
duplicates came from other input datasets gets `also_in_datasets` in its metadata.

Global steps that need the whole run in one place (top-fraction cut-off, semantic k-means) use a
constant-key GroupByKey: fine up to a few million pairs on one worker; beyond that, sample-then-assign
would be needed (not built). pHash dedup sends every image's (rank, pHash) to each of `phash_parts`
workers; each searches its share of the multi-index keys over all hashes (filters.phash_index.duplicates:
identical hashes collapse first). With `phash_transforms` the pHashes of each image's horizontal flip and
90/180/270-degree rotations are matched against the plain ones too. No side inputs (DaskRunner).
Rows are keyed by `row_key` (unique by construction), never by image_id, wherever one decision is applied
per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import apache_beam as beam
import numpy as np

from mmcorpus.filters import phash_index
from mmcorpus.filters.imageinfo import TRANSFORMS
from mmcorpus.filters.reasons import Reject
from mmcorpus.pipelines.runtime.stage import COUNTS, KEPT, REJECTS, reject_output, split_tags

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
    phash_blocks: int = 0  # 0: chosen from the number of distinct hashes (filters.phash_index.plan)
    phash_parts: int = 2  # workers sharing the pHash search (each holds every image's hash)
    phash_transforms: bool = False  # also match flipped / 90-180-270 rotated copies (5x the hashes)
    semantic_eps: float = 0.05  # duplicate when cosine > 1 - eps
    semantic_clusters: int = 0  # 0: about sqrt(number of images)
    seed: int = 0


def rank(row: dict) -> tuple:
    """Survivor order, best first: highest clip_score rounded to 1e-4 (batch-to-batch float noise cannot flip
    equal scores), then the smallest image_id, then the row_key (unique: no ties)."""
    score = row.get("clip_score")
    return (-round(score if score is not None else -2.0, 4), row["image_id"], row.get("row_key") or "")


def _emit(collector, tagged, label):
    parts = split_tags(tagged, label=label)
    collector.add(parts[REJECTS])
    collector.add_counts(parts[COUNTS])
    return parts[KEPT]


# ---- top fraction over the whole run --------------------------------------------------------------------

def _score_key(row):
    return None, (rank(row), row["row_key"])


class _TopDecisions(beam.DoFn):
    def __init__(self, fraction: float):
        self.fraction = fraction

    def process(self, element):
        _, items = element
        items = sorted(items)
        keep = math.ceil(self.fraction * len(items) - 1e-9)
        cutoff = -items[keep - 1][0][0] if keep else None
        for i, (_, row_key) in enumerate(items):
            yield row_key, (i < keep, i + 1, len(items), cutoff)


class _ApplyTop(beam.DoFn):
    """Join of one row with its decision, by row_key (unique per row: exactly one of each)."""

    def process(self, element):
        key, grouped = element
        rows, decisions = list(grouped["pair"]), list(grouped["decision"])
        if len(rows) != 1 or len(decisions) != 1:
            raise RuntimeError(f"row_key {key!r}: {len(rows)} rows, {len(decisions)} decisions (must be unique)")
        for row in rows:
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
    """Keep the ceil(fraction * n) best pairs of the whole run by (clip_score desc, image_id, row_key)."""
    decisions = (pairs | "Top_Scores" >> beam.Map(_score_key) | "Top_Gather" >> beam.GroupByKey()
                 | "Top_Decide" >> beam.ParDo(_TopDecisions(fraction)))
    keyed = pairs | "Top_KeyPairs" >> beam.Map(lambda r: (r["row_key"], r))
    tagged = ({"pair": keyed, "decision": decisions} | "Top_Join" >> beam.CoGroupByKey()
              | "Top_Apply" >> beam.ParDo(_ApplyTop()))
    return _emit(collector, tagged, "Top_")


# ---- image summaries and applying drops -----------------------------------------------------------------

def image_summary(row):
    """(image_ref, (rank, sha256, phash, dataset, embedding)) for CombinePerKey(min): the image's best pair."""
    return row["image_ref"], (rank(row), row["sha256"], row["phash"], row["source_dataset"], row.get("clip_embedding"))


def summaries(pairs, label, fn=image_summary):
    """Each image's best pair: `fn(row)` -> (image_ref, summary), the smallest summary per image_ref."""
    return pairs | f"{label}_Summary" >> beam.Map(fn) | f"{label}_BestPair" >> beam.CombinePerKey(min)


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

def phash_summary(row):
    """(image_ref, (rank, phash, dataset, transformed pHashes)) for CombinePerKey(min): the image's best pair."""
    return row["image_ref"], (rank(row), row["phash"], row["source_dataset"], tuple(row.get("_phash_variants") or ()))


def phash_part(members, k: int, blocks: int, part: int, parts: int, transforms: bool):
    """Drops and marks found by one worker's share (`part` of `parts`) of the multi-index keys, over every
    image: `members` = [(image_ref, (rank, phash hex, dataset, variant hexes))]. Yields
    ("drop", (ref, ((distance, winner rank), "duplicate_phash", detail))) and ("mark", (ref, dataset)).
    Pure apart from the tuples; bench/bench_phash.py times exactly this."""
    members = sorted((m for m in members if m[1][1]), key=lambda m: m[1][0])  # rank order: rank = position
    if len(members) < 2:
        return
    hashes = phash_index.to_uint64([m[1][1] for m in members])
    datasets = sorted({m[1][2] for m in members})
    code = {name: i for i, name in enumerate(datasets)}
    groups = np.array([code[m[1][2]] for m in members]) if len(datasets) > 1 else None  # cross-dataset marks
    p = phash_index.make_plan(k, blocks) if blocks else None  # None: chosen from the distinct hashes
    variants = None
    if transforms:
        owner = [i for i, m in enumerate(members) for _ in m[1][3]]
        kind = [j + 1 for m in members for j in range(len(m[1][3]))]
        variants = (np.array(owner, dtype=np.int64), phash_index.to_uint64([v for m in members for v in m[1][3]]),
                    np.array(kind, dtype=np.int64))
    found = phash_index.duplicates(hashes, np.arange(len(members)), k, p, (part, parts), groups=groups,
                                   variants=variants, exact=part == 0)
    for lo, wi, d, via in zip(found.loser.tolist(), found.winner.tolist(), found.distance.tolist(), found.via.tolist()):
        how = f" ({TRANSFORMS[via - 1]} of one matches the other)" if via else ""
        yield "drop", (members[lo][0], ((d, members[wi][1][0]), "duplicate_phash",
                                        f"pHash distance {d} to image {members[wi][0]}{how}"))
    if found.marks is not None:
        for i in np.flatnonzero(found.marks.any(axis=1)).tolist():
            words = found.marks[i].tolist()
            for g, name in enumerate(datasets):
                if words[g // 64] >> g % 64 & 1:
                    yield "mark", (members[i][0], name)


class _PhashPart(beam.DoFn):
    def __init__(self, cfg: DedupConfig, parts: int):
        self.cfg = cfg
        self.parts = parts

    def process(self, element):
        part, members = element
        c = self.cfg
        yield from phash_part(list(members), c.phash_distance, c.phash_blocks, part, self.parts, c.phash_transforms)


def _to_parts(kv, parts):
    for part in range(parts):
        yield part, kv


def phash_dedup(collector, pairs, cfg: DedupConfig):
    parts = max(1, cfg.phash_parts)
    found = (summaries(pairs, "Phash", phash_summary) | "Phash_ToParts" >> beam.FlatMap(_to_parts, parts)
             | "Phash_Gather" >> beam.GroupByKey() | "Phash_Search" >> beam.ParDo(_PhashPart(cfg, parts)))
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
        from mmcorpus.pipelines.models.clip import embedding

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
        self.index = None  # built on first use (in the worker)

    def __call__(self, row):
        if self.index is None:
            self.index = phash_index.PHashIndex([r[2] for r in self.refs], self.k, [r[0] for r in self.refs])
            self.shas = {r[1]: r[0] for r in self.refs}
        if row["sha256"] in self.shas:
            return Reject("contaminated", f"same bytes as evaluation image {self.shas[row['sha256']]}")
        for label, h in [("", row.get("phash"))] + [(f" ({t})", v) for t, v in
                                                     zip(TRANSFORMS, row.get("_phash_variants") or ())]:
            hits = self.index.query(h) if h else []
            if hits:
                name, d = hits[0]
                return Reject("contaminated", f"pHash distance {d} to evaluation image {name}{label}")
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
