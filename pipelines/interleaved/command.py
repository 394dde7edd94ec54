"""`mmcorpus interleaved`: web pages (WARC, HTML folders, URL lists) -> cleaned M3W/OBELICS-style documents."""

from __future__ import annotations

import functools
import hashlib
import os

import apache_beam as beam

from mmcorpus.pipelines.errors import UserError
from mmcorpus.pipelines.interleaved.sources import CC_PREFIX, PART_BYTES
from mmcorpus.pipelines.runtime.runner import add_runner_args, chosen_runner, worker_count

HELP = "build interleaved image-text web documents (M3W/OBELICS style) from WARCs, HTML folders or URL lists"
DESCRIPTION = (
    "Read each SOURCE (a WARC file .warc/.warc.gz, a folder or glob of them, a folder of .html/.html.gz pages, "
    "a .txt URL list fetched politely: robots.txt, per-host delay, retries, or a WARC listing such as Common "
    "Crawl's warc.paths.gz, see --path-prefix; any of them local or remote: s3://, gs://, https://), extract the main content with "
    "trafilatura keeping each image where it sat (lazy-load/srcset/<picture>/<base> resolved), and filter. "
    "Document stages, each counted in stats.json with its rejects (read = written + rejected): read (WARC "
    "record type, truncated/invalid records) -> decode (HTTP status 200, HTML content type, binary bytes, "
    "--max-page-bytes, charset) -> opt_out (the page's noai/noimageai meta robots tag or X-Robots-Tag header; "
    "its URL on --opt-out-list/--blocklist files) -> precheck (no image markup at all while images are required: "
    "rejected before extraction) -> extract -> safety (the canonical URL on the lists; image "
    "URLs on the lists, noimageai, flagged words in image URLs and alt texts, per-image rejects under "
    "safety_images; e-mails, IPs and phone numbers masked, or rejected with --pii reject) -> language -> "
    "paragraphs (OBELICS node rules, removes paragraphs) "
    "-> quality (Gopher/OBELICS document rules) -> image_rules (URL patterns, declared sizes, max per "
    "document; per-image rejects under image_rules_images) -> fetch_images (one downloader per worker, in the "
    "background while the next pages are extracted; the image's X-Robots-Tag noai/noimageai refuses it; decoded size rules; a rerun into the same output fetches only "
    "the images that failed, OUT/_image_fetch; skipped with --no-images, then images stay URL references) -> nsfw "
    "(with --nsfw-head: every fetched image embedded once with CLIP (--clip-model), scored by the head, "
    "image_info.nsfw_score; images above --nsfw-threshold dropped under nsfw_images, the document rejected when "
    "one scores above --nsfw-document-threshold) -> image_count -> dedup_exact -> dedup_near "
    "(MinHash LSH) -> dedup_images (images in more than K documents) -> image_count_after_dedup (a document "
    "whose images were all boilerplate). Thresholds come from --config "
    "FILE (YAML): sections extract (trafilatura's options: fast, favor_precision, favor_recall, include_tables, "
    "include_comments), language, paragraphs, quality, images (filters/documents.py), dedup "
    "(pipelines/interleaved/dedup.py DedupConfig), fetch (pipelines/fetching/images.py FetchConfig: image "
    "download: batch_urls, threads, host_connections, timeout, retries, decode (false: check headers only, no "
    "pHash, as img2dataset's disable_all_reencoding), ...) and pages "
    "(pipelines/fetching/pages.py PageFetchConfig: timeout, retries, backoff, host_delay, max_redirects, obey_robots, groups, threads). Output: OUT/data/*.parquet "
    "(schema 'interleaved'), OUT/rejects/*.parquet, OUT/stats.json; --emit-m3w-text also writes "
    "OUT/m3w/part-*.txt next to each data shard, one JSON object {doc_id, text} a line, text being the M3W "
    "rendering (<image> where an image sits, <|endofchunk|> closing the text after each image). A .gz WARC is read "
    "in byte ranges (--warc-part-mb), other WARCs and URL lists in interleaved parts (--read-parts): one large file "
    "keeps every worker busy, and a worker holds one part's pages at a time. stats.json records the CPU seconds of "
    "every stage."
)

