"""The trainer's verdict on real photos through the commands only: coco-mini with its true captions vs the same
photos with captions shuffled across them, tiny random models (as offline users run it).

`mmcorpus pairs` builds both datasets once (random tiny CLIP, no score threshold); subsets of their rows (the
first P photos, C captions each) are written beside them; `mmcorpus train` judges each subset with
k-fold over photos, for several seeds and learning rates. Prints and writes the gap (shuffled - real, nats per
token), its 95% interval and the verdict per run, the interval's half-width against the number of photos and
captions, and wall time per run.

    python bench/bench_informativeness.py [--coco ../shared/data/coco-mini] [--seeds 0 1 2]
                                          [--grid photos:captions:lr ...] [--kfold-seeds 1]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from tests.test_trainer_data import coco_records, tiny_clip_json, tiny_lm, word_tokenizer  # noqa: E402
from mmcorpus.pipelines.cli import main as cli  # noqa: E402
from mmcorpus.trainer.weights import load_tokenizer  # noqa: E402

DEFAULT_GRID = ["165:5:3e-3", "165:2:3e-3", "165:1:3e-3", "80:5:3e-3", "40:5:3e-3", "165:5:1e-3", "165:5:1e-2"]


def shuffled_folder(coco: pathlib.Path, out: pathlib.Path, seed: int = 11) -> pathlib.Path:
    """coco-mini's photos (linked) with every photo's captions taken from another photo (a derangement)."""
    recs = [json.loads(line) for line in open(coco / "captions.jsonl")]
    order = list(range(len(recs)))
    random.Random(seed).shuffle(order)
    caps = {order[i]: recs[order[(i + 1) % len(order)]]["captions"] for i in range(len(order))}
    out.mkdir(parents=True)
    os.symlink(coco / "images", out / "images")
    with open(out / "captions.jsonl", "w") as f:
        for i, rec in enumerate(recs):
            f.write(json.dumps({**rec, "captions": caps[i]}) + "\n")
    return out


def subset(pairs_out: pathlib.Path, dest: pathlib.Path, photos: int, captions: int) -> pathlib.Path:
    """Rows of the first `photos` photos (by source order), `captions` of each, as a pairs dataset folder."""
    table = pq.read_table(pairs_out / "data")
    rows = table.to_pylist()
    keep, seen = [], {}
    for r in sorted(rows, key=lambda r: r["image_id"]):
        n = seen.setdefault(r["sha256"], 0)
        if n < captions and (n or len(seen) <= photos):
            keep.append(r)
            seen[r["sha256"]] += 1
        elif not n:
            del seen[r["sha256"]]
    (dest / "data").mkdir(parents=True)
    pq.write_table(table.from_pylist(keep, schema=table.schema), dest / "data" / "part-00000-of-00001.parquet")
    return dest


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coco", default=str(ROOT.parent / "shared" / "data" / "coco-mini"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--grid", nargs="+", default=DEFAULT_GRID, help="photos:captions:lr runs")
    ap.add_argument("--kfold", type=int, default=3)
    ap.add_argument("--kfold-epochs", type=int, default=8)
    ap.add_argument("--kfold-seeds", type=int, default=1)
    ap.add_argument("--patience", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "informativeness_coco.json"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    coco = pathlib.Path(args.coco)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_info_"))
    clip = tiny_clip_json(tmp)
    tok = word_tokenizer(coco_records(coco), tmp / "tok")
    vocab = len(load_tokenizer(tok))
    pairs = {}
    for name, src in (("true", coco), ("shuffled", shuffled_folder(coco, tmp / "coco-shuffled"))):
        pairs[name] = tmp / f"pairs-{name}"
        assert cli(["pairs", str(src), "--output", str(pairs[name]), "--allow-random-weights", "--clip-model", clip,
                    "--workers", "1", "--num-shards", "1"]) == 0
    results = {"cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg(),
               "recipe": {"kfold": args.kfold, "kfold_epochs": args.kfold_epochs, "kfold_patience": args.patience,
                          "kfold_seeds": args.kfold_seeds, "gate_lr_mult": 30, "batch_size": 32,
                          "models": "tiny random open_clip ViT (64 px), tiny random GPT-2 (init 0.2)"},
               "runs": []}
    for item in args.grid:
        photos, captions, lr = item.split(":")
        photos, captions, lr = int(photos), int(captions), float(lr)
        data = {n: tmp / f"{n}-{photos}-{captions}" for n in pairs}  # one subset per size, whatever the lr
        data = {n: d if d.exists() else subset(pairs[n], d, photos, captions) for n, d in data.items()}
        for seed in args.seeds:
            lm = tiny_lm(tmp / f"lm-{seed}", vocab, init_range=0.2, seed=seed)
            cfg = {"seed": seed,
                   "model": {"vision": clip, "lm": lm, "tokenizer": tok, "num_latents": 16, "resampler_depth": 1,
                             "dim_head": 16},
                   "data": {"mode": "round_robin", "num_workers": 0, "datasets": [
                       {"name": n, "path": str(p), "kind": "pair", "batch_size": 32, "max_seq_len": 20}
                       for n, p in data.items()]},
                   "train": {"steps": 2, "lr": lr, "gate_lr_mult": 30, "warmup_steps": 1, "log_every": 2,
                             "eval_every": 2, "checkpoint_every": 2},
                   "eval": {"max_samples": 32, "shuffles": 2, "kfold": args.kfold, "kfold_epochs": args.kfold_epochs,
                            "kfold_patience": args.patience, "kfold_seeds": args.kfold_seeds}}
            run = tmp / f"run-{photos}-{captions}-{lr}-{seed}"
            run.mkdir()
            (run / "train.yaml").write_text(yaml.safe_dump(cfg))
            t = time.perf_counter()
            assert cli(["train", "--config", str(run / "train.yaml"), "--output", str(run / "out"),
                        "--allow-random-weights"]) == 0
            rep = json.loads((run / "out" / "report.json").read_text())
            row = {"photos": photos, "captions": captions, "lr": lr, "seed": seed,
                   "wall_s": round(time.perf_counter() - t, 1)}
            for n, d in rep["datasets"].items():
                g = d["gap_shuffled"]
                row[n] = {"verdict": d["verdict"], "gap": g["mean"], "ci95": g["ci95"], "n_eval": d["n_eval"],
                          "half_width": (g["ci95"][1] - g["ci95"][0]) / 2, "epochs_used": d.get("epochs_used"),
                          "n_needed": d.get("n_needed"), "seed_gaps": d.get("seed_gaps")}
            row["true_ahead"] = row["true"]["gap"] > row["shuffled"]["gap"]
            print(json.dumps(row), flush=True)
            results["runs"].append(row)
            with open(args.out, "w") as f:  # written after every run: a long sweep keeps what it measured
                json.dump(results, f, indent=1)
    results["load_average_at_end"] = os.getloadavg()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
