"""The shard writers of `mmcorpus export`: a WebDataset tar (with img2dataset's per-shard Parquet index and
`_stats.json`) and a Hugging Face Parquet shard.

A writer makes one whole output shard from a `ShardTask` (the source files and row ranges of its samples): it
reads Arrow record batches of those rows (BATCH_ROWS at a time, one row group of a file in memory), checks each
image cheaply, and streams the samples out: tar members written straight from the batch's bytes, Hugging Face
row groups assembled from the batch's columns. Everything goes under OUT/_tmp/ (local or an object store,
through schemas/storage.py) and is renamed onto the final name last (the tar after its index and stats), so a
shard that exists is complete. Memory is one row group per writing worker, whatever the number of samples.
"""

from __future__ import annotations

import contextlib
import json
import tarfile
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from mmcorpus import schemas
from mmcorpus.filters.reasons import Reject, shorten
from mmcorpus.pipelines.export import samples
from mmcorpus.pipelines.runtime.sink import ShardWriter
from mmcorpus.schemas import storage

BATCH_ROWS = 64  # source rows per record batch
HF_ROW_GROUP = 100  # rows per row group of a Hugging Face shard (its dataset viewer reads row groups)


@dataclass(frozen=True)
class ShardTask:
    """One output shard: `segments` are (source file, first row, end row, key number of the first row)."""

    index: int
    segments: tuple[tuple[str, int, int, int], ...]


