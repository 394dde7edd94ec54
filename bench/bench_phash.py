"""pHash near-duplicate search, timed through the code the pipeline runs: pipelines.pairs.dedup.phash_part
(one worker's share of the multi-index keys; filters.phash_index.duplicates underneath), on synthetic
64-bit hashes with planted copies.

Workload per size n: n uniform random hashes, n/100 planted copies of random originals with 0..k bits
flipped, and n/100 extra copies of ONE hash (blank images: an identical-hash group). Members are the
tuples the pipeline's GroupByKey hands each part: (image_ref, (rank, phash hex, dataset, ())). The P parts
run in P processes, as P Beam workers would; the time includes parsing the hex hashes, sorting by rank and
producing the drop tuples. Checks every planted copy and every blank copy is dropped. Reported: wall time
(process start to results), each part's search wall time, and each part's CPU time (what the search costs on
a core of its own: on a shared machine the wall times are inflated by other jobs).

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

from mmcorpus.filters.phash_index import plan  # noqa: E402
from mmcorpus.pipelines.pairs.dedup import phash_part  # noqa: E402


def synthetic(n: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64 - 1, size=n, dtype=np.uint64, endpoint=True)
    planted = n // 100
    src = rng.integers(0, n, planted)
    flips = np.zeros(planted, dtype=np.uint64)
    for i, c in enumerate(rng.integers(0, k + 1, planted)):
        for b in rng.choice(64, c, replace=False):
            flips[i] |= np.uint64(1) << np.uint64(int(b))
    blank = np.full(n // 100, base[0])
    hashes = np.concatenate([base, base[src] ^ flips, blank])
    return hashes, src, np.arange(n, n + planted), np.arange(n + planted, len(hashes))


def members_of(hashes):
    return [(f"img{i:08d}", ((0.0, f"img{i:08d}", ""), f"{int(h):016x}", "synthetic", ()))
            for i, h in enumerate(hashes.tolist())]


_MEMBERS: list = []


def _init(hashes):
    _MEMBERS[:] = members_of(hashes)


def _part(args):
    k, part, parts = args
    t, c = time.perf_counter(), time.process_time()
    out = list(phash_part(_MEMBERS, k, 0, part, parts, False))
    return out, time.perf_counter() - t, time.process_time() - c


def run(n: int, k: int, procs: int) -> dict:
    hashes, src, copies, blanks = synthetic(n, k)
    started = time.perf_counter()
    with ProcessPoolExecutor(procs, initializer=_init, initargs=(hashes,)) as pool:
        results = list(pool.map(_part, [(k, i, procs) for i in range(procs)]))
    wall = time.perf_counter() - started  # includes starting the processes and building the members there
    dropped = {int(ref[3:]) for out, _, _ in results for tag, (ref, _) in out if tag == "drop"}
    expect_dropped = {max(s, c) for s, c in zip(src.tolist(), copies.tolist())} | set(blanks.tolist())
    p = plan(k, len(np.unique(hashes)))
    return {"n": len(hashes), "planted": len(copies), "blank_copies": len(blanks), "k": k, "blocks": p.m,
            "keys_per_hash": len(p.combos), "dropped": len(dropped),
            "planted_or_blank_missed": len(expect_dropped - dropped),
            "search_seconds_per_part": [round(t, 2) for _, t, _ in results],
            "search_cpu_seconds_per_part": [round(c, 2) for _, _, c in results], "wall_seconds": round(wall, 2),
            "hashes_per_s": round(len(hashes) / wall)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="250000,500000,1000000")
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--procs", type=int, default=2)
    ap.add_argument("--output", default=str(ROOT / "bench" / "results" / "bench_phash.json"))
    args = ap.parse_args()
    results = []
    for n in [int(s) for s in args.sizes.split(",")]:
        r = run(n, args.k, args.procs)
        results.append(r)
        print(json.dumps(r), flush=True)
    growth = [f"{a['n']} -> {b['n']}: x{b['n'] / a['n']:.2f} hashes, x{b['wall_seconds'] / a['wall_seconds']:.2f} time"
              for a, b in zip(results, results[1:])]
    print("\n".join(growth))
    with open(args.output, "w") as f:
        json.dump({"procs": args.procs, "cpu_count": os.cpu_count(), "load_average_at_end": os.getloadavg(),
                   "results": results, "growth": growth,
                   "note": "2-core machine shared with other jobs while measured"}, f, indent=2)
        f.write("\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
