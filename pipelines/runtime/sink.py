"""The one Parquet sink every pipeline ends in.

All outputs of a run (kept rows, rejects, stat counters, ...) travel as `(kind, key, row)` tuples in one
PCollection, because the DaskRunner computes only the last leaf of a graph. Rows go to a deterministic shard
(`hash(key) % shards`). They do not cross the shuffle themselves: each worker appends the rows it sees, pickled,
to run files under `OUT/_tmp/runs/` (one file per `RUN_BYTES` or bundle, a section per shard) and only the
sections' references are grouped by shard. A shard's writer reads its sections back, sorts the rows by key and
writes the shard once to `_tmp/`, one row group at a time, then renames it atomically to
`OUT/<dir>/part-SSSSS-of-NNNNN.parquet` (on an object store, where nothing renames: copied to its final key,
which appears whole or not at all, then the temporary key is deleted). So no process holds more than one shard's
rows (without their image bytes) and one row group: `--num-shards` sets that, the total does not. The same input
gives the same files under every runner, and a rerun into a killed run's folder skips the shards that are
already there.

A kind may bring its own `ShardWriter` for another file format: it gets a shard's sorted rows under the same
temp-then-rename contract, counts a finished shard's rows for the run check and writes the empty shards a run
fills in. (`mmcorpus export` sends no rows of its tar / Hugging Face kinds: it writes those shards in its own
DoFn, one element per shard, and uses the writer for counting and filling.)

A cell may hold `FileBytes(path)` instead of bytes: the sink reads the file when it writes that row group, so
large payloads (image bytes) cross every shuffle as a path and a worker holds one row group of them at a time.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import operator
import os
import pickle
import uuid
from collections import defaultdict
from dataclasses import dataclass

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows
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


def park_folder(out_dir: str) -> str:
    """Where a run's documents wait while its shuffles carry their references (removed with _tmp/)."""
    return storage.join(storage.abspath(out_dir), TMP_DIR, "parked")


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


# a row group ends at this many bytes of binary cells (or at row_group_rows rows): writing one costs about 10x
# this at peak (the filled rows, the Arrow table and its builder, the Parquet pages); a shard of COCO photos
# measured +167 MiB at 16 MiB, +287 at 32, +580 at 64 (16 MiB is about 100 COCO photos)
ROW_GROUP_BYTES = 16 << 20


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


# a run file is written when a worker's pickled rows reach this size (and at the end of each bundle)
RUN_BYTES = 32 << 20


@dataclass(frozen=True)
class Section:
    """One shard's rows in one run file: `length` bytes of pickled (key, row) items from `offset`."""

    path: str
    offset: int
    length: int

    def items(self) -> list[tuple[str, dict]]:
        with storage.open(self.path, "rb") as f:
            f.seek(self.offset)
            blob = io.BytesIO(f.read(self.length))
        out = []
        while blob.tell() < self.length:
            out.append(pickle.load(blob))
        return out


def write_run(folder: str, data: bytes) -> str:
    """A new run file under `folder` holding `data`, written whole (before any Section names it); its path."""
    path = storage.join(folder, f"{uuid.uuid4().hex}.run")
    storage.makedirs(folder)
    storage.write_bytes(path, data)
    return path


class _SpillRuns(beam.DoFn):
    """Rows to run files by shard; emits `((kind, shard), Section)` for each shard a run file holds rows of."""

    def __init__(self, out_dir: str, kinds: dict[str, Kind]):
        self.folder = storage.join(out_dir, TMP_DIR, "runs")
        self.kinds = kinds

    def start_bundle(self):
        self.buffers: dict[tuple[str, int], bytearray] = defaultdict(bytearray)
        self.size = 0

    def process(self, element):
        kind, key, row = element
        spec = self.kinds.get(kind)
        if spec is None:
            raise ValueError(f"sink got rows of unknown kind {kind!r}; known: {sorted(self.kinds)}")
        data = pickle.dumps((key, row), protocol=pickle.HIGHEST_PROTOCOL)
        self.buffers[(kind, stable_hash(key) % spec.shards)] += data
        self.size += len(data)
        if self.size >= RUN_BYTES:
            yield from self._flush()

    def finish_bundle(self):
        for out in self._flush():
            yield GlobalWindows.windowed_value(out)

    def _flush(self):
        if not self.buffers:
            return []
        shards = sorted(self.buffers)
        path = write_run(self.folder, b"".join(self.buffers[shard] for shard in shards))
        out, offset = [], 0
        for shard in shards:
            length = len(self.buffers[shard])
            out.append((shard, Section(path, offset, length)))
            offset += length
        self.buffers.clear()
        self.size = 0
        return out


class _WriteShard(beam.DoFn):
    def __init__(self, out_dir: str, kinds: dict[str, Kind], fingerprint: str, row_group_rows: int):
        self.out_dir = out_dir
        self.kinds = kinds
        self.fingerprint = fingerprint
        self.row_group_rows = row_group_rows

    def process(self, element):
        (kind, index), sections = element
        spec = self.kinds[kind]
        final = storage.join(self.out_dir, spec.folder, shard_name(index, spec.shards, spec.suffix))
        if storage.exists(final):  # finished by an earlier attempt of this same run (same fingerprint)
            return
        rows = ordered(item for section in sections for item in section.items())
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
        with pq.ParquetWriter(where, schemas.with_metadata(spec.schema, self.fingerprint),
                              **schemas.parquet_options(spec.schema)) as w:
            for start, group in _row_groups(rows, step):  # one row group at a time: no copy of the whole shard
                try:
                    chunk = schemas.to_table(group, spec.schema, self.fingerprint)
                except schemas.SchemaError as exc:
                    end = start + len(group) - 1
                    raise schemas.SchemaError(f"{final}: rows {start}-{end} of the shard: {exc}") from exc
                w.write_table(chunk, row_group_size=step)


class WriteAll(beam.PTransform):
    """Write `(kind, key, row)` tuples (one PCollection, or a tuple of them: each spills where it is computed) to
    sharded Parquet files; the single leaf of a pipeline."""

    def __init__(self, out_dir: str, kinds: dict[str, Kind], fingerprint: str, row_group_rows: int = 512):
        super().__init__()
        self.out_dir = storage.abspath(out_dir)
        self.kinds = kinds
        self.fingerprint = fingerprint
        self.row_group_rows = row_group_rows

    def expand(self, pcolls):
        branches = pcolls if isinstance(pcolls, (tuple, list)) else (pcolls,)
        spill = _SpillRuns(self.out_dir, self.kinds)
        sections = [branch | f"SpillRuns_{i}" >> beam.ParDo(spill) for i, branch in enumerate(branches)]
        return (
            tuple(sections)
            | "FlattenSections" >> beam.Flatten(pipeline=branches[0].pipeline)
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