STAGE_READ = "read"
STAGE_DECODE = "decode"
STAGE_PRECHECK = "precheck"  # decisions made on the page text before extraction (images required but no markup)
STAGE_EXTRACT = "extract"
STAGE_LANGUAGE = "language"
STAGE_PARAGRAPHS = "paragraphs"
STAGE_QUALITY = "quality"
STAGE_IMAGE_RULES = "image_rules"
STAGE_IMAGE_RULES_ITEMS = "image_rules_images"
STAGE_IMAGE_COUNT = "image_count"
STAGE_IMAGE_RECOUNT = "image_count_after_dedup"  # dedup_images removes boilerplate images: count again
# FetchConfig fields the command fills in (not --config keys, not part of the run's config)
FETCH_SET_BY_COMMAND = ("rules", "spool_dir", "record_dir")
INFO_KEYS = ("url", "sha256", "width", "height", "phash", "bytes", "path", "alt", "nsfw_score")


def add_arguments(parser) -> None:
    parser.add_argument("sources", nargs="+", metavar="SOURCE",
                        help="WARC file, folder, glob, .txt URL list or WARC listing (local, s3://, gs://, https://)")
    parser.add_argument("--output", "-o", required=True,
                        help="output folder or prefix, local or s3:// / gs:// (data/, rejects/, stats.json, _SUCCESS)")
    parser.add_argument("--config", default=None, help="YAML file with threshold sections (see above)")
    parser.add_argument("--no-images", action="store_true",
                        help="do not download images: documents keep image URLs and alt text only")
    parser.add_argument("--allow-private-network", action="store_true",
                        help="allow page and image URLs on private/loopback addresses (tests, intranets)")
    parser.add_argument("--max-page-bytes", type=int, default=5_000_000, help="pages larger than this are rejected")
    parser.add_argument("--url-manifest", default=None, metavar="FILE.jsonl",
                        help='page URLs of HTML files, one {"file": PATH, "url": URL} a line (PATH relative to the '
                             "manifest); without one a page's <link rel=canonical> or og:url is its base URL")
    parser.add_argument("--emit-m3w-text", action="store_true", help="also write OUT/m3w/part-*.txt (see above)")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished run in --output")
    parser.add_argument("--num-shards", type=int, default=0,
                        help="Parquet shards per output folder (default: one per about 128 MiB of WARC, 4,096 "
                             "URL-list pages or 4,096 HTML files of input, at least 4: a worker holds one shard's "
                             "rows while writing it, so they stay the same size however large the input)")
    parser.add_argument("--read-parts", type=int, default=0,
                        help="cut each WARC or URL list into this many interleaved parts read by different workers "
                             "(default: .gz WARCs in byte ranges of --warc-part-mb, other WARCs and URL lists in "
                             "two parts per worker over all of them; 1 = one worker reads a whole file)")
    parser.add_argument("--warc-part-mb", type=float, default=PART_BYTES / 2**20,
                        help="a .gz WARC (a gzip member per record, as Common Crawl's) is read in byte ranges of "
                             "this many MiB, each its own task: a worker holds one range's pages at a time "
                             "(default %(default)g; ignored with --read-parts)")
    parser.add_argument("--path-prefix", default=CC_PREFIX,
                        help="joined to each relative line of a WARC listing (warc.paths.gz); e.g. "
                             "s3://commoncrawl/ to read Common Crawl from S3")
    parser.add_argument("--skip", type=int, default=0, help="WARC listings: skip this many lines first")
    parser.add_argument("--limit", type=int, default=None, help="WARC listings: take at most this many lines")
    add_runner_args(parser)
    from mmcorpus.pipelines.safety.stages import add_arguments as add_safety_arguments  # issue 17

    add_safety_arguments(parser)
    from mmcorpus.pipelines.safety import nsfw

    nsfw.add_arguments(parser, documents=True)
    g = parser.add_argument_group("CLIP (image embeddings for --nsfw-head)")
    g.add_argument("--clip-model", default="ViT-B-32", help="open_clip model name or a model-config .json path")
    g.add_argument("--clip-pretrained", default=None, help="open_clip pretrained tag or local checkpoint path")
    g.add_argument("--allow-random-weights", action="store_true",
                   help="run with a randomly initialised CLIP (and --nsfw-head random) when no weights are given "
                        "(tests and demos only)")
    g.add_argument("--clip-batch-size", type=int, default=64, help="images per CLIP batch (halves on CUDA out-of-memory)")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N")