def plan(files: list[tuple[str, int]], rows_per_shard: int) -> list[ShardTask]:
    """The shards of an export: shard i holds the source rows i * rows_per_shard ... (in file order), each row's
    key its row number over all files."""
    total = sum(n for _, n in files)
    tasks = []
    for i in range(max(1, -(-total // rows_per_shard))):
        lo, hi, at, segments = i * rows_per_shard, min(total, (i + 1) * rows_per_shard), 0, []
        for path, n in files:
            a, b = max(lo, at), min(hi, at + n)
            if a < b:
                segments.append((path, a - at, b - at, a))
            at += n
        tasks.append(ShardTask(i, tuple(segments)))
    return tasks


@dataclass(frozen=True)
class Unread:
    """`rows` source rows a damaged row group could not deliver (each a read_failed reject)."""

    rows: int
    why: str


def task_batches(task: ShardTask, columns: list[str]):
    """(source file, first row in the file, key number of that row, RecordBatch or Unread) over a task's rows,
    in order, one row group of a file read at a time."""
    for path, start, end, first_key in task.segments:
        pf = schemas.open_parquet(path)
        at = 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            lo, hi = max(start, at), min(end, at + n)
            at += n
            if lo >= hi:
                continue
            done, pos = lo, at - n
            try:
                for batch in pf.iter_batches(batch_size=BATCH_ROWS, row_groups=[g], columns=columns):
                    a, b = max(lo, pos), min(hi, pos + batch.num_rows)
                    pos += batch.num_rows
                    if a < b:
                        yield path, a, first_key + a - start, batch.slice(a - (pos - batch.num_rows), b - a)
                        done = b
                    if pos >= hi:
                        break
            except Exception as exc:  # noqa: BLE001 - corrupt pages, missing columns: the rows are rejects
                why = shorten(f"row group {g} unreadable: {type(exc).__name__}: {exc}", 400)
                yield path, done, first_key + done - start, Unread(hi - done, why)


RECORD = tarfile.RECORDSIZE


def tar_header(name: str, size: int) -> bytes:
    """The USTAR header tarfile writes for a regular file (mode 0444, owner 0, mtime 0); short ASCII names (the
    sample keys) built directly, anything else by tarfile."""
    raw = name.encode("ascii", "replace")
    if len(raw) >= 100 or not name.isascii() or size >= 8 ** 11:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o444, 0
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
    head = bytearray(512)
    head[:len(raw)] = raw
    head[100:156] = b"0000444\x000000000\x000000000\x00%011o\x0000000000000\x00        " % size
    head[156] = 0x30  # regular file
    head[257:265] = b"ustar\x0000"
    head[148:155] = b"%06o\x00" % sum(head)
    return bytes(head)


class TarStream:
    """Tar members written one after another to a binary file, as tarfile's USTAR writer lays them out."""

    def __init__(self, fh):
        self.fh, self.offset = fh, 0

    def add(self, name: str, data: bytes) -> None:
        pad = -len(data) % 512
        self.fh.write(tar_header(name, len(data)))
        self.fh.write(data)
        if pad:
            self.fh.write(b"\0" * pad)
        self.offset += 512 + len(data) + pad

    def close(self) -> None:
        end = 1024 + (-(self.offset + 1024) % RECORD)  # two zero blocks, then up to a whole record
        self.fh.write(b"\0" * end)
        self.offset += end


def tar_keys(fh) -> set[str]:
    """The sample keys (member names up to the first dot) of the regular files in a tar, reading only the
    512-byte headers (seeking past the data); ValueError on a bad header checksum or a tar that ends early."""
    keys, pos = set(), 0
    while True:
        fh.seek(pos)
        head = fh.read(512)
        if len(head) < 512:
            raise ValueError(f"cut off at byte {pos} (no end-of-archive blocks)")
        if not head.strip(b"\0"):
            return keys
        try:
            stored = int(head[148:156].strip(b"\0 ") or b"0", 8)
            size = int(head[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ValueError(f"unreadable header at byte {pos}") from None
        if stored != sum(head[:148]) + 256 + sum(head[156:]):
            raise ValueError(f"bad header checksum at byte {pos}")
        if head[156] in (0, 0x30):  # a regular file
            prefix = head[345:500].split(b"\0", 1)[0] if head[257:262] == b"ustar" else b""
            name = head[:100].split(b"\0", 1)[0]
            name = (prefix + b"/" + name if prefix else name).decode("utf-8", "surrogateescape")
            keys.add(name.split(".", 1)[0])
        pos += 512 + size + (-size % 512)


class _Writer(ShardWriter):
    def __init__(self, cfg: samples.ExportConfig, rows_per_shard: int, total: int):
        self.cfg, self.rows_per_shard, self.total = cfg, rows_per_shard, total

    @property
    def columns(self) -> list[str]:
        return samples.PAIR_COLUMNS if self.cfg.kind == "pair" else samples.DOC_COLUMNS

    def _tmp(self, tmp_dir: str, final: str, suffix: str) -> str:
        return storage.join(tmp_dir, f"{storage.basename(final)}-{uuid.uuid4().hex}{suffix}")

    def batches(self, task: ShardTask, rejects: list):
        """(Batch, source file, its first row) of a task; rows that are rejects added to `rejects` as
        (source, Reject), where source is 'file:row' as the other pipelines name rows."""
        width = key_width(self.total)
        for path, first_row, first_key, batch in task_batches(task, self.columns):
            if isinstance(batch, Unread):
                rejects += [(f"{path}:{first_row + i}", Reject("read_failed", batch.why)) for i in range(batch.rows)]
                continue
            keys = [f"{first_key + i:0{width}d}" for i in range(batch.num_rows)]
            made = samples.make_batch(batch, keys, self.cfg)
            rejects += [(f"{path}:{first_row + r}", reject) for r, reject in made.rejects]
            yield made, path, first_row

    def export(self, task: ShardTask, final: str, tmp_dir: str, fingerprint: str, write: bool = True):
        """Write the shard of `task` onto `final` (only check its rows when `write` is false: a finished shard
        of a resumed run). Returns (rows read, samples written, [(source, Reject)])."""
        raise NotImplementedError

    def write(self, items, final, tmp_dir, schema, fingerprint):
        """The sink's entry point, for the empty shards a run fills in: the shard of no rows."""
        if items:
            raise ValueError("export shards are written by the export stage, not from sink rows")
        index = int(storage.basename(final).split("-")[1])  # part-SSSSS-of-NNNNN
        self.export(ShardTask(index, ()), final, tmp_dir, fingerprint)


def key_width(total: int) -> int:
    return max(9, len(str(max(total - 1, 0))))  # img2dataset's keys are 9 digits


def _opened(path: str | None):
    return storage.open(path, "wb") if path else contextlib.nullcontext()


class TarShard(_Writer):
    """PART.tar (samples), PART.parquet (one index row per sample) and PART_stats.json; the tar renamed last."""

    suffix = ".tar"

    def export(self, task, final, tmp_dir, fingerprint, write=True):
        stem = final[: -len(self.suffix)]
        tmp_tar, tmp_index, tmp_stats = (self._tmp(tmp_dir, final, s) if write else None
                                         for s in (".tar", ".parquet", ".json"))
        rejects, index, read = [], [], 0
        with _opened(tmp_tar) as fh:
            tar = TarStream(fh) if write else None
            for made, path, first_row in self.batches(task, rejects):
                if write:
                    for name, data in made.members():
                        tar.add(name, data)
                index.append(made.index_table(path, first_row, fingerprint))
            if write:
                tar.close()
        written = sum(len(t) for t in index)
        read = written + len(rejects)
        if not write:
            return read, written, rejects
        empty = samples.table({f.name: pa.array([], f.type) for f in schemas.schema("export_index")},
                              "export_index", fingerprint)
        with storage.open(tmp_index, "wb") as fh:
            pq.write_table(pa.concat_tables([empty, *index]), fh, compression="zstd")
        planned = max(0, min(self.rows_per_shard, self.total - task.index * self.rows_per_shard))
        stats = {"count": planned, "successes": written, "failed_to_download": 0,
                 "failed_to_resize": planned - written, "status_dict": {"success": written},
                 "note": "failed_to_resize counts source rows of this shard's key range that are rejects "
                         "(see rejects/ for each reason)"}
        storage.write_bytes(tmp_stats, json.dumps(stats, indent=2).encode())
        storage.move(tmp_index, stem + ".parquet")
        storage.move(tmp_stats, stem + "_stats.json")
        storage.move(tmp_tar, final)
        return read, written, rejects

    def count(self, path):
        try:
            with storage.open(path, "rb") as fh:
                return len(tar_keys(fh))
        except (ValueError, OSError) as exc:
            raise schemas.SchemaError(f"{path}: not a readable tar ({exc})") from None


class HfShard(_Writer):
    """A Parquet shard of schema hf_pair / hf_interleaved: image columns are `datasets` Image structs (bytes
    stored uncompressed, as the images are), row groups of HF_ROW_GROUP rows."""

    suffix = ".parquet"

    @property
    def hf_schema(self) -> str:
        return "hf_pair" if self.cfg.kind == "pair" else "hf_interleaved"

    def export(self, task, final, tmp_dir, fingerprint, write=True):
        tmp = self._tmp(tmp_dir, final, ".parquet") if write else None
        rejects, written, pending = [], 0, []
        with _opened(tmp) as fh:
            out = (pq.ParquetWriter(fh, schemas.with_metadata(self.hf_schema, fingerprint),
                                    **schemas.parquet_options(self.hf_schema)) if write else None)
            for made, _, _ in self.batches(task, rejects):
                written += len(made.keys)
                if not write or not made.keys:
                    continue
                pending.append(made.hf_table(fingerprint))
                while sum(len(t) for t in pending) >= HF_ROW_GROUP:  # whole row groups out, the rest kept
                    chunk = pa.concat_tables(pending)
                    out.write_table(chunk.slice(0, HF_ROW_GROUP), row_group_size=HF_ROW_GROUP)
                    pending = [chunk.slice(HF_ROW_GROUP)]
            if write:
                if sum(len(t) for t in pending):
                    out.write_table(pa.concat_tables(pending), row_group_size=HF_ROW_GROUP)
                out.close()
        if write:
            storage.move(tmp, final)
        return written + len(rejects), written, rejects

    def count(self, path):
        return schemas.open_parquet(path).metadata.num_rows
