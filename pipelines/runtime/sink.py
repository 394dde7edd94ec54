"""The one Parquet sink every pipeline ends in.

All outputs of a run (kept rows, rejects, stat counters, ...) travel as `(kind, key, row)` tuples in one
PCollection, because the DaskRunner computes only the last leaf of a graph. Rows go to a deterministic shard
(`hash(key) % shards`), each shard is sorted by key and written once to `_tmp/`, then renamed atomically to
`OUT/<dir>/part-SSSSS-of-NNNNN.parquet` (on an object store, where nothing renames: copied to its final key,
which appears whole or not at all, then the temporary key is deleted). A worker holds one shard's rows at a time (written one row group at a
time), so `--num-shards` sets the memory a worker needs: about output size / shards. The same input gives the
same files under every runner, and a rerun into a killed run's folder skips the shards that are already there.

A kind may bring its own `ShardWriter` for another file format: it gets a shard's sorted rows under the same
temp-then-rename contract, counts a finished shard's rows for the run check and writes the empty shards a run
fills in. (`mmcorpus export` sends no rows of its tar / Hugging Face kinds: it writes those shards in its own
DoFn, one element per shard, and uses the writer for counting and filling.)

A cell may hold `FileBytes(path)` instead of bytes: the sink reads the file when it writes that row group, so
large payloads (image bytes) cross every shuffle as a path and a worker holds one row group of them at a time.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import operator
import os
import uuid
from dataclasses import dataclass

import apache_beam as beam
import pyarrow.parquet as pq

from mmcorpus import schemas
from mmcorpus.schemas import storage

TMP_DIR = "_tmp"


class ShardWriter:
    """Writes one shard of a kind in another format than plain Parquet of the kind's schema. `write` gets the
    shard's (key, row) items sorted by key (rows of the kind's schema, validated by the writer), writes under
    `tmp_dir` and renames onto `final` last (files beside it first), so `final` existing means the shard is
    complete. `count` is the number of rows a finished shard holds."""

    suffix = ".parquet"

    def write(self, items: list[tuple[str, dict]], final: str, tmp_dir: str, schema: str, fingerprint: str) -> None:
        raise NotImplementedError

    def count(self, path: str) -> int:
        raise NotImplementedError


@dataclass(frozen=True)
class Kind:
    """Where rows of one kind go: schema name, folder under OUT, shard count; optionally a ShardWriter (see the
    module docstring)."""

    schema: str
    folder: str
    shards: int = 1
    writer: ShardWriter | None = None

    @property
    def suffix(self) -> str:
        return self.writer.suffix if self.writer is not None else ".parquet"


@dataclass(frozen=True)
class FileBytes:
    """A cell the sink fills with the bytes of the file at `path` when it writes the row."""

    path: str

    def read(self) -> bytes:
        return storage.read_bytes(self.path)


def spool_folder(out_dir: str) -> str:
    """Where a run keeps the image bytes its rows refer to (removed with _tmp/ when the run ends); beside the
    output, so every worker reaches it (an object store for a remote output)."""
    return storage.join(storage.abspath(out_dir), TMP_DIR, "images")


def spool(folder: str, data: bytes, name: str) -> FileBytes:
    """Store `data` once under `folder` as `name` (a content digest; atomic rename, or one PUT on an object
    store; a copy already there is kept) and return the reference that rows carry instead of the bytes."""
    path = storage.join(folder, name[:2], name)
    if storage.is_url(path):
        if not storage.exists(path):
            storage.write_bytes(path, data)
        return FileBytes(path)
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    return FileBytes(path)


def _filled(value):
    """`value` with every FileBytes in it (top level, or in lists and structs) replaced by the file's bytes."""
    if isinstance(value, FileBytes):
        return value.read()
    if isinstance(value, dict):
        return {k: _filled(v) for k, v in value.items()}
    if isinstance(value, list) and any(isinstance(v, (dict, list, FileBytes)) for v in value):
        return [_filled(v) for v in value]
    return value


# a row group ends at this many bytes of binary cells (or at row_group_rows rows): writing one costs about 5-8x
# this at peak (the filled rows, the Arrow table, the Parquet pages): 32 MiB measured +320 MiB, 64 MiB +580
ROW_GROUP_BYTES = 32 << 20


def _nbytes(value) -> int:
    """Bytes held in binary cells of `value` (also inside lists and structs)."""
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, dict):
        return sum(_nbytes(v) for v in value.values())
    if isinstance(value, list):
        return sum(_nbytes(v) for v in value)
    return 0


def _row_groups(rows: list[tuple[str, dict]], step: int):
    """(index of first row, filled rows) per row group: at most `step` rows or about ROW_GROUP_BYTES of bytes."""
    group: list[dict] = []
    size = start = 0
    for i, (_, row) in enumerate(rows):
        row = _filled(row)
        group.append(row)
        size += _nbytes(row)
        if len(group) >= step or size >= ROW_GROUP_BYTES:
            yield start, group
            group, size, start = [], 0, i + 1
    if group:
        yield start, group


