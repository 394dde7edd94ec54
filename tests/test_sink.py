"""The one-leaf Parquet sink under DirectRunner and DaskRunner, resume after a kill, and the count check."""

import argparse
import json
import os
import signal
import subprocess
import sys

import apache_beam as beam
import pyarrow.parquet as pq
import pytest

from mmcorpus import schemas
from mmcorpus.filters.reasons import Reject
from mmcorpus.pipelines.errors import RunCheckError, UserError
from mmcorpus.pipelines.runtime.run import RunSpec, execute
from mmcorpus.pipelines.runtime.runner import add_runner_args
from mmcorpus.pipelines.runtime.sink import Kind
from mmcorpus.pipelines.runtime.stage import CPU_METRIC, Collector

MIN_WORDS = 10


def caption_rows(coco_dir):
    rows = []
    with open(coco_dir / "captions.jsonl") as f:
        for line in f:
            rec = json.loads(line)
            for i, caption in enumerate(rec["captions"]):
                rows.append({"image_id": f"{rec['image_id']}-{i}", "url": rec["flickr_url"], "caption": caption,
                             "caption_source": "web", "source_dataset": "coco-mini"})
    return rows


def keep_long(row):
    n = len(row["caption"].split())
    return row if n >= MIN_WORDS else Reject("caption_too_short", f"{n} words")


def image_id(row):
    return row["image_id"]


def build_for(rows, stages=lambda c, src: c.stage(src, "length", keep_long, source_of=image_id)):
    """Read `rows`, run `stages(collector, rows)` (default: stage "length"), write what it keeps."""
    def build(p):
        c = Collector()
        src = p | "Read" >> beam.Create(rows)
        c.count(src, "read", "in")
        c.count(src, "read", "out")
        kept = stages(c, src)
        c.add(kept | "ToSink" >> beam.Map(lambda r: ("data", r["image_id"], r)))
        return c.finish()
    return build


def run_args(runner="direct", workers=1):
    parser = argparse.ArgumentParser()
    add_runner_args(parser)
    return parser.parse_args(["--runner", runner, "--workers", str(workers)])


def spec(out, inputs, overwrite=False):
    return RunSpec(command="test-sink", out_dir=str(out), config={"min_words": MIN_WORDS}, inputs=inputs,
                   kinds={"data": Kind("pair", "data", 4)}, stages=["read", "length"], overwrite=overwrite)


def shard_bytes(out):
    files = {}
    for sub in ("data", "rejects", "_stats"):
        for name in sorted(os.listdir(out / sub)):
            files[f"{sub}/{name}"] = pq.read_table(out / sub / name).to_pylist()
    return files


def test_direct_and_dask_write_identical_shards(tmp_path, coco):
    rows = caption_rows(coco)
    inputs = [str(coco / "captions.jsonl")]
    direct = execute(spec(tmp_path / "direct", inputs), run_args("direct", 2), build_for(rows))
    dask = execute(spec(tmp_path / "dask", inputs), run_args("dask", 2), build_for(rows))
    expected_kept = sum(len(r["caption"].split()) >= MIN_WORDS for r in rows)
    for stats in (direct, dask):
        assert stats["totals"] == {"read": len(rows), "written": expected_kept,
                                   "rejected": len(rows) - expected_kept, "reject_rows": len(rows) - expected_kept}
    a, b = shard_bytes(tmp_path / "direct"), shard_bytes(tmp_path / "dask")
    assert sorted(a) == sorted(b) == sorted([f"data/part-0000{i}-of-00004.parquet" for i in range(4)]
                                           + [f"rejects/part-0000{i}-of-00004.parquet" for i in range(4)]
                                           + ["_stats/part-00000-of-00001.parquet"])
    # CPU time per stage is measured, so it differs run to run: every other counter row is the same
    timing = {f: [(r["stage"], r["metric"]) for r in rs if r.get("metric") == CPU_METRIC] for f, rs in a.items()}
    assert timing["_stats/part-00000-of-00001.parquet"] and timing == {
        f: [(r["stage"], r["metric"]) for r in rs if r.get("metric") == CPU_METRIC] for f, rs in b.items()}
    untimed = [{f: [r for r in rs if r.get("metric") != CPU_METRIC] for f, rs in x.items()} for x in (a, b)]
    assert untimed[0] == untimed[1]
    kept = [r for f, rs in a.items() if f.startswith("data/") for r in rs]
    assert sorted(r["image_id"] for r in kept) == sorted(r["image_id"] for r in rows if len(r["caption"].split()) >= MIN_WORDS)
    assert (tmp_path / "direct" / "_SUCCESS").exists()
    assert not (tmp_path / "direct" / "_tmp").exists()


