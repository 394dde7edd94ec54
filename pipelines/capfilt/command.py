"""`mmcorpus capfilt`: BLIP CapFilt over a pairs dataset (synthetic captions + ITM filter)."""

from __future__ import annotations

import os

from mmcorpus.filters.imageinfo import DEFAULT_MAX_PIXELS
from mmcorpus.pipelines.errors import UserError
from mmcorpus.pipelines.runtime.runner import add_runner_args

HELP = "BLIP CapFilt: add synthetic captions to a pairs dataset and drop web/synthetic captions the ITM head rejects"
DESCRIPTION = (
    "Read a pairs dataset (INPUT/data/*.parquet as 'mmcorpus pairs' writes, or Parquet files of schema 'pair'; "
    "image bytes in image_bytes or a file in image_path). For every distinct image the BLIP captioner "
    "(transformers BlipForConditionalGeneration) samples --num-captions synthetic captions by nucleus sampling "
    "(top-p, repetition penalty 1.1), prompted with --prompt, which is stripped from the output; sampling is "
    "seeded per image, so a caption does not depend on batch composition or runner. The BLIP ITM head "
    "(BlipForImageTextRetrieval) scores the web caption(s) and every synthetic one: softmax probability of "
    "'match'; captions below --itm-threshold are dropped (reject reason itm_low). OUT/data holds one row per "
    "kept (image, caption) with caption_source web|synthetic and itm_score, so training can pick either or both; "
    "images left with no caption are rejects (no_caption_kept), undecodable images image_decode_failed, "
    "images over --max-pixels image_too_large; each image is decoded from the first of its rows that decodes. "
    "Synthetic rows get image_id '<web image_id>#synthetic-<j>' (image_id stays unique per row). "
    "Each synthetic caption is checked as pairs checks web captions: a flagged word rejects it, e-mails/IPs/phone "
    "numbers are masked (--pii reject: rejected). stats.json has kept/dropped per source and ITM score histograms. Models: a local folder saved with "
    "save_pretrained (model + BlipProcessor) or a cached hub id; no hub here, so --allow-random-weights builds "
    "random weights from the folder's config for a smoke run (stats.json 'models' then says 'random'). "
    "GPU: fp16/bf16 automatically, batches halve on out-of-memory."
)


def add_arguments(parser) -> None:
    parser.add_argument("input", help="pairs dataset folder (reads INPUT/data/*.parquet, else INPUT/*.parquet) or one .parquet file")
    parser.add_argument("--output", "-o", required=True, help="output folder (data/, rejects/, stats.json, _SUCCESS)")
    parser.add_argument("--captioner", required=True, help="BLIP captioning model: local folder or cached hub id "
                        "(e.g. Salesforce/blip-image-captioning-base)")
    parser.add_argument("--itm", required=True, help="BLIP ITM model: local folder or cached hub id (e.g. Salesforce/blip-itm-base-coco)")
    parser.add_argument("--num-captions", type=int, default=1,
                        help="synthetic captions sampled per image (BLIP: 1; 0: filter web captions only)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass")
    parser.add_argument("--repetition-penalty", type=float, default=1.1, help="CTRL-style repetition penalty while sampling")
    parser.add_argument("--prompt", default="a picture of ", help="decoder prompt; stripped from the captions")
    parser.add_argument("--itm-threshold", type=float, default=0.5, help="keep a caption when its ITM match probability is >= this")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="most tokens sampled per caption")
    parser.add_argument("--batch-size", type=int, default=16, help="images per model batch (ITM pairs: 4x); halves on CUDA OOM")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (captions are reproducible per image and seed)")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                        help="auto: bf16 (or fp16) on CUDA, fp32 on CPU")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="images with more pixels are rejects (image_too_large: decompression bombs), checked "
                             "from the header before decoding")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="build models with random weights from their configs when no weights are found (test runs only)")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    parser.add_argument("--num-shards", type=int, default=0,
                        help="Parquet shards per output folder (default: one per read task of about 4,096 input rows, "
                             "at least 4)")
    add_runner_args(parser)
    from mmcorpus.pipelines.safety.stages import add_arguments as add_safety_arguments  # issue 17

    add_safety_arguments(parser, lists=False)


def input_files(path: str) -> list[str]:
    from mmcorpus.schemas import storage

    try:
        if storage.isfile(path):
            return [path]
        if not storage.isdir(path):
            raise UserError(f"input {path!r} does not exist")
        for pattern in ("data/*.parquet", "*.parquet"):
            files = storage.glob(storage.join(path, pattern))
            if files:
                return files
    except OSError as exc:  # an object store: denied access, bad endpoint
        raise UserError(f"input {path!r} cannot be read: {exc}") from None
    raise UserError(f"input {path!r} holds no Parquet files (looked for data/*.parquet and *.parquet)")


