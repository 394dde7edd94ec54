"""Find 64-bit pHash pairs within Hamming distance k without comparing all pairs (multi-index hashing).

Pigeonhole: split the 64 bits into m disjoint blocks. Two hashes at distance <= k differ in at most k blocks,
so at least j = m - k blocks agree exactly. Every hash is filed under C(m, j) keys (one per j-subset of
blocks, the key being those blocks' bits); a pair within distance k shares at least one key, and only
members of one key bucket are compared. m = k + 1 (j = 1) is the textbook split: fewest keys, but blocks of
~6 bits make buckets of n/64, so the work grows as n^2. Larger m gives longer keys (64j/m bits) and small
buckets at the cost of more keys per hash; `plan` picks m from the expected number of hashes. The result is
exact for every m: no pair within k is missed, every candidate is verified.

A pair is reported once: in the bucket of the first j-subset (in `combos` order) whose blocks all agree.
Pure: numpy arrays and ints in, pairs out. Beam wiring lives in pipelines/pair_dedup.py.
"""

from __future__ import annotations

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


def plan(k: int, n: int, max_keys: int = 400) -> Plan:
    """The block count with the least estimated work for n uniformly spread hashes: n * keys (filing) plus
    keys * n^2 / 2 / 2^key_bits (verifying), with at most `max_keys` keys per hash."""
    best = None
    for m in range(k + 1, 65):
        j = m - k
        keys = math.comb(m, j)
        if keys > max_keys:
            break
        bits = 64 * j / m
        cost = n * keys * 4 + keys * (n * n / 2) / 2.0 ** min(bits, 60)
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


def first_agreeing_combo(a: int, b: int, p: Plan) -> int:
    """Index of the first combo whose blocks agree between a and b (-1 if none)."""
    agree = [((a ^ b) >> s) & ((1 << w) - 1) == 0 for s, w in p.blocks]
    for ci, c in enumerate(p.combos):
        if all(agree[i] for i in c):
            return ci
    return -1


def to_uint64(hex_hashes) -> np.ndarray:
    return np.array([int(h, 16) for h in hex_hashes], dtype=np.uint64)


def bucket_pairs(hashes: np.ndarray, k: int, p: Plan | None = None, combo_index: int | None = None) -> np.ndarray:
    """Pairs (i, j, distance), i < j, within one bucket (all members share combo `combo_index`'s key): all
    pairs are compared, and with `combo_index` given only pairs whose first agreeing combo is it are kept."""
    n = len(hashes)
    if n < 2:
        return np.empty((0, 3), dtype=np.int64)
    ii, jj = np.triu_indices(n, 1)
    d = np.bitwise_count(hashes[ii] ^ hashes[jj]).astype(np.int64)
    hit = d <= k
    out = np.stack([ii[hit], jj[hit], d[hit]], axis=1).astype(np.int64)
    if combo_index is not None and p is not None and len(out):
        keep = [first_agreeing_combo(int(hashes[a]), int(hashes[b]), p) == combo_index for a, b, _ in out]
        out = out[np.array(keep, dtype=bool)]
    return out


def _runs_within(skey: np.ndarray, shash: np.ndarray, k: int):
    """(a, b) sorted positions of pairs inside equal-key runs within distance k: runs of equal length are
    compared together as one (runs x size) matrix, all pairs of columns at once."""
    n = len(skey)
    starts = np.flatnonzero(np.r_[True, skey[1:] != skey[:-1]])
    sizes = np.diff(np.r_[starts, n])
    many = sizes > 1
    starts, sizes = starts[many], sizes[many]
    for s in np.unique(sizes):
        st = starts[sizes == s]
        iu, ju = np.triu_indices(int(s), 1)
        for lo in range(0, len(st), max(1, 2_000_000 // len(iu))):  # bound memory for huge runs
            part = st[lo:lo + max(1, 2_000_000 // len(iu))]
            m = shash[part[:, None] + np.arange(s)[None, :]]
            r, c = np.nonzero(np.bitwise_count(m[:, iu] ^ m[:, ju]) <= k)
            if r.size:
                yield part[r] + iu[c], part[r] + ju[c]


def near_pairs(hashes: np.ndarray, k: int, p: Plan | None = None, combos: range | list | None = None) -> np.ndarray:
    """All pairs (i, j, distance), i < j, of `hashes` (uint64) within Hamming distance k, each once.

    Per combo: sort by the key, then compare all pairs inside each run of equal keys (vectorised per run
    length), so the work is the sum of squared bucket sizes, all in numpy."""
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    p = p or plan(k, len(hashes))
    values = _block_values(hashes, p)
    found = []
    for ci in (range(len(p.combos)) if combos is None else combos):
        combo = p.combos[ci]
        key = combo_key(values, combo, p)
        bits = sum(p.blocks[b][1] for b in combo)
        if bits <= 32:  # narrow keys sort much faster (radix sort for <= 16 bits)
            key = key.astype(np.uint16 if bits <= 16 else np.uint32)
        order = np.argsort(key, kind="stable")
        for sa, sb in _runs_within(key[order], hashes[order], k):
            a, b = order[sa], order[sb]
            found.append(np.stack([np.minimum(a, b), np.maximum(a, b),
                                   np.bitwise_count(hashes[a] ^ hashes[b]).astype(np.int64)], axis=1))
    if not found:
        return np.empty((0, 3), dtype=np.int64)
    # a pair sharing several combos is found once per combo: keep one
    return np.unique(np.concatenate(found).astype(np.int64), axis=0)


def drop_worse(pairs: np.ndarray, rank: np.ndarray | None = None) -> np.ndarray:
    """Indices to drop: every item with a better-ranked item within distance (lower rank value is better;
    default: the lower index). Deterministic and independent of order; in a chain A~B~C with A not ~ C both
    B and C go."""
    if not len(pairs):
        return np.empty(0, dtype=np.int64)
    a, b = pairs[:, 0], pairs[:, 1]
    if rank is None:
        return np.unique(np.maximum(a, b))
    worse = np.where(rank[a] > rank[b], a, np.where(rank[a] < rank[b], b, np.maximum(a, b)))
    return np.unique(worse)


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
