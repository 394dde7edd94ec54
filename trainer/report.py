"""Does a dataset's images teach the model anything? Held-out losses with real, shuffled and blank images.

For every held-out sample the mean token loss is measured three ways: with its own images ("real"), with
images shuffled across held-out samples ("shuffled", averaged over `shuffles` permutations) and with a blank
mean-colour image ("blank"). The image informativeness is the gap shuffled - real (and blank - real), whose
95% confidence interval comes from a bootstrap over held-out images (documents for interleaved data): the
captions of one photo move together. With `eval.kfold: k` the held-out
losses come from k fresh short trainings on encoded features, each holding one fold of images out, so every
image is held out once, each training stopped early on a validation share of its own images (DESIGN.md:
with random or small encoders this is the stable signal).

With `eval.kfold_seeds: r` the k-fold is repeated r times with other fold splits and training orders; each
sample's losses are averaged over the repeats, the per-repeat mean gaps are reported (`seed_gaps`) and the
bootstrap interval is widened by their standard error (the spread between trainings, which a bootstrap over
held-out samples alone misses).

Verdict per dataset (VERDICT_RULE, also written into the report and the card): see `verdict`. In short:
"informative" when the CI of gap_shuffled lies above 0 and its mean reaches `eval.min_gap`; "not_informative"
only when the CI lies below `min_gap` (it excludes a useful gain), is at most 2 x min_gap wide and does not lie
wholly below 0, and the model learned; otherwise "inconclusive", with `n_needed` (held-out samples an interval
this noisy would need) and a `verdict_note` saying why.

`DIR/report.json` (read by `mmcorpus card`):
{
  "datasets": {NAME: {
      "gap_shuffled": {"mean": float, "ci95": [lo, hi]},   # nats per token, shuffled - real
      "gap_blank": {"mean": float, "ci95": [lo, hi]},      # nats per token, blank - real
      "verdict": "informative" | "not_informative" | "inconclusive",
      "loss": {"real": float, "shuffled": float, "blank": float},
      "method": "holdout" | "kfold", "n_eval": int, "folds": int | null, "fold_gaps": [per fold] (kfold),
      "verdict_note": str (why a verdict is inconclusive, or what a not_informative interval still allows),
      "n_needed": int (inconclusive: held-out samples for an interval of half-width min_gap / 2 at this spread;
                       at most n_eval when more samples alone would not settle it),
      "seed_gaps": [mean gap per k-fold repeat], "seed_sd": float (kfold with kfold_seeds > 1),
      "heldout_loss": [[step, loss], ...],                 # real-image held-out loss over training
      "train_loss": [[step, loss], ...],                   # its own training loss (unscaled), mean per log window
      "epochs_used": [per fold] (kfold: the early-stopped epoch of each fold),
      "skipped": {reason: n},  # training stream: empty_text, missing_image_bytes, missing_image_file,
                               # undecodable_image, no_usable_image (rows); image_<reason> (interleaved positions;
                               # image_other_split: an image of the other split, held out of a trained document
                               # or trained on and so left out of a held-out one)
      "skipped_eval": {reason: n}, "rows_used": int}},
  "gates": {"layers": [i, ...], "steps": [s, ...], "attn": [[tanh per layer] per step], "ff": [...]},
  "throughput": {"tokens_per_s", "mfu", "data_wait_fraction", "step_time_s", "peak_flops", "peak_source",
                 "device", "precision", ...},
  "sources": {"vision": "pretrained:..." | "random", "lm": ...}, "seed": int, "min_gap": float,
  "verdict_rule": str (the rule below, in words), "measured": str (what the gap is made of),
  "train_loss": [[step, loss], ...] (the step's loss: flamingo's lambda-weighted sum, else the one dataset's),
  "plots": [file names]
}
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from mmcorpus.trainer.data import content_hash


@dataclass
class FeatureSet:
    """Samples with their images already encoded by the frozen vision tower (features on CPU)."""
    keys: list[str]
    ids: list[list[int]]
    feats: list[torch.Tensor]  # [n_images, patches, dim] per sample
    max_seq_len: int
    image_id: int

    def __len__(self):
        return len(self.keys)

    @classmethod
    @torch.no_grad()
    def encode(cls, model, samples, max_seq_len: int, tokenizer, device="cpu", chunk: int = 64) -> "FeatureSet":
        flat = [img for s in samples for img in s.images]
        out = []
        for i in range(0, len(flat), chunk):
            imgs = torch.stack(flat[i: i + chunk]).to(device)
            out.append(model.encode_images(imgs[:, None])[:, 0].float().cpu())
        allf = torch.cat(out) if out else torch.zeros(0)
        feats, k = [], 0
        for s in samples:
            feats.append(allf[k: k + len(s.images)])
            k += len(s.images)
        return cls([s.key for s in samples], [s.input_ids for s in samples], feats, max_seq_len, model.image_token_id)

    def subset(self, idx) -> "FeatureSet":
        return FeatureSet([self.keys[i] for i in idx], [self.ids[i] for i in idx], [self.feats[i] for i in idx],
                          self.max_seq_len, self.image_id)

    def batch(self, idx, pad_id: int, feats=None) -> dict:
        feats = feats if feats is not None else self.feats
        b, n = len(idx), max(1, max(len(feats[i]) for i in idx))
        ids = torch.full((b, self.max_seq_len), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        shape = next(f.shape[1:] for f in feats if len(f))
        f = torch.zeros((b, n, *shape))
        image_mask = torch.zeros((b, n), dtype=torch.bool)
        for r, i in enumerate(idx):
            ids[r, : len(self.ids[i])] = torch.tensor(self.ids[i])
            mask[r, : len(self.ids[i])] = 1
            f[r, : len(feats[i])] = feats[i]
            image_mask[r, : len(feats[i])] = True
        labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == self.image_id, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels, "features": f, "image_mask": image_mask}


def _run(model, batch, device):
    batch = {k: v.to(device) for k, v in batch.items()}
    return model(batch["input_ids"], batch["attention_mask"], features=batch["features"],
                 image_mask=batch["image_mask"], labels=batch["labels"])


def shuffled_feats(fs: FeatureSet, rng: np.random.Generator) -> list[torch.Tensor]:
    """Every image slot gets the image of another slot (a derangement over all images of the set)."""
    slots = [(i, j) for i, f in enumerate(fs.feats) for j in range(len(f))]
    order = rng.permutation(len(slots))
    new = [f.clone() for f in fs.feats]
    for k in range(len(order)):
        i, j = slots[order[k]]
        si, sj = slots[order[(k + 1) % len(order)]]
        new[i][j] = fs.feats[si][sj]
    return new


@torch.no_grad()
def sample_losses(model, fs: FeatureSet, mode: str, batch_size: int, pad_id: int, seed: int = 0,
                  shuffles: int = 1) -> np.ndarray:
    """Mean token loss per sample with real / shuffled (mean over `shuffles` permutations) / blank images."""
    if not len(fs):
        return np.zeros(0)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    if mode == "real":
        variants = [fs.feats]
    elif mode == "shuffled":
        rng = np.random.default_rng([seed, 17])
        variants = [shuffled_feats(fs, rng) for _ in range(shuffles)]
    elif mode == "blank":
        size = model.image_size
        blank = model.encode_images(torch.zeros(1, 1, 3, size, size, device=device))[0, 0].float().cpu()
        variants = [[blank.expand(len(f), *blank.shape) for f in fs.feats]]
    else:
        raise ValueError(f"mode {mode!r}")
    total = np.zeros(len(fs))
    for feats in variants:
        for start in range(0, len(fs), batch_size):
            idx = list(range(start, min(len(fs), start + batch_size)))
            total[idx] += _run(model, fs.batch(idx, pad_id, feats), device)["sample_loss"].float().cpu().numpy()
    model.train(was_training)
    return total / len(variants)


def bootstrap_ci(diffs: np.ndarray, n: int = 1000, seed: int = 0, groups=None) -> dict:
    """Mean and 95% bootstrap interval of per-sample differences. With `groups` (one key per sample: its image
    or document) whole groups are resampled, since the captions of one photo are not independent samples."""
    if len(diffs) == 0:
        return {"mean": None, "ci95": [None, None]}
    rng = np.random.default_rng(seed)
    if groups is None:
        means = diffs[rng.integers(0, len(diffs), size=(n, len(diffs)))].mean(1)
    else:
        _, inverse = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
        sums, counts = np.bincount(inverse, weights=diffs), np.bincount(inverse).astype(float)
        pick = rng.integers(0, len(sums), size=(n, len(sums)))
        means = sums[pick].sum(1) / counts[pick].sum(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(diffs.mean()), "ci95": [float(lo), float(hi)]}


VERDICT_RULE = (
    "informative: the 95% interval of the shuffled-image gap lies above 0 and its mean reaches min_gap "
    "({min_gap} nats/token). not_informative: the interval lies below min_gap, so it excludes a useful gain, "
    "is at most 2 x min_gap wide, and does not lie wholly below 0 (real images scoring worse than shuffled ones "
    "means the model did not learn to use images, not that the data lacks them), and the model learned "
    "(held-out loss fell, or k-fold). "
    "Otherwise inconclusive, with the number of held-out samples (n_needed) an interval this noisy would need "
    "to reach a half-width of min_gap / 2.")


MEASURED = (
    "per held-out sample, the mean token loss of its caption with its own image and with images shuffled across "
    "the held-out samples (and a blank image); with k-fold every image is held out once from a short early-stopped "
    "training on the others. A contrastive image-caption probe on the same frozen features was measured against "
    "this loss gap (bench/bench_probe.py) and separated true from shuffled captions no better, so the loss gap "
    "decides.")


def verdict(gap: dict, min_gap: float) -> tuple[str, str | None]:
    """(verdict, note) for a gap {mean, ci95}; see VERDICT_RULE. A dataset is never called not_informative
    while its interval still holds a gain of `min_gap`: lacking evidence is inconclusive."""
    lo, hi = gap["ci95"]
    if lo is None:
        return "inconclusive", "no held-out samples"
    if lo > 0 and gap["mean"] >= min_gap:
        return "informative", None
    if hi < 0:
        return "inconclusive", ("real images scored worse than shuffled ones (the whole interval is below 0): the "
                                "model did not learn to use the images (random or untrained encoders, too few "
                                "samples or trainings), which says nothing about the data; add samples, "
                                "eval.kfold_seeds or pretrained weights")
    if hi < min_gap and hi - lo <= 2 * min_gap:
        return "not_informative", (None if lo <= 0 else f"images help by less than min_gap ({min_gap})")
    if hi < min_gap:
        return "inconclusive", ("the interval lies below min_gap but is wider than 2 x min_gap: too noisy to rule "
                                "out that a better-trained model would gain min_gap")
    if lo > 0:
        return "inconclusive", f"images help, but the mean gain is below min_gap ({min_gap})"
    return "inconclusive", "the interval holds both no gain and a gain of min_gap: too few held-out samples"


def samples_needed(gap: dict, n: int, min_gap: float) -> int | None:
    """Held-out samples for a 95% interval of half-width min_gap / 2 at the spread seen with `n` samples
    (the half-width shrinks as 1 / sqrt(n)): the size at which a gain of min_gap or none is told apart."""
    lo, hi = gap["ci95"]
    if lo is None or not n or min_gap <= 0:
        return None
    half = gap.get("ci95_bootstrap_half", (hi - lo) / 2)
    return int(np.ceil(n * (half / (min_gap / 2)) ** 2))  # <= n: the spread is not what keeps it inconclusive


def widen(gap: dict, seed_gaps: list[float]) -> dict:
    """The bootstrap interval widened by the standard error of the per-repeat mean gaps (t quantile)."""
    if len(seed_gaps) < 2 or gap["ci95"][0] is None:
        return gap
    from scipy import stats

    lo, hi = gap["ci95"]
    se = float(np.std(seed_gaps, ddof=1) / np.sqrt(len(seed_gaps)))
    t = float(stats.t.ppf(0.975, len(seed_gaps) - 1))
    m = gap["mean"]
    return {"mean": m, "ci95": [m - float(np.hypot(m - lo, t * se)), m + float(np.hypot(hi - m, t * se))],
            "ci95_bootstrap_half": (hi - lo) / 2}


def kfold_losses(model, initial: dict, fs: FeatureSet, k: int, epochs: int, batch_size: int, lr: float,
                 pad_id: int, seed: int = 0, shuffles: int = 3, weight_decay: float = 0.01,
                 gate_lr_mult: float = 1.0, patience: int = 1, val_fraction: float = 0.15) -> dict:
    """Per-sample held-out losses (real/shuffled/blank) from k short trainings from `initial` trainables, folds
    split by image/document so every one is held out once. With `patience` > 0 each fold stops early: a
    `val_fraction` of its training images (by content) is set aside, the real-image loss on it is measured
    after every epoch, training stops after `patience` epochs without improvement and the best epoch's
    weights are the ones tested. The model's trained state is restored after."""
    from mmcorpus.trainer.model import make_optimizer

    trained = model.trainable_state()
    device = next(model.parameters()).device
    fold_of = np.array([content_hash(f"fold:{seed}:{key}") % k for key in fs.keys])
    is_val = np.array([bool(patience) and content_hash(f"val:{seed}:{key}") % 1000 < val_fraction * 1000
                       for key in fs.keys], dtype=bool)
    out = {m: np.zeros(len(fs)) for m in ("real", "shuffled", "blank")}
    fold_gaps, epochs_used = [], []
    try:
        for fold in range(k):
            test_idx = np.flatnonzero(fold_of == fold)
            train_idx = np.flatnonzero((fold_of != fold) & ~is_val)
            val = fs.subset(np.flatnonzero((fold_of != fold) & is_val).tolist())
            if not len(test_idx) or not len(train_idx):
                continue
            model.load_trainable(initial)
            torch.manual_seed(seed * 1000 + fold)
            opt = make_optimizer(model, lr, weight_decay, gate_lr_mult)
            rng = np.random.default_rng([seed, fold])
            best, best_state, best_epoch, since = float("inf"), None, epochs, 0
            for epoch in range(epochs):
                model.train()
                order = train_idx[rng.permutation(len(train_idx))]
                for start in range(0, len(order), batch_size):
                    loss = _run(model, fs.batch(order[start: start + batch_size].tolist(), pad_id), device)["loss"]
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(list(model.trainable_named().values()), 1.0)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                if len(val):
                    v = float(sample_losses(model, val, "real", 64, pad_id).mean())
                    if v < best:
                        best, best_state, best_epoch, since = v, model.trainable_state(), epoch + 1, 0
                    else:
                        since += 1
                        if since >= patience:
                            break
            if best_state is not None:
                model.load_trainable(best_state)
            epochs_used.append(best_epoch)
            held = fs.subset(test_idx.tolist())
            for m in out:
                out[m][test_idx] = sample_losses(model, held, m, 64, pad_id, seed + fold, shuffles)
            fold_gaps.append(float((out["shuffled"][test_idx] - out["real"][test_idx]).mean()))
    finally:
        model.load_trainable(trained)
    return {**out, "folds": k, "fold_gaps": fold_gaps, "epochs_used": epochs_used, "keys": list(fs.keys)}


