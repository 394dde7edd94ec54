"""Read chunks: a large input file becomes several read tasks of about `rows` records each.

Every read task is its own partition on the Dask runner (runtime/dask_graph.py), and a task's rows are what one
worker holds at a time before the first shuffle: with one task per file, a 50,000-row file sat in one worker's
memory as one list. A chunk keeps the file's own offsets (line numbers, row indices), so ids, reject sources and
row keys are the same as when the file is read whole.
- JSON lines: byte ranges of `rows` physical lines (one pass over the file's bytes in the main process);
- CSV/TSV: byte ranges of `rows` records after the header (one pass with the csv module: quoted fields may span
  lines); a file whose header cannot be read stays one task, so its rows are rejected as before;
- Parquet: runs of whole row groups (their sizes come from the footer); a single row group is never split.
"""

from __future__ import annotations

import csv
import io
from typing import NamedTuple

from mmcorpus import schemas
from mmcorpus.schemas import storage

ROWS = 4096  # records per read task
_BLOCK = 1 << 23


class Chunk(NamedTuple):
    start: int    # byte offset (lines, CSV) or first row group (Parquet)
    stop: int     # byte offset / row group after the chunk
    first: int    # offset of the chunk's first record: lines (or CSV lines) before it, or its row index
    records: int  # lines (JSON lines), csv.reader steps (CSV), rows (Parquet)


def line_chunks(path: str, rows: int = ROWS) -> list[Chunk]:
    """Byte ranges of `rows` lines each (the last one shorter; a last line without a newline counts)."""
    bounds = [(0, 0)]  # (byte offset, lines before it)
    lines = size = 0
    last = b"\n"
    with storage.open(path, "rb") as f:
        while block := f.read(_BLOCK):
            at = 0
            while True:
                left = bounds[-1][1] + rows - lines  # newlines still missing in the current chunk
                found = block.count(b"\n", at)
                if found < left:
                    lines += found
                    break
                for _ in range(left):
                    at = block.index(b"\n", at) + 1
                lines += left
                bounds.append((size + at, lines))
            size += len(block)
            last = block[-1:]
    if last != b"\n":
        lines += 1
    if bounds[-1][0] >= size and len(bounds) > 1:
        bounds.pop()
    ends = bounds[1:] + [(size, lines)]
    return [Chunk(b, e, n, m - n) for (b, n), (e, m) in zip(bounds, ends)]


def csv_chunks(path: str, delimiter: str, rows: int = ROWS) -> list[Chunk] | None:
    """Byte ranges of `rows` csv.reader records after the header line(s); None when there is no readable header."""
    consumed = 0

    def lines(text):
        nonlocal consumed
        for line in text:  # newline="": lines come untranslated, so their encoded length is their size on disk
            consumed += len(line.encode("utf-8", "surrogateescape"))
            yield line

    with storage.open(path, "rb") as raw:
        reader = csv.reader(lines(io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")),
                            delimiter=delimiter)
        try:
            next(reader)
        except (StopIteration, csv.Error):
            return None
        bounds = [(consumed, reader.line_num)]
        steps = 0
        while True:
            try:
                next(reader)
            except StopIteration:
                break
            except csv.Error:
                pass
            steps += 1
            if steps % rows == 0:
                bounds.append((consumed, reader.line_num))
    if len(bounds) > 1 and steps % rows == 0:
        bounds.pop()
    ends = bounds[1:] + [(consumed, reader.line_num)]
    counts = [rows] * (len(bounds) - 1) + [steps - rows * (len(bounds) - 1)]
    return [Chunk(b, e, n, c) for (b, n), (e, _), c in zip(bounds, ends, counts)]


def parquet_chunks(path: str, rows: int = ROWS) -> list[Chunk]:
    """Runs of whole row groups of at least `rows` rows (the last run may be shorter)."""
    meta = schemas.open_parquet(path).metadata
    out: list[Chunk] = []
    start = first = n = 0
    for g in range(meta.num_row_groups):
        n += meta.row_group(g).num_rows
        if n >= rows:
            out.append(Chunk(start, g + 1, first, n))
            start, first, n = g + 1, first + n, 0
    if n or not out:
        out.append(Chunk(start, meta.num_row_groups, first, n))
    return out


def chunk_text_lines(f, chunk: Chunk):
    """The `chunk.records` raw lines of a binary file object, from the chunk's start."""
    f.seek(chunk.start)
    for _ in range(chunk.records):
        line = f.readline()
        if not line:
            return
        yield line
