"""CLIP scoring throughput: end to end (JPEG decode + preprocess + model) against the model alone on the same
batch, with pipelines.clip_score.ClipScorer (the code the pipeline runs).

Images: the coco-mini photos (full-size JPEGs), captions their first caption. Model: ViT-B-32 with random
weights (no hub here; throughput does not depend on the weights). On CUDA the scorer takes its GPU path
(nvJPEG decode, fp16); otherwise the CPU path (PIL decode in a thread pool).

    python bench/bench_clip.py [--coco ../shared/data/coco-mini] [--model ViT-B-32] [--batch 32] [--batches 3]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipelines.clip_score import ClipConfig, ClipScorer  # noqa: E402


def sync(scorer):
    if scorer.cuda:
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coco", default=str(ROOT.parent / "shared" / "data" / "coco-mini"))
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    coco = pathlib.Path(args.coco)
    recs = [json.loads(line) for line in (coco / "captions.jsonl").read_text().splitlines()]
    images = [(coco / "images" / r["file_name"]).read_bytes() for r in recs]
    captions = [r["captions"][0] for r in recs]
    n = args.batch * args.batches
    images = (images * (n // len(images) + 1))[:n]
    captions = (captions * (n // len(captions) + 1))[:n]

    scorer = ClipScorer(ClipConfig(model=args.model, allow_random=True, device=args.device, batch_size=args.batch))
    scorer.score(images[:args.batch], captions[:args.batch])  # warm-up (threads, kernels, allocator)
    sync(scorer)

    t = time.perf_counter()
    for i in range(0, n, args.batch):
        scorer.score(images[i:i + args.batch], captions[i:i + args.batch])
    sync(scorer)
    end_to_end = n / (time.perf_counter() - t)

    t = time.perf_counter()
    tensors = [scorer.tensors(images[i:i + args.batch]) for i in range(0, n, args.batch)]
    sync(scorer)
    decode = n / (time.perf_counter() - t)
    pixels = [torch.stack(b) for b in tensors]

    t = time.perf_counter()
    for i, px in enumerate(pixels):
        scorer.embed(px, captions[i * args.batch:(i + 1) * args.batch])
    sync(scorer)
    model_alone = n / (time.perf_counter() - t)

    with torch.inference_mode():
        t = time.perf_counter()
        for px in pixels:
            scorer.model.encode_image(px.to(scorer.device, dtype=scorer.dtype))
        sync(scorer)
    image_tower = n / (time.perf_counter() - t)

    result = {
        "device": scorer.device, "model": args.model, "weights": scorer.source, "batch": args.batch, "images": n,
        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "end_to_end_img_per_s": round(end_to_end, 1), "decode_preprocess_img_per_s": round(decode, 1),
        "model_alone_img_per_s": round(model_alone, 1), "image_tower_alone_img_per_s": round(image_tower, 1),
        "end_to_end_vs_model": round(end_to_end / model_alone, 3),
        "note": "model alone = image + text towers on preprocessed tensors of the same batches; "
                "CPU measured on a 2-core machine shared with other jobs (inflated times)",
    }
    print(json.dumps(result, indent=2))
    out = ROOT / "bench" / "results" / "bench_clip.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
