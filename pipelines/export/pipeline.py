"""The Beam graph of `mmcorpus export`: one element per output shard (its source files and row ranges,
writers.ShardTask) -> stage `export`, which writes the whole shard (writers.py) and emits only its reject rows
and counters -> the sink (rejects/ and _stats/).

The image bytes never enter the runner: a shard's writer reads them from the source Parquet and streams them
out, so the runner moves a few small elements per shard, whatever the number of samples. A shard already
written (a resumed run) is not written again, but its rows are still checked so that its rejects and counts
are the same as the first attempt's.
"""

from __future__ import annotations

import time
from collections import Counter

import apache_beam as beam

from mmcorpus.pipelines.export.writers import ShardTask
from mmcorpus.pipelines.runtime.sink import TMP_DIR, ShardWriter, shard_name
from mmcorpus.pipelines.runtime.stage import COUNTS, CPU_METRIC, REJECTS, Collector, reject_output, split_tags
from mmcorpus.schemas import storage

STAGE = "export"


class _ExportShard(beam.DoFn):
    """Writes one shard; yields (REJECTS, sink tuple) per reject and (COUNTS, counter) for the stage."""

    def __init__(self, writer: ShardWriter, out_dir: str, folder: str, shards: int, fingerprint: str):
        self.writer, self.out_dir, self.folder = writer, storage.abspath(out_dir), folder
        self.shards, self.fingerprint = shards, fingerprint

    def process(self, task: ShardTask):
        started = time.process_time()
        final = storage.join(self.out_dir, self.folder, shard_name(task.index, self.shards, self.writer.suffix))
        tmp_dir = storage.join(self.out_dir, TMP_DIR)
        write = not storage.exists(final)
        if write:
            storage.makedirs(storage.dirname(final))
            storage.makedirs(tmp_dir)
        read, written, rejects = self.writer.export(task, final, tmp_dir, self.fingerprint, write)
        for source, reject in rejects:
            yield REJECTS, reject_output(STAGE, reject, source)
        counts = Counter({(STAGE, "in", ""): read, (STAGE, "out", ""): written,
                          (STAGE, CPU_METRIC, ""): int((time.process_time() - started) * 1e6)})
        counts.update((STAGE, "rejected", reject.reason) for _, reject in rejects)
        for key, n in counts.items():
            yield COUNTS, (key, n)


def build(p, tasks: list[ShardTask], writer: ShardWriter, out_dir: str, folder: str, fingerprint: str):
    tagged = (p | "Shards" >> beam.Create(tasks)
              | "Export" >> beam.ParDo(_ExportShard(writer, out_dir, folder, len(tasks), fingerprint)))
    parts = split_tags(tagged, (REJECTS, COUNTS), label="Export")
    c = Collector()
    c.add(parts[REJECTS])
    c.add_counts(parts[COUNTS])
    return c.finish()
