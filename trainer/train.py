"""Training loop of the compact Flamingo over a weighted mixture, with exact resume.

Config (YAML), every key but the dataset list optional:

    seed: 0
    model: {vision: ViT-B-32 | tiny.json, vision_pretrained: TAG_OR_PATH, lm: HF_ID_OR_PATH,
            tokenizer: ID_OR_PATH (default: lm), allow_random_weights: false, num_latents: 64,
            resampler_depth: 2, cross_attn_every: 1, heads: 4, dim_head: 32}
    data: {mode: flamingo | round_robin | weighted, shuffle_buffer: 256, num_workers: 0,
           datasets: [{name, path, kind: pair | interleaved, weight, max_seq_len, batch_size, max_images, holdout}]}
    train: {steps: 1000, lr: 1e-4, warmup_steps: 50, weight_decay: 0.01, grad_clip: 1.0, log_every: 10,
            eval_every: 100, checkpoint_every: 200, keep_checkpoints: 2, precision: auto | fp32 | bf16,
            peak_flops: null, gate_lr_mult: 1.0 (learning-rate multiplier of the tanh gates)}
    eval: {max_samples: 256, batch_size: 32, bootstrap: 1000, shuffles: 3, min_gap: 0.01, kfold: 0,
           kfold_epochs: 4, kfold_max_samples: 2000}

Flamingo mode sums lambda-weighted losses of one batch from every dataset per step (gradients accumulate
dataset by dataset); round_robin / weighted take one dataset's batch per step. A checkpoint holds the
trainable parameters, optimizer, schedule, loader state, history and RNG states; `--resume` continues from
the newest one and sees the same batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import copy
import glob
import hashlib
import json
import logging
import math
import os
import time

import torch

from trainer import data as D
from trainer import report as R
from trainer.model import build

log = logging.getLogger("mmcorpus.train")

DEFAULTS = {
    "seed": 0,
    "model": {"allow_random_weights": False, "num_latents": 64, "resampler_depth": 2, "cross_attn_every": 1,
              "heads": 4, "dim_head": 32},
    "data": {"mode": "flamingo", "shuffle_buffer": 256, "num_workers": 0},
    "train": {"steps": 1000, "lr": 1e-4, "warmup_steps": 50, "weight_decay": 0.01, "grad_clip": 1.0,
              "log_every": 10, "eval_every": 100, "checkpoint_every": 200, "keep_checkpoints": 2,
              "precision": "auto", "peak_flops": None, "gate_lr_mult": 1.0},
    "eval": {"max_samples": 256, "batch_size": 32, "bootstrap": 1000, "shuffles": 3, "min_gap": 0.01,
             "kfold": 0, "kfold_epochs": 4, "kfold_max_samples": 2000},
}


class ConfigError(ValueError):
    """The training config is wrong; the message names the key."""


def merge_config(cfg: dict) -> dict:
    out = copy.deepcopy(DEFAULTS)
    for key, value in (cfg or {}).items():
        if key not in out:
            raise ConfigError(f"unknown config section {key!r}; known: {', '.join(out)}")
        if isinstance(out[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"config section {key!r} must be a mapping")
            out[key].update(value)
        else:
            out[key] = value
    if "lm" not in out["model"] or "vision" not in out["model"]:
        raise ConfigError("config 'model' needs 'vision' (open_clip name or config JSON) and 'lm' (HF id or path)")
    out["model"].setdefault("tokenizer", out["model"]["lm"])
    out["data"]["seed"] = out["seed"]
    D.MixtureSpec.from_dict(out["data"])  # validates the datasets
    return out


def load_config(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return merge_config(raw)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model, lr: float, weight_decay: float, gate_lr_mult: float = 1.0):
    """AdamW; no decay on gates, norms, biases and the new token rows; gates may learn faster (`gate_lr_mult`):
    they start at 0, and until they open the cross-attention weights behind them barely matter."""
    groups = {"decay": [], "no_decay": [], "gates": []}
    for name, p in model.trainable_named().items():
        if name.endswith("_gate"):
            groups["gates"].append(p)
        elif p.ndim >= 2 and not name.startswith("new_"):
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    return torch.optim.AdamW([{"params": groups["decay"], "weight_decay": weight_decay},
                              {"params": groups["no_decay"], "weight_decay": 0.0},
                              {"params": groups["gates"], "weight_decay": 0.0, "lr": lr * gate_lr_mult}],
                             lr=lr, betas=(0.9, 0.95))


def peak_flops(device: torch.device, configured) -> tuple[float, str]:
    """Peak FLOP/s for MFU: configured, a known GPU's dense bf16 figure, or measured fp32 matmul on CPU."""
    if configured:
        return float(configured), "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, value in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12), ("A10", 125e12)):
            if key in name:
                return value, f"spec sheet bf16 dense ({name})"
        return 100e12, f"assumed ({name})"
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    t, n = time.perf_counter(), 0
    while time.perf_counter() - t < 0.3:
        a @ b
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - t), "measured fp32 matmul on this CPU"


