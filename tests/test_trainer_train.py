"""Training loop: exact resume, the `mmcorpus train` command and its report, and image informativeness on real
coco-mini photos (true captions vs captions shuffled against the images)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from pipelines.cli import main
from tests.test_trainer_data import (assets, interleaved_rows, load_tok, pair_rows, tiny_lm,  # noqa: F401
                                     write_parquet)
from trainer import data as D
from trainer import report as R
from trainer import train as T
from trainer.model import build


@pytest.fixture(scope="module")
def corpora(assets):
    recs = assets["records"]
    root = assets["root"] / "corpora"
    rows = pair_rows(recs[:60], 2)
    for i in range(0, len(rows), 10):
        rows[i]["image_bytes"] = b"not an image"  # 12 undecodable rows spread over the file
    write_parquet(root / "pairs" / "data" / "part-00000-of-00001.parquet", rows, "pair", row_group_size=40)
    write_parquet(root / "docs" / "data" / "part-00000-of-00001.parquet", interleaved_rows(recs[60:120], 3),
                  "interleaved")
    return root


def _cfg(assets, corpora, steps=6, mode="flamingo"):
    return {"seed": 5,
            "model": {"vision": assets["clip"], "lm": assets["lm"], "tokenizer": assets["tokenizer"],
                      "allow_random_weights": True, "num_latents": 8, "resampler_depth": 1, "dim_head": 16},
            "data": {"mode": mode, "shuffle_buffer": 32, "datasets": [
                {"name": "pairs", "path": str(corpora / "pairs"), "kind": "pair", "weight": 2.0, "batch_size": 8,
                 "holdout": 0.2},
                {"name": "docs", "path": str(corpora / "docs"), "kind": "interleaved", "weight": 1.0, "batch_size": 2,
                 "max_seq_len": 96, "holdout": 0.2}]},
            "train": {"steps": steps, "lr": 3e-3, "warmup_steps": 2, "log_every": 2, "eval_every": 3,
                      "checkpoint_every": 2},
            "eval": {"max_samples": 16, "batch_size": 16, "bootstrap": 200, "shuffles": 1}}


def _final_trainables(out):
    ck = T._checkpoints(str(out))[-1]
    return torch.load(ck, weights_only=False)["trainable"]


class Interrupted(Exception):
    pass


def test_resumed_run_equals_uninterrupted(assets, corpora, tmp_path):
    cfg = _cfg(assets, corpora)
    straight = T.run(cfg, str(tmp_path / "a"))

    def die(step, info):
        if step == 3:  # after the step-2 checkpoint: step 3 is lost and redone
            raise Interrupted

    with pytest.raises(Interrupted):
        T.run(cfg, str(tmp_path / "b"), on_step=die)
    with pytest.raises(T.ConfigError, match="--resume"):
        T.run(cfg, str(tmp_path / "b"))
    resumed = T.run(cfg, str(tmp_path / "b"), resume=True)
    hist_a = torch.load(T._checkpoints(str(tmp_path / "a"))[-1], weights_only=False)["history"]
    hist_b = torch.load(T._checkpoints(str(tmp_path / "b"))[-1], weights_only=False)["history"]
    assert hist_a["batches"] == hist_b["batches"] and len(hist_a["batches"]) == 12  # 6 steps x 2 datasets
    a, b = _final_trainables(tmp_path / "a"), _final_trainables(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss"] for h in hist_a["train"]] == [h["loss"] for h in hist_b["train"]]
    assert straight["datasets"]["pairs"]["skipped"] == resumed["datasets"]["pairs"]["skipped"]
    assert straight["datasets"]["pairs"]["skipped"]["undecodable_image"] >= 1


def test_cli_train_writes_report(assets, corpora, tmp_path, capsys):
    cfg = _cfg(assets, corpora, steps=4, mode="round_robin")
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["train", "--config", str(cfg_path), "--output", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    printed = capsys.readouterr().out
    for name in ("pairs", "docs"):
        assert f"{name}: {report['datasets'][name]['verdict']} (" in printed
    for name in ("pairs", "docs"):
        d = report["datasets"][name]
        assert d["verdict"] in ("informative", "not_informative", "inconclusive")
        lo, hi = d["gap_shuffled"]["ci95"]
        assert lo <= d["gap_shuffled"]["mean"] <= hi and d["n_eval"] > 0
        assert len(d["heldout_loss"]) == 3  # steps 0, 3, 4
    skipped = report["datasets"]["pairs"]
    assert set(skipped["skipped"]) == {"undecodable_image"} and skipped["skipped"]["undecodable_image"] >= 1
    assert set(skipped["skipped_eval"]) <= {"undecodable_image"}
    assert len(report["gates"]["steps"]) == 3 and len(report["gates"]["attn"][0]) == 2
    assert report["gates"]["attn"][0] == [0.0, 0.0] and report["gates"]["attn"][-1] != [0.0, 0.0]
    assert report["throughput"]["tokens_per_s"] > 0 and 0 < report["throughput"]["mfu"] < 1
    assert report["sources"]["vision"] == "random"
    for png in report["plots"]:
        assert (out / png).stat().st_size > 1000
    assert main(["train", "--config", str(cfg_path), "--output", str(out)]) == 2  # checkpoints there, no --resume
    cfg["data"]["datasets"][0]["kind"] = "interleaved"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(cfg_path), "--output", str(tmp_path / "x")]) == 2
    assert "holds 'pair' rows" in capsys.readouterr().err


# ------------------------------------------------------------------ image informativeness on real photos

INFO = {"epochs": 8, "lr": 3e-3, "gate_lr_mult": 30, "folds": 5, "batch": 32}


@pytest.fixture(scope="module")
def informativeness_setup(assets):
    """True pairs and the same pairs with captions shuffled against the images (5 captions per photo, all 165
    coco-mini photos), read back through the loader and encoded once by the frozen vision tower. The tiny
    LM is initialised with a wider range (0.2) so a frozen random LM can still express sharp predictions."""
    root = assets["root"] / "informativeness"
    recs = assets["records"]
    tok = load_tok(assets)
    lm = tiny_lm(root / "lm", len(tok) - 2, init_range=0.2)
    model, src = build({"vision": assets["clip"], "lm": lm, "num_latents": 16, "resampler_depth": 1,
                        "dim_head": 16}, tok, allow_random=True)
    sets = {}
    for name, shuffle_seed in (("true", None), ("shuffled", 11)):
        path = write_parquet(root / name / "pairs.parquet", pair_rows(recs, 5, shuffle_seed), "pair")
        spec = D.DatasetSpec(name, str(path), "pair", max_seq_len=20)  # coco captions: ~10 words
        samples, skipped = D.split_samples(spec, tok, D.image_transform(src["image_size"]), 10_000, split="all")
        assert len(samples) == 825 and not skipped
        sets[name] = R.FeatureSet.encode(model, samples, spec.max_seq_len, tok)
    return model, model.trainable_state(), tok, sets


@pytest.mark.parametrize("seed", [0, 1])
def test_shuffled_captions_show_a_smaller_image_gap(informativeness_setup, seed):
    model, initial, tok, sets = informativeness_setup
    gaps = {}
    for name, fs in sets.items():
        losses = R.kfold_losses(model, initial, fs, INFO["folds"], INFO["epochs"], INFO["batch"], INFO["lr"],
                                tok.pad_token_id, seed=seed, shuffles=2, gate_lr_mult=INFO["gate_lr_mult"])
        gaps[name] = R.dataset_result(losses, 1000, seed, min_gap=0.01)
    true, shuffled = gaps["true"]["gap_shuffled"], gaps["shuffled"]["gap_shuffled"]
    print(seed, true, shuffled)
    assert true["ci95"][0] > 0  # held-out images help when captions describe them
    assert true["ci95"][0] > shuffled["mean"] and true["mean"] > shuffled["mean"] + 0.008
    assert gaps["true"]["verdict"] == "informative"