def kfold_repeats(model, initial: dict, fs: FeatureSet, k: int, repeats: int, seed: int = 0, **kw) -> dict:
    """`kfold_losses` repeated with seeds seed, seed + 1, ... (other folds, validation shares and training
    orders); per-sample losses averaged over the repeats, each repeat's mean gap kept in `seed_gaps`."""
    runs = [kfold_losses(model, initial, fs, k, seed=seed + r, **kw) for r in range(max(1, repeats))]
    out = {m: np.mean([run[m] for run in runs], axis=0) for m in ("real", "shuffled", "blank")}
    out.update(folds=k, keys=list(fs.keys), repeats=len(runs),
               fold_gaps=[g for run in runs for g in run["fold_gaps"]],
               epochs_used=[e for run in runs for e in run["epochs_used"]],
               seed_gaps=[float((run["shuffled"] - run["real"]).mean()) for run in runs])
    return out


def dataset_result(losses: dict, n_boot: int, seed: int, min_gap: float, groups=None) -> dict:
    """Gaps with their CIs (bootstrap over `groups`, the samples' image/document keys, when given; widened by the
    spread of `losses["seed_gaps"]` when the k-fold was repeated) and the verdict with its note and n_needed."""
    real, shuf, blank = losses["real"], losses["shuffled"], losses["blank"]
    seed_gaps = losses.get("seed_gaps") or []
    gap_s = widen(bootstrap_ci(shuf - real, n_boot, seed, groups), seed_gaps)
    gap_b = bootstrap_ci(blank - real, n_boot, seed + 1, groups)
    mean = (lambda a: float(a.mean()) if len(a) else None)
    res = {"gap_shuffled": gap_s, "gap_blank": gap_b,
           "loss": {"real": mean(real), "shuffled": mean(shuf), "blank": mean(blank)}, "n_eval": int(len(real))}
    res["verdict"], note = verdict(gap_s, min_gap)
    if note:
        res["verdict_note"] = note
    if res["verdict"] == "inconclusive":
        res["n_needed"] = samples_needed(gap_s, len(real), min_gap)
    if len(seed_gaps) > 1:
        res["seed_gaps"], res["seed_sd"] = seed_gaps, float(np.std(seed_gaps, ddof=1))
    return res


