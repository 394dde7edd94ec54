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

Raw pair dict (internal, becomes a "pair" row at the end): image_id (unique per pair), image_ref (identity
of the image record: the captions of one image share it), source (for reject rows), source_dataset, caption
(raw), url, image_path, image_bytes, metadata (dict).
"""

from __future__ import annotations

import csv
import glob
import json
import os
import tarfile
from dataclasses import dataclass

import pyarrow.parquet as pq

import schemas
from pipelines.errors import UserError

KINDS = ("interleaved", "pairs", "coco", "img2dataset", "table")
TABLE_EXTS = (".jsonl", ".json", ".parquet", ".csv", ".tsv")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")


@dataclass(frozen=True)
class Source:
    name: str
    path: str
    kind: str
    files: tuple[str, ...]  # read tasks: one file each


def parse_source(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if sep and name and os.sep not in name and not os.path.exists(text):
        return name, path
    path = text.rstrip("/")
    stem = os.path.splitext(os.path.basename(path))[0]
    return stem or "source", path


def _parquet_schema_name(path: str) -> str | None:
    try:
        return schemas.read_schema_name(path)[0]
    except Exception:  # noqa: BLE001 - not an mmcorpus file
        return None


def detect(text: str) -> Source:
    """Classify one SOURCE argument; a clear UserError when it is missing or not understood."""
    name, path = parse_source(text)
    if not os.path.exists(path):
        raise UserError(f"source {path!r} does not exist")
    if os.path.isfile(path):
        if path.endswith(".parquet") and _parquet_schema_name(path) == "pair":
            return Source(name, path, "pairs", (path,))
        if path.lower().endswith(TABLE_EXTS):
            return Source(name, path, "table", (path,))
        raise UserError(f"source {path!r}: not a folder and not one of {', '.join(TABLE_EXTS)}")
    data = sorted(glob.glob(os.path.join(path, "data", "*.parquet")))
    if data:
        kind = _parquet_schema_name(data[0])
        if kind == "interleaved":
            return Source(name, path, "interleaved", tuple(data))
        if kind == "pair":
            return Source(name, path, "pairs", tuple(data))
        raise UserError(f"source {path!r}: data/*.parquet holds {kind or 'non-mmcorpus'} rows, "
                        f"expected interleaved or pair")
    if os.path.isfile(os.path.join(path, "captions.jsonl")):
        return Source(name, path, "coco", (os.path.join(path, "captions.jsonl"),))
    if glob.glob(os.path.join(path, "*_stats.json")):
        files = sorted(glob.glob(os.path.join(path, "*.parquet"))) or sorted(glob.glob(os.path.join(path, "*.tar")))
        if not files:
            files = sorted(d for d in glob.glob(os.path.join(path, "*")) if os.path.isdir(d))
        if not files:
            raise UserError(f"source {path!r}: img2dataset folder without parquet, tar or image sub-folders")
        return Source(name, path, "img2dataset", tuple(files))
    tables = sorted(f for ext in TABLE_EXTS for f in glob.glob(os.path.join(path, "*" + ext)))
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


def tasks(sources: list[Source]) -> list[tuple[str, str, str, str]]:
    """(name, kind, root, file) read tasks, one per file."""
    return [(s.name, s.kind, s.path, f) for s in sources for f in s.files]


# ---- readers: task -> raw pairs -------------------------------------------------------------------------

def _pair(name, ref, idx, caption, source, url=None, path=None, data=None, meta=None) -> dict:
    return {"image_id": f"{ref}#{idx}", "image_ref": ref, "source": source, "source_dataset": name,
            "caption": caption, "url": url, "image_path": path, "image_bytes": data, "metadata": meta or {}}


def _neighbour_text(texts: list, pos: int) -> str | None:
    for i in (pos - 1, pos + 1):
        if 0 <= i < len(texts) and texts[i]:
            return texts[i]
    return None


def read_interleaved(name, path, include_context: bool):
    f = pq.ParquetFile(path)
    for batch in f.iter_batches(batch_size=64, columns=["doc_id", "url", "texts", "images", "image_info"]):
        for doc in batch.to_pylist():
            infos = doc["image_info"] or [None] * len(doc["images"])
            for pos, (url, info) in enumerate(zip(doc["images"], infos)):
                if url is None:
                    continue
                info = info or {}
                ref = f"{name}:{doc['doc_id']}:{pos}"
                meta = {"doc_id": doc["doc_id"], "doc_url": doc["url"], "position": pos, "caption_kind": "alt"}
                src = f"{os.path.basename(path)}:{doc['doc_id']}:{pos}"
                yield _pair(name, ref, "alt", info.get("alt"), src, url=url, path=info.get("path"),
                            data=info.get("bytes"), meta=meta)
                if include_context:
                    text = _neighbour_text(doc["texts"], pos)
                    if text is not None:
                        yield _pair(name, ref, "context", text, src, url=url, path=info.get("path"),
                                    data=info.get("bytes"), meta={**meta, "caption_kind": "context"})


def read_pairs(name, path):
    for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
        for row in batch.to_pylist():
            meta = json.loads(row.get("metadata") or "{}")
            ref = f"{name}:{row.get('sha256') or row.get('url') or row.get('image_path') or row['image_id']}"
            yield _pair(name, ref, row["image_id"], row.get("caption"), f"{os.path.basename(path)}:{row['image_id']}",
                        url=row.get("url"), path=row.get("image_path"), data=row.get("image_bytes"),
                        meta={**meta, "upstream_image_id": row["image_id"]})


def _coco_rows(name, path, rec, line_no, root):
    file_name = rec.get("file_name")
    captions = rec.get("captions")
    if captions is None:
        captions = [rec.get("caption")]
    if not isinstance(captions, list):
        captions = [captions]
    image_path = os.path.join(root, "images", file_name) if isinstance(file_name, str) else None
    if image_path and not os.path.exists(image_path) and os.path.exists(os.path.join(root, file_name)):
        image_path = os.path.join(root, file_name)
    ref = f"{name}:{file_name if isinstance(file_name, str) else f'line{line_no}'}"
    meta = {k: rec[k] for k in ("image_id", "license", "flickr_url") if k in rec}
    src = f"{os.path.basename(path)}:{line_no}"
    for i, caption in enumerate(captions):
        yield _pair(name, ref, i, caption, src, url=rec.get("url"), path=image_path, meta={**meta, "caption_index": i})


def read_coco(name, path, root):
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                yield {"_bad": f"{os.path.basename(path)}:{line_no}", "_detail": f"bad JSON: {exc}"}
                continue
            yield from _coco_rows(name, path, rec, line_no, root)


def _table_records(path):
    low = path.lower()
    if low.endswith(".parquet"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):
            yield from batch.to_pylist()
    elif low.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield {"_bad_json": str(exc)}
    elif low.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        yield from (data if isinstance(data, list) else data.get("rows", data.get("data", [])))
    else:
        with open(path, encoding="utf-8", newline="") as f:
            yield from csv.DictReader(f, delimiter="\t" if low.endswith(".tsv") else ",")


def read_table(name, path):
    root = os.path.dirname(os.path.abspath(path))
    for i, rec in enumerate(_table_records(path)):
        src = f"{os.path.basename(path)}:{i}"
        if not isinstance(rec, dict) or "_bad_json" in rec:
            yield {"_bad": src, "_detail": f"not a record: {rec.get('_bad_json') if isinstance(rec, dict) else rec!r}"[:300]}
            continue
        if "captions" in rec and "file_name" in rec:
            yield from _coco_rows(name, path, rec, i, root)
            continue
        p = rec.get("path") or rec.get("image_path") or rec.get("file_name")
        if isinstance(p, str) and p and not os.path.isabs(p):
            p = os.path.join(root, p)
        data = rec.get("image") if isinstance(rec.get("image"), (bytes, bytearray)) else rec.get("image_bytes")
        url = rec.get("url")
        ref = f"{name}:{p or url or f'row{i}'}"
        yield _pair(name, ref, i, rec.get("caption", rec.get("text")), src, url=url or None, path=p or None,
                    data=data, meta={"row": i})


def read_img2dataset(name, path):
    base = os.path.basename(path)
    if path.endswith(".parquet"):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
            for row in batch.to_pylist():
                key = row.get("key") or row.get("url")
                pair = _pair(name, f"{name}:{key}", 0, row.get("caption"), f"{base}:{key}", url=row.get("url"),
                             data=row.get("jpg") or row.get("png") or row.get("webp"), meta={"key": key})
                if row.get("status") not in (None, "success"):  # img2dataset's failed download: a reject row
                    pair.update(_fetch_reason="image_fetch_failed",
                                _fetch_error=f"{row.get('url')}: {row.get('error_message') or row.get('status')}")
                yield pair
        return
    if path.endswith(".tar"):
        samples: dict[str, dict] = {}
        with tarfile.open(path) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, ext = member.name.rpartition(".")
                samples.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
        for key in sorted(samples):
            yield _img2dataset_sample(name, base, key, samples[key])
        return
    for img in sorted(glob.glob(os.path.join(path, "*"))):
        stem, ext = os.path.splitext(img)
        if ext.lower() in IMAGE_EXTS:
            sample = {"path": img}
            for extra in ("txt", "json"):
                if os.path.exists(f"{stem}.{extra}"):
                    with open(f"{stem}.{extra}", "rb") as f:
                        sample[extra] = f.read()
            yield _img2dataset_sample(name, base, os.path.basename(stem), sample)


def _img2dataset_sample(name, base, key, sample):
    meta = {"key": key}
    url = None
    if "json" in sample:
        try:
            info = json.loads(sample["json"])
            url = info.get("url")
        except (ValueError, AttributeError):
            pass
    caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else None
    data = next((sample[e] for e in ("jpg", "jpeg", "png", "webp") if e in sample), None)
    return _pair(name, f"{name}:{key}", 0, caption, f"{base}:{key}", url=url, path=sample.get("path"), data=data,
                 meta=meta)


def read_task(task, include_context: bool = False):
    """Raw pairs of one read task; unreadable rows come as {"_bad": source, "_detail": why}."""
    name, kind, root, path = task
    try:
        if kind == "interleaved":
            yield from read_interleaved(name, path, include_context)
        elif kind == "pairs":
            yield from read_pairs(name, path)
        elif kind == "coco":
            yield from read_coco(name, path, root)
        elif kind == "img2dataset":
            yield from read_img2dataset(name, path)
        else:
            yield from read_table(name, path)
    except (OSError, ValueError, tarfile.TarError, UnicodeDecodeError) as exc:
        # the rest of this file is lost: one reject row says so (rows already yielded stay)
        yield {"_bad": os.path.basename(path), "_detail": f"{kind} file unreadable: {type(exc).__name__}: {exc}"[:500]}


def load_bytes(row: dict) -> bytes | None:
    """Image bytes of a raw pair: inline bytes, else the file at image_path (raises OSError)."""
    if row.get("image_bytes") is not None:  # b"" stays: a zero-byte image, rejected by the decode check
        return bytes(row["image_bytes"])
    if row.get("image_path"):
        with open(row["image_path"], "rb") as f:
            return f.read()
    return None

