"""Training loop of the compact Flamingo over a weighted mixture, with exact resume.

Config (YAML, or TOML for a file ending in .toml), every key but the dataset list optional:

    seed: 0
    model: {vision: ViT-B-32 | tiny.json, vision_pretrained: TAG_OR_PATH, lm: HF_ID_OR_PATH,
            tokenizer: ID_OR_PATH (default: lm), allow_random_weights: false, num_latents: 64,
            resampler_depth: 2, cross_attn_every: 1, heads: 4, dim_head: 32}
    data: {mode: flamingo | round_robin | weighted, shuffle_buffer: 256, num_workers: auto | N, image_cache: DIR,
           datasets: [{name, path, kind: pair | interleaved, weight, max_seq_len, batch_size, max_images, holdout}]}
    train: {steps: 1000, lr: 1e-4, warmup_steps: 50, weight_decay: 0.01, grad_clip: 1.0, log_every: 10,
            eval_every: 100, checkpoint_every: 200, keep_checkpoints: 2, precision: auto | fp32 | bf16,
            peak_flops: null, gate_lr_mult: 1.0 (learning-rate multiplier of the tanh gates)}
    eval: {max_samples: 256, batch_size: 32, bootstrap: 1000, shuffles: 3, min_gap: 0.01, kfold: 0,
           kfold_epochs: 8, kfold_max_samples: 2000, kfold_patience: 1, kfold_seeds: 1}

Modes (`MixtureSpec.loss_weights`): flamingo takes one batch from every dataset per step and sums their
losses weighted by lambda / sum(lambda) (gradients accumulate dataset by dataset); weighted takes one
dataset's batch per step, drawn with probability lambda / sum(lambda), its loss unscaled; round_robin takes
the datasets in turn, losses unscaled. The log and the report keep every dataset's own (unscaled) loss.

A checkpoint holds the trainable parameters, optimizer, schedule, loader state, history and RNG states;
`--resume` continues from the newest one and sees the same batches an uninterrupted run would have seen. It
refuses a config that changes the trajectory (seed, model, data, train.steps/lr/schedule/clipping/precision,
rank layout) and names the keys that differ.

Ranks: with RANK / WORLD_SIZE set (torchrun), each rank reads its own disjoint shard of every dataset and
picks cuda:LOCAL_RANK. Gradients are NOT synchronised (no DistributedDataParallel): every rank trains its own
replica and writes its own checkpoints and report, rank 0 in DIR, rank r in DIR/rank-r. Multi-rank runs are
therefore data-parallel reading without data-parallel training; validate a corpus with one process.
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

from mmcorpus.trainer import data as D
from mmcorpus.trainer import report as R
from mmcorpus.trainer.model import build, make_optimizer

log = logging.getLogger("mmcorpus.train")

DEFAULTS = {
    "seed": 0,
    "model": {"allow_random_weights": False, "num_latents": 64, "resampler_depth": 2, "cross_attn_every": 1,
              "heads": 4, "dim_head": 32},
    "data": {"mode": "flamingo", "shuffle_buffer": 256, "num_workers": "auto"},
    "train": {"steps": 1000, "lr": 1e-4, "warmup_steps": 50, "weight_decay": 0.01, "grad_clip": 1.0,
              "log_every": 10, "eval_every": 100, "checkpoint_every": 200, "keep_checkpoints": 2,
              "precision": "auto", "peak_flops": None, "gate_lr_mult": 1.0},
    # kfold_epochs 8: with lr 3e-3 the early stop chose epoch 4-8 on rendered shapes and 5-8 on coco-mini
    # (bench/results/informativeness_coco.json); a cap of 4 stopped before the validation optimum
    "eval": {"max_samples": 256, "batch_size": 32, "bootstrap": 1000, "shuffles": 3, "min_gap": 0.01,
             "kfold": 0, "kfold_epochs": 8, "kfold_max_samples": 2000, "kfold_patience": 1, "kfold_seeds": 1},
}
# train keys that change what the run computes; a resume must keep them (the rest only log or save)
TRAJECTORY_KEYS = ("steps", "lr", "warmup_steps", "weight_decay", "grad_clip", "precision", "gate_lr_mult")


class ConfigError(ValueError):
    """The training config is wrong; the message names the key."""


def merge_config(cfg: dict, source: str = "") -> dict:
    """DEFAULTS updated by `cfg`, validated. `source` (the config file, if any) prefixes the error for a non-mapping."""
    if cfg is not None and not isinstance(cfg, dict):
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}the config must be a mapping of sections, not {type(cfg).__name__}")
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
    steps = out["train"]["steps"]
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ConfigError(f"train.steps must be an integer >= 1, not {steps!r}")
    if out["train"]["precision"] not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"train.precision {out['train']['precision']!r} is not one of auto, fp32, bf16")
    for key in ("kfold", "kfold_seeds"):
        v = out["eval"][key]
        if not isinstance(v, int) or isinstance(v, bool) or v < (0 if key == "kfold" else 1):
            raise ConfigError(f"eval.{key} must be an integer >= {0 if key == 'kfold' else 1}, not {v!r}")
    out["model"].setdefault("tokenizer", out["model"]["lm"])
    out["data"]["seed"] = out["seed"]
    D.MixtureSpec.from_dict(out["data"])  # validates the datasets
    return out


def load_config(path: str) -> dict:
    """A YAML config, or TOML when the file name ends in .toml."""
    import tomllib

    import yaml

    try:
        if path.endswith(".toml"):
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        else:
            with open(path) as f:
                raw = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return merge_config(raw, source=path)


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# dense peak FLOP/s from the vendors' spec sheets: (bf16 tensor core, tf32 tensor core, plain fp32)
GPU_PEAKS = (("H200", (989e12, 495e12, 67e12)), ("H100 PCIe", (756e12, 378e12, 51e12)),
             ("H100", (989e12, 495e12, 67e12)), ("A100", (312e12, 156e12, 19.5e12)),
             ("L40S", (362e12, 183e12, 91.6e12)), ("L4", (121e12, 60e12, 30.3e12)), ("A10", (125e12, 62.5e12, 31.2e12)))


def peak_flops(device: torch.device, configured, precision: str = "fp32") -> tuple[float, str]:
    """Peak FLOP/s for MFU at the precision the step runs in: configured, a known GPU's dense figure (bf16,
    else tf32 when torch allows tf32 matmuls, else fp32), or measured fp32 matmul on CPU."""
    if configured:
        return float(configured), "config"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        kind = ("bf16" if precision == "bf16" else
                "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
        for key, peaks in GPU_PEAKS:
            if key in name:
                return peaks[("bf16", "tf32", "fp32").index(kind)], f"spec sheet {kind} dense ({name})"
        return 100e12, f"assumed ({name})"
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    a @ b
    best = 0.0
    for _ in range(6):  # the best of short windows: other processes on the machine only ever slow one down
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < 0.05:
            a @ b
            n += 1
        best = max(best, 2 * 512**3 * n / (time.perf_counter() - t))
    return best, f"measured fp32 matmul on this CPU ({torch.get_num_threads()} threads)"


def batch_digest(keys: list[str]) -> str:
    return hashlib.sha1("\n".join(keys).encode()).hexdigest()[:12]


def _to(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def train_step(model, parts, optimizer, scheduler, loss_weights: dict, grad_clip: float, device,
               use_bf16: bool = False) -> dict:
    """One optimizer step over `parts` [(spec, batch)]: each batch's loss times its `loss_weights` factor,
    backward per batch (gradients accumulate), clipping, AdamW, schedule. Returns the unscaled per-dataset
    losses, their weighted sum (the step's loss), the token count and model FLOPs."""
    losses, tokens, flops, digests = {}, 0, 0.0, []
    for spec, batch in parts:
        batch = _to(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            out = model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["image_mask"],
                        labels=batch["labels"])
        (out["loss"] * loss_weights[spec.name]).backward()
        losses[spec.name] = float(out["loss"].detach())
        n_tok, n_img = int(batch["attention_mask"].sum()), int(batch["image_mask"].sum())
        media = batch["image_mask"].shape[1] * model.resampler.latents.shape[0]
        flops += model.train_flops(n_tok, batch["input_ids"].shape[1], n_img, media)
        tokens += n_tok
        digests.append((spec.name, batch_digest(batch["keys"])))
    grad_norm = float(torch.nn.utils.clip_grad_norm_(list(model.trainable_named().values()), grad_clip))
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return {"losses": losses, "loss": sum(loss_weights[k] * v for k, v in losses.items()), "tokens": tokens,
            "flops": flops, "grad_norm": grad_norm, "digests": digests}


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


def resume_config(cfg: dict, rank: int, world_size: int) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint, flattened to dotted keys."""
    data = {k: v for k, v in cfg["data"].items() if k != "image_cache"}  # the cache changes no pixel
    keep = {"seed": cfg["seed"], "model": cfg["model"], "data": data,
            "train": {k: cfg["train"][k] for k in TRAJECTORY_KEYS}, "ranks": {"rank": rank, "world_size": world_size}}
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            flat[prefix] = json.dumps(value, sort_keys=True, default=str)

    walk("", keep)
    return flat


def _check_resume(path: str, saved: dict | None, now: dict) -> None:
    if saved is None:
        raise ConfigError(f"{path} comes from an older mmcorpus without a resume config; start a new output folder")
    diff = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
    if diff:
        shown = "; ".join(f"{k}: {saved.get(k, '(unset)')} -> {now.get(k, '(unset)')}" for k in diff[:6])
        raise ConfigError(f"{path} was written with a different config ({shown}); resume with the same config "
                          f"(steps included) or use a new output folder")


def dist_env() -> tuple[int, int]:
    """(rank, world size) from the torch.distributed environment variables, (0, 1) without them."""
    try:
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError as exc:
        raise ConfigError(f"RANK / WORLD_SIZE must be integers: {exc}") from exc
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is not in 0..WORLD_SIZE-1 (WORLD_SIZE={world})")
    return rank, world


def _window_mean(rows: list[dict]) -> dict[str, float]:
    """Mean unscaled loss per dataset over the steps of a logging window that used it."""
    sums, counts = {}, {}
    for r in rows:
        for name, v in r.items():
            sums[name] = sums.get(name, 0.0) + v
            counts[name] = counts.get(name, 0) + 1
    return {k: sums[k] / counts[k] for k in sorted(sums)}


def run(cfg: dict, out_dir: str, resume: bool = False, on_step=None, device: str | None = None,
        rank: int | None = None, world_size: int | None = None) -> dict:
    """Train as configured, write checkpoints and DIR/report.json + plots; return the report dict.
    `on_step(step, info)` is called after every optimizer step (progress display, tests). `rank` and
    `world_size` default to the RANK / WORLD_SIZE environment variables (see the module docstring)."""
    cfg = merge_config(cfg)
    mc, tc, ec = cfg["model"], cfg["train"], cfg["eval"]
    env_rank, env_world = dist_env()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    if world_size > 1 and rank > 0:
        out_dir = os.path.join(out_dir, f"rank-{rank}")
    if device is None:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    use_bf16 = tc["precision"] == "bf16" or (tc["precision"] == "auto" and device.type == "cuda")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(cfg["seed"])

    ckpts = _checkpoints(out_dir)
    if ckpts and not resume:
        raise ConfigError(f"{out_dir} already holds checkpoints; pass --resume to continue or use a new folder")
    mixture = D.MixtureSpec.from_dict(cfg["data"])
    for spec in mixture.datasets:
        D.check_dataset(spec)  # fail on a wrong path or schema before any model is built

    from mmcorpus.trainer.weights import load_tokenizer

    tokenizer = load_tokenizer(mc["tokenizer"])
    model, sources = build(mc, tokenizer, allow_random=mc["allow_random_weights"])
    model.to(device).train()
    initial = model.trainable_state()
    # uint8; the model normalises with its tower's stats. data.image_cache: training-resolution copies by sha256
    transform = D.image_transform(sources["image_size"], cfg["data"].get("image_cache"))
    loss_weights = mixture.loss_weights()

    optimizer = make_optimizer(model, tc["lr"], tc["weight_decay"], tc["gate_lr_mult"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, tc["warmup_steps"], tc["steps"]))
    start, loader_state, window = 0, None, []  # window: per-dataset losses of the steps since the last log
    history = {"train": [], "eval": [], "gates": [], "batches": []}
    this_config = resume_config(cfg, rank, world_size)
    if resume and ckpts:
        ck = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
        _check_resume(ckpts[-1], ck.get("resume_config"), this_config)
        model.load_trainable(ck["trainable"])
        optimizer.load_state_dict(ck["optimizer"])
        scheduler.load_state_dict(ck["scheduler"])
        start, loader_state, history, window = ck["step"], ck["loader"], ck["history"], ck["window"]
        torch.set_rng_state(ck["rng"])
        log.info("resumed from %s at step %d", ckpts[-1], start)

    loader = D.MixtureLoader(mixture, tokenizer, transform, rank=rank, world_size=world_size, state=loader_state,
                             pin_memory=device.type == "cuda")
    eval_sets, eval_skipped = {}, {}
    for spec in mixture.datasets:
        samples, skipped = D.holdout_samples(spec, tokenizer, transform, ec["max_samples"])
        eval_sets[spec.name] = R.FeatureSet.encode(model, samples, spec.max_seq_len, tokenizer, device)
        eval_skipped[spec.name] = skipped
    peak, peak_source = peak_flops(device, tc["peak_flops"], "bf16" if use_bf16 else "fp32")
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
    step_times, wait_times, step_tokens, step_flops = [], [], [], []
    try:
        for step in range(start, tc["steps"]):
            t0 = time.perf_counter()
            parts = loader.step(step)
            t1 = time.perf_counter()
            res = train_step(model, parts, optimizer, scheduler, loss_weights, tc["grad_clip"], device, use_bf16)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            step_times.append(t2 - t0)
            wait_times.append(t1 - t0)
            step_tokens.append(res["tokens"])
            step_flops.append(res["flops"])
            window.append(res["losses"])
            history["batches"] += [[step, name, digest] for name, digest in res["digests"]]
            done = step + 1
            info = {"step": done, "loss": res["loss"], "losses": res["losses"], "lr": scheduler.get_last_lr()[0],
                    "grad_norm": res["grad_norm"]}
            if done % tc["log_every"] == 0 or done == tc["steps"]:
                n = min(len(window), len(step_times))  # timed steps of this window (this process's share)
                span = sum(step_times[-n:])
                info.update(dataset_loss=_window_mean(window),
                            tokens_per_s=sum(step_tokens[-n:]) / max(span, 1e-9),
                            data_wait=sum(wait_times[-n:]) / max(span, 1e-9),
                            mfu=sum(step_flops[-n:]) / max(span, 1e-9) / peak)
                window = []
                history["train"].append(info)
                log.info("step %d loss %.4f (%s) lr %.2e tok/s %.0f data-wait %.1f%% MFU %.2f%%", done, info["loss"],
                         " ".join(f"{k} {v:.4f}" for k, v in info["dataset_loss"].items()), info["lr"],
                         info["tokens_per_s"], 100 * info["data_wait"], 100 * info["mfu"])
            if done % tc["eval_every"] == 0 or done == tc["steps"]:
                evaluate(done)
            if done % tc["checkpoint_every"] == 0 or done == tc["steps"]:
                save_checkpoint(out_dir, {"step": done, "trainable": model.trainable_state(),
                                          "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                          "loader": loader.state(), "history": history, "rng": torch.get_rng_state(),
                                          "resume_config": this_config, "sources": sources, "window": window},
                                tc["keep_checkpoints"])
            if on_step is not None:
                on_step(done, info)
    finally:
        loader.close()

    skip = 1 if len(step_times) > 2 else 0  # the first step pays for loader start-up (workers, first window)
    step_times, wait_times = step_times[skip:], wait_times[skip:]
    step_tokens, step_flops = step_tokens[skip:], step_flops[skip:]
    total_time = sum(step_times)
    throughput = {"steps_timed": len(step_times), "tokens_per_s": sum(step_tokens) / max(total_time, 1e-9),
                  "step_time_s": total_time / max(1, len(step_times)),
                  "data_wait_fraction": sum(wait_times) / max(total_time, 1e-9),
                  "mfu": sum(step_flops) / max(total_time, 1e-9) / peak, "peak_flops": peak, "peak_source": peak_source,
                  "flops_per_step": sum(step_flops) / max(1, len(step_flops)), "device": str(device),
                  "precision": "bf16" if use_bf16 else "fp32", "num_workers": {n: l.num_workers if l.use_workers else 0
                                                                             for n, l in loader.loaders.items()},
                  "rank": rank, "world_size": world_size}
    kfold = None
    if ec["kfold"]:
        kfold = {}
        for spec in mixture.datasets:
            samples, _ = D.split_samples(spec, tokenizer, transform, ec["kfold_max_samples"], split="all")
            fs = R.FeatureSet.encode(model, samples, spec.max_seq_len, tokenizer, device)
            kfold[spec.name] = R.kfold_repeats(model, initial, fs, ec["kfold"], ec["kfold_seeds"], seed=cfg["seed"],
                                               epochs=ec["kfold_epochs"], batch_size=spec.batch_size, lr=tc["lr"],
                                               pad_id=pad_id, shuffles=ec["shuffles"],
                                               gate_lr_mult=tc["gate_lr_mult"], patience=ec["kfold_patience"])
    result = R.write_report(out_dir, model, eval_sets, history, loader.skipped(), eval_skipped, throughput, ec,
                            pad_id, sources=sources, seed=cfg["seed"], kfold=kfold,
                            rows_used={n: l.rows_ok() for n, l in loader.loaders.items()})
    return result
