"""Streaming, resumable, weighted-mixture loader over mmcorpus Parquet (pairs and interleaved documents).

Pipeline of one dataset: Parquet files (local or any fsspec URL, read through `schemas`, footer metadata
only up front) -> row-group units split over ranks x workers -> windowed shuffle buffer -> samples
(tokens + images resized to the vision encoder) -> fixed-length batches.

Samples follow Flamingo: a pair is `<image>caption<|endofchunk|>` (32 tokens by default); an interleaved
document is `text <image>text<|endofchunk|><image>text<|endofchunk|>...` with at most `max_images` images and
`max_seq_len` tokens (M3W: 5 and 256). Images come from their stored bytes or, failing those, their stored
path (relative to the Parquet file's folder, or any fsspec URL); positions without a usable image are
dropped and counted.

Held-out split by image content, the same in every dataset: an image's key is the sha256 of its bytes (else
its URL, else its path) and its rank a hash of that key in [0, 1). A row's rank is the lowest of its images'
(a document is held out as soon as one of the images it would train on is). Dataset d evaluates on rows of
rank < holdout_d and every dataset of the mixture trains only on rows of rank >= max(holdout), so an image
held out anywhere is trained on nowhere, even when pairs and documents share photos. A document of k images
lands in the held-out split with probability about 1 - (1 - holdout)^k; there it keeps only its held-out
images (the others, and any held-out image of a trained document, are counted as image_other_split).
Identical bytes share a key; a re-encoded copy of a photo does not (dedup across datasets catches those).

Throughput: JPEGs decode at the smallest DCT scale still >= the model's resolution (PIL draft), a photo seen
again within a shuffle window (the captions of one image) is decoded once, and `num_workers: auto` gives each
dataset (cores - 1) / datasets DataLoader workers, each prefetching 4 batches.

Exact resume: the shuffle buffer is a window of `shuffle_buffer` raw rows read from a known position and
permuted with an RNG seeded by (seed, shard, epoch, position), so the whole stream state is a small dict
(epoch, unit position, row offset, rows taken from the window, skip counters). Each batch travels with the
state *after* it; a loader rebuilt from that state yields exactly the batches that would have followed.
With `num_workers > 0` each DataLoader worker owns one logical shard and the worker order is rotated on
resume so the global batch order is unchanged.
"""

from __future__ import annotations

import collections
import hashlib
import io
import itertools
import os
import posixpath
import queue
import threading
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow.parquet as pq
import torch

from mmcorpus import schemas
from mmcorpus.schemas import storage

IMAGE_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
KINDS = {"pair": "pair", "pairs": "pair", "interleaved": "interleaved"}
MODES = ("flamingo", "round_robin", "weighted")
FORMATS = ("parquet", "webdataset")
COLUMNS = {
    "pair": ["image_id", "url", "image_bytes", "image_path", "caption", "sha256"],
    "interleaved": ["doc_id", "texts", "images", "image_info"],
}


class DataError(ValueError):
    """A dataset cannot be read as configured; the message names the dataset and the file."""


