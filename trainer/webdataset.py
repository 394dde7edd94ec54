"""Reader of WebDataset tars for the trainer (`format: webdataset` in a dataset's config): the tars
`mmcorpus export --format webdataset` writes, and img2dataset / MMC4-style tars alike.

A tar is one unit of the loader; its samples are turned into the same row dicts the Parquet reader gives
(schema columns `pair` / `interleaved`), so the sample builder, the held-out split and resume are shared:
- pairs: the image member (jpg, jpeg, png, webp), `txt` as caption, `json` for url / sha256 / key;
- documents: one `json` in the MMC4 layout (`text_list`, `image_info` with `image_base64` and
  `matched_text_index`); OBELICS' aligned `texts`/`images` lists give the order when present, otherwise each
  image goes before its matched sentence, as OpenFlamingo places it.
Plain `tarfile`, streamed member by member: no dependency on the webdataset package.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tarfile

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def split_name(name: str) -> tuple[str, str]:
    """(key, extension) of a member: the extension starts at the first dot of the file name (WebDataset's rule)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext


def samples(fh, start: int = 0):
    """(index, {ext: bytes}) of a tar's samples (consecutive members sharing a key) from sample `start` on."""
    key, sample, index = None, {}, -1
    with tarfile.open(fileobj=fh, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = split_name(member.name)
            if k != key:
                if sample and index >= start:
                    yield index, sample
                key, sample, index = k, {}, index + 1
            if index >= start:
                sample[ext.lower()] = tar.extractfile(member).read()
    if sample and index >= start:
        yield index, sample


def count(fh) -> int:
    keys = set()
    with tarfile.open(fileobj=fh, mode="r|") as tar:
        for member in tar:
            if member.isfile():
                keys.add(split_name(member.name)[0])
    return len(keys)


def pair_row(sample: dict) -> dict:
    meta = json.loads(sample["json"]) if "json" in sample else {}
    data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
    caption = sample["txt"].decode("utf-8", "replace") if "txt" in sample else meta.get("caption")
    return {"image_id": meta.get("image_id") or meta.get("key"), "url": meta.get("url"), "image_bytes": data,
            "image_path": None, "caption": caption,
            "sha256": hashlib.sha256(data).hexdigest() if data else None}


def doc_row(sample: dict) -> dict:
    doc = json.loads(sample["json"])
    infos = doc.get("image_info") or []
    by_name = {}
    for info in infos:
        raw = info.get("image_base64")
        data = base64.b64decode(raw) if raw else None
        by_name[info.get("image_name")] = {"url": info.get("raw_url"), "bytes": data,
                                           "sha256": hashlib.sha256(data).hexdigest() if data else None}
    if "texts" in doc and "images" in doc:  # OBELICS order
        texts, names = doc["texts"], doc["images"]
    else:  # MMC4: each image before its matched sentence
        before: dict[int, list] = {}
        for info in infos:
            before.setdefault(int(info.get("matched_text_index") or 0), []).append(info.get("image_name"))
        texts, names = [], []
        for i, text in enumerate(doc.get("text_list") or []):
            for name in before.pop(i, []):
                texts.append(None)
                names.append(name)
            texts.append(text)
            names.append(None)
        for rest in before.values():
            texts += [None] * len(rest)
            names += rest
    image_info = [None if n is None else by_name.get(n, {}) for n in names]
    return {"doc_id": doc.get("doc_id") or doc.get("key") or doc.get("url"), "texts": texts,
            "images": [None if n is None else (i.get("url") or n) for n, i in zip(names, image_info)],
            "image_info": image_info}
