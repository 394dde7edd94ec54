"""A pairs job at a size Beam's multi-process DirectRunner (the old default) did not finish: it lost rows and
stage counters there (exit 3). On the default runner every row must arrive, bytes intact. The file is read in
chunks (each its own partition), as a large input is, and gives one shard per chunk."""

import hashlib
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmcorpus.pipelines.cli import main
from mmcorpus.pipelines.runtime.runner import add_runner_args, chosen_runner
from tests.test_card import TINY_CLIP

ROWS = 2000
CHUNK = 300


def caption_rows(coco, folder, n):
    """n caption rows over the bundled photos, each row its own file name (a symlink)."""
    recs = [json.loads(line) for line in (coco / "captions.jsonl").read_text().splitlines() if line.strip()]
    (folder / "imgs").mkdir(parents=True)
    rows = folder / "rows.jsonl"
    with open(rows, "w") as f:
        for i in range(n):
            rec = recs[i % len(recs)]
            link = folder / "imgs" / f"{i:06d}.jpg"
            link.symlink_to(coco / "images" / rec["file_name"])
            f.write(json.dumps({"path": str(link), "caption": rec["captions"][i // len(recs) % 5]}) + "\n")
    return rows


def default_runner() -> str:
    import argparse

    parser = argparse.ArgumentParser()
    add_runner_args(parser)
    return chosen_runner(parser.parse_args([]))


@pytest.mark.slow
def test_pairs_at_scale_on_the_default_runner_keeps_every_row(tmp_path, coco):
    rows = caption_rows(coco, tmp_path / "in", ROWS)
    clip = tmp_path / "tiny-clip.json"
    clip.write_text(json.dumps(TINY_CLIP))
    out = tmp_path / "out"
    assert main(["pairs", str(rows), "-o", str(out), "--clip-model", str(clip), "--allow-random-weights",
                 "--min-clip-score", "-1", "--dedup", "none", "--chunk-rows", str(CHUNK)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["runner"]["runner"] == default_runner()
    assert stats["runner"].get("mode") != "multi_processing"  # never the runner that lost rows
    assert stats["totals"] == {"read": ROWS, "written": ROWS, "rejected": 0, "reject_rows": 0}
    assert all(s["in"] == ROWS == s["out"] for s in stats["stages"] if s["stage"] in stats["main_stages"])
    chunks = -(-ROWS // CHUNK)
    assert stats["read_tasks"] == chunks
    files = sorted((out / "data").glob("*.parquet"))
    assert len(files) == chunks
    table = pa.concat_tables([pq.read_table(f, columns=["image_bytes", "sha256", "image_path"]) for f in files])
    assert table.num_rows == ROWS and len(set(table.column("image_path").to_pylist())) == ROWS
    on_disk = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (coco / "images").iterdir()}
    for data, sha, path in zip(*(table.column(c).to_pylist() for c in ("image_bytes", "sha256", "image_path"))):
        assert hashlib.sha256(data).hexdigest() == sha == on_disk[os.path.basename(os.path.realpath(path))]
    assert not (out / "_tmp").exists()  # the image spool went with the run's scratch folder