# ---- stage functions (module level: workers import them by name) ----------------------------------------

def source_of(item) -> str:
    return item.get("source") or "?"


def read_record(rec):
    from mmcorpus.filters.reasons import Reject

    if "_reject" in rec:
        return Reject(*rec["_reject"])
    return rec


def decode_record(rec):
    from mmcorpus.pipelines.interleaved.sources import decode_page

    return decode_page(rec)


class Precheck:
    """Rejects before extraction what extraction cannot rescue: a page without any image markup when documents
    need images (images.min_per_doc >= 1); it would be rejected by image_count after costing an extraction."""

    def __init__(self, cfg):
        self.cfg = cfg

    def __call__(self, rec):
        from mmcorpus.filters.extract import may_hold_images
        from mmcorpus.filters.reasons import Reject

        if not may_hold_images(rec["html"]):
            return Reject("no_images", f"no image markup in the page, {self.cfg.images.min_per_doc} image(s) "
                                       "required (checked before extraction)")
        return rec


def doc_id_of(url: str | None, source: str) -> str:
    return hashlib.blake2b(f"{url or ''}\x00{source}".encode("utf-8", "surrogatepass"), digest_size=10).hexdigest()


def extract_record(rec, options: dict | None = None):
    from mmcorpus.filters.extract import extract

    result = extract(rec["html"], rec.get("url"), options)
    if not isinstance(result, tuple):
        return result
    texts, images, infos, meta = result
    from mmcorpus.schemas import storage

    source = rec["source"]
    url = (rec.get("url") or meta.pop("canonical_url", None)
           or (source if storage.is_url(source) else "file://" + os.path.abspath(source)))
    meta.pop("canonical_url", None)
    return {"doc_id": doc_id_of(url, rec["source"]), "url": url, "warc_record_id": rec.get("warc_record_id"),
            "crawl_date": rec.get("crawl_date"), "source": rec["source"], "language": None, "language_score": None,
            "texts": texts, "images": images, "image_info": infos, "metadata": meta,
            # for the safety stage (issue 17): the page's noimageai directive, the URL opt_out checked
            "_noimageai": rec.get("_noimageai"), "_record_url": rec.get("url")}


