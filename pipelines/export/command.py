"""`mmcorpus export`: a finished pairs or interleaved output as WebDataset tars or a Hugging Face dataset folder."""

from __future__ import annotations

import json

from mmcorpus.filters.imageinfo import DEFAULT_MAX_PIXELS
from mmcorpus.pipelines.errors import UserError
from mmcorpus.pipelines.runtime.runner import add_runner_args, worker_count

HELP = "export a pairs or interleaved output to WebDataset tars or a Hugging Face dataset folder"
DESCRIPTION = (
    "Read a finished mmcorpus output (SOURCE/data/*.parquet of 'mmcorpus pairs', 'capfilt' or 'interleaved') and "
    "write it in the layout training jobs read. --format webdataset: OUT/data/part-SSSSS-of-NNNNN.tar with "
    "--samples-per-shard samples each; pairs as img2dataset writes them (KEY.jpg|png|webp as stored, KEY.txt "
    "caption, KEY.json with url, sha256, width, height, clip_score, itm_score, caption_source, source_dataset), "
    "documents as one KEY.json in the MMC4 layout OpenFlamingo reads (text_list, image_info with image_base64 and "
    "matched_text_index, similarity_matrix) plus OBELICS' aligned texts/images lists; beside each tar its Parquet "
    "index and _stats.json, as img2dataset writes. --format hf: OUT/data/part-*.parquet whose image columns are "
    "Hugging Face datasets Image features (bytes embedded) and OUT/README.md with the matching dataset_info and "
    "configs, so datasets.load_dataset(OUT) gives PIL images; ready for push_to_hub. Rows without image bytes "
    "(a --no-images run) are rejects (no_image_bytes), images that do not decode (or are cut off) image_decode_failed; "
    "images are written as stored unless --image-format jpg re-encodes the non-JPEG ones."
)
FORMATS = ("webdataset", "hf")


def add_arguments(parser) -> None:
    from mmcorpus.pipelines.export.samples import IMAGE_FORMATS

    parser.add_argument("source", help="a finished mmcorpus output folder (SOURCE/data/*.parquet and SOURCE/_SUCCESS)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="webdataset tars or a Hugging Face folder")
    parser.add_argument("--output", "-o", required=True, help="output folder")
    parser.add_argument("--samples-per-shard", type=int, default=10000,
                        help="samples per output shard (the last shard and shards with rejects hold fewer)")
    parser.add_argument("--image-format", default="keep", choices=IMAGE_FORMATS,
                        help="keep: images exactly as stored; jpg: re-encode non-JPEG images as JPEG")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                        help="images with more pixels are rejects (image_too_large)")
    parser.add_argument("--decode-check", action="store_true",
                        help="decode every image's pixels (JPEG at 1/8 scale) to find corruption inside the data; "
                             "default: header, pixel guard and end marker (random bytes and cut-off files), which "
                             "is what the pipelines' own decode check leaves to find")
    parser.add_argument("--overwrite", action="store_true", help="replace a finished export in --output")
    add_runner_args(parser)


def source_files(source: str) -> tuple[str, list[tuple[str, int]]]:
    """(schema name, [(data file, rows)]) of a finished mmcorpus output, local or on an object store; UserError
    naming what is wrong."""
    from mmcorpus import schemas
    from mmcorpus.schemas import storage

    try:
        if not storage.isdir(source):
            raise UserError(f"source {source!r} is not a folder (give a pipeline output folder)")
        files = storage.glob(storage.join(source, "data", "*.parquet"))
        finished = storage.exists(storage.join(source, "_SUCCESS"))
        has_stats = storage.exists(storage.join(source, "stats.json"))
    except (OSError, ValueError) as exc:
        raise UserError(f"source {storage.redact_url(source)!r}: cannot be read ({exc})") from None
    if not files or not has_stats:
        raise UserError(f"source {source!r} is not an mmcorpus output (no data/*.parquet and stats.json)")
    if not finished:
        raise UserError(f"source {source!r} is an unfinished run (no _SUCCESS); finish or rerun it first")
    out, kinds = [], set()
    for f in files:
        try:
            name, _ = schemas.read_schema_name(f)
            rows = schemas.open_parquet(f).metadata.num_rows
        except schemas.SchemaError as exc:
            raise UserError(f"source {source!r}: {exc}") from None
        if name not in ("pair", "interleaved"):
            raise UserError(f"source {source!r}: {f} holds {name!r} rows; export takes pairs or interleaved outputs")
        kinds.add(name)
        out.append((storage.abspath(f), rows))
    if len(kinds) > 1:
        raise UserError(f"source {source!r} mixes {sorted(kinds)} rows")
    return kinds.pop(), out


