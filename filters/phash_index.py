"""Find 64-bit pHash pairs within Hamming distance k without comparing all pairs (multi-index hashing).

Pigeonhole: split the 64 bits into m disjoint blocks. Two hashes at distance <= k differ in at most k blocks,
so at least j = m - k blocks agree exactly. Every hash is filed under C(m, j) keys (one per j-subset of
blocks, the key being those blocks' bits); a pair within distance k shares at least one key, and only
members of one key bucket are compared. The result is exact for every m: no pair within k is missed, every
candidate is verified.

Cost: n * C(m, j) key filings plus C(m, j) * n^2 / 2^(64j/m + 1) candidate checks. `plan` picks m from n. At
k = 10 the filings grow with j as C(10 + j, j) (286 at j = 3, 1001 at j = 4, whose 18-bit keys numpy cannot
radix-sort), so for uniform hashes the best plan stays at 13 blocks of ~5 bits and the candidate term grows
as n^2 / 2^15 per key: near-linear only while buckets (n / 2^15) stay small; between 250k and 1M the CPU
time grows about as n^1.4 (bench/bench_phash.py). Smaller k stays near-linear much further (k = 6: 16-bit
keys at 28 per hash, or 21-bit keys at 84).

`duplicates` is the dedup entry point: identical hashes collapse first (one sort, O(n) grouping: a group of
100k blank images costs what one image costs), only the distinct hashes go through the index, and each
dropped item keeps one witness, so memory stays O(n) whatever the bucket sizes. It can also match
transformed copies (flips, rotations) by cross-joining extra query hashes against the plain ones.
Pure: numpy arrays and ints in, arrays out. Beam wiring lives in pipelines/pairs/dedup.py.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Plan:
    k: int
    m: int
    blocks: tuple[tuple[int, int], ...]  # (shift, width) of each block
    combos: tuple[tuple[int, ...], ...]  # the j-subsets of blocks that make keys

    @property
    def j(self) -> int:
        return self.m - self.k


def make_plan(k: int, m: int | None = None) -> Plan:
    if not 0 <= k < 64:
        raise ValueError(f"Hamming distance must be in [0, 63], got {k}")
    m = k + 1 if m is None else m
    if not k < m <= 64:
        raise ValueError(f"need k < blocks <= 64 (k={k}, blocks={m})")
    widths = [64 // m + (1 if i < 64 % m else 0) for i in range(m)]
    blocks, shift = [], 64
    for w in widths:
        shift -= w
        blocks.append((shift, w))
    return Plan(k, m, tuple(blocks), tuple(itertools.combinations(range(m), m - k)))


def plan(k: int, n: int, max_keys: int = 1100) -> Plan:
    """The block count with the least estimated work for n uniformly spread distinct hashes: filing
    (n per key, dearer for keys over 16 bits, which numpy cannot radix-sort) plus verifying
    (n^2 / 2 / 2^key_bits candidate checks per key), with at most `max_keys` keys per hash."""
    best = None
    for m in range(k + 1, 65):
        j = m - k
        keys = math.comb(m, j)
        if keys > max_keys:
            break
        bits = 64 * j / m
        cost = keys * (n * (3 if bits <= 16 else 8) + (n * n / 2) / 2.0 ** min(bits, 60))
        if best is None or cost < best[0]:
            best = (cost, m)
    return make_plan(k, best[1] if best else k + 1)


def _block_values(hashes: np.ndarray, p: Plan) -> list[np.ndarray]:
    return [((hashes >> np.uint64(s)) & np.uint64((1 << w) - 1)) for s, w in p.blocks]


def combo_key(values: list, combo: tuple[int, ...], p: Plan):
    """Concatenated bits of the blocks in `combo` (works on ints and on uint64 arrays)."""
    key = values[combo[0]]
    for b in combo[1:]:
        width = p.blocks[b][1]
        key = ((key << np.uint64(width)) if isinstance(key, np.ndarray) else (key << width)) | values[b]
    return key


def keys_of(h: int, p: Plan) -> list[str]:
    """The bucket keys of one hash (int), as strings for a Beam GroupByKey: 'combo index:key bits hex'."""
    values = [(h >> s) & ((1 << w) - 1) for s, w in p.blocks]
    return [f"{ci}:{combo_key(values, c, p):x}" for ci, c in enumerate(p.combos)]


def to_uint64(hex_hashes) -> np.ndarray:
    return np.array([int(h, 16) for h in hex_hashes], dtype=np.uint64)


@functools.lru_cache(maxsize=512)
def _limits(s: int, k: int) -> np.ndarray:
    """(s, s) int16: k above the diagonal, -1 on and below it (so one comparison tests 'i < j and within k')."""
    return np.where(np.triu(np.ones((s, s), dtype=bool), 1), k, -1).astype(np.int16)


def _runs_within(skey: np.ndarray, shash: np.ndarray, k: int, budget: int = 4_000_000):
    """(a, b) sorted positions of pairs inside equal-key runs within distance k: runs of equal length are
    compared together, as a (runs, size, size) broadcast XOR (no index arrays), in memory-bounded slices."""
    n = len(skey)
    if n < 2:
        return
    starts = np.flatnonzero(np.r_[True, skey[1:] != skey[:-1]])
    sizes = np.diff(np.r_[starts, n])
    many = sizes > 1
    starts, sizes = starts[many], sizes[many]
    if not len(starts):
        return
    o = np.argsort(sizes, kind="stable")
    starts, sizes = starts[o], sizes[o]
    cut = np.flatnonzero(np.r_[True, sizes[1:] != sizes[:-1]])
    for lo, hi in zip(cut.tolist(), np.r_[cut[1:], len(sizes)].tolist()):
        s = int(sizes[lo])
        if s * s > budget:  # one huge run (many near-identical hashes): row blocks against the whole run
            yield from _big_run(int(starts[lo]), s, shash, k, budget)
            continue
        limit = _limits(s, k)
        step = max(1, budget // (s * s))
        for a in range(lo, hi, step):
            part = starts[a:min(hi, a + step)]
            m = shash[part[:, None] + np.arange(s)[None, :]]
            close = np.bitwise_count(m[:, :, None] ^ m[:, None, :]) <= limit
            hit = np.flatnonzero(close.reshape(len(part), -1).any(axis=1))  # most runs hold no pair
            if hit.size:
                r, i, j = np.nonzero(close[hit])
                yield part[hit[r]] + i, part[hit[r]] + j


def _big_run(start: int, s: int, shash: np.ndarray, k: int, budget: int):
    run = shash[start:start + s]
    rows = max(1, budget // s)
    for lo in range(0, s, rows):
        block = run[lo:lo + rows]
        i, j = np.nonzero(np.bitwise_count(block[:, None] ^ run[None, :]) <= k)
        i = i + lo
        keep = j > i
        if keep.any():
            yield start + i[keep], start + j[keep]


def _sorted_key(values: list, combo: tuple[int, ...], p: Plan) -> tuple[np.ndarray, np.ndarray]:
    """(sorted key, order) of one combo; keys of <= 16 bits are radix-sorted."""
    key = combo_key(values, combo, p)
    bits = sum(p.blocks[b][1] for b in combo)
    if bits <= 32:
        key = key.astype(np.uint16 if bits <= 16 else np.uint32)
    order = np.argsort(key, kind="stable")
    return key[order], order


def _combos(p: Plan, combos) -> range | list:
    return range(len(p.combos)) if combos is None else combos


def _self_pairs(hashes: np.ndarray, k: int, p: Plan, combos=None):
    """Chunks (a, b) of index pairs within k, combo by combo (a pair sharing several keys comes once per key)."""
    values = _block_values(hashes, p)
    for ci in _combos(p, combos):
        sk, order = _sorted_key(values, p.combos[ci], p)
        for sa, sb in _runs_within(sk, hashes[order], k):
            yield order[sa], order[sb]


def _cross_pairs(queries: np.ndarray, hashes: np.ndarray, k: int, p: Plan, combos=None, chunk: int = 2_000_000):
    """Chunks (q, b): index into `queries`, index into `hashes`, within k (once per shared key)."""
    values, qvalues = _block_values(hashes, p), _block_values(queries, p)
    for ci in _combos(p, combos):
        sk, order = _sorted_key(values, p.combos[ci], p)
        qk = combo_key(qvalues, p.combos[ci], p).astype(sk.dtype)
        lo = np.searchsorted(sk, qk, "left")
        cnt = np.searchsorted(sk, qk, "right") - lo
        q = np.flatnonzero(cnt)
        sh = hashes[order]
        cum = np.cumsum(cnt[q])
        start = 0
        while start < len(q):
            base = cum[start - 1] if start else 0
            stop = max(start + 1, int(np.searchsorted(cum, base + chunk, "right")))
            qs, cs = q[start:stop], cnt[q[start:stop]]
            qi = np.repeat(qs, cs)
            pos = np.repeat(lo[qs], cs) + (np.arange(qi.size) - np.repeat(np.cumsum(cs) - cs, cs))
            hit = np.bitwise_count(queries[qi] ^ sh[pos]) <= k
            if hit.any():
                yield qi[hit], order[pos[hit]]
            start = stop


def near_pairs(hashes: np.ndarray, k: int, p: Plan | None = None, combos: range | list | None = None) -> np.ndarray:
    """All pairs (i, j, distance), i < j, of `hashes` (uint64) within Hamming distance k, each once.

    Per combo: sort by the key, then compare all pairs inside each run of equal keys (vectorised per run
    length), so the work is the sum of squared bucket sizes, all in numpy."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    p = p or plan(k, len(hashes))
    found = [np.stack([np.minimum(a, b), np.maximum(a, b), np.bitwise_count(hashes[a] ^ hashes[b]).astype(np.int64)],
                      axis=1) for a, b in _self_pairs(hashes, k, p, combos)]
    if not found:
        return np.empty((0, 3), dtype=np.int64)
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)  # a pair sharing several keys: once