class DocStep:
    """One document filter of filters/documents.py bound to its config (picklable)."""

    def __init__(self, name: str, cfg):
        self.name = name
        self.cfg = cfg

    def __call__(self, doc):
        from mmcorpus.filters import documents as d
        from mmcorpus.filters.reasons import Reject
        from mmcorpus.pipelines.runtime.stage import Count, ItemReject

        if self.name == STAGE_LANGUAGE:
            return d.identify_language(doc, self.cfg)
        if self.name == STAGE_PARAGRAPHS:
            doc, removed = d.clean_paragraphs(doc, self.cfg)
            meta = doc.get("metadata") or {}
            words = meta.get("extracted_words", 0)
            counts = [Count(STAGE_PARAGRAPHS, "paragraphs_removed", removed)] if removed else []
            counts += [Count(STAGE_PARAGRAPHS, "words_extracted", words),
                       Count(STAGE_PARAGRAPHS, "words_removed", round(words * meta.get("removed_word_share", 0))),
                       Count(STAGE_PARAGRAPHS, "images_extracted", sum(i is not None for i in doc["images"])),
                       Count(STAGE_PARAGRAPHS, "article_images_added", meta.get("article_images_added", 0))]
            return [d.check_removed_share(doc, self.cfg), *counts]
        if self.name == STAGE_QUALITY:
            return d.check_quality(doc, self.cfg)
        if self.name == STAGE_IMAGE_RULES:
            n = sum(1 for i in doc["images"] if i is not None)
            doc, dropped = d.filter_image_urls(doc, self.cfg)
            events = [Count(STAGE_IMAGE_RULES_ITEMS, "in", n), Count(STAGE_IMAGE_RULES_ITEMS, "out", n - len(dropped))]
            events += [ItemReject(STAGE_IMAGE_RULES_ITEMS, Reject(r.reason, f"{url}: {r.detail}"), doc["source"])
                       for url, r in dropped]
            return [doc, *events]
        if self.name in (STAGE_IMAGE_COUNT, STAGE_IMAGE_RECOUNT):
            return d.check_image_count(doc, self.cfg)
        raise ValueError(f"unknown document step {self.name}")


def to_row(doc) -> tuple[str, str, dict]:
    from mmcorpus import schemas

    meta = {k: v for k, v in (doc.get("metadata") or {}).items() if not k.startswith("_")}
    infos = [None if i is None else {k: i.get(k) for k in INFO_KEYS} for i in doc["image_info"]]
    row = {"doc_id": doc["doc_id"], "url": doc.get("url"), "warc_record_id": doc.get("warc_record_id"),
           "crawl_date": doc.get("crawl_date"), "language": doc.get("language"),
           "language_score": doc.get("language_score"), "texts": doc["texts"], "images": doc["images"],
           "image_info": infos, "source": doc["source"], "metadata": schemas.metadata_json(meta)}
    return "data", doc["doc_id"], row


# ---- config and wiring ------------------------------------------------------------------------------------

