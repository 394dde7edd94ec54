"""A finished output with one data shard damaged (random bytes, or truncated to 0 bytes), as a user meets it
after a bad copy: every command that reads it names the damaged file in one line and exits 2, never a traceback.
Also: a reject's detail keeps its reason whole when the echoed input is huge."""

from __future__ import annotations

import os
import shutil

import pyarrow.parquet as pq
import pytest
import yaml

from mmcorpus.pipelines.cli import main
from tests.test_card import real_run

DAMAGES = {"random_bytes": lambda n: os.urandom(max(n, 4096)), "empty": lambda n: b""}


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory, shared_data):
    return real_run("pairs", tmp_path_factory, shared_data)


@pytest.fixture(params=sorted(DAMAGES))
def damaged(request, pairs_run, tmp_path):
    """A copy of a finished pairs output whose first data shard is damaged; (folder, damaged file)."""
    out = tmp_path / "pairs"
    shutil.copytree(pairs_run, out)
    victim = sorted((out / "data").iterdir())[0]
    victim.write_bytes(DAMAGES[request.param](victim.stat().st_size))
    return out, victim


def one_clear_line(err: str, victim) -> None:
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert str(victim) in lines[0], err


@pytest.mark.parametrize("command", ["card", "inspect"])
def test_readers_of_an_output_name_the_damaged_shard(damaged, command, capsys):
    out, victim = damaged
    assert main([command, str(out)]) == 2
    one_clear_line(capsys.readouterr().err, victim)


def test_pairs_on_a_damaged_output_names_the_file(damaged, tmp_path, capsys):
    out, victim = damaged
    assert main(["pairs", str(out), "-o", str(tmp_path / "p"), "--allow-random-weights"]) == 2
    err = capsys.readouterr().err
    one_clear_line(err, victim)
    assert "non-mmcorpus" not in err


@pytest.mark.parametrize("target", ["file", "folder"])
def test_train_names_the_damaged_parquet(damaged, target, tmp_path, capsys):
    out, victim = damaged
    cfg = {"model": {"vision": "none", "lm": "none", "tokenizer": "none", "allow_random_weights": True},
           "data": {"datasets": [{"name": "p", "kind": "pair",
                                  "path": str(victim if target == "file" else out / "data")}]},
           "train": {"steps": 1}}
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(path), "--output", str(tmp_path / "run")]) == 2
    one_clear_line(capsys.readouterr().err, victim)


def test_reject_detail_keeps_the_reason_of_a_huge_url(tmp_path, shared_data):
    """A 10,000-character ftp:// URL is refused before any request: the stored detail is cut in the middle of the
    URL, so the reason after it survives whole, and the URL's start too."""
    long_url = "ftp://127.0.0.1/" + "a" * 10_000 + ".html"
    lists = tmp_path / "urls.txt"
    lists.write_text(long_url + "\n")
    out = tmp_path / "out"
    assert main(["interleaved", str(lists), "-o", str(out), "--no-images", "--workers", "1"]) == 0
    rows = [r for f in sorted((out / "rejects").iterdir()) for r in pq.read_table(f).to_pylist()]
    assert len(rows) == 1
    detail = rows[0]["detail"]
    assert rows[0]["reason"] == "url_not_allowed"
    assert len(detail) <= 2000 and "characters cut" in detail
    assert detail.startswith("ftp://127.0.0.1/aaa") and detail.endswith(".html: scheme 'ftp' is not http(s)")
