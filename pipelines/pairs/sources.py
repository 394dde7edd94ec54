"""Inputs of `mmcorpus pairs`: find what each SOURCE is, list read tasks, and turn records into raw pairs.

A SOURCE is `[NAME=]PATH` (NAME becomes `source_dataset`; default: the folder or file stem):
- interleaved: an `mmcorpus interleaved` output folder (data/*.parquet of schema "interleaved"); every image
  with bytes in image_info and a non-empty alt text gives an ALIGN-style pair (caption = alt); with
  --include-context-text also an LTIP-style pair with the text chunk next to it (the one before, else after);
- pairs: a folder or file of schema "pair" (an earlier `mmcorpus pairs`/`capfilt` output);
- coco: a folder with captions.jsonl ({file_name, captions: [...]}, images in images/): ONE PAIR PER CAPTION
  (all human captions are kept; dedup treats an image's captions as one unit, see pair_dedup);
- img2dataset: an img2dataset output folder (parquet with jpg/caption columns, webdataset .tar, or files
  NNNNN/KEY.jpg + KEY.txt), recognised by its *_stats.json files;
- table: a .jsonl/.json/.parquet/.csv/.tsv file of {url | path | image, caption} (path relative to the
  file's folder; `image` holds bytes); a COCO-style row with file_name + captions works too.

Raw pair dict (internal, becomes a "pair" row at the end): row_key (unique per row of the run by
construction: dataset/file[@chunk]:ordinal), image_id (unique per pair within its read task, a file or a chunk
of a large one (chunks.py): a repeated id gets "~ORDINAL" appended), image_ref (identity of the image record: the captions of one image share it), source
(file:offset, for reject rows), source_dataset, caption (raw), caption_source and itm_score (kept from pairs
inputs, e.g. CapFilt output), url, image_path, image_bytes, metadata (dict).

Bad input never stops a read: a record that is not an object, a field of the wrong type, a line that is not
UTF-8 or JSON becomes `{"_bad": file:offset, "_detail": why}` (a reject row) and the file goes on. When a file
breaks off partway (truncated Parquet row group, tar, unreadable bytes), the rows that could not be read are
accounted for: one bad row per unread row where the count is known (Parquet metadata), else one naming the
offset where reading stopped. So read = written + rejected holds for every file.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import tarfile
from dataclasses import dataclass

import pyarrow.parquet as pq

from mmcorpus.filters.reasons import shorten
from mmcorpus import schemas
from mmcorpus.schemas import storage
from mmcorpus.pipelines.errors import UserError
from mmcorpus.pipelines.pairs import chunks

KINDS = ("interleaved", "pairs", "coco", "img2dataset", "table")
TABLE_EXTS = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Source:
    name: str
    path: str
    kind: str
    files: tuple[str, ...]  # its files; a large one is read in chunks (tasks())


def parse_source(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if sep and name and os.sep not in name and not os.path.exists(text):
        return name, path
    path = text.rstrip("/")
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem or "source", path


def _parquet_schema_name(path: str) -> str | None:
    """The mmcorpus schema a Parquet file holds, None for a readable file of someone else's; a damaged file is a
    UserError naming it."""
    try:
        return schemas.read_schema_name(path)[0]
    except schemas.SchemaError as exc:
        if "not a readable Parquet file" in str(exc):
            raise UserError(f"source {exc}") from None
        return None


def detect(text: str) -> Source:
    """Classify one SOURCE argument; a clear UserError when it is missing or not understood."""
    name, path = parse_source(text)
    try:
        return _detect(name, path)
    except (OSError, ValueError) as exc:  # an object store: denied access, missing bucket, bad endpoint
        raise UserError(f"source {path!r} cannot be read: {exc}") from None


def _detect(name: str, path: str) -> Source:
    if not storage.exists(path):
        raise UserError(f"source {path!r} does not exist")
    if storage.isfile(path):
        if path.endswith(".parquet") and _parquet_schema_name(path) == "pair":
            return Source(name, path, "pairs", (path,))
        if path.lower().endswith(TABLE_EXTS):
            return Source(name, path, "table", (path,))
        raise UserError(f"source {path!r}: not a folder and not one of {', '.join(TABLE_EXTS)}")
    data = sorted(storage.glob(storage.join(path, "data", "*.parquet")))
    if data:
        kind = _parquet_schema_name(data[0])
        if kind == "interleaved":
            return Source(name, path, "interleaved", tuple(data))
        if kind == "pair":
            return Source(name, path, "pairs", tuple(data))
        raise UserError(f"source {path!r}: data/*.parquet holds {kind or 'non-mmcorpus'} rows, "
                        f"expected interleaved or pair")
    if storage.isfile(storage.join(path, "captions.jsonl")):
        return Source(name, path, "coco", (storage.join(path, "captions.jsonl"),))
    if storage.glob(storage.join(path, "*_stats.json")):
        files = sorted(storage.glob(storage.join(path, "*.parquet"))) or sorted(storage.glob(storage.join(path, "*.tar")))
        if not files:
            files = sorted(d for d in storage.glob(storage.join(path, "*")) if storage.isdir(d))
        if not files:
            raise UserError(f"source {path!r}: img2dataset folder without parquet, tar or image sub-folders")
        return Source(name, path, "img2dataset", tuple(files))
    tables = sorted(f for ext in TABLE_EXTS for f in storage.glob(storage.join(path, "*" + ext)))
    pair_files = [f for f in tables if f.endswith(".parquet") and _parquet_schema_name(f) == "pair"]
    if pair_files:
        return Source(name, path, "pairs", tuple(pair_files))
    if tables:
        return Source(name, path, "table", tuple(tables))
    raise UserError(f"source {path!r}: no interleaved/pair data/*.parquet, captions.jsonl, img2dataset output "
                    f"or {'/'.join(TABLE_EXTS)} table found")


def detect_all(texts: list[str]) -> list[Source]:
    sources = [detect(t) for t in texts]
    names = [s.name for s in sources]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"two sources share the name {dupes[0]!r}: name them NAME=PATH")
    return sources


def tasks(sources: list[Source], rows: int = chunks.ROWS) -> list[tuple]:
    """(name, kind, root, file, chunk) read tasks: one per chunk of about `rows` records of a large JSON-lines,
    CSV/TSV or Parquet file (see chunks.py), else one per file (chunk None)."""
    out = []
    for s in sources:
        for f in s.files:
            parts = _chunks(s.kind, f, rows)
            out += [(s.name, s.kind, s.path, f, c) for c in (parts if parts and len(parts) > 1 else [None])]
    return out


def _chunks(kind: str, path: str, rows: int) -> list[chunks.Chunk] | None:
    low = path.lower()
    try:
        if low.endswith(".parquet"):  # an interleaved row is a document: several pairs each
            return chunks.parquet_chunks(path, max(1, rows // 8) if kind == "interleaved" else rows)
        if low.endswith(".jsonl") and kind in ("coco", "table"):
            return chunks.line_chunks(path, rows)
        if low.endswith((".csv", ".tsv")) and kind == "table":
            return chunks.csv_chunks(path, "\t" if low.endswith(".tsv") else ",", rows)
    except Exception:  # noqa: BLE001 - a damaged file is read whole: its reader turns what it cannot read into rejects
        return None
    return None


# ---- readers: task -> raw pairs -------------------------------------------------------------------------

def _pair(name, ref, idx, caption, source, url=None, path=None, data=None, meta=None, caption_source="web",
          itm_score=None) -> dict:
    return {"image_id": f"{ref}#{idx}", "image_ref": ref, "source": source, "source_dataset": name,
            "caption": caption, "caption_source": caption_source, "itm_score": itm_score, "url": url,
            "image_path": path, "image_bytes": data, "metadata": meta or {}}


def _bad(source: str, detail: str) -> dict:
    return {"_bad": source, "_detail": shorten(detail)}


class BadRecord(ValueError):
    """A record that cannot become a pair; the message says why (it becomes a reject row)."""


def _text(rec: dict, *names: str) -> str | None:
    """The first present field of `names` as text (None when absent or empty); BadRecord when not text."""
    for n in names:
        v = rec.get(n)
        if v is None or v == "":
            continue
        if not isinstance(v, str):
            raise BadRecord(f"field {n!r} is {type(v).__name__}, not text")
        return v
    return None


def _image_field(rec: dict) -> tuple[bytes | None, str | None]:
    """(bytes, path) from an `image`/`image_bytes` column: raw bytes, or a {bytes, path} struct (Hugging Face
    datasets' Image feature)."""
    for n in ("image", "image_bytes", "jpg"):
        v = rec.get(n)
        if v is None:
            continue
        if isinstance(v, (bytes, bytearray, memoryview)):
            return bytes(v), None
        if isinstance(v, dict):
            data, path = v.get("bytes"), v.get("path")
            if data is not None and not isinstance(data, (bytes, bytearray)):
                raise BadRecord(f"field {n!r}.bytes is {type(data).__name__}, not bytes")
            if path is not None and not isinstance(path, str):
                raise BadRecord(f"field {n!r}.path is {type(path).__name__}, not text")
            return (bytes(data) if data is not None else None), path or None
        if isinstance(v, str) and n == "image":
            return None, v  # a path in an `image` column
        raise BadRecord(f"field {n!r} is {type(v).__name__}, not bytes")
    return None, None


def _guarded(source: str, make):
    """The pairs `make()` yields, or one bad row naming `source` when the record is malformed."""
    try:
        return list(make())
    except BadRecord as exc:
        return [_bad(source, str(exc))]
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        return [_bad(source, f"malformed record: {type(exc).__name__}: {exc}")]


def _records_to_pairs(base, records, make, bad_prefix=""):
    """Pairs of (offset, record or BadRecord) items: a BadRecord is a bad row naming base:offset (just base
    when the offset is None), a record goes through `make(offset, record)`, guarded."""
    for offset, rec in records:
        if isinstance(rec, BadRecord):
            yield _bad(base if offset is None else f"{base}:{offset}", f"{bad_prefix}{rec}")
        else:
            yield from _guarded(f"{base}:{offset}", lambda: make(offset, rec))


def parquet_rows(path: str, columns: list[str] | None = None, batch_size: int = 256, chunk=None):
    """(row index, row dict) of a Parquet file (or of a chunk of its row groups), streamed a batch at a time. A
    row group that breaks off yields (index, BadRecord) for each row it could not deliver; the next row groups
    are still read."""
    f = schemas.open_parquet(path)
    groups = range(f.num_row_groups) if chunk is None else range(chunk.start, chunk.stop)
    start = 0 if chunk is None else chunk.first
    for g in groups:
        n = f.metadata.row_group(g).num_rows
        done = 0
        try:
            for batch in f.iter_batches(batch_size=batch_size, row_groups=[g], columns=columns):
                for row in batch.to_pylist():
                    yield start + done, row
                    done += 1
        except Exception as exc:  # noqa: BLE001 - corrupt pages, missing columns: the rows are rejects
            why = BadRecord(shorten(f"row group {g} unreadable: {type(exc).__name__}: {exc}", 400))
            for i in range(start + done, start + n):
                yield i, why
        start += n


def _neighbour_text(texts: list, pos: int) -> str | None:
    for i in (pos - 1, pos + 1):
        if 0 <= i < len(texts) and texts[i]:
            return texts[i]
    return None


def _interleaved_pairs(name, base, doc, include_context):
    images = doc["images"] or []
    infos = doc["image_info"] or [None] * len(images)
    if len(infos) != len(images):
        raise BadRecord(f"{len(images)} images but {len(infos)} image_info entries")
    for pos, (url, info) in enumerate(zip(images, infos)):
        if url is None:
            continue
        info = info or {}
        ref = f"{name}:{doc['doc_id']}:{pos}"
        meta = {"doc_id": doc["doc_id"], "doc_url": doc["url"], "position": pos, "caption_kind": "alt"}
        src = f"{base}:{doc['doc_id']}:{pos}"
        yield _pair(name, ref, "alt", info.get("alt"), src, url=url, path=info.get("path"), data=info.get("bytes"),
                    meta=meta)
        if include_context:
            text = _neighbour_text(doc["texts"] or [], pos)
            if text is not None:
                yield _pair(name, ref, "context", text, src, url=url, path=info.get("path"), data=info.get("bytes"),
                            meta={**meta, "caption_kind": "context"})


def read_interleaved(name, path, include_context: bool, chunk=None):
    base = os.path.basename(path)
    rows = parquet_rows(path, ["doc_id", "url", "texts", "images", "image_info"], batch_size=64, chunk=chunk)
    yield from _records_to_pairs(base, rows, lambda i, doc: _interleaved_pairs(name, base, doc, include_context))


def _upstream_pair(name, base, i, row):
    try:
        meta = json.loads(row.get("metadata") or "{}")
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        meta = {"upstream_metadata": row.get("metadata")}
    source = row.get("caption_source") or "web"
    if source not in schemas.CAPTION_SOURCES:
        raise BadRecord(f"caption_source {source!r} is not one of {', '.join(schemas.CAPTION_SOURCES)}")
    upstream = row.get("image_id")
    ident = row.get("sha256") or row.get("url") or row.get("image_path") or upstream or f"row{i}"
    yield _pair(name, f"{name}:{ident}", upstream if upstream is not None else f"row{i}", row.get("caption"),
                f"{base}:{i}" if upstream is None else f"{base}:{upstream}", url=row.get("url"),
                path=_text(row, "image_path"), data=row.get("image_bytes"),
                meta={**meta, "upstream_image_id": upstream}, caption_source=source, itm_score=row.get("itm_score"))


def read_pairs(name, path, chunk=None):
    base = os.path.basename(path)
    yield from _records_to_pairs(base, parquet_rows(path, chunk=chunk), lambda i, row: _upstream_pair(name, base, i, row))


def _coco_rows(name, path, rec, line_no, root):
    if not isinstance(rec, dict):
        raise BadRecord(f"not a JSON object but {type(rec).__name__}: {json.dumps(rec, default=repr)[:120]}")
    file_name = _text(rec, "file_name")
    captions = rec.get("captions")
    if captions is None:
        captions = [rec.get("caption")]
    if not isinstance(captions, list):
        captions = [captions]
    image_path = os.path.join(root, "images", file_name) if file_name else None
    if image_path and not os.path.exists(image_path) and os.path.exists(os.path.join(root, file_name)):
        image_path = os.path.join(root, file_name)
    ref = f"{name}:{file_name or f'line{line_no}'}"
    meta = {k: rec[k] for k in ("image_id", "license", "flickr_url") if k in rec}
    src = f"{os.path.basename(path)}:{line_no}"
    url = _text(rec, "url")
    one = len(captions) == 1  # one caption per line (COCO's own layout): the line number keeps ids unique across
    for i, caption in enumerate(captions):  # read chunks, where the repeat check of read_task cannot see
        yield _pair(name, ref, f"L{line_no}" if one else i, caption, src, url=url, path=image_path, meta={**meta, "caption_index": i})


def _json_lines(path, chunk=None):
    """(line number, record or BadRecord) of a JSON-lines file (or of a chunk of its lines); a line that is not
    UTF-8 or not JSON is a BadRecord, and reading goes on."""
    with storage.open(path, "rb") as f:
        lines = f if chunk is None else chunks.chunk_text_lines(f, chunk)
        for line_no, raw in enumerate(lines, 1 if chunk is None else chunk.first + 1):
            if not raw.strip():
                continue
            try:
                yield line_no, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as exc:
                yield line_no, BadRecord(f"not UTF-8: {exc}")
            except json.JSONDecodeError as exc:
                yield line_no, BadRecord(f"bad JSON: {exc}")


def read_coco(name, path, root, chunk=None):
    yield from _records_to_pairs(os.path.basename(path), _json_lines(path, chunk),
                                 lambda line_no, rec: _coco_rows(name, path, rec, line_no, root))


def _csv_reader(f, delimiter):
    return csv.reader(io.TextIOWrapper(f, encoding="utf-8", errors="surrogateescape", newline=""), delimiter=delimiter)


def _csv_records(path, delimiter, chunk=None):
    """(line number, dict or BadRecord) of a CSV/TSV file with a header row (or of a chunk of its records, with
    the file's header); bad rows (invalid UTF-8, a field over the csv module's limit, more fields than the
    header) are BadRecords and reading goes on. An unreadable header is a BadRecord, and so is every row after
    it (its columns are unknown)."""
    header = None
    if chunk is not None:  # chunks exist only for a file whose header reads (chunks.csv_chunks)
        with storage.open(path, "rb") as f:
            header = next(_csv_reader(f, delimiter))
    with storage.open(path, "rb") as f:
        base, steps = (0, -1) if chunk is None else (chunk.first, chunk.records)
        f.seek(0 if chunk is None else chunk.start)
        reader = _csv_reader(f, delimiter)
        no_header = None  # why the header could not be read
        while steps != 0:
            steps -= 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                if header is None and no_header is None:
                    no_header = f"CSV header (line {reader.line_num}) unreadable: {exc}"
                    yield reader.line_num, BadRecord(no_header)
                else:
                    yield base + reader.line_num, BadRecord(f"CSV: {exc}")
                continue
            line = base + reader.line_num
            if header is None and no_header is None:
                header = fields
                continue
            if not fields:
                continue
            if no_header is not None:
                yield line, BadRecord(f"columns unknown: {no_header}")
                continue
            if any("\udc80" <= ch <= "\udcff" for v in fields for ch in v):
                yield line, BadRecord("not UTF-8")
            elif len(fields) > len(header):
                yield line, BadRecord(f"{len(fields)} fields, header has {len(header)}")
            else:
                yield line, dict(zip(header, fields))


def _table_records(path, chunk=None):
    """(offset, record or BadRecord) of one table file (or chunk): line numbers for JSONL/CSV/TSV, row indices
    for Parquet/JSON. A JSON file must hold a list of records or an object with a `rows`/`data` list."""
    low = path.lower()
    if low.endswith(".parquet"):
        yield from parquet_rows(path, chunk=chunk)
    elif low.endswith(".jsonl"):
        yield from _json_lines(path, chunk)
    elif low.endswith(".json"):
        with storage.open(path, "rb") as f:
            try:
                data = json.loads(f.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                yield 0, BadRecord(f"not a UTF-8 JSON document: {exc}")
                return
        rows = data if isinstance(data, list) else data.get("rows", data.get("data")) if isinstance(data, dict) else None
        if not isinstance(rows, list):
            yield 0, BadRecord(f"top level is {type(data).__name__}: expected a list of records or an object "
                               f"with a 'rows' or 'data' list")
            return
        yield from enumerate(rows)
    else:
        yield from _csv_records(path, "\t" if low.endswith(".tsv") else ",", chunk)


def _table_pairs(name, path, root, offset, rec, tag):
    if not isinstance(rec, dict):
        raise BadRecord(f"not a record but {type(rec).__name__}: {json.dumps(rec, default=repr)[:120]}")
    if "captions" in rec and "file_name" in rec:
        yield from _coco_rows(name, path, rec, offset, root)
        return
    data, image_path = _image_field(rec)
    p = _text(rec, "path", "image_path", "file_name") or image_path
    if p and not os.path.isabs(p) and not storage.is_url(p):
        p = storage.join(root, p)
    url = _text(rec, "url")
    caption = rec.get("caption", rec.get("text"))
    ref = f"{name}:{p or url or f'{tag}row{offset}'}"
    yield _pair(name, ref, f"{tag}{offset}", caption, f"{os.path.basename(path)}:{offset}", url=url, path=p,
                data=data, meta={"row": offset})


def read_table(name, path, tag: str = "", chunk=None):
    """Pairs of one table file (or chunk); `tag` (the file name, for a folder of tables) keeps image_ids apart."""
    root = storage.dirname(storage.abspath(path))
    yield from _records_to_pairs(os.path.basename(path), _table_records(path, chunk),
                                 lambda offset, rec: _table_pairs(name, path, root, offset, rec, tag),
                                 bad_prefix="not a record: ")


def _img2dataset_row(name, base, i, row):
    key = row.get("key") or row.get("url") or f"row{i}"
    data, _ = _image_field({"jpg": row.get("jpg") or row.get("png") or row.get("webp")})
    pair = _pair(name, f"{name}:{key}", 0, row.get("caption"), f"{base}:{key}", url=_text(row, "url"), data=data,
                 meta={"key": key})
    if row.get("status") not in (None, "success"):  # img2dataset's failed download: a reject row
        pair.update(_fetch_reason="image_fetch_failed",
                    _fetch_error=f"{row.get('url')}: {row.get('error_message') or row.get('status')}")
    yield pair


def _tar_samples(path):
    """(key, {ext: bytes}) of a webdataset tar, one sample per run of members sharing a key, streamed; a tar
    that breaks off yields what it completed, then (None, BadRecord) naming the byte offset."""
    key, sample, offset = None, {}, 0
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                offset = member.offset
                if not member.isfile():
                    continue
                k, _, ext = member.name.rpartition(".")
                if k != key and sample:
                    yield key, sample
                    sample = {}
                key = k
                sample[ext.lower()] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError) as exc:
        if sample:
            yield key, sample
        yield None, BadRecord(f"tar unreadable from byte {offset}, the rest is lost: {type(exc).__name__}: {exc}")
        return
    if sample:
        yield key, sample


def read_img2dataset(name, path, chunk=None):
    base = os.path.basename(path)
    if path.endswith(".parquet"):
        yield from _records_to_pairs(base, parquet_rows(path, batch_size=64, chunk=chunk),
                                     lambda i, row: _img2dataset_row(name, base, i, row))
        return
    if path.endswith(".tar"):  # a break-off BadRecord comes with key None: it names the file
        yield from _records_to_pairs(base, _tar_samples(path),
                                     lambda key, sample: [_img2dataset_sample(name, base, key, sample)])
        return
    for img in sorted(glob.glob(os.path.join(path, "*"))):
        stem, ext = os.path.splitext(img)
        if ext.lower() in IMAGE_EXTS:
            def one():
                sample = {"path": img}
                for extra in ("txt", "json"):
                    if os.path.exists(f"{stem}.{extra}"):
                        with open(f"{stem}.{extra}", "rb") as f:
                            sample[extra] = f.read()
                return [_img2dataset_sample(name, base, os.path.basename(stem), sample)]
            try:
                yield from one()
            except OSError as exc:
                yield _bad(f"{base}:{os.path.basename(stem)}", f"sidecar unreadable: {exc}")


def _img2dataset_sample(name, base, key, sample):
    meta = {"key": key}
    url = None
    if "json" in sample:
        try:
            info = json.loads(sample["json"])
            url = info.get("url") if isinstance(info, dict) and isinstance(info.get("url"), str) else None
        except (ValueError, UnicodeDecodeError):
            pass
    caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else None
    data = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
    return _pair(name, f"{name}:{key}", 0, caption, f"{base}:{key}", url=url, path=sample.get("path"), data=data,
                 meta=meta)


def _read(task, include_context):
    name, kind, root, path, chunk = task
    if kind == "interleaved":
        return read_interleaved(name, path, include_context, chunk)
    if kind == "pairs":
        return read_pairs(name, path, chunk)
    if kind == "coco":
        return read_coco(name, path, root, chunk)
    if kind == "img2dataset":
        return read_img2dataset(name, path, chunk)
    return read_table(name, path, "" if os.path.abspath(path) == os.path.abspath(root) else
                      os.path.basename(path) + ":", chunk)


def row_key_prefix(task) -> str:
    """The row keys' prefix: the file (and, past a file's first chunk, the chunk's first offset, so row keys stay
    unique and in file order)."""
    name, _, root, path, chunk = task
    rel = os.path.basename(path) if os.path.abspath(path) == os.path.abspath(root) else os.path.relpath(path, root)
    return f"{name}/{rel}" + (f"@{chunk.first:012d}" if chunk is not None and chunk.first else "")


def read_task(task, include_context: bool = False):
    """Raw pairs of one read task, each with a unique `row_key`; unreadable rows come as
    {"_bad": source, "_detail": why}. A repeated image_id within the task (a file, or a chunk of a large one) gets
    "~ORDINAL" appended."""
    from mmcorpus.pipelines.runtime.sink import stable_hash

    prefix = row_key_prefix(task)
    seen: set[int] = set()
    n = 0
    try:
        for item in _read(task, include_context):
            if "_bad" not in item:
                h = stable_hash(item["image_id"])
                if h in seen:
                    item["image_id"] = f"{item['image_id']}~{n}"
                seen.add(h)
            item["row_key"] = f"{prefix}:{n:09d}"
            n += 1
            yield item
    except Exception as exc:  # noqa: BLE001 - the rest of this file is lost: one reject row says where
        yield {"_bad": os.path.basename(task[3]), "row_key": f"{prefix}:{n:09d}",
               "_detail": f"{task[1]} file unreadable after {n} rows, the rest is lost: "
                          f"{type(exc).__name__}: {exc}"[:500]}


def load_bytes(row: dict) -> bytes | None:
    """Image bytes of a raw pair: inline bytes, else the file at image_path (raises OSError)."""
    from mmcorpus.pipelines.runtime.sink import FileBytes

    if isinstance(row.get("image_bytes"), FileBytes):  # spooled by the reader (capfilt)
        return row["image_bytes"].read()
    if row.get("image_bytes") is not None:  # b"" stays: a zero-byte image, rejected by the decode check
        return bytes(row["image_bytes"])
    path = row.get("image_path")
    if path is not None and not isinstance(path, str):
        raise OSError(f"image_path is {type(path).__name__}, not a file name")
    if path:
        with storage.open(path, "rb") as f:  # a local file or any fsspec URL
            return f.read()
    return None