@dataclass
class Duplicates:
    loser: np.ndarray  # items to drop (sorted) ...
    winner: np.ndarray  # ... each with one better-ranked item within k
    distance: np.ndarray
    via: np.ndarray  # 0: plain hashes within k; v > 0: a variant of kind v (of either item) matched
    marks: np.ndarray | None  # (items, words) uint64: bit g % 64 of word g // 64 set when a duplicate (either
    # way) belongs to group g != the item's own


def duplicates(hashes: np.ndarray, rank: np.ndarray, k: int, p: Plan | None = None, share: tuple[int, int] = (0, 1),
               groups: np.ndarray | None = None, variants: tuple[np.ndarray, np.ndarray] | None = None,
               exact: bool = True, flush: int = 4_000_000) -> Duplicates:
    """Every item that has a better-ranked item within distance k (lower `rank` is better; distinct ints),
    with one witness each: deterministic and independent of order (in a chain A~B~C with A not ~ C, B and
    C both go).

    Identical hashes collapse first: within a group the best-ranked item wins at distance 0, and only the
    groups' distinct hashes are searched (`p`: plan, default `plan(k, distinct)`; `share` = (part, parts): this
    worker's share of the plan's keys, combos part, part + parts, ...; `exact=False`: leave the identical-hash
    losers to another worker). `groups` (ints >= 0, e.g. the dataset of each item) asks for cross-group marks.
    `variants` = (owner item, hash[, kind > 0]) of transformed copies (flips, rotations): a variant of A within
    k of B's hash makes A and B duplicates (variants of each identical-hash group's best item are used).""" 
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    rank = np.asarray(rank, dtype=np.int64)
    n = len(hashes)
    order = np.lexsort((rank, hashes))
    sh = hashes[order]
    first = np.r_[True, sh[1:] != sh[:-1]] if n else np.zeros(0, dtype=bool)
    gid = np.cumsum(first) - 1
    reps = order[first]  # each distinct hash's best item
    group_of = np.empty(n, dtype=np.int64)
    group_of[order] = gid
    uh = sh[first]
    p = p or plan(k, len(uh))
    combos = range(share[0], len(p.combos), share[1])
    marks = gmask = own_bit = None
    if groups is not None:
        groups = np.asarray(groups, dtype=np.int64)
        own_bit = np.zeros((n, int(groups.max(initial=0)) // 64 + 1), dtype=np.uint64)  # each item's group's bit
        own_bit[np.arange(n), groups // 64] = np.left_shift(np.uint64(1), (groups % 64).astype(np.uint64))
        gmask = np.bitwise_or.reduceat(own_bit[order], np.flatnonzero(first), axis=0) if n else own_bit
        marks = np.zeros_like(own_bit)
        if exact:
            marks[order] = gmask[gid]
    acc: list = []  # (loser, winner, distance, via) chunks, reduced to one witness per loser now and then
    if exact:
        lose = order[~first]
        acc.append((lose, reps[gid[~first]], np.zeros(len(lose), dtype=np.int64), np.zeros(len(lose), dtype=np.int64)))

    def reduce(parts):
        lo, wi, di, vi = (np.concatenate([x[i] for x in parts]) for i in range(4))
        if not len(lo):
            return lo, wi, di, vi
        o = np.lexsort((vi, rank[wi], di, lo))  # per loser: nearest, then best-ranked witness
        lo, wi, di, vi = lo[o], wi[o], di[o], vi[o]
        keep = np.r_[True, lo[1:] != lo[:-1]]
        return lo[keep], wi[keep], di[keep], vi[keep]

    pending = 0  # rows in acc since the last reduce

    def found(ga, gb, d, via):
        nonlocal acc, pending
        keep = ga != gb
        ga, gb, d = ga[keep], gb[keep], d[keep].astype(np.int64)
        via = via[keep] if np.ndim(via) else np.full(len(ga), via, dtype=np.int64)
        if not len(ga):
            return
        a, b = reps[ga], reps[gb]
        if marks is not None:
            np.bitwise_or.at(marks, a, gmask[gb])
            np.bitwise_or.at(marks, b, gmask[ga])
        worse = rank[a] > rank[b]
        acc.append((np.where(worse, a, b), np.where(worse, b, a), d, via))
        pending += len(a)
        if pending > flush:
            acc = [reduce(acc)]
            pending = len(acc[0][0])

    for ga, gb in _self_pairs(uh, k, p, combos):
        found(ga, gb, np.bitwise_count(uh[ga] ^ uh[gb]), 0)
    if variants is not None and len(variants[0]):
        owner = np.asarray(variants[0], dtype=np.int64)
        vh = np.ascontiguousarray(variants[1], dtype=np.uint64)
        kind = np.asarray(variants[2], dtype=np.int64) if len(variants) > 2 else np.ones(len(owner), dtype=np.int64)
        own = reps[group_of[owner]] == owner  # variants of each group's best item only
        owner, vh, kind = owner[own], vh[own], kind[own]
        for qi, gb in _cross_pairs(vh, uh, k, p, combos):
            found(group_of[owner[qi]], gb, np.bitwise_count(vh[qi] ^ uh[gb]), kind[qi])
    empty = np.empty(0, dtype=np.int64)
    loser, winner, dist, via = reduce(acc) if acc else (empty, empty, empty, empty)
    if marks is not None:
        marks &= ~own_bit
    return Duplicates(loser, winner, dist, via, marks)


class PHashIndex:
    """A small in-memory index of reference hashes (an evaluation set) to query one hash at a time."""

    def __init__(self, hex_hashes: list[str], k: int, ids: list[str] | None = None):
        self.k = k
        self.plan = make_plan(k, k + 1 if len(hex_hashes) < 4096 else None) if len(hex_hashes) < 4096 \
            else plan(k, len(hex_hashes))
        self.hashes = [int(h, 16) for h in hex_hashes]
        self.ids = ids or [str(i) for i in range(len(hex_hashes))]
        self.buckets: dict[str, list[int]] = {}
        for i, h in enumerate(self.hashes):
            for key in keys_of(h, self.plan):
                self.buckets.setdefault(key, []).append(i)

    def __len__(self) -> int:
        return len(self.hashes)

    def query(self, hex_hash: str) -> list[tuple[str, int]]:
        """(id, distance) of the reference hashes within k, nearest first."""
        h = int(hex_hash, 16)
        seen: set[int] = set()
        out = []
        for key in keys_of(h, self.plan):
            for i in self.buckets.get(key, ()):
                if i not in seen:
                    seen.add(i)
                    d = (h ^ self.hashes[i]).bit_count()
                    if d <= self.k:
                        out.append((self.ids[i], d))
        return sorted(out, key=lambda t: (t[1], t[0]))