def test_finished_output_is_refused_then_overwritten(tmp_path, coco):
    rows = caption_rows(coco)[:50]
    execute(spec(tmp_path, []), run_args(), build_for(rows))
    with pytest.raises(UserError, match="already holds a finished run"):
        execute(spec(tmp_path, []), run_args(), build_for(rows))
    stats = execute(spec(tmp_path, [], overwrite=True), run_args(), build_for(rows))
    assert stats["totals"]["read"] == 50 and not stats["resumed"]


# Run the sink in a child process that SIGKILLs itself right after its second shard file was renamed into place,
# and once more half-way through writing a third shard's temporary file: a kill at a known point mid-run.
KILLED_RUN = """
import os, signal, sys
import pyarrow.parquet as pq
from mmcorpus.pipelines.runtime import sink
from tests.test_sink import build_for, caption_rows, run_args, spec
from mmcorpus.pipelines.runtime.run import execute
import pathlib

out, coco = sys.argv[1], pathlib.Path(sys.argv[2])
written = []
original_replace, original_writer = os.replace, pq.ParquetWriter

def writer(where, *a, **kw):
    if len(written) == 2:  # the third shard: leave half a temporary file, then die
        with open(where, "wb") as f:
            f.write(b"PAR1" + b"x" * 1000)
        os.kill(os.getpid(), signal.SIGKILL)
    return original_writer(where, *a, **kw)

def replace(src, dst):
    original_replace(src, dst)
    if os.path.basename(dst).startswith("part-"):
        written.append(dst)

os.replace, sink.pq.ParquetWriter = replace, writer
execute(spec(out, [str(coco / "captions.jsonl")]), run_args("direct", 1), build_for(caption_rows(coco)))
"""


