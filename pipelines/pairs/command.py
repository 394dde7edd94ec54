"""`mmcorpus pairs`: image-text pairs from interleaved output, caption tables, COCO captions or img2dataset
folders; captions cleaned, images checked, CLIP-scored, filtered and deduplicated."""

from __future__ import annotations

import glob
import math
import os

import apache_beam as beam

from mmcorpus.filters.imageinfo import DEFAULT_MAX_PIXELS
from mmcorpus.pipelines.errors import UserError
from mmcorpus.pipelines.runtime.runner import add_runner_args

HELP = "build image-text pairs (ALIGN/LTIP style), CLIP-score, filter and dedupe them"
DESCRIPTION = (
    "Read each SOURCE ([NAME=]PATH; NAME becomes source_dataset): an 'mmcorpus interleaved' output folder "
    "(alt text of each fetched image -> pair; --include-context-text adds the neighbouring text chunk as a "
    "second, LTIP-style pair), a COCO-style folder (captions.jsonl + images/, one pair per caption), an "
    "img2dataset output folder, a pairs dataset, or a .jsonl/.parquet/.csv/.tsv table of {url|path|image, "
    "caption}. URLs without bytes are downloaded (one downloader per worker; the image's X-Robots-Tag noai/"
    "noimageai refuses it; a rerun into the same output fetches only the URLs that failed: OUT/_image_fetch). Stages, each counted in stats.json with its "
    "rejects: read -> caption (clean HTML entities/whitespace; drop empty, boilerplate such as 'image', file "
    "names, 'click here'; DataComp length rule: more than 2 words and 5 characters) -> safety (image and page "
    "URL on --opt-out-list/--blocklist files, flagged words in the image URL or caption, e-mails/IPs/phone "
    "numbers in the caption masked or, with --pii reject, rejected; before any download) -> image (decode "
    "check, sha256, pHash; corrupt/truncated/zero-byte/bomb images rejected) -> decontaminate (--decontaminate "
    "EVAL_DIR: same bytes or pHash within --phash-distance of an evaluation image) -> clip_score (open_clip cosine of image "
    "and caption embeddings, batched; on CUDA batched nvJPEG decode on a prefetch thread overlapping the model, "
    "fp16 (or --precision bf16), out-of-memory halves the batch) -> nsfw (with --nsfw-head: an MLP over the image "
    "embedding clip_score computed, no second encoding; nsfw_score per row, rejected above --nsfw-threshold) "
    "-> clip_filter (--min-clip-score, LAION used 0.28 for ViT-B/32, or --keep-top-fraction over the WHOLE "
    "run) -> dedup "
    "(exact sha256, pHash Hamming <= --phash-distance via multi-index hashing, identical pHashes collapsed first; "
    "--phash-transforms also catches horizontally flipped and 90/180/270-degree rotated copies; SemDeDup-style "
    "semantic). Dedup keeps, per duplicate group, the image whose best pair has "
    "the highest clip_score (then the smallest image_id); all captions of a kept image stay. Pairs inputs "
    "(e.g. CapFilt output) keep their caption_source and itm_score. Weights: "
    "--clip-pretrained TAG_OR_PATH; without it the run stops unless --allow-random-weights (then stats.json "
    "says clip_weights: random)."
)

STAGE_READ = "read"
STAGE_CAPTION = "caption"
STAGE_IMAGE = "image"
STAGE_THRESHOLD = "clip_filter"
HIST_BIN = 0.02
DEDUP_KINDS = ("exact", "phash", "semantic")