@dataclass
class DatasetSpec:
    name: str
    path: str  # a Parquet file, a folder (pipeline OUT/ or its data/), a glob, or any fsspec URL of those
    kind: str  # "pair" | "interleaved"
    weight: float = 1.0  # lambda in the mixture
    max_seq_len: int = 0  # 0: 32 for pairs, 256 for interleaved
    batch_size: int = 8
    max_images: int = 5
    format: str = "parquet"  # "parquet" | "webdataset" (tars of `mmcorpus export`, img2dataset or MMC4 style)
    holdout: float = 0.1  # fraction of images (by content hash) held out for the report (a document: any of its)
    # images ranked below this are never trained on: its own `holdout`, or in a mixture the largest one, so
    # an image held out by one dataset is not trained on through another that holds the same photo
    exclude: float = field(default=-1.0, init=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DataError(f"dataset {self.name!r}: kind {self.kind!r} is not one of pair, interleaved")
        self.kind = KINDS[self.kind]
        if self.format not in FORMATS:
            raise DataError(f"dataset {self.name!r}: format {self.format!r} is not one of {', '.join(FORMATS)}")
        if not self.max_seq_len:
            self.max_seq_len = 32 if self.kind == "pair" else 256
        if self.weight < 0 or self.batch_size < 1 or not 0 <= self.holdout < 1:
            raise DataError(f"dataset {self.name!r}: need weight >= 0, batch_size >= 1, 0 <= holdout < 1")
        self.exclude = self.holdout


@dataclass
class MixtureSpec:
    datasets: list[DatasetSpec]
    mode: str = "flamingo"  # see loss_weights
    seed: int = 0
    shuffle_buffer: int = 256
    num_workers: int | str = "auto"  # DataLoader workers per dataset; "auto": spare cores / datasets, 1 to 8
    extras: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in MODES:
            raise DataError(f"mode {self.mode!r} is not one of {MODES}")
        if self.mode != "round_robin" and sum(s.weight for s in self.datasets) <= 0:
            raise DataError(f"mode {self.mode!r} needs at least one dataset with weight > 0")
        if not (self.num_workers == "auto" or isinstance(self.num_workers, int) and self.num_workers >= 0):
            raise DataError(f"num_workers must be an integer >= 0 or 'auto', not {self.num_workers!r}")
        exclude = max(s.holdout for s in self.datasets)
        for s in self.datasets:
            s.exclude = exclude

    def loss_weights(self) -> dict[str, float]:
        """Factor on each dataset's loss in a step. flamingo: one batch from every dataset per step, losses
        summed with lambda normalised to sum 1 (the step's loss stays on the per-dataset scale). weighted: one
        dataset per step, drawn with probability lambda / sum(lambda), its loss unscaled (lambda already acts
        through the draw). round_robin: datasets in turn, losses unscaled (lambda unused)."""
        if self.mode != "flamingo":
            return {s.name: 1.0 for s in self.datasets}
        total = sum(s.weight for s in self.datasets)
        return {s.name: s.weight / total for s in self.datasets}

    def workers(self) -> int:
        if self.num_workers != "auto":
            return self.num_workers
        return max(1, min(8, (cpu_count() - 1) // len(self.datasets)))

    @classmethod
    def from_dict(cls, d: dict) -> "MixtureSpec":
        d = dict(d)
        raw = d.pop("datasets", None)
        if not raw:
            raise DataError("data config needs a non-empty 'datasets' list")
        specs = []
        for i, item in enumerate(raw):
            item = dict(item)
            item.setdefault("name", f"dataset{i}")
            unknown = set(item) - {f.name for f in fields(DatasetSpec) if f.init}
            if unknown or "path" not in item or "kind" not in item:
                raise DataError(f"dataset {item['name']!r}: needs path and kind; unknown keys {sorted(unknown)}")
            specs.append(DatasetSpec(**item))
        if len({s.name for s in specs}) != len(specs):
            raise DataError("dataset names must be unique")
        known = {k: d.pop(k) for k in ("mode", "seed", "shuffle_buffer", "num_workers") if k in d}
        return cls(specs, extras=d, **known)


def cpu_count() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ---------------------------------------------------------------- files and units

def list_files(path: str, suffix: str = ".parquet") -> tuple[object, list[str]]:
    """(filesystem, sorted Parquet files, or files ending in `suffix`) for a file, folder, pipeline output folder
    or glob, local or fsspec."""
    fs, root = storage.filesystem(path)  # the fsspec layer, with --storage-option settings
    if any(ch in root for ch in "*?["):
        files = fs.glob(root)
    elif fs.isdir(root):
        data = root.rstrip("/") + "/data"
        base = data if fs.isdir(data) else root
        files = [f for f in fs.find(base) if f.endswith(suffix) and "/rejects/" not in f]
    elif fs.exists(root):
        files = [root]
    else:
        raise DataError(f"{path}: no such file or folder")
    files = sorted(f for f in files if f.endswith(suffix))
    if not files:
        raise DataError(f"{path}: no {suffix} files found")
    return fs, files


def _tar_units(spec: DatasetSpec) -> tuple[object, list[tuple[str, int, int]]]:
    """One unit (tar, 0, samples) per WebDataset tar of a dataset."""
    import tarfile

    from mmcorpus.trainer import webdataset

    fs, files = list_files(spec.path, ".tar")
    units = []
    for f in files:
        try:
            with fs.open(f, "rb") as fh:
                units.append((f, 0, webdataset.count(fh)))
        except (tarfile.TarError, OSError) as exc:
            raise DataError(f"dataset {spec.name!r}: {f} is not a readable tar ({exc})") from None
    return fs, units


def _units(spec: DatasetSpec) -> tuple[object, list[tuple[str, int, int]]]:
    """Row groups (file, group, rows) of a dataset, after checking each file's mmcorpus schema name (a
    WebDataset dataset: one unit per tar)."""
    if spec.format == "webdataset":
        return _tar_units(spec)
    fs, files = list_files(spec.path)
    units = []
    for f in files:
        with fs.open(f, "rb") as fh:
            try:
                pf = schemas.open_parquet(fh, where=f)
            except schemas.SchemaError as exc:
                raise DataError(f"dataset {spec.name!r}: {exc}") from None
            meta = pf.schema_arrow.metadata or {}
            found = meta.get(schemas.META_SCHEMA, b"").decode()
            if found != spec.kind:
                raise DataError(f"dataset {spec.name!r}: {f} holds {found or 'non-mmcorpus'!r} rows, "
                                f"expected {spec.kind!r}")
            missing = [c for c in COLUMNS[spec.kind] if c not in pf.schema_arrow.names]
            if missing:
                raise DataError(f"dataset {spec.name!r}: {f} lacks columns {missing}")
            units += [(f, g, pf.metadata.row_group(g).num_rows) for g in range(pf.metadata.num_row_groups)]
    return fs, units


def check_dataset(spec: DatasetSpec) -> int:
    """Raise DataError unless the dataset's files exist and hold `spec.kind` rows; return its row count."""
    return sum(n for _, _, n in _units(spec)[1])


def content_hash(key: str | bytes) -> int:
    data = key if isinstance(key, bytes) else key.encode()
    return int.from_bytes(hashlib.sha1(data).digest()[:8], "big")


def image_key(data: bytes | None, sha256: str | None, url: str | None, path: str | None) -> str | None:
    """Identity of one image, the same in every dataset that holds it: the sha256 of its bytes (stored by the
    pipelines, or computed), else its URL, else its path. (A re-encoded copy has other bytes, hence another key.)"""
    if sha256:
        return sha256
    if data:
        return hashlib.sha256(data).hexdigest()
    return url or path or None


def image_keys(row: dict, kind: str, max_images: int = 5) -> list[str]:
    """The images a sample of this row trains on: the pair's image, or a document's first `max_images` image
    positions that have bytes or a path (later ones never reach a sample)."""
    if kind == "pair":
        key = image_key(row.get("image_bytes"), row.get("sha256"), row.get("url"), row.get("image_path"))
        return [key or f"id:{row.get('image_id')}"]
    keys = []
    infos = row.get("image_info") or [None] * len(row["images"])
    for url, info in zip(row["images"], infos):
        key = _position_key(url, info)
        if key is None:
            continue
        keys.append(key)
        if len(keys) == max_images:
            break
    return keys


def _position_key(url: str | None, info: dict | None) -> str | None:
    """Key of a document's image position (see image_key); None for a position with neither bytes nor path:
    a text position, or an image that cannot be loaded (skipped and counted when the sample is built)."""
    info = info or {}
    if not (info.get("bytes") or info.get("path")):
        return None
    return image_key(info.get("bytes"), info.get("sha256"), info.get("url") or url, info.get("path"))


def row_key(row: dict, kind: str) -> str:
    """Stable identity of a sample (batch digests, k-fold folds): the image for pairs, the document otherwise."""
    if kind == "interleaved":
        return str(row.get("doc_id"))
    return image_keys(row, "pair")[0]


def holdout_rank(keys: list[str], fallback: str) -> float:
    """Position in [0, 1) of a row on the held-out scale: the lowest rank of its images (by content), so a row
    is held out as soon as one of its images is; `fallback` (the document id) for a row without images."""
    return min(content_hash("holdout:" + k) % 1_000_000 for k in keys or [fallback]) / 1_000_000


# ---------------------------------------------------------------- rows -> samples

class ImageTransform:
    """PIL image -> uint8 tensor [3, size, size]: the centred square of side min(w, h) resized to `size`
    (= shorter side to `size`, then centre crop) in one antialiased bicubic PIL resize. Pixels stay uint8
    (a quarter of the bytes between processes and to the GPU); `Flamingo.encode_images` normalises them."""

    cache = None  # an ImageCache of this transform's outputs (image_transform(size, cache=DIR))

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img) -> torch.Tensor:
        from PIL import Image

        if img.mode != "RGB":
            img = img.convert("RGB")
        w, h = img.size
        side = min(w, h)
        box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
        img = img.resize((self.size, self.size), Image.Resampling.BICUBIC, box=box)
        return torch.from_numpy(np.array(img)).permute(2, 0, 1)  # one copy; collate's stack makes it contiguous


def image_transform(size: int, cache: str | None = None) -> ImageTransform:
    """The model's transform; with `cache` (a folder) its outputs are kept there by sha256 (see ImageCache)."""
    transform = ImageTransform(size)
    transform.cache = ImageCache(cache, size) if cache else None
    return transform


class ImageCache:
    """Training-resolution copies of images on disk (`data.image_cache`), written once and keyed by the sha256
    of the stored bytes and the transform (size, centre crop, bicubic): later epochs, runs and workers read
    3 x size x size raw bytes instead of decoding the JPEG. Writes are atomic (temporary file, rename), so
    workers may share a folder; a folder that cannot be written only loses the speed-up."""

    VERSION = "centre-bicubic-v1"

    def __init__(self, root: str, size: int):
        self.size, self.dir, self.writable = size, os.path.join(root, f"{size}px-{self.VERSION}"), True

    @staticmethod
    def usable(key: str | None) -> bool:
        return bool(key) and len(key) == 64 and all(c in "0123456789abcdef" for c in key)

    def _path(self, sha: str) -> str:
        return os.path.join(self.dir, sha[:2], sha + ".u8")

    def get(self, sha: str) -> torch.Tensor | None:
        try:
            with open(self._path(sha), "rb") as fh:
                raw = fh.read()
        except OSError:
            return None
        if len(raw) != 3 * self.size * self.size:  # a torn or foreign file: decode again
            return None
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(3, self.size, self.size)

    def put(self, sha: str, image: torch.Tensor) -> None:
        if not self.writable:
            return
        path = self._path(sha)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(image.contiguous().numpy().tobytes())
            os.replace(tmp, path)
        except OSError:
            self.writable = False


def decode_image(data: bytes, size: int | None = None):
    """Decode and verify an image; JPEGs are decoded at the smallest scale still >= `size` (PIL draft)."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    if size and img.format == "JPEG":
        img.draft("RGB", (size, size))
    img.load()
    return img


@dataclass
class Sample:
    key: str
    input_ids: list[int]
    images: list  # tensors [3, H, W] (or precomputed features), one per <image> token, in order
    image_keys: list[str] = field(default_factory=list)  # content key of each image (see image_key)


def _fill_sha256(row: dict, kind: str) -> None:
    """Hash image bytes that came without their sha256 once, for the split and the sample key alike."""
    if kind == "pair":
        if not row.get("sha256") and row.get("image_bytes"):
            row["sha256"] = hashlib.sha256(row["image_bytes"]).hexdigest()
        return
    for info in row.get("image_info") or ():
        if info and not info.get("sha256") and info.get("bytes"):
            info["sha256"] = hashlib.sha256(info["bytes"]).hexdigest()


class SampleBuilder:
    """Turns schema rows into Flamingo samples; returns a skip reason string for a bad row. With `keep_image`
    set (a predicate on image keys; ShardStream sets it) a document keeps only the image positions it accepts
    (the held-out split keeps only held-out images, the training split none; the others are counted as
    image_other_split)."""

    CACHE_BYTES = 64 << 20  # at most this much of the window's decoded images kept per builder (per worker)

    def __init__(self, tokenizer, transform, spec: DatasetSpec, fs=None):
        self.tok, self.transform, self.spec, self.fs, self.keep_image = tokenizer, transform, spec, fs, None
        ensure_special_tokens(tokenizer)
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eoc_id = tokenizer.convert_tokens_to_ids(EOC_TOKEN)
        self._backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        size = getattr(transform, "size", 224)
        self._cache = collections.OrderedDict()  # image key -> tensor or skip reason, least recent first
        self._cache_size = max(8, self.CACHE_BYTES // (3 * size * size))
        self.disk = getattr(transform, "cache", None)  # ImageCache or None

    def _encode(self, text: str) -> list[int]:
        if self._backend is not None:  # the Rust tokenizer itself: same ids, a tenth of the call overhead
            return self._backend.encode(text, add_special_tokens=False).ids
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _read(self, path: str, base: str) -> bytes:
        """Bytes of an image stored by path: a URL through fsspec, otherwise a path on the dataset's own
        filesystem, relative to the folder of the Parquet file that names it."""
        if "://" in path:
            with storage.open(path, "rb") as fh:
                return fh.read()
        full = path if posixpath.isabs(path) or not base else posixpath.join(base, path)
        with (self.fs.open(full, "rb") if self.fs is not None else open(full, "rb")) as fh:
            return fh.read()

    def _image(self, data: bytes | None, path: str | None, base: str, key: str | None = None) -> object | str:
        """The transformed image (or a skip reason), decoded once per shuffle window: the captions of one photo
        sit in the same window, so a photo is decoded once there, not once per caption. The stream calls
        `forget_images` at every new window, so the cache never spans more than a window (nor an epoch)."""
        if key is None:
            return self._load(data, path, base)
        cache_key = (base, key) if not data else key
        hit = self._cache.get(cache_key)
        if hit is not None:
            self._cache.move_to_end(cache_key)
            return hit
        image = self.disk.get(key) if self.disk is not None and ImageCache.usable(key) else None
        if image is None:
            image = self._load(data, path, base)
            if self.disk is not None and ImageCache.usable(key) and not isinstance(image, str):
                self.disk.put(key, image)
        self._cache[cache_key] = image
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return image

    def forget_images(self) -> None:
        self._cache.clear()

    def _load(self, data: bytes | None, path: str | None, base: str) -> object | str:
        if not data and path:
            try:
                data = self._read(path, base)
            except (OSError, ValueError):
                return "missing_image_file"
        if not data:
            return "missing_image_bytes"
        try:
            return self.transform(decode_image(data, getattr(self.transform, "size", None)))
        except Exception:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            return "undecodable_image"

    def build(self, row: dict, base: str, counts: collections.Counter) -> Sample | str:
        return self.pair(row, base) if self.spec.kind == "pair" else self.interleaved(row, base, counts)

    def pair(self, row, base) -> Sample | str:
        caption = (row.get("caption") or "").strip()
        if not caption:
            return "empty_text"
        tokens = self._encode(caption)
        if not tokens:
            return "empty_text"
        image = self._image(row.get("image_bytes"), row.get("image_path"), base, row.get("sha256"))
        if isinstance(image, str):
            return image
        ids = [self.image_id] + tokens[: self.spec.max_seq_len - 2] + [self.eoc_id]
        key = row_key(row, "pair")
        return Sample(key, ids, [image], [key])

    def interleaved(self, row, base, counts) -> Sample | str:
        ids, images, keys, text_tokens, have_image = [], [], [], 0, False
        infos = row.get("image_info") or [None] * len(row["texts"])
        for text, url, info in zip(row["texts"], row["images"], infos):
            if len(ids) >= self.spec.max_seq_len:
                break
            if text is not None:
                tokens = self._encode(text.strip()) if text.strip() else []
                ids += tokens
                text_tokens += len(tokens)
                continue
            if len(images) == self.spec.max_images:
                break
            info = info or {}
            key = _position_key(url, info)
            if self.keep_image is not None and key is not None and not self.keep_image(key):
                counts["image_other_split"] += 1
                continue
            image = self._image(info.get("bytes"), info.get("path"), base, info.get("sha256"))
            if isinstance(image, str):
                counts["image_" + image] += 1  # the position is skipped, the document kept
                continue
            ids += ([self.eoc_id] if have_image else []) + [self.image_id]
            images.append(image)
            keys.append(key)
            have_image = True
        if have_image:
            ids.append(self.eoc_id)
        ids = ids[: self.spec.max_seq_len]
        n = ids.count(self.image_id)
        if not text_tokens:
            return "empty_text"
        if not n:
            return "no_usable_image"
        return Sample(row_key(row, "interleaved"), ids, images[:n], keys[:n])


def ensure_special_tokens(tokenizer) -> None:
    """Add `<image>`, `<|endofchunk|>` (and a pad token) to a tokenizer that lacks them."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in (IMAGE_TOKEN, EOC_TOKEN) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or EOC_TOKEN


def collate(samples: list[Sample], max_seq_len: int, pad_id: int, image_id: int) -> dict:
    """Fixed-length batch: input_ids/attention_mask/labels [B, L]; images [B, N, ...] + image_mask [B, N]."""
    b, n = len(samples), max(1, max(len(s.images) for s in samples))
    counts = [len(s.images) for s in samples]
    rows = np.full((b, max_seq_len), pad_id, dtype=np.int64)
    for i, s in enumerate(samples):
        rows[i, : len(s.input_ids)] = s.input_ids
    ids = torch.from_numpy(rows)
    lengths = torch.tensor([len(s.input_ids) for s in samples])
    mask = (torch.arange(max_seq_len)[None] < lengths[:, None]).long()
    image_mask = torch.arange(n)[None] < torch.tensor(counts)[:, None]
    if all(c == n for c in counts):  # every sample fills every slot (pairs): one stack, no zero fill
        images = torch.stack([img for s in samples for img in s.images]).view(b, n, *samples[0].images[0].shape)
    else:
        first = samples[0].images[0]
        images = torch.zeros((b, n, *first.shape), dtype=first.dtype)
        for i, s in enumerate(samples):
            if s.images:
                images[i, : len(s.images)] = torch.stack(s.images)
    labels = ids.masked_fill(mask == 0, -100).masked_fill(ids == image_id, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels, "images": images,
            "image_mask": image_mask, "keys": [s.key for s in samples]}


# ---------------------------------------------------------------- resumable row stream of one shard

def new_state() -> dict:
    return {"epoch": 0, "unit": 0, "row": 0, "taken": 0, "batches": 0, "rows_ok": 0, "skipped": {}}


class ShardStream:
    """Endless, deterministic sample stream of shard `shard` of `world` of one dataset."""

    def __init__(self, spec: DatasetSpec, builder: SampleBuilder, shard: int, world: int, seed: int,
                 shuffle_buffer: int, split: str = "train", state: dict | None = None, units=None, fs=None,
                 one_pass: bool = False):
        if fs is None or units is None:
            fs, units = _units(spec)
        self.spec, self.builder, self.fs, self.seed, self.split = spec, builder, fs, seed, split
        self.shard, self.world, self.buffer, self.one_pass = shard, world, max(1, shuffle_buffer), one_pass
        builder.fs = fs
        if split in ("eval", "train"):  # a held-out document shows only held-out images, a trained one none
            # (a later image may stand in for a broken one)
            builder.keep_image = lambda key: self._in_split(holdout_rank([key], key))
        if len(units) >= world:  # whole row groups per shard; otherwise every world-th row
            self.units, self.stride = [(f, g, n, 0) for f, g, n in units[shard::world]], 1
        else:
            starts = np.cumsum([0] + [n for _, _, n in units])
            self.units, self.stride = [(f, g, n, int(s)) for (f, g, n), s in zip(units, starts)], world
        self._live = None  # (position, open row generator) to continue reading without re-seeking
        self.state = dict(state) if state else new_state()
        self.state["skipped"] = dict(self.state["skipped"])

    def _order(self, epoch: int) -> list:
        order = list(range(len(self.units)))
        np.random.default_rng([self.seed, self.shard, epoch]).shuffle(order)
        return [self.units[i] for i in order]

    def _keep(self, row: dict, start: int, r: int) -> bool:
        if self.stride > 1 and (start + r) % self.stride != self.shard:
            return False
        _fill_sha256(row, self.spec.kind)
        if self.split == "all":
            return True
        spec = self.spec
        return self._in_split(holdout_rank(image_keys(row, spec.kind, spec.max_images), str(row.get("doc_id"))))

    def _in_split(self, rank: float) -> bool:
        """Whether a row or image of this holdout rank belongs to this stream's split ("eval" or "train")."""
        return rank < self.spec.holdout if self.split == "eval" else rank >= self.spec.exclude

    def _unit_rows(self, f: str, g: int, row: int):
        """(row index, row dict) of row group g of file f from `row` on, decoded lazily batch by batch."""
        if self.spec.format == "webdataset":
            yield from self._tar_rows(f, row)
            return
        with self.fs.open(f, "rb") as fh:
            seen = 0
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=128, row_groups=[g], columns=COLUMNS[self.spec.kind]):
                if seen + batch.num_rows > row:
                    lo = max(0, row - seen)
                    for i, r in enumerate(batch.slice(lo).to_pylist()):
                        yield seen + lo + i, r
                seen += batch.num_rows

    def _tar_rows(self, f: str, row: int):
        from mmcorpus.trainer import webdataset

        to_row = webdataset.pair_row if self.spec.kind == "pair" else webdataset.doc_row
        with self.fs.open(f, "rb") as fh:
            for index, sample in webdataset.samples(fh, row):
                yield index, to_row(sample)

    def _window(self, epoch: int, unit: int, row: int) -> tuple[list, int, int]:
        """Kept rows among the next `buffer` raw rows from (unit, row); returns (rows, next unit, next row).
        The open reader is reused when the next window continues where the last one stopped."""
        order, rows, taken = self._order(epoch), [], 0
        while unit < len(order) and taken < self.buffer:
            f, g, n, start = order[unit]
            live = self._live if self._live and self._live[0] == (epoch, f, g, row) else None
            gen = live[1] if live else self._unit_rows(f, g, row)
            want = min(n - row, self.buffer - taken)
            for index, r in itertools.islice(gen, want):
                if self._keep(r, start, index):
                    rows.append((r, posixpath.dirname(f)))
            taken += want
            row += want
            self._live = ((epoch, f, g, row), gen) if row < n else None
            if row >= n:
                unit, row = unit + 1, 0
        return rows, unit, row

    def __iter__(self):
        st = self.state
        while True:
            if st["unit"] >= len(self.units):
                if self.one_pass:
                    return
                if st["rows_ok"] == 0:
                    raise DataError(f"dataset {self.spec.name!r} shard {self.shard}/{self.world} ({self.split}): "
                                    f"no usable rows (skipped: {st['skipped'] or 'none'})")
                st.update(epoch=st["epoch"] + 1, unit=0, row=0, taken=0)
                continue
            rows, next_unit, next_row = self._window(st["epoch"], st["unit"], st["row"])
            self.builder.forget_images()  # reuse is within a window (a photo's captions), never across epochs
            perm = np.random.default_rng([self.seed, self.shard, st["epoch"], st["unit"], st["row"]]).permutation(len(rows))
            counts = collections.Counter()
            while st["taken"] < len(rows):
                row, base = rows[perm[st["taken"]]]
                st["taken"] += 1
                sample = self.builder.build(row, base, counts)
                for reason, n in counts.items():
                    st["skipped"][reason] = st["skipped"].get(reason, 0) + n
                counts.clear()
                if isinstance(sample, str):
                    st["skipped"][sample] = st["skipped"].get(sample, 0) + 1
                    continue
                st["rows_ok"] += 1
                yield sample
            st.update(unit=next_unit, row=next_row, taken=0)

    def batches(self):
        """(batch, state after it) pairs, forever."""
        spec, b = self.spec, self.builder
        pad = b.tok.pad_token_id if b.tok.pad_token_id is not None else b.eoc_id
        buf = []
        for sample in self:
            buf.append(sample)
            if len(buf) == spec.batch_size:
                self.state["batches"] += 1
                yield collate(buf, spec.max_seq_len, pad, b.image_id), _copy_state(self.state)
                buf = []


def _copy_state(st: dict) -> dict:
    return {**st, "skipped": dict(st["skipped"])}


# ---------------------------------------------------------------- one dataset over workers, then the mixture

class _WorkerShards(torch.utils.data.IterableDataset):
    def __init__(self, loader: "DatasetLoader"):
        self.loader = loader

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        yield from self.loader._shard_batches((wid + self.loader.rotation) % self.loader.num_workers)


class _Receiver:
    """Takes batches off a DataLoader iterator in a background thread, in order, so the wait for a batch to
    cross over from its worker process overlaps the training step instead of adding to it."""

    def __init__(self, it, depth: int):
        self.it, self.queue, self.stop = it, queue.Queue(maxsize=max(1, depth)), threading.Event()
        self.thread = threading.Thread(target=self._run, name="mmcorpus-loader", daemon=True)
        self.thread.start()

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self):
        try:
            for item in self.it:
                if not self._put((True, item)):
                    return
            self._put((False, StopIteration()))
        except Exception as exc:  # a worker's DataError, or its death: raised where the batch was wanted
            self._put((False, exc))

    def __next__(self):
        while True:
            try:
                ok, value = self.queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self.thread.is_alive() and self.queue.empty():
                    raise DataError("the loader thread stopped without a batch or an error") from None
        if not ok:
            raise value
        return value

    def close(self):
        """Stop the thread and the DataLoader's worker processes (they hold no state: every batch carried its own)."""
        self.stop.set()
        workers = getattr(self.it, "_workers", None) or []
        for w in workers:
            if w.is_alive():
                w.terminate()
        self.thread.join(timeout=1.0)
        if workers:
            self.it._shutdown_workers()