def test_killed_run_resumes_with_every_row_exactly_once(tmp_path, coco):
    out = tmp_path / "out"
    child = subprocess.run([sys.executable, "-c", KILLED_RUN, str(out), str(coco)], capture_output=True, text=True,
                           timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    finished = sorted((out / "data").glob("part-*.parquet")) + sorted((out / "rejects").glob("part-*.parquet"))
    assert len(finished) == 2 and not (out / "_SUCCESS").exists() and not (out / "stats.json").exists()
    assert list((out / "_tmp").iterdir())  # the half-written shard: never under data/ or rejects/
    kept = {f: os.stat(f).st_mtime_ns for f in finished}
    rows = caption_rows(coco)
    stats = execute(spec(out, [str(coco / "captions.jsonl")]), run_args("direct", 1), build_for(rows))
    assert stats["resumed"] and (out / "_SUCCESS").exists() and not (out / "_tmp").exists()
    assert {f: os.stat(f).st_mtime_ns for f in finished} == kept  # finished shards were not rewritten
    ids = pq.read_table(out / "data").column("image_id").to_pylist()
    rejected = pq.read_table(out / "rejects").column("source").to_pylist()
    assert len(ids) == len(set(ids)) == stats["totals"]["written"]
    assert sorted(ids + rejected) == sorted(r["image_id"] for r in rows)  # every row exactly once


def test_resume_with_other_shard_count_is_refused(tmp_path, coco):
    rows = caption_rows(coco)[:20]
    execute(spec(tmp_path, []), run_args(), build_for(rows))
    os.remove(tmp_path / "_SUCCESS")
    other = spec(tmp_path, [])
    other.kinds = {"data": Kind("pair", "data", 8)}
    with pytest.raises(UserError, match="shard count"):
        execute(other, run_args(), build_for(rows))


def test_resume_keeps_finished_shards_and_writes_each_row_once(tmp_path, coco):
    rows = caption_rows(coco)
    execute(spec(tmp_path, []), run_args(), build_for(rows))
    # What a killed run leaves: some shards, a half-written temp file, no stats or _SUCCESS.
    for name in ("_SUCCESS", "stats.json", "data/part-00001-of-00004.parquet", "rejects/part-00002-of-00004.parquet"):
        os.remove(tmp_path / name)
    kept_before = os.stat(tmp_path / "data/part-00000-of-00004.parquet").st_mtime_ns
    os.makedirs(tmp_path / "_tmp")
    (tmp_path / "_tmp" / "data-00001-half.parquet").write_bytes(b"PAR1 half a file")
    stats = execute(spec(tmp_path, []), run_args(), build_for(rows))
    assert stats["resumed"]
    assert os.stat(tmp_path / "data/part-00000-of-00004.parquet").st_mtime_ns == kept_before
    ids = pq.read_table(tmp_path / "data").column("image_id").to_pylist()
    assert len(ids) == len(set(ids)) == stats["totals"]["written"]


def test_resume_with_other_config_is_refused(tmp_path, coco):
    rows = caption_rows(coco)[:20]
    execute(spec(tmp_path, []), run_args(), build_for(rows))
    os.remove(tmp_path / "_SUCCESS")
    other = spec(tmp_path, [])
    other.config = {"min_words": 3}
    with pytest.raises(UserError, match="unfinished run with another"):
        execute(other, run_args(), build_for(rows))


def test_count_check_fails_loudly_when_rows_go_missing(tmp_path, coco):
    rows = caption_rows(coco)[:40]

    def lossy(p):
        c = Collector()
        src = p | beam.Create(rows)
        c.count(src, "read", "in")
        c.count(src, "read", "out")
        kept = c.stage(src, "length", keep_long, source_of=lambda r: r["image_id"])
        # a broken runner or transform: drops every other kept row after it was counted
        c.add(kept | beam.Filter(lambda r: int(r["image_id"].split("-")[1]) % 2 == 0)
              | beam.Map(lambda r: ("data", r["image_id"], r)))
        return c.finish()

    with pytest.raises(RunCheckError, match="rows in data/"):
        execute(spec(tmp_path, []), run_args(), lossy)
    assert not (tmp_path / "_SUCCESS").exists()


def test_non_writable_output_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is not a folder"):
        execute(spec(blocker, []), run_args(), build_for([]))


def test_rows_cross_the_shuffle_as_run_file_sections(tmp_path, coco, monkeypatch):
    """The sink's shuffle carries references: a bundle's rows go to run files (a new one each RUN_BYTES), a
    section per shard, and a shard's sections give back exactly its rows."""
    from mmcorpus.pipelines.runtime import sink

    monkeypatch.setattr(sink, "RUN_BYTES", 20_000)
    rows = caption_rows(coco)
    kinds = {"data": Kind("pair", "data", 4)}
    spill = sink._SpillRuns(str(tmp_path), kinds)
    spill.start_bundle()
    refs = [out for r in rows for out in spill.process(("data", r["image_id"], r))]
    refs += [wv.value for wv in spill.finish_bundle()]
    runs = {section.path for _, section in refs}
    assert len(runs) > 2 and all(os.path.dirname(p) == str(tmp_path / "_tmp" / "runs") for p in runs)
    by_shard: dict = {}
    for (kind, shard), section in refs:
        assert kind == "data"
        by_shard.setdefault(shard, []).extend(section.items())
    assert sorted(by_shard) == [0, 1, 2, 3]
    for shard, items in by_shard.items():
        assert all(sink.stable_hash(key) % 4 == shard for key, _ in items)
    back = sorted((key, json.dumps(row, sort_keys=True)) for items in by_shard.values() for key, row in items)
    assert back == sorted((r["image_id"], json.dumps(r, sort_keys=True)) for r in rows)
    with pytest.raises(ValueError, match="unknown kind 'other'"):
        list(spill.process(("other", "k", {})))


def no_dogs(row):
    """The caption up to its first comma; a caption naming a dog is rejected."""
    if "dog" in row["caption"].lower():
        return Reject("caption_boilerplate", row["caption"][:40])
    return dict(row, caption=row["caption"].split(",", 1)[0])


def keep_short(row):
    n = len(row["caption"].split())
    return row if n <= 14 else Reject("caption_too_long", f"{n} words")


STEPS = [("length", keep_long, None), ("no_dogs", no_dogs, None), ("short", keep_short, None)]


def stages_one_by_one(c, src):
    for name, fn, _ in STEPS:
        src = c.stage(src, name, fn, source_of=image_id)
    return src


def test_chained_stages_write_what_the_stages_one_by_one_write(tmp_path, coco):
    """Stages chained in one DoFn (Collector.chain: how `interleaved` takes a page to a document) keep, change,
    reject and count exactly as the same stages applied one after the other."""
    rows = caption_rows(coco)
    runs = {}
    for chained in (False, True):
        out = tmp_path / f"chained-{chained}"
        stages = (lambda c, src: c.chain(src, "Chain", STEPS, image_id)) if chained else stages_one_by_one
        stats = execute(RunSpec(command="test-sink", out_dir=str(out), config={}, inputs=[],
                                kinds={"data": Kind("pair", "data", 4)}, stages=["read"] + [s[0] for s in STEPS]),
                        run_args("dask", 2), build_for(rows, stages))
        runs[chained] = ({f: [r for r in rs if r.get("metric") != CPU_METRIC] for f, rs in shard_bytes(out).items()},
                         stats)
    (one_by_one, stats_a), (chained, stats_b) = runs[False], runs[True]
    assert one_by_one == chained
    stages = {s["stage"]: s for s in stats_b["stages"]}
    assert all(stages[name]["rejected"] > 0 and stages[name]["out"] > 0 for name, _, _ in STEPS)
    assert stages["short"]["in"] == stages["no_dogs"]["out"] and stages["no_dogs"]["in"] == stages["length"]["out"]
    assert all("," not in r["caption"] for f, rs in chained.items() if f.startswith("data/") for r in rs)
    assert all(stages[name]["cpu_seconds"] is not None for name, _, _ in STEPS)
    assert stats_a["totals"] == stats_b["totals"]