def yaml_features(schema_name: str) -> list[dict]:
    """The README's dataset_info features, from the schema's Hugging Face features."""
    from mmcorpus import schemas

    features = json.loads(schemas.schema(schema_name).metadata[b"huggingface"])["info"]["features"]

    def one(f):
        if f["_type"] == "Image":
            return "image"
        return f["dtype"]

    return [{"name": name, "sequence": one(f["feature"])} if f["_type"] == "Sequence" else
            {"name": name, "dtype": one(f)} for name, f in features.items()]


def write_hf_card(out: str, kind: str, stats: dict) -> None:
    import yaml

    from mmcorpus.schemas import storage

    data = storage.glob(storage.join(out, "data", "*.parquet"))
    size = sum(storage.info(f)["bytes"] for f in data)
    schema_name = "hf_pair" if kind == "pair" else "hf_interleaved"
    meta = {
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": "data/part-*.parquet"}]}],
        "dataset_info": {"features": yaml_features(schema_name),
                         "splits": [{"name": "train", "num_bytes": size, "num_examples": stats["totals"]["written"]}],
                         "download_size": size, "dataset_size": size},
    }
    what = "image-text pairs" if kind == "pair" else "interleaved documents (OBELICS layout: texts and images aligned)"
    body = (f"# mmcorpus export\n\n{stats['totals']['written']} {what}, exported by `mmcorpus export` from "
            f"`{stats['config']['source']}`; {stats['totals']['rejected']} rows were not exported (see "
            "`rejects/` and `stats.json`).\n\n```python\nfrom datasets import load_dataset\n"
            "ds = load_dataset(\"path/to/this/folder\", split=\"train\")\n```\n")
    text = "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + body
    storage.write_bytes(storage.join(out, "README.md"), text.encode())


def run(args) -> int:
    from mmcorpus.pipelines.export import pipeline
    from mmcorpus.pipelines.export.samples import ExportConfig
    from mmcorpus.pipelines.export.writers import HfShard, TarShard, plan
    from mmcorpus.pipelines.runtime.run import RunSpec, execute, fingerprint
    from mmcorpus.pipelines.runtime.sink import Kind
    from mmcorpus.schemas import storage

    if args.samples_per_shard < 1 or args.max_pixels < 1:
        raise UserError("--samples-per-shard and --max-pixels must be at least 1")
    if storage.abspath(args.output).rstrip("/") == storage.abspath(args.source).rstrip("/"):
        raise UserError("--output must not be the source folder")
    kind, files = source_files(args.source)
    total = sum(n for _, n in files)
    tasks = plan(files, args.samples_per_shard)
    cfg = ExportConfig(kind=kind, image_format=args.image_format, max_pixels=args.max_pixels,
                       decode_check=args.decode_check)
    writer = (TarShard if args.format == "webdataset" else HfShard)(cfg, args.samples_per_shard, total)
    shards = len(tasks)
    spec = RunSpec(command="export", out_dir=args.output,
                   config={"source": storage.abspath(args.source), "format": args.format, "kind": kind,
                           "samples_per_shard": args.samples_per_shard, "image_format": args.image_format,
                           "max_pixels": args.max_pixels, "decode_check": args.decode_check},
                   inputs=[f for f, _ in files],
                   kinds={"data": Kind("export_index", "data", shards, writer),  # written by the export stage
                          "rejects": Kind("reject", "rejects", shards), "stats": Kind("stat", "_stats", 1)},
                   stages=[pipeline.STAGE], overwrite=args.overwrite)
    fp = fingerprint(spec)  # what execute() computes from the same spec: the shards' files carry it
    # shards are written in parallel by the Dask workers: two partitions per worker (the DaskRunner otherwise puts
    # up to 128 created elements in one partition)
    args.dask_partitions = min(shards, 2 * worker_count(args))
    print(f"export: {total} {kind} rows in {len(files)} file(s) -> {args.format} in {args.output} "
          f"({shards} shard(s))", flush=True)
    stats = execute(spec, args, lambda p: pipeline.build(p, tasks, writer, args.output, "data", fp))
    if args.format == "hf":
        write_hf_card(args.output, kind, stats)
    t = stats["totals"]
    print(f"export: {t['written']} samples written, {t['rejected']} rejected, in {stats['wall_seconds']:.1f}s",
          flush=True)
    return 0