def check_inputs(files: list[str]) -> None:
    from mmcorpus import schemas

    for f in files:
        try:
            schemas.read_table(f, "pair", columns=["image_id"])
        except (schemas.SchemaError, OSError) as exc:
            raise UserError(f"input {f!r} is not a pairs dataset: {exc}") from None


def model_sources(cfg) -> dict:
    """Load both models once here: a clear error before the pipeline starts, and their source for stats."""
    from mmcorpus.pipelines.models.blip import Captioner, Matcher

    out = {}
    if cfg.num_captions > 0:
        out["captioner"] = Captioner.load(cfg.captioner, cfg.allow_random_weights, "cpu", "fp32").source
    out["itm"] = Matcher.load(cfg.itm, cfg.allow_random_weights, "cpu", "fp32").source
    return out


def run(args) -> int:
    from mmcorpus.pipelines.capfilt import stages as capfilt
    from mmcorpus.pipelines.runtime.run import STATS, RunSpec, _write_json, execute
    from mmcorpus.pipelines.runtime.sink import Kind, spool_folder

    if args.num_captions < 0 or not 0 < args.top_p <= 1 or args.max_new_tokens < 1 or args.batch_size < 1:
        raise UserError("--num-captions must be >= 0, --top-p in (0, 1], --max-new-tokens and --batch-size >= 1")
    if args.num_shards < 0:
        raise UserError("--num-shards must be at least 0 (0: one per read task)")
    if args.max_pixels < 1:
        raise UserError("--max-pixels must be at least 1")
    if not 0 <= args.itm_threshold <= 1:
        raise UserError("--itm-threshold is a probability in [0, 1]")
    files = input_files(args.input)
    check_inputs(files)
    cfg = capfilt.CapFiltConfig(
        captioner=args.captioner, itm=args.itm, num_captions=args.num_captions, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, prompt=args.prompt, itm_threshold=args.itm_threshold,
        max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
        allow_random_weights=args.allow_random_weights, device=args.device, precision=args.precision,
        max_pixels=args.max_pixels, pii=args.pii, flagged_words=not args.no_flagged_image_words)
    sources = model_sources(cfg)
    if "random" in sources.values():
        print("capfilt: WARNING: running with RANDOM weights (--allow-random-weights); captions and scores are "
              "meaningless", flush=True)
    from mmcorpus.pipelines.safety.stages import safety_stats

    safety = safety_stats(cfg.safety(), None, kind="capfilt")
    tasks = capfilt.read_tasks(sorted(files))
    args.dask_partitions = len(tasks)  # each read task its own partition: bounded worker memory
    spec = RunSpec(command="capfilt", out_dir=args.output, config=dict(capfilt.config_dict(cfg), safety=safety),
                   inputs=files, kinds={"data": Kind("pair", "data", args.num_shards or max(4, len(tasks)))},
                   stages=[capfilt.STAGE_CANDIDATES, capfilt.STAGE_ITM], overwrite=args.overwrite,
                   extra_stats={"models": sources, "itm_threshold": args.itm_threshold, "safety": safety})
    print(f"capfilt: {len(files)} input file(s) -> {args.output}", flush=True)
    spool_dir = spool_folder(args.output)
    stats = execute(spec, args, lambda p: capfilt.build_capfilt(p, files, cfg, spool_dir, tasks))
    stats["itm_histograms"] = capfilt.histograms(stats["stages"])
    from mmcorpus.schemas import storage

    _write_json(storage.join(args.output, STATS), stats)
    by = {s["stage"]: s for s in stats["stages"]}
    im, itm = by.get(capfilt.STAGE_IMAGES, {}), by.get(capfilt.STAGE_ITM, {})
    ctr = itm.get("counters", {})
    why = by.get(capfilt.STAGE_CANDIDATES, {}).get("reasons", {})
    masked = by.get("safety", {}).get("counters", {}).get("documents_pii_masked", 0)
    print(f"capfilt: {im.get('in', 0)} images, {im.get('out', 0)} kept with a caption, {im.get('rejected', 0)} rejected; "
          f"captions kept web {ctr.get('web_kept', 0)}/{ctr.get('web_kept', 0) + ctr.get('web_dropped', 0)}, "
          f"synthetic {ctr.get('synthetic_kept', 0)}/{ctr.get('synthetic_kept', 0) + ctr.get('synthetic_dropped', 0)}; "
          f"{stats['totals']['written']} rows written in {stats['wall_seconds']:.1f}s; synthetic captions with a "
          f"flagged word {why.get('flagged_image_words', 0)}, with PII {why.get('pii_found', 0)} rejected / {masked} masked"
          + (" [RANDOM WEIGHTS]" if "random" in sources.values() else ""), flush=True)
    return 0