def _learned(curve: list, min_drop: float = 0.01) -> bool:
    return len(curve) >= 2 and curve[-1][1] < curve[0][1] - min_drop


def write_report(out_dir, model, eval_sets, history, skipped, eval_skipped, throughput, ec, pad_id, sources=None,
                 seed=0, kfold=None, rows_used=None) -> dict:
    datasets = {}
    for name, fs in eval_sets.items():
        if kfold and name in kfold:
            losses, method, folds = kfold[name], "kfold", kfold[name]["folds"]
        else:
            losses = {m: sample_losses(model, fs, m, ec["batch_size"], pad_id, seed, ec["shuffles"])
                      for m in ("real", "shuffled", "blank")}
            method, folds = "holdout", None
        keys = kfold[name]["keys"] if kfold and name in kfold else fs.keys
        res = dataset_result(losses, ec["bootstrap"], seed, ec["min_gap"], groups=keys)
        res.update(method=method, folds=folds,
                   heldout_loss=[[h["step"], h[name]] for h in history["eval"] if name in h],
                   skipped=skipped.get(name, {}), skipped_eval=eval_skipped.get(name, {}))
        res["train_loss"] = [[h["step"], h["dataset_loss"][name]] for h in history["train"]
                             if name in h.get("dataset_loss", {})]
        if kfold and name in kfold:
            res["fold_gaps"], res["epochs_used"] = kfold[name]["fold_gaps"], kfold[name]["epochs_used"]
        elif res["verdict"] == "not_informative" and not _learned(res["heldout_loss"]):
            res["verdict"] = "inconclusive"  # an untrained model shows no gap whatever the data
            res["verdict_note"] = "held-out loss did not improve during training; train longer"
            res["n_needed"] = samples_needed(res["gap_shuffled"], res["n_eval"], ec["min_gap"])
        if rows_used:
            res["rows_used"] = rows_used.get(name)
        datasets[name] = res
    gates = {"layers": model.xattn_layers, "steps": [g["step"] for g in history["gates"]],
             "attn": [g["attn"] for g in history["gates"]], "ff": [g["ff"] for g in history["gates"]]}
    report = {"datasets": datasets, "gates": gates, "throughput": throughput, "sources": sources or {},
              "seed": seed, "min_gap": ec["min_gap"], "verdict_rule": VERDICT_RULE.format(min_gap=ec["min_gap"]),
              "measured": MEASURED,
              "train_loss": [[h["step"], h["loss"]] for h in history["train"]]}
    report["plots"] = plot(out_dir, report)
    tmp = os.path.join(out_dir, "report.json.tmp")
    with open(tmp, "w") as f:
        json.dump(report, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(out_dir, "report.json"))
    return report