class DatasetLoader:
    """Batches of one dataset for rank `rank` of `world_size`, over `num_workers` DataLoader workers."""

    def __init__(self, spec: DatasetSpec, tokenizer, transform, seed=0, shuffle_buffer=256, num_workers=0,
                 rank=0, world_size=1, state: dict | None = None, split="train", pin_memory=False,
                 prefetch_factor=4):
        self.spec, self.tok, self.transform, self.seed = spec, tokenizer, transform, seed
        self.buffer, self.rank, self.world_size, self.split = shuffle_buffer, rank, world_size, split
        if not 0 <= rank < world_size:
            raise DataError(f"dataset {spec.name!r}: rank {rank} is not in 0..{world_size - 1}")
        self.num_workers = max(1, num_workers)
        self.use_workers = num_workers > 0
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.fs, self.units = _units(spec)
        ensure_special_tokens(tokenizer)
        state = state or {}
        if state and len(state.get("shards", [])) != self.num_workers:
            raise DataError(f"dataset {spec.name!r}: checkpoint has {len(state.get('shards', []))} worker shards, "
                            f"config has {self.num_workers}; resume with the same num_workers")
        self.shard_states = list(state.get("shards") or [None] * self.num_workers)
        self.consumed = state.get("consumed", 0)
        self.rotation = self.consumed % self.num_workers
        self._it = None

    def _shard_batches(self, logical: int):
        world = self.world_size * self.num_workers
        stream = ShardStream(self.spec, SampleBuilder(self.tok, self.transform, self.spec), self.rank * self.num_workers + logical,
                             world, self.seed, self.buffer, self.split, self.shard_states[logical], self.units, self.fs)
        for batch, st in stream.batches():
            yield logical, batch, st

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._it is None:
            if self.use_workers:
                dl = torch.utils.data.DataLoader(_WorkerShards(self), batch_size=None, num_workers=self.num_workers,
                                                 prefetch_factor=self.prefetch_factor, persistent_workers=False,
                                                 pin_memory=self.pin_memory)
                self._it = _Receiver(iter(dl), self.prefetch_factor)
            else:
                self._it = self._shard_batches(0)
        logical, batch, st = next(self._it)
        self.shard_states[logical] = st
        self.consumed += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes now (they hold no state: every batch carried its own)."""
        it, self._it = self._it, None
        if isinstance(it, _Receiver):
            it.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def state(self) -> dict:
        return {"consumed": self.consumed, "shards": [None if s is None else _copy_state(s) for s in self.shard_states]}

    def skipped(self) -> dict:
        total = collections.Counter()
        for s in self.shard_states:
            total.update((s or {}).get("skipped", {}))
        return dict(sorted(total.items()))

    def rows_ok(self) -> int:
        return sum((s or {}).get("rows_ok", 0) for s in self.shard_states)


class MixtureLoader:
    """Per training step, the (dataset, batch) pairs to use: every dataset (flamingo), one in turn
    (round_robin) or one drawn by weight (weighted, drawn from an RNG seeded by the step, so resumable)."""

    def __init__(self, mixture: MixtureSpec, tokenizer, transform, rank=0, world_size=1, state: dict | None = None,
                 pin_memory=False):
        self.mixture, state = mixture, state or {}
        self.loaders = {}
        for s in mixture.datasets:
            workers = mixture.workers()
            if mixture.num_workers == "auto" and state.get(s.name):  # keep the checkpoint's shard layout
                workers = len(state[s.name]["shards"])
            self.loaders[s.name] = DatasetLoader(s, tokenizer, transform, mixture.seed, mixture.shuffle_buffer,
                                                 workers, rank, world_size, state.get(s.name), pin_memory=pin_memory)

    def chosen(self, step: int) -> list[DatasetSpec]:
        specs, mode = self.mixture.datasets, self.mixture.mode
        if mode == "flamingo" or len(specs) == 1:
            return specs
        if mode == "round_robin":
            return [specs[step % len(specs)]]
        weights = np.array([s.weight for s in specs], dtype=float)
        pick = np.random.default_rng([self.mixture.seed, 7919, step]).choice(len(specs), p=weights / weights.sum())
        return [specs[pick]]

    def step(self, step: int) -> list[tuple[DatasetSpec, dict]]:
        return [(s, next(self.loaders[s.name])) for s in self.chosen(step)]

    def close(self) -> None:
        for loader in self.loaders.values():
            loader.close()

    def state(self) -> dict:
        return {name: loader.state() for name, loader in self.loaders.items()}

    def skipped(self) -> dict:
        return {name: loader.skipped() for name, loader in self.loaders.items()}


def split_samples(spec: DatasetSpec, tokenizer, transform, max_samples: int, split: str = "eval"
                  ) -> tuple[list[Sample], dict]:
    """The first `max_samples` usable samples of a split ("eval" = held out, "train", "all") in file order
    (one pass, unshuffled), and that pass's skip counts."""
    fs, units = _units(spec)
    stream = ShardStream(spec, SampleBuilder(tokenizer, transform, spec), 0, 1, 0, 256, split, None, units, fs,
                         one_pass=True)
    out = []
    for sample in stream:
        out.append(sample)
        if len(out) >= max_samples:
            break
    return out, dict(stream.state["skipped"])


def holdout_samples(spec: DatasetSpec, tokenizer, transform, max_samples: int) -> tuple[list[Sample], dict]:
    return split_samples(spec, tokenizer, transform, max_samples, "eval")


__all__ = ["DatasetSpec", "MixtureSpec", "MixtureLoader", "DatasetLoader", "ShardStream", "SampleBuilder",
           "Sample", "collate", "image_transform", "ImageTransform", "ImageCache", "holdout_samples", "split_samples",
           "list_files", "holdout_rank", "image_key", "image_keys", "row_key", "content_hash",
           "ensure_special_tokens", "IMAGE_TOKEN", "EOC_TOKEN", "DataError", "check_dataset"]
