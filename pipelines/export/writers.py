"""The sink's ShardWriters for `mmcorpus export`: a WebDataset tar (with img2dataset's per-shard Parquet index
and `_stats.json`) and a Hugging Face Parquet shard.

The sink shuffles only index rows (a key and the source file + row a sample comes from); a writer reads the
image bytes from the source Parquet while it writes, one source row group at a time. So no runner ever holds
image bytes beyond one row group per writing worker, whatever the number of samples.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import tarfile
import uuid

import pyarrow.parquet as pq

from mmcorpus import schemas
from mmcorpus.filters.reasons import Reject
from mmcorpus.pipelines.export import samples
from mmcorpus.pipelines.runtime.sink import ShardWriter

HF_ROW_GROUP = 100  # rows per row group of a Hugging Face shard (its dataset viewer reads row groups)


def source_rows(index_rows: list[dict], columns: list[str]):
    """The source row of each index row, in order, reading each needed row group of each file once."""
    pf, path, groups, cached = None, None, [], (None, None)
    for ref in index_rows:
        if ref["source_file"] != path:
            path = ref["source_file"]
            pf = schemas.open_parquet(path)
            starts, n = [], 0
            for g in range(pf.num_row_groups):
                starts.append(n)
                n += pf.metadata.row_group(g).num_rows
            groups, cached = starts, (None, None)
        row = ref["source_row"]
        g = bisect.bisect_right(groups, row) - 1
        if cached[0] != g:
            try:
                cached = (g, pf.read_row_group(g, columns=columns).to_pylist())
            except Exception as exc:  # noqa: BLE001 - damage found after the checks read it
                raise schemas.SchemaError(f"{path}: row group {g} no longer readable: {exc}") from None
        yield cached[1][row - groups[g]]


def _made(result, ref: dict):
    if isinstance(result, Reject):  # the source changed between the check and the write
        raise schemas.SchemaError(f"{ref['source_file']} row {ref['source_row']}: {result.reason}: {result.detail}")
    return result


class _Writer(ShardWriter):
    def __init__(self, cfg: samples.ExportConfig, rows_per_shard: int, total: int):
        self.cfg, self.rows_per_shard, self.total = cfg, rows_per_shard, total

    @property
    def columns(self) -> list[str]:
        return samples.PAIR_COLUMNS if self.cfg.kind == "pair" else samples.DOC_COLUMNS

    def _tmp(self, tmp_dir: str, final: str, suffix: str) -> str:
        return os.path.join(tmp_dir, f"{os.path.basename(final)}-{uuid.uuid4().hex}{suffix}")


class TarShard(_Writer):
    """PART.tar (samples), PART.parquet (one index row per sample) and PART_stats.json; the tar renamed last."""

    suffix = ".tar"

    def write(self, items, final, tmp_dir, schema, fingerprint):
        refs = [row for _, row in items]
        index = schemas.to_table(refs, schema, fingerprint)
        stem = final[: -len(self.suffix)]
        tmp_tar, tmp_index, tmp_stats = (self._tmp(tmp_dir, final, s) for s in (".tar", ".parquet", ".json"))
        with tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
            for ref, row in zip(refs, source_rows(refs, self.columns)):
                for name, data in _made(samples.wds_members(row, ref["key"], self.cfg), ref):
                    info = tarfile.TarInfo(name)
                    info.size, info.mode, info.mtime = len(data), 0o444, 0
                    tar.addfile(info, io.BytesIO(data))
        pq.write_table(index, tmp_index, compression="zstd")
        shard = int(os.path.basename(stem).split("-")[1])
        planned = max(0, min(self.rows_per_shard, self.total - shard * self.rows_per_shard))
        stats = {"count": planned, "successes": len(refs), "failed_to_download": 0,
                 "failed_to_resize": planned - len(refs), "status_dict": {"success": len(refs)},
                 "note": "failed_to_resize counts source rows of this shard's key range that are rejects "
                         "(see rejects/ for each reason)"}
        with open(tmp_stats, "w") as f:
            json.dump(stats, f, indent=2)
        os.replace(tmp_index, stem + ".parquet")
        os.replace(tmp_stats, stem + "_stats.json")
        os.replace(tmp_tar, final)

    def count(self, path):
        keys = set()
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.isfile():
                        keys.add(member.name.split(".", 1)[0])
        except (tarfile.TarError, OSError) as exc:
            raise schemas.SchemaError(f"{path}: not a readable tar ({exc})") from None
        return len(keys)


class HfShard(_Writer):
    """A Parquet shard of schema hf_pair / hf_interleaved: image columns are `datasets` Image structs."""

    suffix = ".parquet"

    @property
    def hf_schema(self) -> str:
        return "hf_pair" if self.cfg.kind == "pair" else "hf_interleaved"

    def write(self, items, final, tmp_dir, schema, fingerprint):
        refs = [row for _, row in items]
        tmp = self._tmp(tmp_dir, final, ".parquet")
        rows = source_rows(refs, self.columns)
        with pq.ParquetWriter(tmp, schemas.with_metadata(self.hf_schema, fingerprint), compression="zstd") as w:
            for start in range(0, len(refs), HF_ROW_GROUP):
                chunk = [_made(samples.hf_row(row, ref["key"], self.cfg), ref)
                         for ref, row in zip(refs[start:start + HF_ROW_GROUP], rows)]
                w.write_table(schemas.to_table(chunk, self.hf_schema, fingerprint))
        os.replace(tmp, final)

    def count(self, path):
        return schemas.open_parquet(path).metadata.num_rows