def batch_digest(keys: list[str]) -> str:
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()[:12]


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _checkpoints(out_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(out_dir, "checkpoints", "step-*.pt")))


def save_checkpoint(out_dir: str, state: dict, keep: int) -> str:
    os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
    path = os.path.join(out_dir, "checkpoints", f"step-{state['step']:08d}.pt")
    torch.save(state, path + ".tmp")
    os.replace(path + ".tmp", path)
    for old in _checkpoints(out_dir)[:-keep]:
        os.remove(old)
    return path


def _config_key(cfg: dict) -> str:
    return json.dumps({k: cfg[k] for k in ("seed", "model", "data")}, sort_keys=True, default=str)


def run(cfg: dict, out_dir: str, resume: bool = False, on_step=None, device: str | None = None) -> dict:
    """Train as configured, write checkpoints and DIR/report.json + plots; return the report dict.
    `on_step(step, info)` is called after every optimizer step (progress display, tests)."""
    cfg = merge_config(cfg)
    mc, tc, ec = cfg["model"], cfg["train"], cfg["eval"]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    use_bf16 = tc["precision"] == "bf16" or (tc["precision"] == "auto" and device.type == "cuda")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg["seed"])

    ckpts = _checkpoints(out_dir)
    if ckpts and not resume:
        raise ConfigError(f"{out_dir} already holds checkpoints; pass --resume to continue or use a new folder")
    mixture = D.MixtureSpec.from_dict(cfg["data"])
    for spec in mixture.datasets:
        D.check_dataset(spec)  # fail on a wrong path or schema before any model is built

    from trainer.weights import load_tokenizer

    tokenizer = load_tokenizer(mc["tokenizer"])
    model, sources = build(mc, tokenizer, allow_random=mc["allow_random_weights"])
    model.to(device).train()
    initial = model.trainable_state()
    transform = D.image_transform(sources["image_size"], sources.get("mean", D.CLIP_MEAN), sources.get("std", D.CLIP_STD))
    weights = {s.name: s.weight for s in mixture.datasets}
    if mixture.mode == "flamingo":  # lambdas normalised so the summed loss stays on the per-dataset scale
        total = sum(weights.values()) or 1.0
        weights = {k: v / total for k, v in weights.items()}

    optimizer = make_optimizer(model, tc["lr"], tc["weight_decay"], tc["gate_lr_mult"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc["warmup_steps"], tc["steps"]))
    start, loader_state = 0, None
    history = {"train": [], "eval": [], "gates": [], "batches": []}
    if resume and ckpts:
        ck = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
        if ck["config_key"] != _config_key(cfg):
            raise ConfigError(f"{ckpts[-1]} was written with a different seed/model/data config; "
                              f"resume with the same config or use a new output folder")
        model.load_trainable(ck["trainable"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        start, loader_state, history = ck["step"], ck["loader"], ck["history"]
        torch.set_rng_state(ck["rng"])
        log.info("resumed from %s at step %d", ckpts[-1], start)

    loader = D.MixtureLoader(mixture, tokenizer, transform, state=loader_state)
    eval_sets, eval_skipped = {}, {}
    for spec in mixture.datasets:
        samples, skipped = D.holdout_samples(spec, tokenizer, transform, ec["max_samples"])
        eval_sets[spec.name] = R.FeatureSet.encode(model, samples, spec.max_seq_len, tokenizer, device)
        eval_skipped[spec.name] = skipped
    peak, peak_source = peak_flops(device, tc["peak_flops"])
    fl = model.flops_per_token()
    pad_id = tokenizer.pad_token_id

    def evaluate(step):
        model.eval()
        row = {"step": step}
        for name, fs in eval_sets.items():
            if len(fs):
                row[name] = float(R.sample_losses(model, fs, "real", ec["batch_size"], pad_id).mean())
        model.train()
        history["eval"].append(row)
        history["gates"].append({"step": step, **model.gates()})

    if start == 0 and not history["eval"]:
        evaluate(0)
    step_times, wait_times, step_tokens, flops_done = [], [], [], 0.0
    for step in range(start, tc["steps"]):
        t0 = time.perf_counter()
        parts = loader.step(step)
        t1 = time.perf_counter()
        losses, n_tokens, n_images = {}, 0, 0
        for spec, batch in parts:
            batch = _to(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                out = model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["image_mask"],
                            labels=batch["labels"])
            (out["loss"] * weights[spec.name]).backward()
            losses[spec.name] = float(out["loss"].detach())
            n_tokens += int(batch["attention_mask"].sum())
            n_images += int(batch["image_mask"].sum())
            history["batches"].append([step, spec.name, batch_digest(batch["keys"])])
        grad_norm = float(torch.nn.utils.clip_grad_norm_(list(model.trainable_named().values()), tc["grad_clip"]))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        step_times.append(t2 - t0)
        wait_times.append(t1 - t0)
        step_tokens.append(n_tokens)
        flops_done += n_tokens * fl["per_token"] + n_images * fl["per_image"]
        done = step + 1
        info = {"step": done, "loss": sum(weights[k] * v for k, v in losses.items()), "losses": losses,
                "lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm}
        if done % tc["log_every"] == 0 or done == tc["steps"]:
            span = sum(step_times[-tc["log_every"]:])
            info.update(tokens_per_s=sum(step_tokens[-tc["log_every"]:]) / max(span, 1e-9),
                        data_wait=sum(wait_times[-tc["log_every"]:]) / max(span, 1e-9),
                        mfu=flops_done / max(sum(step_times), 1e-9) / peak)
            history["train"].append(info)
            log.info("step %d loss %.4f lr %.2e tok/s %.0f data-wait %.1f%% MFU %.2f%%", done, info["loss"],
                     info["lr"], info["tokens_per_s"], 100 * info["data_wait"], 100 * info["mfu"])
        if done % tc["eval_every"] == 0 or done == tc["steps"]:
            evaluate(done)
        if done % tc["checkpoint_every"] == 0 or done == tc["steps"]:
            save_checkpoint(out_dir, {"step": done, "trainable": model.trainable_state(),
                                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                      "loader": loader.state(), "history": history, "rng": torch.get_rng_state(),
                                      "config_key": _config_key(cfg), "sources": sources}, tc["keep_checkpoints"])
        if on_step is not None:
            on_step(done, info)

    skip = 1 if len(step_times) > 2 else 0  # the first step pays for loader start-up (workers, first window)
    step_times, wait_times, step_tokens = step_times[skip:], wait_times[skip:], step_tokens[skip:]
    flops_done *= len(step_times) / max(1, len(step_times) + skip)
    loader.close()
    total_time = sum(step_times)
    throughput = {"steps_timed": len(step_times), "tokens_per_s": sum(step_tokens) / max(total_time, 1e-9),
                  "step_time_s": total_time / max(1, len(step_times)),
                  "data_wait_fraction": sum(wait_times) / max(total_time, 1e-9),
                  "mfu": flops_done / max(total_time, 1e-9) / peak, "peak_flops": peak, "peak_source": peak_source,
                  "flops_per_token": fl["per_token"], "flops_per_image": fl["per_image"], "device": str(device),
                  "precision": "bf16" if use_bf16 else "fp32"}
    kfold = None
    if ec["kfold"]:
        kfold = {}
        for spec in mixture.datasets:
            samples, _ = D.split_samples(spec, tokenizer, transform, ec["kfold_max_samples"], split="all")
            fs = R.FeatureSet.encode(model, samples, spec.max_seq_len, tokenizer, device)
            kfold[spec.name] = R.kfold_losses(model, initial, fs, ec["kfold"], ec["kfold_epochs"], spec.batch_size,
                                              tc["lr"], pad_id, seed=cfg["seed"], shuffles=ec["shuffles"],
                                              gate_lr_mult=tc["gate_lr_mult"])
    result = R.write_report(out_dir, model, eval_sets, history, loader.skipped(), eval_skipped, throughput, ec,
                            pad_id, sources=sources, seed=cfg["seed"], kfold=kfold,
                            rows_used={n: l.rows_ok() for n, l in loader.loaders.items()})
    return result
