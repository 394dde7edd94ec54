"""The Beam graph of `mmcorpus export`: source rows -> export check (stage `export`) -> index rows into the sink,
whose ShardWriters (writers.py) write the samples."""

from __future__ import annotations

import apache_beam as beam

from mmcorpus.filters.reasons import Reject
from mmcorpus.pipelines.export import samples
from mmcorpus.pipelines.runtime.stage import Collector, as_output

STAGE = "export"


def key_width(total: int) -> int:
    return max(9, len(str(max(total - 1, 0))))  # img2dataset's keys are 9 digits


class _ReadRows(beam.DoFn):
    """(global index, file, row in file, row or Reject) of one source file; a row group that breaks off gives a
    read_failed Reject for each row it could not deliver."""

    def __init__(self, columns: list[str]):
        self.columns = columns

    def process(self, element):
        from mmcorpus.pipelines.pairs.sources import BadRecord, parquet_rows

        path, offset = element
        for i, row in parquet_rows(path, columns=self.columns):
            if isinstance(row, BadRecord):
                row = Reject("read_failed", str(row))
            yield offset + i, path, i, row


def build(p, files: list[tuple[str, int]], cfg: samples.ExportConfig):
    total = sum(n for _, n in files)
    width = key_width(total)
    offsets, start = [], 0
    for path, n in files:
        offsets.append((path, start))
        start += n
    columns = samples.PAIR_COLUMNS if cfg.kind == "pair" else samples.DOC_COLUMNS

    def check(element):
        index, path, i, row = element
        if isinstance(row, Reject):
            return row
        return samples.check_row(row, f"{index:0{width}d}", path, i, cfg)

    c = Collector()
    rows = (p | "Files" >> beam.Create(offsets) | "ReadRows" >> beam.ParDo(_ReadRows(columns)))
    kept = c.stage(rows, STAGE, check, lambda e: f"{e[1]}:{e[2]}")
    c.add(kept | "IndexRows" >> as_output("data", lambda r: r["key"]))
    return c.finish()
