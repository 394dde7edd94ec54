"""Read the demo's exports back the way training jobs do, and check them against the Parquet they came from.

For each SOURCE EXPORT_DIR pair (EXPORT_DIR holds webdataset/ and hf/ from `mmcorpus export`):
- the WebDataset tars with the `webdataset` library: pairs as (image, txt, json) samples whose image bytes are
  the stored ones; documents as MMC4 JSON (OpenFlamingo reads `text_list` and `image_info[*].image_base64`);
- the Hugging Face folder with `datasets.load_dataset`, images decoded to PIL.

Usage: python demo/read_exports.py SOURCE EXPORT_DIR [SOURCE EXPORT_DIR ...]
"""

from __future__ import annotations

import base64
import glob
import json
import os
import sys

import pyarrow.parquet as pq


def check(source: str, exported: str) -> None:
    import datasets
    import webdataset as wds

    rows = pq.read_table(os.path.join(source, "data")).to_pylist()
    pairs = "image_id" in rows[0]
    by_id = {r["image_id"] if pairs else r["doc_id"]: r for r in rows}
    tars = sorted(glob.glob(os.path.join(exported, "webdataset", "data", "*.tar")))
    n = same = 0
    for sample in wds.WebDataset(tars, shardshuffle=False):
        meta = json.loads(sample["json"])
        if pairs:
            image = next(sample[e] for e in ("jpg", "png", "webp", "gif") if e in sample)
            same += image == by_id[meta["image_id"]]["image_bytes"]
        else:
            doc = by_id[meta["doc_id"]]
            stored = [i["bytes"] for i in doc["image_info"] if i is not None]
            same += [base64.b64decode(i["image_base64"]) for i in meta["image_info"]] == stored
        n += 1
    ds = datasets.load_dataset(os.path.join(exported, "hf"), split="train")
    first = ds[0]["image"] if pairs else next(i for i in ds[0]["images"] if i is not None)
    print(f"{source}: {len(rows)} rows; webdataset {n} samples in {len(tars)} tar(s), {same} with identical image "
          f"bytes; datasets {len(ds)} rows, first image {type(first).__name__} {first.size}")
    if not (n == same == len(ds) == len(rows)):
        raise SystemExit(f"{exported}: exports do not match {source}")


def main(argv: list[str]) -> int:
    if len(argv) < 2 or len(argv) % 2:
        print(__doc__, file=sys.stderr)
        return 2
    for source, exported in zip(argv[::2], argv[1::2]):
        check(source, exported)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
