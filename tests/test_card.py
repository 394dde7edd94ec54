"""`mmcorpus card` on real runs of `mmcorpus interleaved` (trafilatura-eval pages) and `mmcorpus pairs` (coco-mini
photos with a tiny random CLIP): front matter, counts against stats.json and the Parquet files, plots, and the
card's configs loaded by Hugging Face datasets and DuckDB."""

import collections
import hashlib
import json
import os
import re
import shutil

import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmcorpus.pipelines.outputs.card import parse_card
from mmcorpus.pipelines.cli import main
from mmcorpus.trainer import report as R
from tests.test_capfilt import models  # noqa: F401  (fixture: tiny random BLIP captioner and ITM folders)

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
_RUNS: dict = {}  # one run per kind for this session, shared with tests/test_inspect.py


def real_run(kind: str, tmp_path_factory, shared_data, blip=None):
    """Output folder of a real pipeline command on bundled data (run once per session)."""
    if kind in _RUNS:
        return _RUNS[kind]
    base = tmp_path_factory.mktemp(f"run-{kind}")
    out = base / kind
    if kind == "capfilt":  # over the pairs run's output
        code = main(["capfilt", str(real_run("pairs", tmp_path_factory, shared_data)), "--output", str(out),
                     "--captioner", blip["captioner"], "--itm", blip["itm"], "--num-captions", "1",
                     "--itm-threshold", "0.5203", "--workers", "1", "--num-shards", "2"])
    elif kind == "interleaved":
        code = main(["interleaved", str(shared_data / "trafilatura-eval" / "pages"), "-o", str(out), "--no-images",
                     "--workers", "1", "--num-shards", "2"])
    else:
        clip = base / "mmcorpus-tiny-clip.json"
        clip.write_text(json.dumps(TINY_CLIP))
        code = main(["pairs", str(shared_data / "coco-mini"), "--output", str(out), "--allow-random-weights",
                     "--clip-model", str(clip), "--workers", "1", "--num-shards", "2", "--min-clip-score", "0.0"])
    assert code == 0
    _RUNS[kind] = out
    return out


@pytest.fixture(scope="module", params=["interleaved", "pairs", "capfilt"])
def carded(request, tmp_path_factory, shared_data):
    blip = request.getfixturevalue("models") if request.param == "capfilt" else None
    out = real_run(request.param, tmp_path_factory, shared_data, blip)
    assert main(["card", str(out), "--name", f"test-{request.param}", "--license", "cc-by-4.0"]) == 0
    fm, body = parse_card(str(out / "README.md"))
    return request.param, out, json.loads((out / "stats.json").read_text()), fm, body


def rows(folder):
    return sum(pq.ParquetFile(folder / f).metadata.num_rows for f in os.listdir(folder) if f.endswith(".parquet"))


def table_rows(body: str, header: str) -> list[list[str]]:
    """Cells of the markdown table whose header line starts with `header`."""
    lines = body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    out = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        out.append([c.strip().strip("`") for c in line.strip("|").split("|")])
    return out