def add_arguments(parser) -> None:
    parser.add_argument("sources", nargs="+", metavar="SOURCE", help="[NAME=]PATH of an input (see above)")
    parser.add_argument("--output", "-o", required=True, help="output folder (data/, rejects/, stats.json, _SUCCESS)")
    g = parser.add_argument_group("CLIP")
    g.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name or a model-config .json path")
    g.add_argument("--clip-pretrained", default=None, help="open_clip pretrained tag or local checkpoint path")
    g.add_argument("--allow-random-weights", action="store_true",
                   help="score with a randomly initialised model when no weights are given (tests and demos only)")
    g.add_argument("--batch-size", type=int, default=64, help="pairs per CLIP batch (halves on CUDA out-of-memory)")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")
    g.add_argument("--decode-threads", type=int, default=0, help="CPU image decode threads per worker (0: all cores)")
    g.add_argument("--precision", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="CLIP precision: auto = fp16 on CUDA, fp32 on CPU")
    g.add_argument("--clip-decode", default="auto", choices=["auto", "pil", "device"],
                   help="image decode for CLIP: device = batched torchvision decode_jpeg on the model's device "
                        "(nvJPEG on CUDA), pil = PIL in threads; auto = device on CUDA, pil on CPU")
    g.add_argument("--store-embeddings", action="store_true",
                   help="keep the float16 image embedding in clip_embedding (for later semantic dedup)")
    f = parser.add_mutually_exclusive_group()
    f.add_argument("--min-clip-score", type=float, default=None, help="keep pairs with clip_score >= X (LAION: 0.28 for ViT-B/32)")
    f.add_argument("--keep-top-fraction", type=float, default=None,
                   help="keep the ceil(F*n) best-scoring pairs of the whole run (DataComp style), F in (0, 1]")
    d = parser.add_argument_group("dedup and decontamination")
    d.add_argument("--dedup", default="exact,phash", help="comma list of exact, phash, semantic, or 'none'")
    d.add_argument("--phash-distance", type=int, default=10, help="pHash Hamming distance counted as a duplicate (imagededup default 10)")
    d.add_argument("--phash-blocks", type=int, default=0,
                   help="multi-index blocks (> distance; 0: chosen from the number of images). More blocks: longer "
                        "keys, more keys per image")
    d.add_argument("--phash-parts", type=int, default=2,
                   help="workers that share the pHash search (each holds every image's hash)")
    d.add_argument("--phash-transforms", action="store_true",
                   help="also find horizontally flipped and 90/180/270-degree rotated copies (pHash is blind to "
                        "them): 4 more hashes per image, several times the pHash dedup work")
    d.add_argument("--semantic-eps", type=float, default=0.05, help="semantic duplicate when embedding cosine > 1 - eps")
    d.add_argument("--semantic-clusters", type=int, default=0, help="k-means clusters (0: sqrt(number of images))")
    d.add_argument("--decontaminate", metavar="EVAL_DIR", default=None,
                   help="drop pairs whose image is byte-identical or within --phash-distance of an image under EVAL_DIR")
    s = parser.add_argument_group("captions and images")
    s.add_argument("--include-context-text", action="store_true",
                   help="interleaved sources: also pair each image with its neighbouring text chunk (LTIP style)")
    s.add_argument("--min-words", type=int, default=3, help="caption minimum words (DataComp: more than 2)")
    s.add_argument("--min-chars", type=int, default=6, help="caption minimum characters (DataComp: more than 5)")
    s.add_argument("--max-chars", type=int, default=1000, help="caption maximum characters")
    s.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="larger images are rejected as decompression bombs")
    s.add_argument("--allow-private-urls", action="store_true", help="let image URLs point at private/loopback hosts")
    s.add_argument("--fetch-timeout", type=int, default=10,
                   help="seconds per image download request (a rerun into the same output fetches only the URLs "
                        "that failed: OUT/_image_fetch records each URL; delete it to fetch everything again)")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    parser.add_argument("--chunk-rows", type=int, default=4096,
                        help="records per read task: a larger JSON-lines, CSV/TSV or Parquet file is read in chunks, "
                             "each its own partition, so no worker holds a whole file's rows")
    parser.add_argument("--num-shards", type=int, default=0,
                        help="Parquet shards per output folder (default: one per read chunk of about 4,096 records, "
                             "at least 4, so a shard's rows stay the same size however large the input)")
    add_runner_args(parser)
    from mmcorpus.pipelines.safety.stages import add_arguments as add_safety_arguments  # issue 17

    add_safety_arguments(parser)
    from mmcorpus.pipelines.safety import nsfw  # the head over the image embedding clip_score computes

    nsfw.add_arguments(parser, documents=False)


