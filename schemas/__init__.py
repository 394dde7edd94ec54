"""Versioned pyarrow schemas of everything mmcorpus writes, and their validation.

Every writer and reader goes through `SCHEMAS` and `validate` (`validate_stats` for a run's `stats.json`).
Types are plain Arrow types (strings, ints, lists, structs, binary) so pyarrow, DuckDB and Hugging Face
`datasets` read the files without custom code.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = "1.2"  # 1.1: pair.nsfw_score; 1.2: interleaved image_info.nsfw_score
META_SCHEMA = b"mmcorpus.schema"
META_VERSION = b"mmcorpus.schema_version"
META_FINGERPRINT = b"mmcorpus.run_fingerprint"

# One fetched image, aligned with the `images` position it belongs to (null at text positions).
IMAGE_INFO = pa.struct(
    [
        ("url", pa.string()),
        ("sha256", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("phash", pa.string()),  # 64-bit perceptual hash as 16 hex digits
        ("bytes", pa.binary()),
        ("path", pa.string()),
        ("alt", pa.string()),
        ("nsfw_score", pa.float32()),  # since 1.2: NSFW head over the CLIP image embedding (null: not run)
    ]
)

# OBELICS convention: `texts` and `images` have equal length, exactly one of the two is non-null per position.
INTERLEAVED = pa.schema(
    [
        ("doc_id", pa.string()),
        ("url", pa.string()),
        ("warc_record_id", pa.string()),
        ("crawl_date", pa.string()),  # ISO 8601, as the WARC or HTTP header gave it
        ("language", pa.string()),
        ("language_score", pa.float32()),
        ("texts", pa.list_(pa.string())),
        ("images", pa.list_(pa.string())),
        ("image_info", pa.list_(IMAGE_INFO)),
        ("source", pa.string()),
        ("metadata", pa.string()),  # JSON object
    ]
)

PAIR = pa.schema(
    [
        ("image_id", pa.string()),
        ("url", pa.string()),
        ("image_bytes", pa.binary()),
        ("image_path", pa.string()),
        ("caption", pa.string()),
        ("caption_source", pa.string()),  # web | synthetic
        ("clip_score", pa.float32()),
        ("itm_score", pa.float32()),
        ("nsfw_score", pa.float32()),  # since 1.1: NSFW head over the CLIP image embedding (null: not run)
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        ("phash", pa.string()),
        ("source_dataset", pa.string()),
        ("clip_embedding", pa.binary()),  # optional: float16 little-endian image embedding
        ("metadata", pa.string()),  # JSON object
    ]
)

REJECT = pa.schema(
    [
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("source", pa.string()),  # file + offset / record id, or URL
        ("detail", pa.string()),
    ]
)

# Raw counter rows a pipeline emits; `stats.json` aggregates them.
STAT = pa.schema(
    [
        ("stage", pa.string()),
        ("metric", pa.string()),  # in | out | rejected | any named counter
        ("reason", pa.string()),  # set for metric == rejected
        ("count", pa.int64()),
    ]
)

# One stage of a run's summary, as `stats.json` lists them under "stages".
RUN_STAGE = pa.schema(
    [
        ("stage", pa.string()),
        ("in", pa.int64()),
        ("out", pa.int64()),
        ("rejected", pa.int64()),
        ("reasons", pa.map_(pa.string(), pa.int64())),  # rejected rows by reason
        ("counters", pa.map_(pa.string(), pa.int64())),  # other named counts of the stage
        ("cpu_seconds", pa.float64()),  # CPU time of the stage's function summed over workers (null: not timed)
    ]
)

# Top-level keys every `stats.json` has, with their JSON types.
RUN_STATS_KEYS = {"schema_version": str, "command": str, "started": str, "finished": str,
                  "wall_seconds": (int, float), "totals": dict, "stages": list}

# A plain list of URLs, for a separate, resumable image download step.
URL_LIST = pa.schema([("url", pa.string())])

# The per-URL record of image downloads beside an output (OUT/_image_fetch/status/*.parquet): one row per
# attempt; a rerun into the same output reuses the URLs whose last attempt succeeded and fetches the rest.
IMAGE_FETCH = pa.schema(
    [
        ("url", pa.string()),
        ("status", pa.string()),  # "success" (bytes kept under OUT/_image_fetch/images/) or "failed"
        ("reason", pa.string()),  # for a failure: image_fetch_failed, url_not_allowed, image_opt_out
        ("error", pa.string()),
        ("http_status", pa.int32()),
        ("sha256", pa.string()),  # of the bytes as downloaded
        ("bytes", pa.int64()),
        ("fetched_at", pa.string()),  # ISO time of the attempt (the latest attempt of a URL counts)
    ]
)

# `mmcorpus export`: one row per exported sample, the per-shard index beside each WebDataset tar (img2dataset's
# columns first), pointing back at the source row it was made from.
EXPORT_INDEX = pa.schema(
    [
        ("key", pa.string()),  # the sample's key in the tar (KEY.jpg, KEY.txt, KEY.json)
        ("url", pa.string()),
        ("caption", pa.string()),
        ("status", pa.string()),  # img2dataset's status: always "success" (rejects are in rejects/)
        ("error_message", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("original_width", pa.int32()),
        ("original_height", pa.int32()),
        ("exif", pa.string()),
        ("sha256", pa.string()),  # of the image bytes as written (pairs); null for documents
        ("id", pa.string()),  # image_id or doc_id of the source row
        ("images", pa.int32()),  # images in the sample (1 for a pair)
        ("image_bytes", pa.int64()),  # bytes of image data in the sample, as written
        ("source_file", pa.string()),  # the source Parquet file (absolute path) and row the sample came from
        ("source_row", pa.int64()),
    ]
)

# Hugging Face `datasets` Image feature as Parquet stores it (bytes embedded, path a file name or null).
HF_IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
_HF_DTYPES = {pa.string(): "string", pa.int32(): "int32", pa.int64(): "int64", pa.float32(): "float32",
              pa.float64(): "float64"}


def _hf_feature(t: pa.DataType) -> dict:
    """The `datasets` feature of an Arrow type: HF_IMAGE -> Image, list -> Sequence, else a Value."""
    if t == HF_IMAGE:
        return {"_type": "Image"}
    if pa.types.is_list(t):
        return {"feature": _hf_feature(t.value_type), "_type": "Sequence"}
    return {"dtype": _HF_DTYPES[t], "_type": "Value"}


def _hf(schema: pa.Schema) -> pa.Schema:
    """`schema` with the `huggingface` metadata `datasets` reads its features from (Image columns decode)."""
    features = {f.name: _hf_feature(f.type) for f in schema}
    return schema.with_metadata({b"huggingface": json.dumps({"info": {"features": features}}).encode()})


HF_PAIR = _hf(pa.schema(
    [
        ("image", HF_IMAGE),
        ("caption", pa.string()),
        ("caption_source", pa.string()),
        ("url", pa.string()),
        ("image_id", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("sha256", pa.string()),
        ("clip_score", pa.float32()),
        ("itm_score", pa.float32()),
        ("source_dataset", pa.string()),
        ("key", pa.string()),
    ]))

# OBELICS layout: `texts` and `images` of equal length, exactly one set per position.
HF_INTERLEAVED = _hf(pa.schema(
    [
        ("texts", pa.list_(pa.string())),
        ("images", pa.list_(HF_IMAGE)),
        ("image_urls", pa.list_(pa.string())),
        ("doc_id", pa.string()),
        ("url", pa.string()),
        ("language", pa.string()),
        ("key", pa.string()),
    ]))
# Columns added after 1.0, by the version that added them: files of an older version are read with them null.
# "column.field": a field added to the struct (or list of structs) of a column.
ADDED_IN: dict[str, dict[str, str]] = {"pair": {"nsfw_score": "1.1"}, "interleaved": {"image_info.nsfw_score": "1.2"}}

SCHEMAS: dict[str, pa.Schema] = {
    "interleaved": INTERLEAVED,
    "pair": PAIR,
    "reject": REJECT,
    "stat": STAT,
    "run_stage": RUN_STAGE,
    "url": URL_LIST,
    "export_index": EXPORT_INDEX,
    "image_fetch": IMAGE_FETCH,
    "hf_pair": HF_PAIR,
    "hf_interleaved": HF_INTERLEAVED,
}

CAPTION_SOURCES = ("web", "synthetic")

# Required (never null) columns per schema; everything else may be null.
NON_NULL: dict[str, tuple[str, ...]] = {
    "interleaved": ("doc_id", "texts", "images", "source"),
    "pair": ("image_id", "caption", "caption_source", "source_dataset"),
    "reject": ("stage", "reason", "source"),
    "stat": ("stage", "metric", "count"),
    "run_stage": ("stage", "in", "out", "rejected", "reasons"),
    "url": ("url",),
    "image_fetch": ("url", "status", "fetched_at"),
    "export_index": ("key", "status", "id", "images", "image_bytes", "source_file", "source_row"),
    "hf_pair": ("image", "caption", "key"),
    "hf_interleaved": ("texts", "images", "doc_id", "key"),
}


class SchemaError(ValueError):
    """A table does not match its schema; the message names the column and, where known, the row."""


@dataclass(frozen=True)
class Problem:
    column: str
    row: int | None
    message: str

    def __str__(self) -> str:
        where = f"column {self.column!r}" + ("" if self.row is None else f", row {self.row}")
        return f"{where}: {self.message}"


def schema(name: str) -> pa.Schema:
    try:
        return SCHEMAS[name]
    except KeyError:
        raise SchemaError(f"unknown schema {name!r}; known: {', '.join(SCHEMAS)}") from None


@functools.cache
def leaf_columns(name: str) -> tuple[str, ...]:
    """The Parquet column paths of schema `name` (nested fields as `image_info.list.element.bytes`)."""
    buf = pa.BufferOutputStream()
    pq.ParquetWriter(buf, schema(name)).close()
    parquet_schema = pq.ParquetFile(pa.BufferReader(buf.getvalue())).schema
    return tuple(parquet_schema.column(i).path for i in range(len(parquet_schema)))


def _image_bytes(column: str) -> bool:
    return column == "image_bytes" or column.endswith(".bytes")


def parquet_options(name: str) -> dict:
    """ParquetWriter arguments for schema `name`: every column zstd-compressed, except encoded image files,
    stored as they are and without a dictionary (JPEG, PNG and WebP are compressed already and each value is
    unique: on the bench's photos zstd saved 0.02% of the bytes and wrote 0.29 s against 0.19 s, scale.json
    `sink_per_92_MB_shard_part`)."""
    leaves = leaf_columns(name)
    return {"compression": {c: "none" if _image_bytes(c) else "zstd" for c in leaves},
            "use_dictionary": [c for c in leaves if not _image_bytes(c)]}


def with_metadata(name: str, fingerprint: str = "") -> pa.Schema:
    """The schema carrying its name, version and the run fingerprint as file metadata."""
    base = schema(name)
    meta = {**(base.metadata or {}), META_SCHEMA: name.encode(), META_VERSION: SCHEMA_VERSION.encode()}
    if fingerprint:
        meta[META_FINGERPRINT] = fingerprint.encode()
    return base.with_metadata(meta)


def first_problem(table: pa.Table, name: str) -> Problem | None:
    expected = schema(name)
    for field in expected:
        if field.name not in table.column_names:
            return Problem(field.name, None, "missing")
        got = table.schema.field(field.name).type
        if got != field.type:
            return Problem(field.name, None, f"type {got} is not {field.type}")
    extra = [c for c in table.column_names if c not in expected.names]
    if extra:
        return Problem(extra[0], None, f"not in schema {name!r}")
    for column in NON_NULL[name]:
        if table.column(column).null_count:
            row = table.column(column).is_null().to_pylist().index(True)
            return Problem(column, row, "is null")
    if name == "interleaved":
        return _interleaved_problem(table)
    if name == "pair":
        sources = table.column("caption_source").to_pylist()
        for row, value in enumerate(sources):
            if value not in CAPTION_SOURCES:
                return Problem("caption_source", row, f"{value!r} is not one of {CAPTION_SOURCES}")
    return None


def _interleaved_problem(table: pa.Table) -> Problem | None:
    texts = table.column("texts").to_pylist()
    images = table.column("images").to_pylist()
    infos = table.column("image_info").to_pylist()
    for row, (t, i, info) in enumerate(zip(texts, images, infos)):
        if len(t) != len(i):
            return Problem("images", row, f"{len(i)} images for {len(t)} texts: lists must have equal length")
        for pos, (a, b) in enumerate(zip(t, i)):
            if (a is None) == (b is None):
                what = "both" if a is not None else "neither"
                return Problem("texts", row, f"position {pos} has {what} a text and an image; exactly one is required")
        if info is not None:
            if len(info) != len(i):
                return Problem("image_info", row, f"{len(info)} entries for {len(i)} positions")
            for pos, (img, inf) in enumerate(zip(i, info)):
                if (img is None) != (inf is None):
                    return Problem("image_info", row, f"position {pos}: entry must be set exactly where images is")
    return None


def validate(table: pa.Table, name: str) -> pa.Table:
    """Return `table` if it matches schema `name`, else raise SchemaError naming the first bad column/row."""
    problem = first_problem(table, name)
    if problem is not None:
        raise SchemaError(f"{name} schema v{SCHEMA_VERSION}: {problem}")
    return table


def to_table(rows: list[dict], name: str, fingerprint: str = "") -> pa.Table:
    """Build and validate a table from row dicts (missing keys become null)."""
    try:
        table = pa.Table.from_pylist(rows, schema=with_metadata(name, fingerprint))
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
        raise SchemaError(f"{name} schema v{SCHEMA_VERSION}: rows do not convert: {exc}") from exc
    return validate(table, name)


def compatible(version: str) -> bool:
    """Whether files written with schema `version` can be read by this one (same major version)."""
    return version.split(".")[0] == SCHEMA_VERSION.split(".")[0]


def validate_stats(stats: dict, where: str = "stats.json") -> dict:
    """Return a run's stats if they have the keys and types of `RUN_STATS_KEYS`, a compatible schema version
    and stages that match `RUN_STAGE` with rejects by reason adding up and cpu_seconds (optional) a
    non-negative number; else raise SchemaError naming the key or stage."""
    if not isinstance(stats, dict):
        raise SchemaError(f"{where}: not a JSON object")
    for key, types in RUN_STATS_KEYS.items():
        if not isinstance(stats.get(key), types):
            got = "missing" if key not in stats else f"a {type(stats[key]).__name__}"
            raise SchemaError(f"{where}: key {key!r} is {got}")
    if not compatible(stats["schema_version"]):
        raise SchemaError(f"{where}: schema version {stats['schema_version']} is not compatible with {SCHEMA_VERSION}")
    try:
        table = pa.Table.from_pylist(stats["stages"], schema=RUN_STAGE)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, AttributeError) as exc:
        raise SchemaError(f"{where}: stages do not match the run_stage schema: {exc}") from None
    problem = first_problem(table, "run_stage")
    if problem is not None:
        raise SchemaError(f"{where}: stages: {problem}")
    for row, stage in enumerate(stats["stages"]):
        if sum(stage["reasons"].values()) != stage["rejected"]:
            raise SchemaError(f"{where}: stage {stage['stage']!r} (row {row}): rejects by reason add up to "
                              f"{sum(stage['reasons'].values())}, not {stage['rejected']}")
        cpu = stage.get("cpu_seconds")
        if cpu is not None and not (isinstance(cpu, (int, float)) and not isinstance(cpu, bool) and cpu >= 0):
            raise SchemaError(f"{where}: stage {stage['stage']!r} (row {row}): cpu_seconds {cpu!r} is not a "
                              "non-negative number")
    return stats


def _located(path):
    """(path, filesystem) for pyarrow: a local path as it is, a URL through the fsspec layer (storage)."""
    from mmcorpus.schemas import storage

    if isinstance(path, str) and storage.is_url(path):
        fs, p = storage.filesystem(path)
        return p, fs
    return path, None


def open_parquet(source, where: str | None = None) -> pq.ParquetFile:
    """Open one Parquet file (a local path, an fsspec URL such as s3://bucket/key, or an open binary file;
    `where` names it in errors). A damaged file (random bytes, truncated, empty) or one that cannot be reached
    raises SchemaError naming it, never pyarrow's bare error."""
    try:
        path, fs = _located(source)
        return pq.ParquetFile(path, filesystem=fs) if fs is not None else pq.ParquetFile(source)
    except (OSError, pa.ArrowException, ValueError) as exc:
        raise SchemaError(f"{where or source}: not a readable Parquet file ({_short(exc)})") from None


