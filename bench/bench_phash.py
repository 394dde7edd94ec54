"""pHash near-duplicate search with filters.phash_index on synthetic 64-bit hashes with planted copies.

n uniform random hashes plus n/100 planted copies of random originals with 0..k bits flipped; all pairs within
Hamming distance k are found (multi-index hashing; the key combos are split over P worker processes) and the
survivors chosen (drop every item with a better-ranked item within k). Checks every planted copy is found.
Sizes 250k, 500k, 1M show how the time grows.

    python bench/bench_phash.py [--sizes 250000,500000,1000000] [--k 10] [--procs 2]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from filters.phash_index import drop_worse, near_pairs, plan  # noqa: E402


def synthetic(n: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    planted = n // 100
    src = rng.integers(0, n, planted)
    flips = np.zeros(planted, dtype=np.uint64)
    counts = rng.integers(0, k + 1, planted)
    for i in range(planted):
        for b in rng.choice(64, counts[i], replace=False):
            flips[i] |= np.uint64(1) << np.uint64(int(b))
    hashes = np.concatenate([base, base[src] ^ flips])
    return hashes, src, np.arange(n, n + planted)


def _part(args):
    hashes, k, p, combos = args
    return near_pairs(hashes, k, p, combos)


def run(n: int, k: int, procs: int) -> dict:
    hashes, src, copies = synthetic(n, k)
    p = plan(k, len(hashes))
    started = time.perf_counter()
    parts = [range(i, len(p.combos), procs) for i in range(procs)]
    with ProcessPoolExecutor(procs) as pool:
        found = list(pool.map(_part, [(hashes, k, p, c) for c in parts]))
    pairs = np.unique(np.concatenate(found), axis=0)
    drops = drop_worse(pairs)
    elapsed = time.perf_counter() - started
    got = {(int(a), int(b)) for a, b, _ in pairs}
    missed = sum((min(s, c), max(s, c)) not in got for s, c in zip(src, copies))
    return {"n": len(hashes), "planted": len(copies), "k": k, "blocks": p.m, "keys_per_hash": len(p.combos),
            "pairs_found": len(pairs), "dropped": len(drops), "planted_missed": missed,
            "seconds": round(elapsed, 2), "hashes_per_s": round(len(hashes) / elapsed)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="250000,500000,1000000")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--procs", type=int, default=2)
    args = ap.parse_args()
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        r = run(n, args.k, args.procs)
        results.append(r)
        print(json.dumps(r), flush=True)
    for a, b in zip(results, results[1:]):
        print(f"{a['n']} -> {b['n']}: x{b['n'] / a['n']:.2f} hashes, x{b['seconds'] / a['seconds']:.2f} time")
    out = ROOT / "bench" / "results" / "bench_phash.json"
    out.write_text(json.dumps({"procs": args.procs, "cpu_count": os.cpu_count(), "results": results,
                               "note": "2-core machine shared with other jobs while measured"}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