# ---- stage functions (module level: workers import them by name) ----------------------------------------

def to_candidate(row):
    from mmcorpus.filters.reasons import Reject

    if "_bad" in row:
        return Reject("read_failed", row["_detail"])
    if row.get("image_bytes") is None and not row.get("image_path") and not row.get("url"):
        return Reject("missing_image", "no image bytes, path or URL")
    return row


def source_of(row) -> str:
    return row.get("source") or row.get("_bad") or "?"


class CaptionStage:
    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, row):
        from mmcorpus.filters.captions import check_caption

        result = check_caption(row["caption"], self.cfg)
        return result if not isinstance(result, str) else dict(row, caption=result)


class ImageStage:
    """Decode check, sha256 and pHash. The bytes leave the row here: a kept row carries `_file`, the image file
    it came from or a copy under `spool_dir` (inline and downloaded bytes, named by sha256), which CLIP and the
    sink read again; so no shuffle after this stage moves image bytes (bounded memory at any number of rows)."""

    def __init__(self, max_pixels: int, transforms: bool = False, spool_dir: str | None = None):
        self.max_pixels = max_pixels
        self.transforms = transforms
        self.spool_dir = spool_dir

    def __call__(self, row):
        from mmcorpus.filters.imageinfo import inspect_image
        from mmcorpus.filters.reasons import Reject
        from mmcorpus.pipelines.pairs.sources import load_bytes
        from mmcorpus.pipelines.runtime.sink import FileBytes, spool
        from mmcorpus.schemas import storage

        if row.get("_fetch_error"):
            return Reject(row["_fetch_reason"], row["_fetch_error"])
        fetched = row.get("_file")  # downloaded into the fetch record: read from there, not stored again
        try:
            if row.get("_data") is not None:
                data = row["_data"]
            else:
                data = FileBytes(fetched).read() if fetched else load_bytes(row)
        except OSError as exc:
            return Reject("read_failed", f"{row.get('image_path')}: {exc.strerror or exc}")
        if data is None:
            return Reject("missing_image", "no image bytes, path or URL")
        info = inspect_image(data, self.max_pixels, self.transforms)
        if isinstance(info, Reject):
            where = row.get("image_path") or row.get("url") or row["image_ref"]
            return Reject(info.reason, f"{where}: {info.detail}")
        meta = dict(row["metadata"], image_format=info.format, image_mode=info.mode)
        if info.n_frames > 1:
            meta["n_frames"] = info.n_frames
        from_file = not fetched and row.get("_data") is None and row.get("image_bytes") is None
        if self.spool_dir is None and not fetched:  # bytes stay in the row (callers without an output folder)
            place = {"_data": data}
        else:
            path = fetched or (storage.abspath(row["image_path"]) if from_file
                               else spool(self.spool_dir, data, info.sha256).path)
            place = {"_data": None, "_file": path}
        return dict(row, **place, image_bytes=None, sha256=info.sha256, phash=info.phash, width=info.width,
                    height=info.height, metadata=meta, _phash_variants=info.phash_transforms)


def image_data(row) -> bytes:
    """The checked image bytes of a row after ImageStage."""
    from mmcorpus.pipelines.runtime.sink import FileBytes

    return row["_data"] if row.get("_data") is not None else FileBytes(row["_file"]).read()


class Threshold:
    def __init__(self, minimum: float):
        self.minimum = minimum

    def __call__(self, row):
        from mmcorpus.filters.reasons import Reject

        if row["clip_score"] >= self.minimum:
            return row
        return Reject("clip_score_low", f"clip_score {row['clip_score']:.4f} < {self.minimum}")


def needs_fetch(row) -> bool:
    return (row.get("image_bytes") is None and not row.get("image_path") and bool(row.get("url"))
            and not row.get("_fetch_error"))