def test_front_matter_counts_equal_stats_and_files(carded):
    kind, out, stats, fm, body = carded
    data_rows, reject_rows = rows(out / "data"), rows(out / "rejects")
    assert fm["pretty_name"] == f"test-{kind}" and fm["license"] == "cc-by-4.0"
    assert [c["config_name"] for c in fm["configs"]] == ["default", "rejects"]
    assert fm["configs"][0]["data_files"] == [{"split": "train", "path": "data/part-*.parquet"}]
    info = {i["config_name"]: i for i in fm["dataset_info"]}
    assert info["default"]["splits"][0]["num_examples"] == data_rows == stats["totals"]["written"] > 0
    assert info["rejects"]["splits"][0]["num_examples"] == reject_rows == stats["totals"]["reject_rows"] > 0
    assert fm["size_categories"] == ["n<1K"]
    assert fm["task_categories"][0] == ("image-text-to-text" if kind == "interleaved" else "image-to-text")

    # funnel table = stats.json stages of the main chain
    funnel = {r[0]: [int(x.replace(",", "")) for x in r[1:4]] for r in table_rows(body, "| stage | in | out | rejected | kept")}
    by_stage = {s["stage"]: s for s in stats["stages"]}
    assert funnel and all(funnel[name] == [by_stage[name]["in"], by_stage[name]["out"], by_stage[name]["rejected"]]
                          for name in funnel)
    assert list(funnel) == stats["main_stages"]  # the chain the run recorded, in its order
    assert list(funnel)[-1] == {"interleaved": "image_count_after_dedup", "pairs": "dedup_phash",
                                "capfilt": "itm_filter"}[kind]
    assert list(funnel.values())[-1][1] == data_rows

    # time per stage = the CPU seconds stats.json recorded for every timed stage
    timed = {s["stage"]: s["cpu_seconds"] for s in stats["stages"] if s.get("cpu_seconds") is not None}
    if kind == "capfilt":  # its stages are its own DoFns, which time nothing: no table claims a time
        assert not timed and "| stage | in | cpu seconds" not in body
    else:
        times = {r[0]: float(r[2].replace(",", "")) for r in table_rows(body, "| stage | in | cpu seconds")}
        assert times and times.keys() == timed.keys()
        assert all(abs(times[k] - timed[k]) < 0.006 for k in times)

    # reasons table = reject rows grouped by (stage, reason), read independently
    table = pq.read_table(out / "rejects", columns=["stage", "reason"]).to_pylist()
    expected = collections.Counter((r["stage"], r["reason"]) for r in table)
    got = {(r[0], r[1]): int(r[2].replace(",", "")) for r in table_rows(body, "| stage | reason | rows")}
    assert got == dict(expected)


def test_languages_and_distributions_come_from_the_data(carded):
    kind, out, stats, fm, body = carded
    if kind == "interleaved":
        langs = collections.Counter(pq.read_table(out / "data", columns=["language"]).column("language").to_pylist())
        top = [k for k, n in langs.most_common() if n / sum(langs.values()) >= 0.01]
        assert fm["language"] == top and fm["multilinguality"] == "multilingual"
        images = [sum(i is not None for i in imgs) for imgs in
                  pq.read_table(out / "data", columns=["images"]).column("images").to_pylist()]
        row = next(r for r in table_rows(body, "| measure |") if r[0] == "images per document")
        assert int(row[1].replace(",", "")) == len(images) and float(row[3]) == min(images)
        assert float(row[6]) == max(images)
    elif kind == "capfilt":
        table = pq.read_table(out / "data", columns=["caption_source", "itm_score"]).to_pydict()
        sources = collections.Counter(table["caption_source"])
        assert set(sources) == {"web", "synthetic"}
        line = next(x for x in body.splitlines() if x.startswith("Caption source: "))
        assert f"web {sources['web']:,} (" in line and f"synthetic {sources['synthetic']:,} (" in line
        row = next(r for r in table_rows(body, "| measure |") if r[0] == "ITM score, synthetic captions")
        assert int(row[1]) == sources["synthetic"]
        assert min(table["itm_score"]) >= stats["itm_threshold"]
        assert "itm_score.png" in body and "pretrained:" in body
    else:
        assert fm["language"] == ["en"]
        scores = pq.read_table(out / "data", columns=["clip_score"]).column("clip_score").to_pylist()
        row = next(r for r in table_rows(body, "| measure |") if r[0] == "CLIP score")
        assert int(row[1]) == len(scores) and abs(float(row[6]) - max(scores)) < 1e-3
        assert "RANDOM weights" in body
        assert "Caption source: web" in body


def test_plots_exist_and_are_valid_pngs(carded):
    kind, out, _, _, body = carded
    names = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", body)
    expected = {"funnel.png", "reject_reasons.png"} | (
        {"images_per_document.png", "words_per_document.png", "languages.png"} if kind == "interleaved"
        else {"itm_score.png", "caption_words.png"} if kind == "capfilt"
        else {"clip_score.png", "image_sizes.png", "caption_words.png"})
    assert expected <= set(names)
    for name in names:
        path = out / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] >= 600 and im.size[1] >= 250


