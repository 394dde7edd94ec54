"""Remote I/O end to end with real components: moto's S3 server and loopback HTTP servers (Range support, a
connection cut mid-WARC) on 127.0.0.1. Inputs on S3/HTTP, outputs on S3, under Direct and Dask; a run killed
on S3 resumes to the same files; the output opens with DuckDB and `datasets` straight from S3."""

from __future__ import annotations

import gzip
import json
import os
import pathlib
import signal
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from mmcorpus import schemas
from mmcorpus.pipelines.cli import main
from mmcorpus.schemas import storage
from tests.remote_servers import S3_ENV, dask_hosts, range_server

ROOT = pathlib.Path(__file__).resolve().parents[1]
SECRET = S3_ENV["AWS_SECRET_ACCESS_KEY"]


def s3_tables(out: str) -> dict:
    """Every data/ and rejects/ file of an output, as demo/same_output.py compares them."""
    found = {}
    for sub in ("data", "rejects"):
        for name in storage.listdir(f"{out}/{sub}"):
            found[f"{sub}/{name}"] = schemas.open_parquet(f"{out}/{sub}/{name}").read()
    return found


def stats_of(out: str) -> dict:
    return json.loads(storage.read_bytes(f"{out}/stats.json"))


@pytest.fixture(scope="module")
def warcs(shared_data, tmp_path_factory):
    """Two small WARCs: a real Common Crawl one and a copy cut at 60% (a truncated remote object)."""
    folder = tmp_path_factory.mktemp("warcs")
    whole = (shared_data / "cc-whirlwind" / "whirlwind.warc.gz").read_bytes()
    (folder / "whirlwind.warc.gz").write_bytes(whole)
    (folder / "truncated.warc.gz").write_bytes(whole[: len(whole) * 6 // 10])
    return folder


@pytest.fixture(scope="module")
def s3_runs(s3_endpoint, warcs, tmp_path_factory):
    """The WARCs uploaded to s3://mm-in/warcs/, run into s3://mm-out/ by the Direct runner and by Dask on a
    scheduler and a worker started as separate commands, the worker in its own empty folder (no shared disk)."""
    import boto3

    client = boto3.client("s3")
    for bucket in ("mm-in", "mm-out"):
        client.create_bucket(Bucket=bucket)
    for f in sorted(warcs.iterdir()):
        client.upload_file(str(f), "mm-in", f"warcs/{f.name}")
    src = "s3://mm-in/warcs/*.warc.gz"
    assert main(["interleaved", src, "-o", "s3://mm-out/direct", "--no-images", "--workers", "1",
                 "--storage-option", f"s3:secret={SECRET}", "--storage-option", "s3:key=testing"]) == 0
    with dask_hosts(tmp_path_factory.mktemp("hosts")) as address:
        # Dask reads each WARC in byte ranges of 4 kB, each from its own offset on S3
        assert main(["interleaved", src, "-o", "s3://mm-out/dask", "--no-images", "--runner", "dask",
                     "--dask-address", address, "--warc-part-mb", "0.004"]) == 0
    return "s3://mm-out/direct", "s3://mm-out/dask"


def test_direct_and_dask_write_the_same_files_to_s3(s3_runs):
    direct, dask = s3_runs
    a, b = s3_tables(direct), s3_tables(dask)
    assert sorted(a) == sorted(b) and len(a) == 8
    assert [n for n in a if not a[n].equals(b[n])] == []
    stats = stats_of(direct)
    t = stats["totals"]
    assert t["written"] > 0 and t["read"] == t["written"] + t["rejected"]
    assert sum(x.num_rows for n, x in a.items() if n.startswith("rejects/")) == t["reject_rows"]
    assert stats["runner"]["runner"] == "direct" and stats_of(dask)["runner"]["runner"] == "dask"
    sources = {s for n, x in a.items() for s in x.column("source").to_pylist()}
    assert all(s.startswith("s3://mm-in/warcs/") for s in sources)
    reasons = {r for n, x in a.items() if n.startswith("rejects/") for r in x.column("reason").to_pylist()}
    assert "warc_file_truncated" in reasons  # the cut copy: one reject, the run went on
    names = storage.listdir(direct)
    assert "_SUCCESS" in names and "_tmp" not in names and "_progress" not in names


def test_secrets_never_reach_stats_or_run_file(s3_runs):
    direct, _ = s3_runs
    for name in ("stats.json", "_run.json"):
        assert SECRET not in storage.read_bytes(f"{direct}/{name}").decode()
    argv = stats_of(direct)["argv"]
    assert "s3:secret=***" in argv and "s3:key=***" in argv


def test_output_opens_with_duckdb_and_datasets_straight_from_s3(s3_runs, monkeypatch, tmp_path):
    import datasets
    import duckdb
    import fsspec
    from datasets import load_dataset

    direct, _ = s3_runs
    written = stats_of(direct)["totals"]["written"]
    con = duckdb.connect()
    con.register_filesystem(fsspec.filesystem("s3"))
    assert con.sql(f"select count(*) from read_parquet('{direct}/data/*.parquet')").fetchall()[0][0] == written
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)  # the tests' hub guard; S3 here is loopback
    ds = load_dataset("parquet", data_files=f"{direct}/data/*.parquet", split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == written and set(ds.column_names) == set(schemas.INTERLEAVED.names)


def test_listing_over_http_survives_a_cut_connection(s3_runs, warcs, tmp_path):
    """A warc.paths.gz listing on S3 whose relative lines point at an HTTP server that cuts the first response
    reaching the middle of each WARC: the reader resumes with a Range request at the offset reached, and the
    documents are those of the S3 run. --skip/--limit slice the listing; a line that is no path is one reject."""
    d = warcs.name
    lines = [f"{d}/not-in-slice.warc.gz", f"{d}/whirlwind.warc.gz", "this line is not a path", f"{d}/never-read.warc.gz"]
    storage.write_bytes("s3://mm-in/lists/warc.paths.gz", gzip.compress("\n".join(lines).encode() + b"\n"))
    with range_server(warcs.parent) as server:
        out = tmp_path / "out"
        assert main(["interleaved", "s3://mm-in/lists/warc.paths.gz", "--path-prefix", f"{server.url}/cut/",
                     "--skip", "1", "--limit", "2", "-o", str(out), "--no-images", "--workers", "1"]) == 0
        starts = [start for path, start in server.requests if path.endswith("whirlwind.warc.gz")]
    # cut once, then read again (a 4 MB block holds this small WARC whole: the resume starts at byte 0 here;
    # test_resuming_reader_resumes_at_the_offset_reached shows a resume mid-file)
    assert len(server.cut_done) == 1 and len(starts) == 2
    stats = json.loads((out / "stats.json").read_text())
    t = stats["totals"]
    assert t["read"] == t["written"] + t["rejected"]
    rejects = pq.read_table(out / "rejects").to_pylist()
    bad = [r for r in rejects if r["reason"] == "listing_bad_line"]
    assert len(bad) == 1 and bad[0]["source"] == "s3://mm-in/lists/warc.paths.gz:3"
    assert not any("never-read" in r["source"] or "not-in-slice" in r["source"] for r in rejects)
    texts = sorted(map(str, pq.read_table(out / "data").column("texts").to_pylist()))
    whirl = [r for n, x in s3_tables(s3_runs[0]).items() if n.startswith("data/") for r in x.to_pylist()
             if "whirlwind" in r["source"]]
    assert texts and texts == sorted(str(r["texts"]) for r in whirl)  # the same documents as read from S3


def test_resuming_reader_resumes_at_the_offset_reached(warcs, monkeypatch):
    path = warcs / "whirlwind.warc.gz"
    with range_server(warcs) as server:
        r = storage.ResumingReader(f"{server.url}/cut/whirlwind.warc.gz", block_size=4096, backoff=0.01)
        chunks = iter(lambda: r.read(1000), b"")
        assert b"".join(chunks) == path.read_bytes() and r.resumes == 1
        middle = path.stat().st_size // 2
        retried = [s for _, s in server.requests[server.requests.index(max(
            (q for q in server.requests if q[1] <= middle), key=lambda q: q[1])) + 1:]]
        assert retried and 0 < retried[0] <= middle  # the retry starts where the data stopped, not at 0
        from mmcorpus.pipelines.interleaved import sources

        monkeypatch.setattr(sources, "REMOTE_RETRY", (3, 0.01))  # the run's setting, shortened
        items = list(sources.read_items(("warc", f"{server.url}/dead/whirlwind.warc.gz")))
    failed = [i for i in items if i.get("_reject", ("",))[0] == "read_failed"]
    assert len(failed) == 1 and "/dead/whirlwind.warc.gz" in failed[0]["source"]
    assert "after 3 retries" in failed[0]["_reject"][1]


@pytest.mark.parametrize("source, output, message", [
    ("s3://mm-in/warcs/*.nothing.gz", "s3://mm-out/bad1", "the glob matches nothing"),
    ("s3://no-such-bucket/x.warc.gz", "s3://mm-out/bad2", "does not exist"),
    ("s3://mm-in/warcs/missing.warc.gz", "s3://mm-out/bad3", "does not exist"),
    ("s3://mm-in/warcs/whirlwind.warc.gz", "s3://no-such-bucket/out", "bucket or folder does not exist"),
])
def test_bad_remote_input_is_one_line_exit_2(s3_runs, capsys, source, output, message):
    assert main(["interleaved", source, "-o", output, "--no-images", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_denied_http_input_is_named(warcs, tmp_path, capsys):
    with range_server(warcs) as server:
        url = f"{server.url}/denied/whirlwind.warc.gz"
        assert main(["interleaved", url, "-o", str(tmp_path / "o"), "--no-images", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and url in err[0] and "access denied (HTTP 403)" in err[0]


# A run on S3 that SIGKILLs itself right after its second shard reached its final key.
KILLED = """
import os, signal, sys
from mmcorpus.schemas import storage
from mmcorpus.pipelines.cli import main
moved, original = [], storage.move
def move(src, dst):
    original(src, dst)
    if "/part-" in dst:
        moved.append(dst)
        if len(moved) == 2:
            os.kill(os.getpid(), signal.SIGKILL)
storage.move = move
main(["interleaved", "s3://mm-in/warcs/*.warc.gz", "-o", sys.argv[1], "--no-images", "--workers", "1"])
"""


def test_killed_run_on_s3_resumes_to_identical_files(s3_runs):
    out = "s3://mm-out/killed"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    child = subprocess.run([sys.executable, "-c", KILLED, out], capture_output=True, text=True, timeout=300, env=env)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    names = storage.listdir(out)
    assert "_run.json" in names and "_SUCCESS" not in names and "stats.json" not in names
    done = sum(len(storage.listdir(f"{out}/{d}")) for d in ("data", "rejects"))
    assert done == 2
    assert main(["interleaved", "s3://mm-in/warcs/*.warc.gz", "-o", out, "--no-images", "--workers", "1"]) == 0
    assert stats_of(out)["resumed"]
    a, b = s3_tables(s3_runs[0]), s3_tables(out)
    assert sorted(a) == sorted(b) and [n for n in a if not a[n].equals(b[n])] == []


def test_later_steps_accept_s3_outputs(s3_runs, coco, tmp_path, capsys):
    """pairs reads a table whose images sit on S3 and writes to S3; inspect, card, the trainer's reader and
    capfilt's input check take that S3 output; pairs recognises the interleaved S3 output."""
    from mmcorpus.pipelines.capfilt.command import check_inputs, input_files
    from mmcorpus.pipelines.pairs.sources import detect
    from mmcorpus.trainer.data import DatasetSpec, check_dataset
    from tests.test_pairs import TINY

    rows = [json.loads(line) for line in (coco / "captions.jsonl").read_text().splitlines()[:6]]
    table = "".join(json.dumps({"path": f"images/{r['file_name']}", "caption": r["captions"][0]}) + "\n"
                    for r in rows)
    storage.write_bytes("s3://mm-in/coco/pairs.jsonl", table.encode())
    for r in rows:
        storage.write_bytes(f"s3://mm-in/coco/images/{r['file_name']}", (coco / "images" / r["file_name"]).read_bytes())
    clip = tmp_path / "mmcorpus-tiny-clip.json"
    clip.write_text(json.dumps(TINY))
    out = "s3://mm-out/pairs"
    assert main(["pairs", "s3://mm-in/coco/pairs.jsonl", "-o", out, "--allow-random-weights", "--clip-model",
                 str(clip), "--num-shards", "2", "--workers", "1"]) == 0
    t = stats_of(out)["totals"]
    assert t["written"] == 6 and t["read"] == t["written"] + t["rejected"]
    kept = [r for x in s3_tables(out).values() for r in x.to_pylist() if "caption" in r]
    assert all(r["image_bytes"] for r in kept)  # read from s3://mm-in/coco/images/
    capsys.readouterr()
    assert main(["inspect", out, "-n", "1"]) == 0
    printed = capsys.readouterr().out
    assert "== 1 of 6 kept pairs ==" in printed and "pairs:s3://mm-in/coco/images/" in printed
    assert main(["card", out]) == 0
    names = storage.listdir(out)
    assert "README.md" in names and any(n.endswith(".png") for n in names)
    assert "num_examples: 6" in storage.read_bytes(f"{out}/README.md").decode()
    assert check_dataset(DatasetSpec("coco", out, "pair")) == 6
    files = input_files(out)
    check_inputs(files)
    assert len(files) == 2 and all(f.startswith(f"{out}/data/") for f in files)
    assert detect(s3_runs[0]).kind == "interleaved"