class FetchGroup(beam.DoFn):
    """(group, rows) -> rows with the downloaded image (`_file`, or `_data` without a record folder) or
    `_fetch_error`: each unique URL once, through the worker's one downloader (fetching/downloader.py, shared
    with `interleaved`); URLs that succeeded in an earlier run into the same output come from its record."""

    def __init__(self, timeout: int, allow_private: bool, record_dir: str = "", threads: int = 16):
        self.timeout, self.allow_private = timeout, allow_private
        self.record_dir, self.threads = record_dir, threads

    def process(self, element):
        from mmcorpus.pipelines.fetching.downloader import DownloadConfig, FetchRecord, fetch_with_record

        _, rows = element
        by_url: dict[str, list] = {}
        for row in sorted(rows, key=lambda r: (r["image_ref"], r["row_key"])):
            by_url.setdefault(row["url"], []).append(row)
        cfg = DownloadConfig(threads=self.threads, timeout=self.timeout)
        for result in fetch_with_record(by_url, cfg, self.allow_private, FetchRecord(self.record_dir)):
            for row in by_url.pop(result.url):
                if not result.ok:
                    yield dict(row, _fetch_error=result.error, _fetch_reason=result.reason)
                elif result.path is not None:
                    yield dict(row, _file=result.path)
                else:
                    yield dict(row, _data=result.data)


def _group_of(row, groups):
    from mmcorpus.pipelines.runtime.sink import stable_hash

    return stable_hash(row["url"]) % groups, row


def _local_only(row):
    if not needs_fetch(row):
        yield row


def _remote_only(row):
    if needs_fetch(row):
        yield row


def output_row(row, store_embeddings: bool):
    from mmcorpus import schemas
    from mmcorpus.pipelines.runtime.sink import FileBytes

    out = {
        "image_id": row["image_id"], "url": row.get("url"),
        "image_bytes": row["_data"] if row.get("_data") is not None else FileBytes(row["_file"]),
        "image_path": row.get("image_path"), "caption": row["caption"],
        "caption_source": row.get("caption_source") or "web", "clip_score": row.get("clip_score"),
        "itm_score": row.get("itm_score"), "nsfw_score": row.get("nsfw_score"),
        "width": row["width"], "height": row["height"],
        "sha256": row["sha256"], "phash": row["phash"], "source_dataset": row["source_dataset"],
        "clip_embedding": row.get("clip_embedding") if store_embeddings else None,
        "metadata": schemas.metadata_json(dict(row["metadata"], image_ref=row["image_ref"])),
    }
    return "data", row["row_key"], out


def _score_bins(row):
    b = int(math.floor((row["clip_score"] + 1.0) / HIST_BIN))
    return (("clip_score", f"score_bin_{b:03d}", ""), 1)


# ---- wiring ---------------------------------------------------------------------------------------------