def test_hf_datasets_and_duckdb_read_what_the_card_declares(carded, tmp_path):
    import datasets
    import duckdb

    _, out, _, fm, _ = carded
    info = {i["config_name"]: i for i in fm["dataset_info"]}
    for config in fm["configs"]:
        files = {f["split"]: str(out / f["path"]) for f in config["data_files"]}
        ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf"))
        declared = info[config["config_name"]]
        assert ds.num_rows == declared["splits"][0]["num_examples"]
        assert ds.features._to_yaml_list() == declared["features"]
        n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{files['train']}')").fetchall()[0][0]
        assert n == ds.num_rows


def test_manifest_records_enough_to_reproduce(carded):
    kind, out, stats, _, body = carded
    assert stats["argv"][:2] == ["mmcorpus", kind] and stats["cwd"] and stats["versions"]["pyarrow"]
    assert stats["runner"]["runner"] == "direct" and stats["started"] <= stats["finished"]
    assert stats["inputs"]
    for entry in stats["inputs"]:
        with open(entry["path"], "rb") as f:
            assert entry["sha256"] == hashlib.sha256(f.read()).hexdigest()
        assert entry["bytes"] == os.path.getsize(entry["path"])
    assert f"mmcorpus {kind}" in body and stats["fingerprint"] in body


def test_card_refuses_files_that_changed_after_the_run(tmp_path, tmp_path_factory, shared_data, capsys):
    out = tmp_path / "copy"
    shutil.copytree(real_run("interleaved", tmp_path_factory, shared_data), out)
    victim = sorted((out / "rejects").iterdir())[0]
    pq.write_table(pq.read_table(victim).slice(1), victim)  # one reject row lost
    assert main(["card", str(out)]) == 2
    assert "no longer match stats.json" in capsys.readouterr().err
    assert not (out / "README.md").exists() or "no longer" not in (out / "README.md").read_text()
    os.remove(out / "_SUCCESS")
    assert main(["card", str(out)]) == 2
    assert "no finished run" in capsys.readouterr().err


def test_training_verdict_found_beside_the_output(tmp_path, tmp_path_factory, shared_data):
    out = tmp_path / "docs"
    shutil.copytree(real_run("interleaved", tmp_path_factory, shared_data), out)
    (tmp_path / "train").mkdir()
    report = {"datasets": {"docs": {"gap_shuffled": {"mean": 0.021, "ci95": [0.008, 0.034]},
                                    "gap_blank": {"mean": 0.05, "ci95": [0.02, 0.07]}, "verdict": "informative",
                                    "method": "kfold", "n_eval": 66, "skipped": {"empty_text": 2}},
                           "other": {"gap_shuffled": {"mean": -0.002, "ci95": [-0.01, 0.006]},
                                     "gap_blank": {"mean": 0.0, "ci95": [-0.01, 0.01]}, "verdict": "not_informative",
                                     "method": "kfold", "n_eval": 40, "skipped": {}}},
              "sources": {"vision": "random", "lm": "random"}, "verdict_rule": R.VERDICT_RULE.format(min_gap=0.01)}
    few = {"mean": -0.0027, "ci95": [-0.0051, -0.0007]}  # the trainer's figures on 74 photos with random encoders
    verdict, note = R.verdict(few, 0.01)
    report["datasets"]["few"] = {"gap_shuffled": few, "gap_blank": few, "verdict": verdict, "verdict_note": note,
                                 "n_needed": R.samples_needed(few, 148, 0.01), "seed_gaps": [-0.001, -0.004],
                                 "seed_sd": 0.0021, "method": "kfold", "n_eval": 148, "skipped": {}}
    (tmp_path / "train" / "report.json").write_text(json.dumps(report))
    assert main(["card", str(out)]) == 0
    _, body = parse_card(str(out / "README.md"))
    verdicts = {r[0].strip("*"): r for r in table_rows(body, "| dataset | verdict")}
    assert verdicts["docs"][1] == "**informative**" and verdicts["docs"][2] == "+0.0210 [+0.0080, +0.0340]"
    assert verdicts["other"][1] == "not_informative" and "empty_text 2" in verdicts["docs"][6]
    assert verdicts["few"][1] == "inconclusive"
    assert f"Note: few: {note} (148 held-out samples already give a narrow enough interval" in body
    assert "Note: few: gap over 2 k-fold repeats -0.0010, -0.0040 (sd 0.0021)" in body
    assert "Verdict rule: informative: the 95% interval" in body and "excludes a useful gain" in body
