"""What exported samples hold, one record batch of source rows at a time: pure functions, no Beam, no file I/O.

- `prepare_image`: the image bytes to ship (as stored, or JPEG on request), checked cheaply (header, pixel
  guard, end marker: `check_image`; pixels only with `decode_check` or to re-encode), with the sha256, width and
  height the pipelines stored beside the bytes (computed only where a row lacks them or the bytes were
  re-encoded).
- `pair_batch` / `doc_batch`: the samples of one record batch and the rows that are rejects; a batch gives the
  writers its WebDataset tar members in order, its per-shard index table and its Hugging Face table. Pairs are
  assembled column-wise with Arrow (the image bytes go into the Hugging Face table without a copy when none was
  rejected or re-encoded); documents row by row (their MMC4 JSON is per document anyway).
- Pairs follow img2dataset (KEY.jpg|png|webp as stored, KEY.txt caption, KEY.json metadata); documents are one
  KEY.json in the MMC4 layout OpenFlamingo's loader reads (`text_list`, `image_info` with `image_base64`,
  `matched_text_index`, `matched_sim`, and the images x sentences `similarity_matrix`), plus OBELICS' aligned
  `texts`/`images` lists; Hugging Face rows have `datasets` Image structs.

Documents carry no image-text similarity: each image is matched to the text it precedes in reading order (the
last text when it comes last), `matched_sim` 1.0 and the similarity matrix one-hot on that match; the JSON
says so in `"matched_by": "position"`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
from dataclasses import dataclass, field

import pyarrow as pa

from mmcorpus import schemas
from mmcorpus.filters.imageinfo import DEFAULT_MAX_PIXELS, check_image, decode_rgb
from mmcorpus.filters.reasons import Reject

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}
IMAGE_FORMATS = ("keep", "jpg")
JPEG_QUALITY = 95
PAIR_COLUMNS = ["image_id", "url", "image_bytes", "caption", "caption_source", "clip_score", "itm_score",
                "width", "height", "sha256", "source_dataset"]
DOC_COLUMNS = ["doc_id", "url", "language", "texts", "images", "image_info"]


@dataclass(frozen=True)
class ExportConfig:
    kind: str  # "pair" | "interleaved" (the source's schema)
    image_format: str = "keep"
    max_pixels: int = DEFAULT_MAX_PIXELS
    decode_check: bool = False  # decode every image's pixels, not only its header and end marker


@dataclass(frozen=True)
class Image:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int
    digest: str | None = None  # the sha256 the source stored for these bytes

    @functools.cached_property
    def sha256(self) -> str:
        return self.digest or hashlib.sha256(self.data).hexdigest()


def prepare_image(data: bytes | None, cfg: ExportConfig, sha256: str | None = None, width: int | None = None,
                  height: int | None = None) -> Image | Reject:
    """The bytes to write: as stored, or (image_format jpg) non-JPEG images decoded and re-encoded as RGB JPEG.
    Bytes that fail the check are a Reject, never a sample. `sha256`, `width`, `height`: what the source stored
    for these bytes (width and height after EXIF orientation, as the pipelines measure them); the header's
    size where they are missing."""
    if not data:
        return Reject("no_image_bytes", "the row stores no image bytes")
    found = check_image(data, cfg.max_pixels, decode=cfg.decode_check)
    if isinstance(found, Reject):
        return found
    fmt, w, h = found
    if width and height:
        w, h = width, height
    if cfg.image_format == "keep" or fmt == "JPEG":
        return Image(data, EXTENSIONS.get(fmt, fmt.lower() or "bin"), w, h, w, h, sha256)
    rgb = decode_rgb(data, cfg.max_pixels)
    if isinstance(rgb, Reject):
        return rgb
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return Image(buf.getvalue(), "jpg", rgb.width, rgb.height, w, h)


def doc_images(row: dict, cfg: ExportConfig) -> list[Image] | Reject:
    """The images of a document in order; the whole document is a Reject when one lacks bytes or fails."""
    out = []
    for pos, (url, info) in enumerate(zip(row["images"], row.get("image_info") or [None] * len(row["images"]))):
        if url is None:
            continue
        info = info or {}
        image = prepare_image(info.get("bytes"), cfg, info.get("sha256"), info.get("width"), info.get("height"))
        if isinstance(image, Reject):
            return Reject(image.reason, f"image at position {pos} ({url}): {image.detail}")
        out.append(image)
    if not out:
        return Reject("no_images", "the document holds no image")
    return out


def matched_text_indices(texts: list) -> list[int]:
    """Per image position, the index in the text list of the text it precedes (else the last text before it)."""
    out, seen, pending = [], 0, 0
    for text in texts:
        if text is None:
            pending += 1
        else:
            out += [seen] * pending
            pending = 0
            seen += 1
    return out + [max(seen - 1, 0)] * pending


def pair_json(row: dict, key: str, image: Image) -> dict:
    """img2dataset's KEY.json fields, then the mmcorpus ones."""
    return {"key": key, "url": row.get("url"), "caption": row.get("caption"), "status": "success",
            "error_message": None, "width": image.width, "height": image.height,
            "original_width": image.original_width, "original_height": image.original_height, "exif": None,
            "sha256": image.sha256, "image_id": row["image_id"], "clip_score": row.get("clip_score"),
            "itm_score": row.get("itm_score"), "caption_source": row.get("caption_source"),
            "source_dataset": row.get("source_dataset")}