def build(p, opts: dict):
    from mmcorpus.pipelines.pairs import dedup as pair_dedup
    from mmcorpus.pipelines.pairs import sources as pairs_sources
    from mmcorpus.pipelines.models.clip import ScoreBatches
    from mmcorpus.pipelines.runtime.stage import Collector

    c = Collector()
    raw = (p | "Tasks" >> beam.Create(opts["tasks"])
           | "Read" >> beam.FlatMap(pairs_sources.read_task, opts["include_context"]))
    pairs = c.stage(raw, STAGE_READ, to_candidate, source_of)
    pairs = c.stage(pairs, STAGE_CAPTION, CaptionStage(opts["caption_cfg"]), source_of)
    # safety (issue 17): opt-out lists, blocklists, flagged words and PII, before any image is downloaded
    from mmcorpus.pipelines.safety.nsfw import STAGE_NSFW, NsfwStage
    from mmcorpus.pipelines.safety.stages import STAGE_SAFETY, PairSafety

    pair_safety = PairSafety(opts["safety"])
    pairs = c.stage(pairs, STAGE_SAFETY, pair_safety, source_of, setup=pair_safety.setup)
    local = pairs | "LocalImages" >> beam.FlatMap(_local_only)
    fetched = (pairs | "RemoteImages" >> beam.FlatMap(_remote_only)
               | "FetchKey" >> beam.Map(_group_of, opts["fetch_groups"]) | "FetchGroup" >> beam.GroupByKey()
               | "Fetch" >> beam.ParDo(FetchGroup(opts["fetch_timeout"], opts["allow_private"], opts.get("record_dir", ""))))
    pairs = (local, fetched) | "WithBytes" >> beam.Flatten()
    pairs = c.stage(pairs, STAGE_IMAGE, ImageStage(opts["max_pixels"], opts["dedup_cfg"].phash_transforms,
                                                   opts.get("spool_dir")), source_of)
    if opts["eval_refs"] is not None:  # before scoring: no model time spent on evaluation images
        pairs = c.stage(pairs, pair_dedup.STAGE_DECON,
                        pair_dedup.Decontaminate(opts["eval_refs"], opts["dedup_cfg"].phash_distance), source_of)
    # batches within a bundle (a Dask partition: one read chunk's rows), no shuffle
    batches = pairs | "Batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=opts["clip_cfg"].batch_size)
    tagged = batches | "ClipScore" >> beam.ParDo(ScoreBatches(opts["clip_cfg"]))
    pairs = pair_dedup._emit(c, tagged, "Clip_")
    c.add_counts(pairs | "ScoreBins" >> beam.Map(_score_bins))
    if opts["nsfw"] is not None:  # issue 17: the head on the embedding clip_score left in the row
        pairs = c.stage(pairs, STAGE_NSFW, NsfwStage(*opts["nsfw"]), source_of)
    if opts["min_clip_score"] is not None:
        pairs = c.stage(pairs, STAGE_THRESHOLD, Threshold(opts["min_clip_score"]), source_of)
    elif opts["top_fraction"] is not None:
        pairs = pair_dedup.keep_top_fraction(c, pairs, opts["top_fraction"])
    pairs, _ = pair_dedup.dedup_pairs(c, pairs, opts["dedup_cfg"])
    c.add(pairs | "ToSink" >> beam.Map(output_row, opts["store_embeddings"]))
    return c.finish()


def eval_references(folder: str, max_pixels: int) -> tuple[list[tuple[str, str, str]], int]:
    """(name, sha256, phash) of every decodable image under `folder`, and how many files were skipped."""
    from mmcorpus.filters.imageinfo import ImageInfo, inspect_image

    if not os.path.isdir(folder):
        raise UserError(f"--decontaminate {folder!r} is not a folder")
    refs, skipped = [], 0
    for path in sorted(glob.glob(os.path.join(folder, "**", "*"), recursive=True)):
        if not os.path.isfile(path):
            continue
        with open(path, "rb") as f:
            info = inspect_image(f.read(), max_pixels)
        if isinstance(info, ImageInfo):
            refs.append((os.path.relpath(path, folder), info.sha256, info.phash))
        else:
            skipped += 1
    if not refs:
        raise UserError(f"--decontaminate {folder!r} holds no decodable images")
    return refs, skipped


def histogram(stages: list[dict], kept_scores: list[float]) -> dict:
    bins = {}
    for s in stages:
        if s["stage"] == "clip_score":
            for name, n in s["counters"].items():
                if name.startswith("score_bin_"):
                    bins[int(name.rsplit("_", 1)[1])] = n
    n_bins = int(round(2 / HIST_BIN))
    kept = [0] * n_bins
    for v in kept_scores:
        kept[min(n_bins - 1, max(0, int(math.floor((v + 1.0) / HIST_BIN))))] += 1
    lo = min([b for b in bins] + [i for i, n in enumerate(kept) if n] or [0])
    hi = max([b for b in bins] + [i for i, n in enumerate(kept) if n] or [0]) + 1
    return {"bin_width": HIST_BIN, "bin_edges": [round(-1 + i * HIST_BIN, 4) for i in range(lo, hi + 1)],
            "scored": [bins.get(i, 0) for i in range(lo, hi)], "kept": kept[lo:hi]}


