"""Training loop: exact resume, the `mmcorpus train` command and its report, and image informativeness on real
coco-mini photos (true captions vs captions shuffled against the images)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import yaml

from mmcorpus.pipelines.cli import main
from tests.test_trainer_data import (assets, interleaved_rows, load_tok, one_torch_thread, pair_rows,  # noqa: F401
                                     tiny_lm, write_parquet)
from mmcorpus.trainer import data as D
from mmcorpus.trainer import report as R
from mmcorpus.trainer import train as T
from mmcorpus.trainer.model import build


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
            "data": {"mode": mode, "shuffle_buffer": 32, "num_workers": 0, "datasets": [
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


@pytest.mark.parametrize("mode", ["flamingo", "weighted", "round_robin"])
def test_resumed_run_equals_uninterrupted(assets, corpora, tmp_path, mode):
    cfg = _cfg(assets, corpora, mode=mode)
    steps = []
    straight = T.run(cfg, str(tmp_path / "a"), on_step=lambda step, info: steps.append(info))

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
    assert hist_a["batches"] == hist_b["batches"]
    used = [name for _, name, _ in hist_a["batches"]]
    if mode == "flamingo":
        assert used == ["pairs", "docs"] * 6  # one batch of every dataset a step
    elif mode == "round_robin":
        assert used == ["pairs", "docs"] * 3
    else:
        assert len(used) == 6 and set(used) == {"pairs", "docs"}  # drawn by weight
    a, b = _final_trainables(tmp_path / "a"), _final_trainables(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    exact = ("step", "loss", "losses", "dataset_loss", "lr", "grad_norm")  # the rest are timings
    assert [{k: h[k] for k in exact} for h in hist_a["train"]] == [{k: h[k] for k in exact} for h in hist_b["train"]]
    assert len(hist_a["train"]) == 3
    assert straight["datasets"]["pairs"]["skipped"] == resumed["datasets"]["pairs"]["skipped"]
    assert straight["datasets"]["pairs"]["skipped"]["undecodable_image"] >= 1
    # the step's loss: lambda-normalised sum in flamingo mode (weights 2 and 1), else the one dataset's own
    for info in steps:
        if mode == "flamingo":
            assert info["loss"] == pytest.approx(2 / 3 * info["losses"]["pairs"] + 1 / 3 * info["losses"]["docs"])
        else:
            assert len(info["losses"]) == 1 and info["loss"] == next(iter(info["losses"].values()))
    # per-dataset training losses are logged unscaled and reach the report
    for name in ("pairs", "docs"):
        logged = [[h["step"], h["dataset_loss"][name]] for h in hist_a["train"] if name in h["dataset_loss"]]
        assert logged and straight["datasets"][name]["train_loss"] == logged


def test_weighted_mode_does_not_scale_the_loss_by_lambda(assets, corpora, tmp_path):
    """Sampling by weight already applies lambda: a lone dataset trains the same whatever its lambda."""
    runs = []
    for weight in (1.0, 7.0):
        cfg = _cfg(assets, corpora, steps=2, mode="weighted")
        cfg["data"]["datasets"] = [dict(cfg["data"]["datasets"][0], weight=weight)]
        cfg["train"].update(checkpoint_every=2, eval_every=2)
        T.run(cfg, str(tmp_path / f"w{weight}"))
        runs.append(_final_trainables(tmp_path / f"w{weight}"))
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_rank_and_world_size_from_the_environment(assets, corpora, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _cfg(assets, corpora, steps=2)
    cfg["train"].update(checkpoint_every=2, eval_every=2)
    report = T.run(cfg, str(tmp_path / "run"))
    assert (report["throughput"]["rank"], report["throughput"]["world_size"]) == (1, 2)
    assert (tmp_path / "run" / "rank-1" / "report.json").exists()  # rank 0 alone writes DIR itself
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(T.ConfigError, match="RANK=2"):
        T.run(cfg, str(tmp_path / "bad"))


@pytest.fixture
def root_logging():
    """`main` points the root logger at the stderr of the moment (pytest's capture); put it back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_cli_train_writes_report(assets, corpora, tmp_path, capsys, root_logging):
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
    capsys.readouterr()
    assert main(["train", "--config", str(cfg_path), "--output", str(out), "--resume", "--steps", "8"]) == 2
    assert "train.steps: 4 -> 8" in capsys.readouterr().err  # a longer schedule is another run
    cfg["data"]["datasets"][0]["kind"] = "interleaved"
    cfg_path.write_text(yaml.safe_dump(cfg))
    assert main(["train", "--config", str(cfg_path), "--output", str(tmp_path / "x")]) == 2
    assert "holds 'pair' rows" in capsys.readouterr().err


def _toml(cfg: dict) -> str:
    """The test config as TOML (sections of scalars and a [[data.datasets]] table array)."""
    def value(v):
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = [f"seed = {cfg['seed']}"]
    for section in ("model", "data", "train", "eval"):
        lines.append(f"[{section}]")
        lines += [f"{k} = {value(v)}" for k, v in cfg[section].items() if k != "datasets"]
    for d in cfg["data"]["datasets"]:
        lines.append("[[data.datasets]]")
        lines += [f"{k} = {value(v)}" for k, v in d.items()]
    return "\n".join(lines) + "\n"


def test_toml_config_reads_like_yaml(assets, corpora, tmp_path):
    cfg = _cfg(assets, corpora, mode="weighted")
    (tmp_path / "train.toml").write_text(_toml(cfg))
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    assert T.load_config(str(tmp_path / "train.toml")) == T.load_config(str(tmp_path / "train.yaml"))
    (tmp_path / "bad.toml").write_text("[model\nlm = 1\n")
    with pytest.raises(T.ConfigError, match="not valid TOML"):
        T.load_config(str(tmp_path / "bad.toml"))


# ------------------------------------------------------------------ image informativeness on real photos

# k-fold over images (3 folds: every photo held out once), each fold stopped early on a validation share of
# its own training photos (at most 8 epochs); 2 captions per photo; the model's random init (frozen LM,
# vision tower, trainables) and the fold split change with the seed.
INFO = {"epochs": 8, "lr": 3e-3, "gate_lr_mult": 30, "folds": 3, "batch": 32, "patience": 1, "captions": 2}


@pytest.fixture(scope="module")
def informativeness_samples(assets):
    """True pairs and the same pairs with captions shuffled against the images (all 165 coco-mini photos),
    read back through the loader once; models and image features are built per seed."""
    root = assets["root"] / "informativeness"
    tok = load_tok(assets)
    samples = {}
    for name, shuffle_seed in (("true", None), ("shuffled", 11)):
        rows = pair_rows(assets["records"], INFO["captions"], shuffle_seed)
        path = write_parquet(root / name / "pairs.parquet", rows, "pair")
        spec = D.DatasetSpec(name, str(path), "pair", max_seq_len=20)  # coco captions: ~10 words
        samples[name], skipped = D.split_samples(spec, tok, D.image_transform(64), 10_000, split="all")
        assert len(samples[name]) == 165 * INFO["captions"] and not skipped
    return root, tok, samples


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shuffled_captions_show_a_smaller_image_gap(assets, informativeness_samples, seed):
    """The tiny LM is initialised with a wider range (0.2) so a frozen random LM can still express sharp
    predictions. Without pretrained weights the gap is small (DESIGN.md); the CI is a bootstrap over photos."""
    root, tok, samples = informativeness_samples
    lm = tiny_lm(root / f"lm-{seed}", len(tok) - 2, init_range=0.2, seed=seed)
    torch.manual_seed(seed)  # the random vision tower and the trainables
    model, _ = build({"vision": assets["clip"], "lm": lm, "num_latents": 16, "resampler_depth": 1,
                      "dim_head": 16}, tok, allow_random=True)
    initial = model.trainable_state()
    gaps = {}
    for name, items in samples.items():
        fs = R.FeatureSet.encode(model, items, 20, tok)
        losses = R.kfold_losses(model, initial, fs, INFO["folds"], INFO["epochs"], INFO["batch"], INFO["lr"],
                                tok.pad_token_id, seed=seed, shuffles=2, gate_lr_mult=INFO["gate_lr_mult"],
                                patience=INFO["patience"])
        gaps[name] = R.dataset_result(losses, 1000, seed, min_gap=0.01, groups=fs.keys)
        assert len(losses["epochs_used"]) == INFO["folds"]
    true, shuffled = gaps["true"]["gap_shuffled"], gaps["shuffled"]["gap_shuffled"]
    print(f"seed {seed}: true pairs {true}, shuffled captions {shuffled}")
    assert true["mean"] > 0 and true["mean"] > shuffled["mean"]  # held-out images help only when captions fit
    assert shuffled["ci95"][0] <= 0  # no image information where captions do not describe the images


@pytest.mark.parametrize("gap, expected", [
    # the figures (74 COCO photos, random encoders, `mmcorpus train`): true and shuffled captions
    ((-0.0039, -0.019, 0.012), "inconclusive"), ((-0.0017, -0.032, 0.026), "inconclusive"),
    ((-0.0027, -0.0051, -0.0007), "inconclusive"), ((-0.0097, -0.019, -0.0007), "inconclusive"),
    ((0.0013, -0.0033, 0.0055), "not_informative"), ((0.54, 0.51, 0.58), "informative"),
    ((0.004, 0.001, 0.009), "not_informative"), ((0.006, 0.001, 0.012), "inconclusive"),
    ((-0.0207, -0.049, 0.0043), "inconclusive")])  # below min_gap, but too wide to tell 0 from min_gap
def test_verdict_never_calls_missing_evidence_uninformative(gap, expected):
    mean, lo, hi = gap
    verdict, note = R.verdict({"mean": mean, "ci95": [lo, hi]}, min_gap=0.01)
    assert verdict == expected
    assert verdict != "not_informative" or 0 <= hi < 0.01 and hi - lo <= 0.02  # excludes a useful gain, precisely
    assert (note is not None) == (verdict == "inconclusive" or lo > 0 and verdict != "informative")
    needed = R.samples_needed({"mean": mean, "ci95": [lo, hi]}, 148, 0.01)
    assert needed == int(np.ceil(148 * ((hi - lo) / 0.01) ** 2))  # half-width (hi - lo) / 2 down to 0.005


def test_repeated_kfold_widens_the_interval_by_the_seed_spread():
    rng = np.random.default_rng(0)
    real = rng.normal(3.0, 0.2, 200)
    losses = {"real": real, "shuffled": real + rng.normal(0.02, 0.05, 200), "blank": real + 0.01}
    one = R.dataset_result(losses, 500, 0, 0.01)
    many = R.dataset_result({**losses, "seed_gaps": [0.0, 0.02, 0.04]}, 500, 0, 0.01)
    assert many["gap_shuffled"]["mean"] == one["gap_shuffled"]["mean"]
    assert many["gap_shuffled"]["ci95"][0] < one["gap_shuffled"]["ci95"][0]
    assert many["gap_shuffled"]["ci95"][1] > one["gap_shuffled"]["ci95"][1]
    assert many["seed_sd"] == pytest.approx(0.02) and many["verdict"] == "inconclusive" and many["n_needed"] > 200