def shard_name(index: int, shards: int, suffix: str = ".parquet") -> str:
    return f"part-{index:05d}-of-{shards:05d}{suffix}"


def stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def _row_digest(row: dict) -> bytes:
    return hashlib.blake2b(json.dumps(row, sort_keys=True, default=repr).encode(), digest_size=16).digest()


def ordered(items) -> list[tuple[str, dict]]:
    """`(key, row)` items sorted by key; rows that share a key are ordered by a digest of their content, so the
    order never depends on the runner. Only rows with equal keys are serialised for that."""
    out: list[tuple[str, dict]] = []
    for _, same_key in itertools.groupby(sorted(items, key=operator.itemgetter(0)), key=operator.itemgetter(0)):
        group = list(same_key)
        out.extend(sorted(group, key=lambda item: _row_digest(item[1])) if len(group) > 1 else group)
    return out


class _AssignShard(beam.DoFn):
    def __init__(self, kinds: dict[str, Kind]):
        self.kinds = kinds

    def process(self, element):
        kind, key, row = element
        spec = self.kinds.get(kind)
        if spec is None:
            raise ValueError(f"sink got rows of unknown kind {kind!r}; known: {sorted(self.kinds)}")
        yield (kind, stable_hash(key) % spec.shards), (key, row)


class _WriteShard(beam.DoFn):
    def __init__(self, out_dir: str, kinds: dict[str, Kind], fingerprint: str, row_group_rows: int):
        self.out_dir = out_dir
        self.kinds = kinds
        self.fingerprint = fingerprint
        self.row_group_rows = row_group_rows

    def process(self, element):
        (kind, index), items = element
        spec = self.kinds[kind]
        final = storage.join(self.out_dir, spec.folder, shard_name(index, spec.shards, spec.suffix))
        if storage.exists(final):  # finished by an earlier attempt of this same run (same fingerprint)
            return
        rows = ordered(items)
        storage.makedirs(storage.dirname(final))
        tmp_dir = storage.join(self.out_dir, TMP_DIR)
        storage.makedirs(tmp_dir)
        if spec.writer is not None:  # its own file format, the same temp-then-rename contract
            spec.writer.write(rows, final, tmp_dir, spec.schema, self.fingerprint)
            return
        tmp = storage.join(tmp_dir, f"{kind}-{index:05d}-{uuid.uuid4().hex}.parquet")
        if storage.is_url(tmp):  # an object store: streamed up (multipart) under the temporary key
            with storage.open(tmp, "wb") as fh:
                self._write(fh, rows, spec, final)
        else:
            self._write(tmp, rows, spec, final)
        storage.move(tmp, final)

    def _write(self, where, rows, spec: Kind, final: str) -> None:
        step = self.row_group_rows
        with pq.ParquetWriter(where, schemas.with_metadata(spec.schema, self.fingerprint), compression="zstd") as w:
            for start, group in _row_groups(rows, step):  # one row group at a time: no copy of the whole shard
                try:
                    chunk = schemas.to_table(group, spec.schema, self.fingerprint)
                except schemas.SchemaError as exc:
                    end = start + len(group) - 1
                    raise schemas.SchemaError(f"{final}: rows {start}-{end} of the shard: {exc}") from exc
                w.write_table(chunk, row_group_size=step)


class WriteAll(beam.PTransform):
    """Write `(kind, key, row)` tuples to sharded Parquet files; the single leaf of a pipeline."""

    def __init__(self, out_dir: str, kinds: dict[str, Kind], fingerprint: str, row_group_rows: int = 512):
        super().__init__()
        self.out_dir = storage.abspath(out_dir)
        self.kinds = kinds
        self.fingerprint = fingerprint
        self.row_group_rows = row_group_rows

    def expand(self, pcoll):
        return (
            pcoll
            | "AssignShard" >> beam.ParDo(_AssignShard(self.kinds))
            | "GroupByShard" >> beam.GroupByKey()
            | "WriteShard" >> beam.ParDo(_WriteShard(self.out_dir, self.kinds, self.fingerprint, self.row_group_rows))
        )


def shard_files(out_dir: str, kind: Kind) -> list[str]:
    folder = storage.join(out_dir, kind.folder)
    return [storage.join(folder, f) for f in storage.listdir(folder)
            if f.startswith("part-") and f.endswith(kind.suffix)]


def count_rows(out_dir: str, kind: Kind) -> int:
    if kind.writer is not None:
        return sum(kind.writer.count(f) for f in shard_files(out_dir, kind))
    return sum(schemas.open_parquet(f).metadata.num_rows for f in shard_files(out_dir, kind))
