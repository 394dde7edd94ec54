"""Loader throughput vs what a training step consumes, and data wait as a share of step time.

Builds a pairs dataset (5 captions per coco-mini photo, the full-size 640 px JPEGs as stored, with their
sha256 as the pairs pipeline writes it) and the tiny model the tests use, then measures: loader samples/s
on its own (0 and N workers), training-step consumption in samples/s with a fixed batch, and a real
`trainer.train.run` with tokens/s, MFU (model FLOPs per `Flamingo.flops`) and data wait % of step time
(target < 5% on CPU); with --image-cache also with `data.image_cache` (a first run that writes the
training-resolution copies, then one that reads them). Torch gets the cores the workers leave.

    python bench/bench_loader.py [--coco ../shared/data/coco-mini] [--steps 40] [--workers 1]
                                 [--captions-per-image 5] [--source-size 0] [--image-cache]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
import tempfile
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_trainer_data import (coco_records, pair_rows, tiny_clip_json, tiny_lm, word_tokenizer,  # noqa: E402
                                     write_parquet)
from mmcorpus.trainer import data as D  # noqa: E402
from mmcorpus.trainer import train as T  # noqa: E402
from mmcorpus.trainer.model import build, make_optimizer  # noqa: E402
from mmcorpus.trainer.weights import load_tokenizer  # noqa: E402


def loader_rate(spec, tok, transform, workers, batches):
    loader = D.DatasetLoader(spec, tok, transform, shuffle_buffer=256, num_workers=workers)
    next(loader)  # start-up (worker fork) not counted
    t = time.perf_counter()
    for _ in range(batches):
        next(loader)
    rate = batches * spec.batch_size / (time.perf_counter() - t)
    loader.close()
    return rate


def decode_steps(recs, size: int, cache_dir) -> dict:
    """Milliseconds per image of each way to the model's pixels: full decode, decode at reduced DCT scale
    (PIL draft, the loader's way), and a read of the cached training-resolution copy."""
    transform = D.image_transform(size)
    cache = D.ImageCache(str(cache_dir), size)
    blobs = [(hashlib.sha256(r["bytes"]).hexdigest(), r["bytes"]) for r in recs]
    for sha, data in blobs:
        cache.put(sha, transform(D.decode_image(data, size)))
    ways = {"full_decode": lambda sha, data: transform(D.decode_image(data)),
            "reduced_scale_decode": lambda sha, data: transform(D.decode_image(data, size)),
            "cached_copy": lambda sha, data: cache.get(sha)}
    out = {}
    for name, fn in ways.items():
        t = time.perf_counter()
        for sha, data in blobs:
            fn(sha, data)
        out[name] = 1000 * (time.perf_counter() - t) / len(blobs)
    return out


def reencode(data: bytes, size: int) -> bytes:
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    scale = size / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BICUBIC)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=90)
    return out.getvalue()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--coco", default=str(ROOT.parent / "shared" / "data" / "coco-mini"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--captions-per-image", type=int, default=5,
                    help="pair rows per photo (coco-mini has 5 captions; 1: every row a distinct image)")
    ap.add_argument("--source-size", type=int, default=0,
                    help="re-encode photos to this shorter side first (img2dataset-style stored images); 0: as is")
    ap.add_argument("--image-cache", action="store_true",
                    help="also run with data.image_cache (training-resolution copies by sha256): cold, then warm")
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) - args.workers))
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="bench_loader_"))
    recs = coco_records(pathlib.Path(args.coco))
    if args.source_size:
        recs = [{**r, "bytes": reencode(r["bytes"], args.source_size)} for r in recs]
    tok_dir = word_tokenizer(recs, tmp / "tok")
    lm = tiny_lm(tmp / "lm", len(load_tokenizer(tok_dir)), init_range=0.2)
    clip = tiny_clip_json(tmp)
    rows = pair_rows(recs, args.captions_per_image)
    for row in rows:  # as `mmcorpus pairs` writes them: with the image's sha256
        row["sha256"] = hashlib.sha256(row["image_bytes"]).hexdigest()
    data = write_parquet(tmp / "pairs" / "data" / "part-0.parquet", rows, "pair", row_group_size=128)
    tok = load_tokenizer(tok_dir)
    model_cfg = {"vision": clip, "lm": lm, "tokenizer": tok_dir, "allow_random_weights": True, "num_latents": 16,
                 "resampler_depth": 1, "dim_head": 16}
    model, src = build(model_cfg, tok, allow_random=True)
    transform = D.image_transform(src["image_size"])
    spec = D.DatasetSpec("pairs", str(data.parent.parent), "pair", batch_size=args.batch_size, holdout=0.1)

    results = {"source_size": args.source_size or "original (coco-mini, 640 px)",
               "captions_per_image": args.captions_per_image, "batch_size": args.batch_size,
               "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
               "load_average_at_start": os.getloadavg()}
    results["per_image_ms"] = decode_steps(recs, src["image_size"], tmp / "step-cache")
    results["loader_samples_per_s"] = {f"workers={w}": loader_rate(spec, tok, transform, w, 20)
                                       for w in sorted({0, args.workers})}
    if args.image_cache:
        cached = D.image_transform(src["image_size"], cache=str(tmp / "loader-cache"))
        loader_rate(spec, tok, cached, 0, 20)  # writes the copies
        for w in sorted({0, args.workers}):
            results["loader_samples_per_s"][f"workers={w}_cache_warm"] = loader_rate(spec, tok, cached, w, 20)
    batch = next(D.DatasetLoader(spec, tok, transform, num_workers=0))
    opt = make_optimizer(model, 1e-3, 0.01)
    model.train()
    for i in range(12):
        if i == 2:
            t = time.perf_counter()
        out = model(batch["input_ids"], batch["attention_mask"], batch["images"], batch["image_mask"], labels=batch["labels"])
        out["loss"].backward()
        opt.step()
        opt.zero_grad()
    step = (time.perf_counter() - t) / 10
    results["train_step_s"] = step
    results["train_consumes_samples_per_s"] = args.batch_size / step

    runs = [(f"train_run_workers={w}", w, None) for w in sorted({0, args.workers})]
    if args.image_cache:  # the first run writes the training-resolution copies, the second only reads them
        cache = str(tmp / "image-cache")
        runs += [(f"train_run_workers={args.workers}_cache_{t}", args.workers, cache) for t in ("cold", "warm")]
    for label, w, cache in runs:
        data = {"num_workers": w, "shuffle_buffer": 256, "datasets": [
            {"name": "pairs", "path": spec.path, "kind": "pair", "batch_size": args.batch_size, "holdout": 0.1}]}
        if cache:
            data["image_cache"] = cache
        cfg = {"model": model_cfg, "data": data,
               "train": {"steps": args.steps, "log_every": 10, "eval_every": 10 ** 9, "checkpoint_every": 10 ** 9},
               "eval": {"max_samples": 32, "bootstrap": 100, "shuffles": 1}}
        rep = T.run(cfg, str(tmp / label))
        run = {k: rep["throughput"][k] for k in ("tokens_per_s", "mfu", "data_wait_fraction", "step_time_s",
                                                 "flops_per_step", "peak_flops", "peak_source", "device", "precision")}
        run["samples_per_s"] = args.batch_size / run["step_time_s"]
        results[label] = run
    results["load_average_at_end"] = os.getloadavg()  # other processes on the machine skew every figure
    print(json.dumps(results, indent=1))
    os.makedirs(ROOT / "bench" / "results", exist_ok=True)
    name = "bench_loader" + (f"_src{args.source_size}" if args.source_size else "")
    name += f"_cap{args.captions_per_image}.json" if args.captions_per_image != 5 else ".json"
    with open(ROOT / "bench" / "results" / name, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
