"""`mmcorpus train`: train a compact Flamingo on a weighted mixture and report whether each dataset's images
are informative. The work lives in `trainer.train`; this module only parses arguments."""

from __future__ import annotations

import os

from mmcorpus.pipelines.errors import UserError

HELP = "train a small Flamingo on a mixture of pair/interleaved datasets and write report.json + plots"
DESCRIPTION = (
    "Train a compact Flamingo (frozen open_clip vision tower + Perceiver Resampler + frozen Hugging Face causal "
    "LM with gated cross-attention) on the Parquet written by 'mmcorpus pairs' / 'mmcorpus interleaved', mixed "
    "by weight as the YAML or TOML config says (see trainer/train.py for every key and the three mixture "
    "modes). Writes DIR/checkpoints/, "
    "DIR/report.json (per dataset: held-out loss with real vs shuffled vs blank images, the gap with a 95% CI "
    "and a verdict; gate values; skipped rows; tokens/s and MFU) and PNG plots. Without a model hub, pass local "
    "model paths, or --allow-random-weights for a smoke run (the report's 'sources' then says 'random'). "
    "Under torchrun (RANK/WORLD_SIZE set) each rank reads its own shard but gradients are not synchronised: "
    "each rank trains its own replica and writes under DIR/rank-R."
)


def add_arguments(parser) -> None:
    parser.add_argument("--config", required=True,
                        help="YAML (or .toml) file: model, data (datasets and weights), train, eval")
    parser.add_argument("--output", "-o", required=True, help="output folder (checkpoints, report.json, plots)")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output")
    parser.add_argument("--steps", type=int,
                        help="override train.steps (part of the run's config: --resume refuses a changed value)")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="build the vision tower / LM from their configs with random weights if none are found")


def run(args) -> int:
    from mmcorpus.trainer import train as T
    from mmcorpus.trainer.data import DataError

    try:
        cfg = T.load_config(args.config)
        if args.steps is not None:
            cfg["train"]["steps"] = args.steps  # checked by T.run (merge_config): train.steps >= 1
        if args.allow_random_weights:
            cfg["model"]["allow_random_weights"] = True

        def progress(step, info):
            if step % cfg["train"]["log_every"] == 0 or step == cfg["train"]["steps"]:
                extra = "".join(f" {k} {info[k]:.3g}" for k in ("tokens_per_s", "mfu", "data_wait") if k in info)
                print(f"step {step}/{cfg['train']['steps']} loss {info['loss']:.4f}{extra}", flush=True)

        report = T.run(cfg, args.output, resume=args.resume, on_step=progress, device=args.device)
    except (T.ConfigError, DataError) as exc:
        raise UserError(str(exc)) from exc
    for name, d in report["datasets"].items():
        gap = d["gap_shuffled"]
        ci = gap.get("ci95") or [float("nan"), float("nan")]
        print(f"{name}: {d['verdict']} (held-out loss with shuffled images minus real: {gap['mean']:+.4f}, "
              f"95% CI [{ci[0]:+.4f}, {ci[1]:+.4f}])")
        if d.get("verdict_note"):
            more = d.get("n_needed") and d["n_needed"] > d["n_eval"]
            print(f"  {d['verdict_note']}" + (f"; about {d['n_needed']:,} held-out samples needed at this spread"
                                             if more else ""))
    print(f"report: {os.path.join(args.output, 'report.json')}")
    return 0
