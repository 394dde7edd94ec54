"""Streaming, resumable, weighted-mixture loader over mmcorpus Parquet (pairs and interleaved documents).

Pipeline of one dataset: Parquet files (local or any fsspec URL, read through `schemas`, footer metadata
only up front) -> row-group units split over ranks x workers -> windowed shuffle buffer -> samples
(tokens + images resized to the vision encoder) -> fixed-length batches.

Samples follow Flamingo: a pair is `<image>caption<|endofchunk|>` (32 tokens by default); an interleaved
document is `text <image>text<|endofchunk|><image>text<|endofchunk|>...` with at most `max_images` images and
`max_seq_len` tokens (M3W: 5 and 256). Image positions without usable bytes are dropped and counted.

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
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch

import schemas

IMAGE_TOKEN = "<image>"
EOC_TOKEN = "<|endofchunk|>"
KINDS = {"pair": "pair", "pairs": "pair", "interleaved": "interleaved"}
MODES = ("flamingo", "round_robin", "weighted")
COLUMNS = {
    "pair": ["image_id", "image_bytes", "image_path", "caption", "sha256"],
    "interleaved": ["doc_id", "texts", "images", "image_info"],
}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


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
    holdout: float = 0.1  # fraction of images/documents (by content hash) kept out of training for the report

    def __post_init__(self):
        if self.kind not in KINDS:
            raise DataError(f"dataset {self.name!r}: kind {self.kind!r} is not one of pair, interleaved")
        self.kind = KINDS[self.kind]
        if not self.max_seq_len:
            self.max_seq_len = 32 if self.kind == "pair" else 256
        if self.weight < 0 or self.batch_size < 1 or not 0 <= self.holdout < 1:
            raise DataError(f"dataset {self.name!r}: need weight >= 0, batch_size >= 1, 0 <= holdout < 1")


@dataclass
class MixtureSpec:
    datasets: list[DatasetSpec]
    mode: str = "flamingo"  # flamingo: every step sums lambda-weighted losses of one batch per dataset
    seed: int = 0
    shuffle_buffer: int = 256
    num_workers: int = 0
    extras: dict = field(default_factory=dict)

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
            unknown = set(item) - set(DatasetSpec.__dataclass_fields__)
            if unknown or "path" not in item or "kind" not in item:
                raise DataError(f"dataset {item['name']!r}: needs path and kind; unknown keys {sorted(unknown)}")
            specs.append(DatasetSpec(**item))
        if len({s.name for s in specs}) != len(specs):
            raise DataError("dataset names must be unique")
        known = {k: d.pop(k) for k in ("mode", "seed", "shuffle_buffer", "num_workers") if k in d}
        spec = cls(specs, extras=d, **known)
        if spec.mode not in MODES:
            raise DataError(f"mode {spec.mode!r} is not one of {MODES}")
        return spec


# ---------------------------------------------------------------- files and units

def list_files(path: str) -> tuple[object, list[str]]:
    """(filesystem, sorted Parquet files) for a file, folder, pipeline output folder or glob, local or fsspec."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if any(ch in root for ch in "*?["):
        files = fs.glob(root)
    elif fs.isdir(root):
        data = root.rstrip("/") + "/data"
        base = data if fs.isdir(data) else root
        files = [f for f in fs.find(base) if f.endswith(".parquet") and "/rejects/" not in f]
    elif fs.exists(root):
        files = [root]
    else:
        raise DataError(f"{path}: no such file or folder")
    files = sorted(f for f in files if f.endswith(".parquet"))
    if not files:
        raise DataError(f"{path}: no .parquet files found")
    return fs, files


def _units(spec: DatasetSpec) -> tuple[object, list[tuple[str, int, int]]]:
    """Row groups (file, group, rows) of a dataset, after checking each file's mmcorpus schema name."""
    fs, files = list_files(spec.path)
    units = []
    for f in files:
        with fs.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
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


def row_key(row: dict, kind: str) -> str:
    """Stable identity used for held-out splits and folds: the image for pairs, the document otherwise."""
    if kind == "interleaved":
        return str(row.get("doc_id"))
    if row.get("sha256"):
        return row["sha256"]
    if row.get("image_bytes"):
        return hashlib.sha256(row["image_bytes"]).hexdigest()
    return str(row.get("image_path") or row.get("image_id"))


def in_holdout(key: str, fraction: float) -> bool:
    return (content_hash("holdout:" + key) % 1_000_000) < fraction * 1_000_000


# ---------------------------------------------------------------- rows -> samples

def image_transform(size: int, mean=CLIP_MEAN, std=CLIP_STD):
    """PIL image -> normalised float tensor [3, size, size]: shorter side to `size`, centre crop."""
    import torchvision.transforms.v2.functional as F

    mean_t, std_t = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)

    def apply(img):
        img = F.pil_to_tensor(img.convert("RGB"))
        img = F.resize(img, size, interpolation=F.InterpolationMode.BICUBIC, antialias=True)
        img = F.center_crop(img, [size, size])
        return (img.float() / 255.0 - mean_t) / std_t

    apply.size = size
    return apply


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