def doc_json(row: dict, key: str, images: list[Image]) -> dict:
    """MMC4 / OpenFlamingo fields plus the OBELICS aligned lists, for one document."""
    texts, urls = row["texts"], row["images"]
    text_list = [t for t in texts if t is not None]
    matched = matched_text_indices(texts)
    names = [f"{key}_{j}.{image.ext}" for j, image in enumerate(images)]
    info = []
    for j, (image, url, m) in enumerate(zip(images, [u for u in urls if u is not None], matched)):
        info.append({"image_name": names[j], "raw_url": url, "matched_text_index": m, "matched_sim": 1.0,
                     "width": image.width, "height": image.height, "sha256": image.sha256,
                     "image_base64": base64.b64encode(image.data).decode("ascii")})
    sims = [[1.0 if i == m else 0.0 for i in range(len(text_list))] for m in matched]
    it = iter(names)
    return {"key": key, "url": row.get("url"), "doc_id": row["doc_id"], "language": row.get("language"),
            "text_list": text_list, "image_info": info, "similarity_matrix": sims, "matched_by": "position",
            "texts": list(texts), "images": [None if u is None else next(it) for u in urls]}


def hf_doc_row(row: dict, key: str, images: list[Image]) -> dict:
    """One row of a Hugging Face interleaved shard (OBELICS layout, images as `datasets` Image structs)."""
    it = iter(enumerate(images))
    structs = []
    for url in row["images"]:
        if url is None:
            structs.append(None)
        else:
            j, image = next(it)
            structs.append({"bytes": image.data, "path": f"{key}_{j}.{image.ext}"})
    return {"texts": list(row["texts"]), "images": structs, "image_urls": list(row["images"]),
            "doc_id": row["doc_id"], "url": row.get("url"), "language": row.get("language"), "key": key}


def table(columns: dict, name: str, fingerprint: str = "") -> pa.Table:
    """A validated table of schema `name` from whole Arrow columns (in any order)."""
    schema = schemas.with_metadata(name, fingerprint)
    try:
        out = pa.Table.from_arrays([columns[f.name] for f in schema], schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, KeyError) as exc:
        raise schemas.SchemaError(f"{name} schema v{schemas.SCHEMA_VERSION}: columns do not convert: {exc}") from exc
    return schemas.validate(out, name)


@dataclass
class Batch:
    """The samples made from one record batch: `rejects` are (row in the batch, Reject)."""

    keys: list[str]
    rows: list[int]  # row in the batch of each sample
    images: list[list[Image]]  # per sample (one for a pair)
    rejects: list[tuple[int, Reject]] = field(default_factory=list)
    sized = False  # the index carries the image's size and sha256 (pairs)

    def index_table(self, source_file: str, first_row: int, fingerprint: str) -> pa.Table:
        """img2dataset's per-shard index rows (schema export_index) of these samples."""
        n = len(self.keys)
        one = [imgs[0] if self.sized else None for imgs in self.images]  # a pair's image; none for documents
        cols = {"key": pa.array(self.keys, pa.string()), "status": pa.array(["success"] * n, pa.string()),
                "error_message": pa.nulls(n, pa.string()), "exif": pa.nulls(n, pa.string()),
                "images": pa.array([len(i) for i in self.images], pa.int32()),
                "image_bytes": pa.array([sum(len(x.data) for x in i) for i in self.images], pa.int64()),
                "source_file": pa.array([source_file] * n, pa.string()),
                "source_row": pa.array([first_row + r for r in self.rows], pa.int64())}
        for name in ("width", "height", "original_width", "original_height", "sha256"):
            values = [None if i is None else getattr(i, name) for i in one]
            cols[name] = pa.array(values, pa.string() if name == "sha256" else pa.int32())
        cols.update(self._index_columns())
        return table(cols, "export_index", fingerprint)