def plot(out_dir: str, report: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, files = list(report["datasets"]), []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        pts = report["datasets"][name]["heldout_loss"]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xlabel="step", ylabel="held-out loss (nats/token)", title="Held-out loss, real images")
    ax.legend()
    files.append(_save(fig, out_dir, "heldout_loss.png"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = np.arange(len(names))
    for j, (cond, marker) in enumerate((("real", "o"), ("shuffled", "s"), ("blank", "^"))):
        values = [report["datasets"][n]["loss"][cond] for n in names]
        axes[0].plot(x + (j - 1) * 0.2, [np.nan if v is None else v for v in values], marker, ms=8, ls="none",
                     label=cond)  # points, not bars: the conditions differ by far less than the loss itself
    axes[0].set(xticks=x, xticklabels=names, xlim=(-0.6, len(names) - 0.4), ylabel="held-out loss (nats/token)",
                title="Loss by image condition")
    axes[0].grid(axis="y", alpha=0.3)
    lo, hi = axes[0].get_ylim()
    axes[0].set_ylim(lo, hi + 0.3 * (hi - lo))  # room for the legend above the points
    axes[0].legend(ncol=3, loc="upper center")
    for j, key in enumerate(("gap_shuffled", "gap_blank")):
        means = [report["datasets"][n][key]["mean"] or 0 for n in names]
        lo = [m - (report["datasets"][n][key]["ci95"][0] or m) for m, n in zip(means, names)]
        hi = [(report["datasets"][n][key]["ci95"][1] or m) - m for m, n in zip(means, names)]
        axes[1].bar(x + (j - 0.5) * 0.4, means, 0.4, yerr=[lo, hi], capsize=4, label=key)
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set(xticks=x, xticklabels=[f"{n}\n{report['datasets'][n]['verdict']}" for n in names],
                ylabel="gap (nats/token), 95% CI", title="Image informativeness")
    axes[1].legend()
    files.append(_save(fig, out_dir, "image_informativeness.png"))

    g = report["gates"]
    fig, ax = plt.subplots(figsize=(6, 4))
    if g["steps"]:
        attn, ff = np.array(g["attn"]), np.array(g["ff"])
        for i, layer in enumerate(g["layers"]):
            ax.plot(g["steps"], attn[:, i], label=f"layer {layer} attn")
            ax.plot(g["steps"], ff[:, i], ls="--", label=f"layer {layer} ffw")
    ax.set(xlabel="step", ylabel="tanh(gate)", title="Cross-attention gates")
    ax.legend(fontsize=7)
    files.append(_save(fig, out_dir, "gates.png"))
    return files


def _save(fig, out_dir, name) -> str:
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, name), dpi=100)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name