class SampleBuilder:
    """Turns schema rows into Flamingo samples; returns a skip reason string for a bad row."""

    def __init__(self, tokenizer, transform, spec: DatasetSpec, fs=None):
        self.tok, self.transform, self.spec, self.fs = tokenizer, transform, spec, fs
        ensure_special_tokens(tokenizer)
        self.image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.eoc_id = tokenizer.convert_tokens_to_ids(EOC_TOKEN)

    def _encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def _image(self, data: bytes | None, path: str | None, base: str, counts) -> object | str:
        if not data and path:
            full = path if ("://" in path or os.path.isabs(path)) else os.path.join(base, path)
            try:
                with (self.fs.open(full, "rb") if self.fs and "://" not in full else _open(full)) as fh:
                    data = fh.read()
            except (OSError, ValueError):
                return "missing_image_file"
        if not data:
            return "missing_image_bytes"
        try:
            return self.transform(decode_image(data, getattr(self.transform, "size", None)))
        except Exception:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
            return "undecodable_image"

    def build(self, row: dict, base: str, counts: collections.Counter) -> Sample | str:
        return self.pair(row, base, counts) if self.spec.kind == "pair" else self.interleaved(row, counts)

    def pair(self, row, base, counts) -> Sample | str:
        caption = (row.get("caption") or "").strip()
        if not caption:
            return "empty_text"
        tokens = self._encode(caption)
        if not tokens:
            return "empty_text"
        image = self._image(row.get("image_bytes"), row.get("image_path"), base, counts)
        if isinstance(image, str):
            return image
        ids = [self.image_id] + tokens[: self.spec.max_seq_len - 2] + [self.eoc_id]
        return Sample(row_key(row, "pair"), ids, [image])

    def interleaved(self, row, counts) -> Sample | str:
        ids, images, text_tokens, have_image = [], [], 0, False
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
            image = self._image((info or {}).get("bytes"), None, "", counts)
            if isinstance(image, str):
                counts["image_" + image] += 1  # the position is skipped, the document kept
                continue
            ids += ([self.eoc_id] if have_image else []) + [self.image_id]
            images.append(image)
            have_image = True
        if have_image:
            ids.append(self.eoc_id)
        ids = ids[: self.spec.max_seq_len]
        images = images[: ids.count(self.image_id)]
        if not text_tokens:
            return "empty_text"
        if not images:
            return "no_usable_image"
        return Sample(row_key(row, "interleaved"), ids, images)


def _open(path):
    return open(path, "rb")


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
    ids = torch.full((b, max_seq_len), pad_id, dtype=torch.long)
    mask = torch.zeros((b, max_seq_len), dtype=torch.long)
    first = samples[0].images[0]
    images = torch.zeros((b, n, *first.shape), dtype=first.dtype)
    image_mask = torch.zeros((b, n), dtype=torch.bool)
    for i, s in enumerate(samples):
        ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        mask[i, : len(s.input_ids)] = 1
        for j, img in enumerate(s.images):
            images[i, j] = img
            image_mask[i, j] = True
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
        if self.split == "all" or not self.spec.holdout:
            return self.split != "eval"
        return in_holdout(row_key(row, self.spec.kind), self.spec.holdout) == (self.split == "eval")

    def _unit_rows(self, f: str, g: int, row: int):
        """(row index, row dict) of row group g of file f from `row` on, decoded lazily batch by batch."""
        with self.fs.open(f, "rb") as fh:
            seen = 0
            for batch in pq.ParquetFile(fh).iter_batches(batch_size=128, row_groups=[g], columns=COLUMNS[self.spec.kind]):
                if seen + batch.num_rows > row:
                    lo = max(0, row - seen)
                    for i, r in enumerate(batch.slice(lo).to_pylist()):
                        yield seen + lo + i, r
                seen += batch.num_rows

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
                    rows.append((r, os.path.dirname(f)))
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


class DatasetLoader:
    """Batches of one dataset for rank `rank` of `world_size`, over `num_workers` DataLoader workers."""

    def __init__(self, spec: DatasetSpec, tokenizer, transform, seed=0, shuffle_buffer=256, num_workers=0,
                 rank=0, world_size=1, state: dict | None = None, split="train"):
        self.spec, self.tok, self.transform, self.seed = spec, tokenizer, transform, seed
        self.buffer, self.rank, self.world_size, self.split = shuffle_buffer, rank, world_size, split
        self.num_workers = max(1, num_workers)
        self.use_workers = num_workers > 0
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
                                                 prefetch_factor=4, persistent_workers=False)
                self._it = iter(dl)
            else:
                self._it = self._shard_batches(0)
        logical, batch, st = next(self._it)
        self.shard_states[logical] = st
        self.consumed += 1
        return batch

    def close(self) -> None:
        """Stop the worker processes now (they hold no state: every batch carried its own)."""
        it, self._it = self._it, None
        workers = getattr(it, "_workers", None) or []
        for w in workers:
            if w.is_alive():
                w.terminate()
        if workers:
            it._shutdown_workers()

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

    def __init__(self, mixture: MixtureSpec, tokenizer, transform, rank=0, world_size=1, state: dict | None = None):
        self.mixture, state = mixture, state or {}
        self.loaders = {s.name: DatasetLoader(s, tokenizer, transform, mixture.seed, mixture.shuffle_buffer,
                                              mixture.num_workers, rank, world_size, state.get(s.name))
                        for s in mixture.datasets}

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
           "Sample", "collate", "image_transform", "holdout_samples", "split_samples", "list_files", "in_holdout", "row_key",
           "content_hash", "ensure_special_tokens", "IMAGE_TOKEN", "EOC_TOKEN", "DataError", "check_dataset"]
