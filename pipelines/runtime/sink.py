"""The one Parquet sink every pipeline ends in.

All outputs of a run (kept rows, rejects, stat counters, ...) travel as `(kind, key, row)` tuples in one
PCollection, because the DaskRunner computes only the last leaf of a graph. Rows go to a deterministic shard
(`hash(key) % shards`), each shard is sorted by key and written once to `_tmp/`, then renamed atomically to
`OUT/<dir>/part-SSSSS-of-NNNNN.parquet` (on an object store, where nothing renames: copied to its final key,
which appears whole or not at all, then the temporary key is deleted). A worker holds one shard's rows at a time (written one row group at a
time), so `--num-shards` sets the memory a worker needs: about output size / shards. The same input gives the
same files under every runner, and a rerun into a killed run's folder skips the shards that are already there.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import operator
import uuid
from dataclasses import dataclass

import apache_beam as beam
import pyarrow.parquet as pq

from mmcorpus import schemas
from mmcorpus.schemas import storage

TMP_DIR = "_tmp"


@dataclass(frozen=True)
class Kind:
    """Where rows of one kind go: schema name, folder under OUT, shard count."""

    schema: str
    folder: str
    shards: int = 1


def shard_name(index: int, shards: int) -> str:
    return f"part-{index:05d}-of-{shards:05d}.parquet"


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
        final = storage.join(self.out_dir, spec.folder, shard_name(index, spec.shards))
        if storage.exists(final):  # finished by an earlier attempt of this same run (same fingerprint)
            return
        rows = ordered(items)
        storage.makedirs(storage.dirname(final))
        tmp = storage.join(self.out_dir, TMP_DIR, f"{kind}-{index:05d}-{uuid.uuid4().hex}.parquet")
        storage.makedirs(storage.dirname(tmp))
        if storage.is_url(tmp):  # an object store: streamed up (multipart) under the temporary key
            with storage.open(tmp, "wb") as fh:
                self._write(fh, rows, spec, final)
        else:
            self._write(tmp, rows, spec, final)
        storage.move(tmp, final)


    def _write(self, where, rows, spec: Kind, final: str) -> None:
        step = self.row_group_rows
        with pq.ParquetWriter(where, schemas.with_metadata(spec.schema, self.fingerprint), compression="zstd") as w:
            for start in range(0, len(rows), step):  # one row group at a time: no second copy of the whole shard
                try:
                    chunk = schemas.to_table([row for _, row in rows[start:start + step]], spec.schema,
                                             self.fingerprint)
                except schemas.SchemaError as exc:
                    raise schemas.SchemaError(f"{final}: rows {start}-{start + step - 1} of the shard: {exc}") from exc
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
    return [storage.join(folder, f) for f in storage.listdir(folder) if f.startswith("part-") and f.endswith(".parquet")]


def count_rows(out_dir: str, kind: Kind) -> int:
    return sum(schemas.open_parquet(f).metadata.num_rows for f in shard_files(out_dir, kind))
