"""Check that two mmcorpus outputs of the same command hold the same rows: `python demo/same_output.py A B`."""

import os
import sys

import pyarrow.parquet as pq


def tables(out: str) -> dict[str, object]:
    found = {}
    for sub in ("data", "rejects"):
        for name in sorted(os.listdir(os.path.join(out, sub))):
            found[f"{sub}/{name}"] = pq.read_table(os.path.join(out, sub, name))
    return found


def main(a: str, b: str) -> int:
    ta, tb = tables(a), tables(b)
    if sorted(ta) != sorted(tb):
        print(f"different files: {sorted(set(ta) ^ set(tb))}", file=sys.stderr)
        return 1
    differ = [name for name in ta if not ta[name].equals(tb[name])]
    if differ:
        print(f"{len(differ)} files differ, first {differ[0]}", file=sys.stderr)
        return 1
    rows = {sub: sum(t.num_rows for n, t in ta.items() if n.startswith(sub)) for sub in ("data", "rejects")}
    print(f"{a} and {b}: the same {len(ta)} files, {rows['data']} rows and {rows['rejects']} rejects")
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