def load_config(path: str | None):
    """YAML -> (DocumentConfig, DedupConfig, FetchConfig, PageFetchConfig); UserError naming the file on any problem."""
    import dataclasses

    from mmcorpus.filters.documents import DocumentConfig
    from mmcorpus.pipelines.interleaved.dedup import DedupConfig
    from mmcorpus.pipelines.fetching.pages import PageFetchConfig
    from mmcorpus.pipelines.fetching.images import FetchConfig

    raw: dict = {}
    if path:
        import yaml

        if not os.path.isfile(path):
            raise UserError(f"config file {path!r} does not exist")
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise UserError(f"config file {path!r} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise UserError(f"config file {path!r} must hold a mapping of sections")
    raw = dict(raw)
    dedup_raw, fetch_raw = raw.pop("dedup", None) or {}, raw.pop("fetch", None) or {}
    pages_raw = raw.pop("pages", None) or {}
    try:
        doc_cfg = DocumentConfig.from_dict(raw)
        known = {f.name for f in dataclasses.fields(DedupConfig)}
        bad = set(dedup_raw) - known
        if bad:
            raise ValueError(f"unknown dedup keys {sorted(bad)} (known: {sorted(known)})")
        dedup_cfg = DedupConfig(**dedup_raw)
        known = {f.name for f in dataclasses.fields(FetchConfig)} - set(FETCH_SET_BY_COMMAND)
        bad = set(fetch_raw) - known
        if bad:
            raise ValueError(f"unknown fetch keys {sorted(bad)} (known: {sorted(known)})")
        if "disallowed_header_directives" in fetch_raw:
            fetch_raw["disallowed_header_directives"] = tuple(fetch_raw["disallowed_header_directives"])
        fetch_cfg = FetchConfig(**fetch_raw, rules=doc_cfg)
        known = {f.name for f in dataclasses.fields(PageFetchConfig)}
        bad = set(pages_raw) - known
        if bad:
            raise ValueError(f"unknown pages keys {sorted(bad)} (known: {sorted(known)})")
        page_cfg = PageFetchConfig(**pages_raw)
    except (ValueError, TypeError) as exc:
        raise UserError(f"config {path!r}: {exc}") from None
    return doc_cfg, dedup_cfg, fetch_cfg, page_cfg


def document_stages(dedup_cfg, doc_cfg=None, nsfw: bool = False) -> list[str]:
    """Document-level stages in order; precheck only when documents need images (doc_cfg.images.min_per_doc),
    nsfw only with an NSFW head.
    Every stage that drops images is followed by an image count, so a document written always holds
    images.min_per_doc..max_per_doc images: image_count after the URL rules and the fetch (failures, decoded-size
    rules), image_count_after_dedup after dedup_images."""
    from mmcorpus.pipelines.interleaved.dedup import document_stages as dedup_stages
    from mmcorpus.pipelines.safety.nsfw import STAGE_NSFW
    from mmcorpus.pipelines.safety.stages import STAGE_OPT_OUT, STAGE_SAFETY

    recount = [STAGE_IMAGE_RECOUNT] if dedup_cfg.images else []
    precheck = [STAGE_PRECHECK] if doc_cfg is not None and doc_cfg.images.min_per_doc >= 1 else []
    return [STAGE_READ, STAGE_DECODE, STAGE_OPT_OUT, *precheck, STAGE_EXTRACT, STAGE_SAFETY, STAGE_LANGUAGE,
            STAGE_PARAGRAPHS, STAGE_QUALITY, STAGE_IMAGE_RULES, *([STAGE_NSFW] if nsfw else []), STAGE_IMAGE_COUNT,
            *dedup_stages(dedup_cfg), *recount]


def build(p, items, opts):
    from mmcorpus.pipelines.interleaved.dedup import dedup_documents
    from mmcorpus.pipelines.fetching.pages import fetch_url_lists
    from mmcorpus.pipelines.fetching.images import fetch_images, image_fill
    from mmcorpus.pipelines.interleaved.sources import read_batch, split_items, task_batches
    from mmcorpus.pipelines.runtime.stage import Collector

    doc_cfg, dedup_cfg, fetch_cfg = opts["doc"], opts["dedup"], opts["fetch"]
    c = Collector()
    files = [item for item in items if item[0] != "urls"]
    lists = [item[1] for item in items if item[0] == "urls"]
    branches = []
    if files:  # WARCs cut into byte ranges or interleaved parts: read, extract and filter run fused on every worker
        batches = opts.get("read_batches") or task_batches(split_items(files, opts["read_parts"]), PAGES_PER_PARTITION)
        records = p | "Files" >> beam.Create(batches)
        if opts.get("spread_tasks", True):  # on the Dask runner each batch is already its own partition
            records = records | "Reshuffle" >> beam.Reshuffle()
        records = records | "ReadFiles" >> beam.FlatMap(read_batch, opts["max_bytes"], opts.get("urls"))
        if os.environ.get("MMCORPUS_BENCH_RESHUFFLE_RECORDS"):  # bench only: the alternative measured against
            records = records | "ReshuffleRecords" >> beam.Reshuffle()
        branches.append(records)
    if lists:
        branches.append(fetch_url_lists(p, lists, opts["max_bytes"], opts["allow_private"], opts["pages"],
                                        opts["read_parts"]))
    records = branches[0] if len(branches) == 1 else tuple(branches) | "Records" >> beam.Flatten()
    # safety (issue 17): opt-outs and blocklists before extraction, images and PII after it
    from mmcorpus.pipelines.safety.stages import STAGE_OPT_OUT, STAGE_SAFETY, DocSafety, PageOptOut

    page_opt_out, doc_safety = PageOptOut(opts["safety"]), DocSafety(opts["safety"])
    stages = document_stages(dedup_cfg, doc_cfg)  # the stats stage list decides the optional stages
    steps = [(STAGE_READ, read_record, None), (STAGE_DECODE, decode_record, None),
             (STAGE_OPT_OUT, page_opt_out, page_opt_out.setup)]
    if STAGE_PRECHECK in stages:
        steps.append((STAGE_PRECHECK, Precheck(doc_cfg), None))
    steps += [(STAGE_EXTRACT, functools.partial(extract_record, options=doc_cfg.extract.trafilatura_options()), None),
              (STAGE_SAFETY, doc_safety, doc_safety.setup)]
    steps += [(name, DocStep(name, doc_cfg), None)
              for name in (STAGE_LANGUAGE, STAGE_PARAGRAPHS, STAGE_QUALITY, STAGE_IMAGE_RULES)]
    # one DoFn from the page record to the filtered document: a partition's pages are held once, not per stage;
    # its images download in the background while the next pages are extracted (ImageFill)
    fill = None if opts["no_images"] else image_fill(fetch_cfg, opts["allow_private"])
    x = c.chain(records, "PageToDocument", steps, source_of, tail=fill)
    if not opts["no_images"] and fill is None:  # img2dataset's output joined in (fetch.fetched_dir)
        x = fetch_images(c, x, fetch_cfg, allow_private=opts["allow_private"])
    if opts.get("nsfw") is not None:  # issue 17: one CLIP embedding per fetched image, the head, the policy
        from mmcorpus.pipelines.safety.nsfw import STAGE_NSFW, DocNsfw, score_images

        clip_cfg, head, policy, groups = opts["nsfw"]
        x = c.stage(score_images(c, x, clip_cfg, head, groups), STAGE_NSFW, DocNsfw(policy), source_of)
    x = c.stage(x, STAGE_IMAGE_COUNT, DocStep(STAGE_IMAGE_COUNT, doc_cfg), source_of)
    x = dedup_documents(c, x, dedup_cfg, opts.get("park_dir"))
    if STAGE_IMAGE_RECOUNT in stages:
        x = c.stage(x, STAGE_IMAGE_RECOUNT, DocStep(STAGE_IMAGE_RECOUNT, doc_cfg), source_of)
    c.add(x | "Rows" >> beam.Map(to_row))
    return c.finish()


PAGES_PER_PARTITION = 256  # URL-list pages per Dask partition after the host-group shuffle (and HTML files)


SHARD_WARC_BYTES = 128 << 20  # input per output shard (automatic --num-shards): WARC bytes,
SHARD_PAGES = 4096  # or URL-list pages, or HTML files


def auto_shards(items, sizes: dict, url_lines: int) -> int:
    """Output shards for the input's size (at least 4), so a shard's rows, which its writer holds, do not grow
    with the input."""
    warc_bytes = sum(sizes.get(item[1]) or 0 for item in items if item[0] == "warc")
    html = sum(item[0] == "html" for item in items)
    return max(4, -(-warc_bytes // SHARD_WARC_BYTES) + -(-(url_lines + html) // SHARD_PAGES))


def dask_partitions(batches: int, url_lines: int, workers: int) -> int:
    """Partitions of the Dask runner's bags: one per read batch (a WARC part, or up to 256 HTML files) and one per
    PAGES_PER_PARTITION pages of the URL lists, so a partition holds a bounded share of the pages however large
    the input (every step keeps a whole partition's output in memory); at least two per worker."""
    return max(2 * workers, batches + -(-url_lines // PAGES_PER_PARTITION))


def read_parts(items, workers: int) -> int:
    """Parts per WARC or URL list: two per worker over all of them (every part reads its file through, so no
    more than that); one worker reads each file once."""
    warcs = sum(item[0] in ("warc", "urls") for item in items)
    return max(1, -(-2 * workers // warcs)) if warcs and workers > 1 else 1


def write_m3w(out_dir: str, kind) -> int:
    """OUT/m3w/part-*.txt next to each data shard: one JSON string (the M3W text) per line, doc_id order."""
    import json

    from mmcorpus import schemas
    from mmcorpus.filters.m3w import render_m3w
    from mmcorpus.pipelines.runtime.sink import shard_files
    from mmcorpus.schemas import storage

    folder = storage.join(out_dir, "m3w")
    storage.makedirs(folder)
    n = 0
    for f in shard_files(out_dir, kind):
        target = storage.join(folder, storage.basename(f).replace(".parquet", ".txt"))
        tmp = target + ".tmp"
        with storage.open(tmp, "wb") as out:
            for batch in schemas.iter_batches(f, columns=["doc_id", "texts", "images"]):
                for d, t, i in zip(*(batch.column(k).to_pylist() for k in ("doc_id", "texts", "images"))):
                    out.write((json.dumps({"doc_id": d, "text": render_m3w(t, i)}, ensure_ascii=False) + "\n")
                              .encode())
                    n += 1
        storage.move(tmp, target)
    return n


def nsfw_option(args, fetch_cfg):
    """((ClipConfig, NsfwHead, NsfwPolicy, batch groups) or None, its stats.json entry or None) from the
    --nsfw-head/--clip-* options; the CLIP model is loaded here once, so missing weights stop the run now."""
    from mmcorpus.pipelines.models.clip import ClipConfig, load_model
    from mmcorpus.pipelines.safety.nsfw import load_nsfw_head, nsfw_stats, policy_from_args

    policy = policy_from_args(args)
    if args.nsfw_head is None:
        return None, None
    if args.no_images:
        raise UserError("--nsfw-head scores fetched images: it cannot run with --no-images")
    if not fetch_cfg.keep_bytes:
        raise UserError("--nsfw-head needs the fetched image bytes: set fetch.keep_bytes true in --config")
    if args.clip_batch_size < 1:
        raise UserError("--clip-batch-size must be at least 1")
    clip_cfg = ClipConfig(model=args.clip_model, pretrained=args.clip_pretrained, allow_random=args.allow_random_weights,
                          device=args.device, batch_size=args.clip_batch_size)
    loaded = load_model(clip_cfg)
    head, weights = load_nsfw_head(args.nsfw_head, args.allow_random_weights, int(loaded.model.visual.output_dim))
    if "random" in (weights, loaded.source):
        print("interleaved: WARNING: the NSFW check runs with RANDOM weights (--allow-random-weights); its scores "
              "are meaningless", flush=True)
    groups = 2 * worker_count(args)
    return (clip_cfg, head, policy, groups), nsfw_stats(weights, loaded.source, policy, args.clip_model,
                                                        "drop the image, keep the text")


def run(args) -> int:
    from mmcorpus.pipelines.runtime.run import RunSpec, execute
    from mmcorpus.pipelines.fetching.downloader import fetch_record_folder
    from mmcorpus.pipelines.runtime.sink import Kind, park_folder, spool_folder
    from mmcorpus.pipelines.interleaved.sources import (expand_sources, file_sizes, line_count, load_url_manifest,
                                                        ranged_sizes, sized_items, split_items, task_batches)
    from mmcorpus.schemas import storage

    if args.num_shards < 0:
        raise UserError("--num-shards must be 0 (automatic) or more")
    if args.read_parts < 0:
        raise UserError("--read-parts must be 0 (automatic) or more")
    if not args.warc_part_mb > 0:
        raise UserError("--warc-part-mb must be more than 0")
    if args.max_page_bytes < 1:
        raise UserError("--max-page-bytes must be at least 1")
    if args.skip < 0 or (args.limit is not None and args.limit < 0):
        raise UserError("--skip and --limit must be at least 0")
    inputs: list[str] = []
    items = expand_sources(args.sources, args.path_prefix, args.skip, args.limit, inputs)
    urls = load_url_manifest(args.url_manifest) if args.url_manifest else None
    doc_cfg, dedup_cfg, fetch_cfg, page_cfg = load_config(args.config)
    import dataclasses

    from mmcorpus.pipelines.safety.stages import SafetySpec, safety_stats  # issue 17

    safety = SafetySpec.from_args(args)
    nsfw, nsfw_applied = nsfw_option(args, fetch_cfg)
    off = "--no-images: no image fetched" if args.no_images else ""
    safety_applied = safety_stats(safety, nsfw_applied, nsfw_off=off)  # reads the lists: a bad line is exit 2

    config = {"documents": doc_cfg.to_dict(),
              "dedup": dataclasses.asdict(dedup_cfg),
              "fetch": {k: v for k, v in dataclasses.asdict(fetch_cfg).items() if k not in FETCH_SET_BY_COMMAND},
              "pages": dataclasses.asdict(page_cfg),
              "no_images": args.no_images, "allow_private_network": args.allow_private_network,
              "max_page_bytes": args.max_page_bytes, "url_manifest": args.url_manifest, "safety": safety_applied,
              "path_prefix": storage.redact_url(args.path_prefix), "skip": args.skip, "limit": args.limit}
    spool_dir = spool_folder(args.output)  # fetched bytes wait there
    # the per-URL fetch record beside the output: a rerun fetches only the images that failed
    fetch_cfg = dataclasses.replace(fetch_cfg, spool_dir=spool_dir, record_dir=fetch_record_folder(args.output))
    workers = worker_count(args)
    parts = args.read_parts or read_parts(items, workers)
    part_bytes = 0 if args.read_parts else max(1, int(args.warc_part_mb * 2**20))
    files = [item for item in items if item[0] != "urls"]
    sizes = file_sizes(sized_items(items))
    batches = task_batches(split_items(files, parts, part_bytes, ranged_sizes(files, sizes, part_bytes)),
                           PAGES_PER_PARTITION)
    url_lines = sum(line_count(item[1]) for item in items if item[0] == "urls")  # comments and blanks too
    # a URL list's pages spread over host groups of about PAGES_PER_PARTITION pages, each partition a few groups
    page_cfg = dataclasses.replace(page_cfg, groups=max(page_cfg.groups, -(-url_lines // PAGES_PER_PARTITION)))
    opts = {"doc": doc_cfg, "dedup": dedup_cfg, "fetch": fetch_cfg, "pages": page_cfg, "no_images": args.no_images,
            "safety": safety, "allow_private": args.allow_private_network, "max_bytes": args.max_page_bytes,
            "urls": urls, "read_parts": parts, "read_batches": batches, "nsfw": nsfw,
            "park_dir": park_folder(args.output),
            "spread_tasks": chosen_runner(args) != "dask"}
    args.dask_partitions = dask_partitions(len(batches), url_lines, workers)
    shards = args.num_shards or auto_shards(items, sizes, url_lines)
    spec = RunSpec(command="interleaved", out_dir=args.output, config=config, inputs=inputs,
                   kinds={"data": Kind("interleaved", "data", shards)},
                   stages=document_stages(dedup_cfg, doc_cfg, nsfw is not None), overwrite=args.overwrite,
                   extra_stats={"safety": safety_applied})
    print(f"interleaved: {len(items)} input file(s) -> {args.output}", flush=True)
    stats = execute(spec, args, lambda p: build(p, items, opts))
    if args.emit_m3w_text:
        n = write_m3w(args.output, spec.kinds["data"])
        print(f"interleaved: wrote {n} M3W text lines to {args.output.rstrip('/')}/m3w")
    t = stats["totals"]
    print(f"interleaved: read {t['read']} records, wrote {t['written']} documents, rejected {t['rejected']} "
          f"(details in {args.output.rstrip('/')}/stats.json)")
    return 0