@dataclass
class PairBatch(Batch):
    sized = True
    batch: pa.RecordBatch | None = None
    fields: dict = field(default_factory=dict)  # column -> Python values of the batch (all but image_bytes)
    unchanged: bool = True  # every row a sample, every image as stored

    def _index_columns(self) -> dict:
        taken = self.batch.select(["url", "caption", "image_id"]).take(pa.array(self.rows, pa.int32()))
        return {"url": taken.column("url"), "caption": taken.column("caption"), "id": taken.column("image_id")}

    def members(self):
        """(name, bytes) of the tar members of every sample, in order."""
        f = self.fields
        for key, r, (image,) in zip(self.keys, self.rows, self.images):
            row = {name: values[r] for name, values in f.items()}
            meta = json.dumps(pair_json(row, key, image), ensure_ascii=False)
            yield f"{key}.{image.ext}", image.data
            yield f"{key}.txt", (row["caption"] or "").encode()
            yield f"{key}.json", meta.encode()

    def hf_table(self, fingerprint: str) -> pa.Table:
        """The Hugging Face rows (schema hf_pair) of these samples, column by column."""
        idx = pa.array(self.rows, pa.int32())
        taken = self.batch.select(["caption", "caption_source", "url", "image_id", "clip_score", "itm_score",
                                   "source_dataset"]).take(idx)
        data = (self.batch.column("image_bytes") if self.unchanged else
                pa.array([i.data for (i,) in self.images], pa.binary()))
        paths = pa.array([f"{k}.{i.ext}" for k, (i,) in zip(self.keys, self.images)], pa.string())
        cols = {name: taken.column(name) for name in taken.column_names}
        cols.update(image=pa.StructArray.from_arrays([data, paths], fields=list(schemas.HF_IMAGE)),
                    width=pa.array([i.width for (i,) in self.images], pa.int32()),
                    height=pa.array([i.height for (i,) in self.images], pa.int32()),
                    sha256=pa.array([i.sha256 for (i,) in self.images], pa.string()),
                    key=pa.array(self.keys, pa.string()))
        return table(cols, "hf_pair", fingerprint)


def pair_batch(batch: pa.RecordBatch, keys: list[str], cfg: ExportConfig) -> PairBatch:
    """The samples of a record batch of pair rows (PAIR_COLUMNS); `keys` one per row."""
    fields = {name: batch.column(name).to_pylist() for name in batch.column_names if name != "image_bytes"}
    data = batch.column("image_bytes").to_pylist()
    out = PairBatch([], [], [], batch=batch, fields=fields)
    sha, width, height = fields["sha256"], fields["width"], fields["height"]
    for r, value in enumerate(data):
        image = prepare_image(value, cfg, sha[r], width[r], height[r])
        if isinstance(image, Reject):
            out.rejects.append((r, image))
            continue
        out.unchanged = out.unchanged and image.data is value
        out.keys.append(keys[r])
        out.rows.append(r)
        out.images.append([image])
    out.unchanged = out.unchanged and not out.rejects
    return out


@dataclass
class DocBatch(Batch):
    docs: list[dict] = field(default_factory=list)  # the source row of each sample

    def _index_columns(self) -> dict:
        return {"url": pa.array([d.get("url") for d in self.docs], pa.string()),
                "caption": pa.nulls(len(self.docs), pa.string()),
                "id": pa.array([d["doc_id"] for d in self.docs], pa.string())}

    def members(self):
        for key, doc, images in zip(self.keys, self.docs, self.images):
            yield f"{key}.json", json.dumps(doc_json(doc, key, images), ensure_ascii=False).encode()

    def hf_table(self, fingerprint: str) -> pa.Table:
        rows = [hf_doc_row(doc, key, images) for key, doc, images in zip(self.keys, self.docs, self.images)]
        return schemas.to_table(rows, "hf_interleaved", fingerprint)


def doc_batch(batch: pa.RecordBatch, keys: list[str], cfg: ExportConfig) -> DocBatch:
    """The samples of a record batch of interleaved documents (DOC_COLUMNS); `keys` one per row."""
    out = DocBatch([], [], [])
    for r, doc in enumerate(batch.to_pylist()):
        images = doc_images(doc, cfg)
        if isinstance(images, Reject):
            out.rejects.append((r, images))
            continue
        out.keys.append(keys[r])
        out.rows.append(r)
        out.images.append(images)
        out.docs.append(doc)
    return out


def make_batch(batch: pa.RecordBatch, keys: list[str], cfg: ExportConfig) -> Batch:
    return (pair_batch if cfg.kind == "pair" else doc_batch)(batch, keys, cfg)
