"""What one exported sample holds, from one source row: pure functions, no Beam, no file I/O.

- `prepare_image`: the image bytes to ship (as stored, or JPEG on request), checked to decode.
- `check_row`: the index row of a sample (what the sink shards and the writers re-read), or a Reject.
- `wds_members`: the files of a sample in a WebDataset tar. Pairs follow img2dataset (KEY.jpg|png|webp as
  stored, KEY.txt caption, KEY.json metadata); documents are one KEY.json in the MMC4 layout OpenFlamingo's
  loader reads (`text_list`, `image_info` with `image_base64`, `matched_text_index`, `matched_sim`, and the
  images x sentences `similarity_matrix`), plus OBELICS' aligned `texts`/`images` lists.
- `hf_row`: the row of a Hugging Face Parquet shard (image columns as `datasets` Image structs).

Documents carry no image-text similarity: each image is matched to the text it precedes in reading order (the
last text when it comes last), `matched_sim` 1.0 and the similarity matrix one-hot on that match; the JSON
says so in `"matched_by": "position"`.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass

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

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def prepare_image(data: bytes | None, cfg: ExportConfig, checked: bool = False) -> Image | Reject:
    """The bytes to write: as stored, or (image_format jpg) non-JPEG images decoded and re-encoded as RGB JPEG.
    Bytes that fail the check are a Reject, never a sample. `checked`: the export stage checked these bytes
    already (the writers), so only the header is read again."""
    if not data:
        return Reject("no_image_bytes", "the row stores no image bytes")
    found = check_image(data, cfg.max_pixels, decode=cfg.decode_check and not checked)
    if isinstance(found, Reject):
        return found
    fmt, width, height = found
    if cfg.image_format == "keep" or fmt == "JPEG":
        return Image(bytes(data), EXTENSIONS.get(fmt, fmt.lower() or "bin"), width, height, width, height)
    rgb = decode_rgb(data, cfg.max_pixels)
    if isinstance(rgb, Reject):
        return rgb
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return Image(buf.getvalue(), "jpg", rgb.width, rgb.height, width, height)


def doc_images(row: dict, cfg: ExportConfig, checked: bool = False) -> list[Image] | Reject:
    """The images of a document in order; the whole document is a Reject when one lacks bytes or fails."""
    out = []
    for pos, (url, info) in enumerate(zip(row["images"], row.get("image_info") or [None] * len(row["images"]))):
        if url is None:
            continue
        image = prepare_image((info or {}).get("bytes"), cfg, checked)
        if isinstance(image, Reject):
            return Reject(image.reason, f"image at position {pos} ({url}): {image.detail}")
        out.append(image)
    if not out:
        return Reject("no_images", "the document holds no image")
    return out


def check_row(row: dict, key: str, source_file: str, source_row: int, cfg: ExportConfig) -> dict | Reject:
    """The sample's index row (schema export_index), or why the row cannot be exported."""
    if cfg.kind == "pair":
        image = prepare_image(row.get("image_bytes"), cfg)
        if isinstance(image, Reject):
            return image
        return {"key": key, "url": row.get("url"), "caption": row.get("caption"), "status": "success",
                "width": image.width, "height": image.height, "original_width": image.original_width,
                "original_height": image.original_height, "sha256": image.sha256, "id": row["image_id"],
                "images": 1, "image_bytes": len(image.data), "source_file": source_file, "source_row": source_row}
    images = doc_images(row, cfg)
    if isinstance(images, Reject):
        return images
    return {"key": key, "url": row.get("url"), "status": "success", "id": row["doc_id"], "images": len(images),
            "image_bytes": sum(len(i.data) for i in images), "source_file": source_file, "source_row": source_row}


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


def wds_members(row: dict, key: str, cfg: ExportConfig) -> list[tuple[str, bytes]] | Reject:
    """(member name, bytes) of one sample, in tar order (of a row the export stage checked)."""
    if cfg.kind == "pair":
        image = prepare_image(row.get("image_bytes"), cfg, checked=True)
        if isinstance(image, Reject):
            return image
        meta = json.dumps(pair_json(row, key, image), ensure_ascii=False, sort_keys=False)
        return [(f"{key}.{image.ext}", image.data), (f"{key}.txt", (row.get("caption") or "").encode()),
                (f"{key}.json", meta.encode())]
    images = doc_images(row, cfg, checked=True)
    if isinstance(images, Reject):
        return images
    return [(f"{key}.json", json.dumps(doc_json(row, key, images), ensure_ascii=False).encode())]


def hf_row(row: dict, key: str, cfg: ExportConfig) -> dict | Reject:
    """One row of a Hugging Face shard (schema hf_pair or hf_interleaved), of a row the export stage checked."""
    if cfg.kind == "pair":
        image = prepare_image(row.get("image_bytes"), cfg, checked=True)
        if isinstance(image, Reject):
            return image
        return {"image": {"bytes": image.data, "path": f"{key}.{image.ext}"}, "caption": row.get("caption"),
                "caption_source": row.get("caption_source"), "url": row.get("url"), "image_id": row["image_id"],
                "width": image.width, "height": image.height, "sha256": image.sha256,
                "clip_score": row.get("clip_score"), "itm_score": row.get("itm_score"),
                "source_dataset": row.get("source_dataset"), "key": key}
    images = doc_images(row, cfg, checked=True)
    if isinstance(images, Reject):
        return images
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