def run(args) -> int:
    from mmcorpus import schemas
    from mmcorpus.schemas import storage

    from mmcorpus.filters.captions import CaptionConfig
    from mmcorpus.pipelines.pairs import dedup as pair_dedup
    from mmcorpus.pipelines.pairs import sources as pairs_sources
    from mmcorpus.pipelines.models.clip import STAGE_CLIP, ClipConfig, load_model
    from mmcorpus.pipelines.runtime.run import STATS, RunSpec, _write_json, execute
    from mmcorpus.pipelines.runtime.runner import worker_count
    from mmcorpus.pipelines.fetching.downloader import fetch_record_folder
    from mmcorpus.pipelines.runtime.sink import Kind, shard_files, spool_folder

    if args.keep_top_fraction is not None and not 0 < args.keep_top_fraction <= 1:
        raise UserError("--keep-top-fraction must be in (0, 1]")
    if args.batch_size < 1 or args.num_shards < 0 or args.phash_parts < 1 or args.chunk_rows < 1:
        raise UserError("--batch-size, --chunk-rows and --phash-parts must be at least 1, --num-shards at least 0 "
                        "(0: automatic)")
    dedup = [d.strip() for d in args.dedup.split(",") if d.strip() and d.strip() != "none"]
    unknown = sorted(set(dedup) - set(DEDUP_KINDS))
    if unknown:
        raise UserError(f"--dedup {unknown[0]!r}: choose from {', '.join(DEDUP_KINDS)} or none")
    if not 0 <= args.phash_distance < 32 or (args.phash_blocks and args.phash_blocks <= args.phash_distance):
        raise UserError("--phash-distance must be in [0, 31] and --phash-blocks (if set) larger than it")
    sources = pairs_sources.detect_all(args.sources)
    clip_cfg = ClipConfig(model=args.clip_model, pretrained=args.clip_pretrained, allow_random=args.allow_random_weights,
                          device=args.device, batch_size=args.batch_size, decode_threads=args.decode_threads,
                          precision=args.precision, decode=args.clip_decode)
    loaded = load_model(clip_cfg)  # fails here, before the pipeline, when weights are missing
    weights = loaded.source
    if weights == "random":
        print("pairs: WARNING: CLIP has RANDOM weights (--allow-random-weights); clip_score is meaningless", flush=True)
    dedup_cfg = pair_dedup.DedupConfig(exact="exact" in dedup, phash="phash" in dedup, semantic="semantic" in dedup,
                                       phash_distance=args.phash_distance, phash_blocks=args.phash_blocks,
                                       phash_parts=args.phash_parts, phash_transforms=args.phash_transforms,
                                       semantic_eps=args.semantic_eps, semantic_clusters=args.semantic_clusters)
    from mmcorpus.pipelines.safety.nsfw import STAGE_NSFW, load_nsfw_head, nsfw_stats, policy_from_args
    from mmcorpus.pipelines.safety.stages import STAGE_SAFETY, SafetySpec, safety_stats

    safety = SafetySpec.from_args(args)  # issue 17
    nsfw_policy = policy_from_args(args)
    nsfw_head, nsfw_weights = load_nsfw_head(args.nsfw_head, args.allow_random_weights,
                                             int(loaded.model.visual.output_dim))
    nsfw = None if nsfw_head is None else nsfw_stats(nsfw_weights, weights, nsfw_policy, args.clip_model,
                                                     "drop the pair")
    safety_applied = safety_stats(safety, nsfw, kind="pair")
    tasks = pairs_sources.tasks(sources, args.chunk_rows)  # large files in chunks: each its own Dask partition (bounded memory)
    args.dask_partitions = len(tasks)
    eval_refs, skipped = (eval_references(args.decontaminate, args.max_pixels) if args.decontaminate else (None, 0))
    opts = {
        "tasks": tasks, "include_context": args.include_context_text,
        "caption_cfg": CaptionConfig(min_words=args.min_words, min_chars=args.min_chars, max_chars=args.max_chars),
        "max_pixels": args.max_pixels, "clip_cfg": clip_cfg, "min_clip_score": args.min_clip_score,
        "top_fraction": args.keep_top_fraction, "dedup_cfg": dedup_cfg, "eval_refs": eval_refs,
        "store_embeddings": args.store_embeddings, "fetch_timeout": args.fetch_timeout,
        # groups of URLs spread over the workers; each worker streams them through its one downloader
        "fetch_groups": 4 * worker_count(args),
        "spool_dir": spool_folder(args.output), "record_dir": fetch_record_folder(args.output),
        "allow_private": args.allow_private_urls,
        "safety": safety, "nsfw": None if nsfw_head is None else (nsfw_head, nsfw_policy),
    }
    stages = [STAGE_READ, STAGE_CAPTION, STAGE_SAFETY, STAGE_IMAGE]
    if eval_refs is not None:
        stages.append(pair_dedup.STAGE_DECON)
    stages.append(STAGE_CLIP)
    if nsfw_head is not None:
        stages.append(STAGE_NSFW)
    if args.min_clip_score is not None or args.keep_top_fraction is not None:
        stages.append(STAGE_THRESHOLD)
    stages += [s for flag, s in ((dedup_cfg.exact, pair_dedup.STAGE_EXACT), (dedup_cfg.phash, pair_dedup.STAGE_PHASH),
                                 (dedup_cfg.semantic, pair_dedup.STAGE_SEMANTIC)) if flag]
    config = {
        "sources": [{"name": s.name, "kind": s.kind, "path": storage.abspath(s.path)} for s in sources],
        "clip_model": args.clip_model, "clip_pretrained": args.clip_pretrained, "clip_weights": weights,
        "clip_precision": args.precision, "clip_decode": args.clip_decode,
        "min_clip_score": args.min_clip_score, "keep_top_fraction": args.keep_top_fraction,
        "dedup": dedup, "phash_distance": args.phash_distance, "phash_blocks": args.phash_blocks,
        "phash_transforms": args.phash_transforms,
        "semantic_eps": args.semantic_eps, "semantic_clusters": args.semantic_clusters,
        "decontaminate": os.path.abspath(args.decontaminate) if args.decontaminate else None,
        "include_context_text": args.include_context_text, "min_words": args.min_words, "min_chars": args.min_chars,
        "max_chars": args.max_chars, "max_pixels": args.max_pixels, "store_embeddings": args.store_embeddings,
        "chunk_rows": args.chunk_rows,  # row keys (so shards) depend on it: part of the resume fingerprint
        "safety": safety_applied,
    }
    inputs = [f for s in sources for f in s.files]
    spec = RunSpec(command="pairs", out_dir=args.output, config=config, inputs=inputs,
                   kinds={"data": Kind("pair", "data", args.num_shards or max(4, len(tasks)))}, stages=stages, overwrite=args.overwrite,
                   extra_stats={"clip_weights": weights, "safety": safety_applied, "read_tasks": len(tasks)})
    print(f"pairs: {len(sources)} source(s) ({', '.join(f'{s.name}:{s.kind}' for s in sources)}) -> {args.output}",
          flush=True)
    stats = execute(spec, args, lambda p: build(p, opts))
    files = shard_files(args.output, spec.kinds["data"])
    kept = [v for f in files for v in schemas.read_table(f, "pair", columns=["clip_score"]).column("clip_score")
            .to_pylist() if v is not None]
    stats["clip_score_histogram"] = histogram(stats["stages"], kept)
    if eval_refs is not None:
        stats["decontamination"] = {"eval_images": len(eval_refs), "eval_files_skipped": skipped}
    _write_json(storage.join(args.output, STATS), stats)
    t = stats["totals"]
    print(f"pairs: read {t['read']}, wrote {t['written']}, rejected {t['rejected']} "
          f"({', '.join(str(s['stage']) + ' ' + str(s['rejected']) for s in stats['stages'] if s['rejected'])}) "
          f"in {stats['wall_seconds']:.1f}s; CLIP weights: {weights}", flush=True)
    return 0