def iter_batches(path: str, **kwargs):
    """Record batches of one Parquet file (ParquetFile.iter_batches arguments); damage found while reading
    raises SchemaError naming the file."""
    pf = open_parquet(path)
    try:
        yield from pf.iter_batches(**kwargs)
    except (OSError, pa.ArrowException) as exc:
        raise SchemaError(f"{path}: damaged Parquet data ({_short(exc)})") from None


def _short(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[:limit] + "..."


def read_schema_name(path: str) -> tuple[str, str]:
    """(schema name, version) recorded in a Parquet file written by mmcorpus."""
    meta = open_parquet(path).schema_arrow.metadata or {}
    if META_SCHEMA not in meta:
        raise SchemaError(f"{path}: not an mmcorpus file (no {META_SCHEMA.decode()} metadata)")
    return meta[META_SCHEMA].decode(), meta.get(META_VERSION, b"?").decode()


def read_table(path: str, name: str, columns: list[str] | None = None) -> pa.Table:
    """Read one file, checking it was written with schema `name` and a compatible version."""
    found, version = read_schema_name(path)
    if found != name:
        raise SchemaError(f"{path}: holds {found!r} rows, expected {name!r}")
    if not compatible(version):
        raise SchemaError(f"{path}: schema version {version} is not compatible with {SCHEMA_VERSION}")
    older = {c for c, since in ADDED_IN.get(name, {}).items() if _version(version) < _version(since)}
    wanted = None if columns is None else [c for c in columns if c not in older]
    try:
        where, fs = _located(path)
        table = pq.read_table(where, columns=wanted, filesystem=fs)
    except (OSError, pa.ArrowException) as exc:
        raise SchemaError(f"{path}: damaged Parquet data ({_short(exc)})") from None
    table = upgrade(table, name, version)
    return table.select(columns) if columns else validate(table, name)


def _version(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in version.split("."))
    except ValueError:
        return (0,)


def upgrade(table: pa.Table, name: str, version: str) -> pa.Table:
    """A table read from a file of schema `version` with the columns (and struct fields) added since then as
    nulls, in schema order."""
    newer = [c for c, since in ADDED_IN.get(name, {}).items() if _version(version) < _version(since)]
    for column in {c.split(".")[0] for c in newer if "." in c}:  # a struct gained a field: cast to the new type
        if column in table.column_names:
            field = schema(name).field(column)
            i = table.column_names.index(column)
            table = table.set_column(i, field, table.column(column).cast(field.type))
    added = [c for c in newer if "." not in c and c not in table.column_names]
    if not added:
        return table
    for c in added:
        table = table.append_column(schema(name).field(c), pa.nulls(table.num_rows, schema(name).field(c).type))
    order = [f.name for f in schema(name) if f.name in table.column_names]
    return table.select(order + [c for c in table.column_names if c not in order])


def metadata_json(value: dict | None) -> str:
    return json.dumps(value or {}, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
