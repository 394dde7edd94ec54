"""Run a pipeline into an output folder: prepare, run, verify counts, write stats.json and _SUCCESS.

Output folder states:
- absent or empty: a fresh run;
- has `_SUCCESS`: refused unless `--overwrite` (which clears it first);
- has `_run.json` but no `_SUCCESS` (a killed run): resumed when the run fingerprint (command + config +
  inputs + shard counts) is the same, refused otherwise; finished shards are kept and skipped by the sink.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from mmcorpus import schemas
from mmcorpus.schemas import storage
from mmcorpus.pipelines.runtime import progress
from mmcorpus.pipelines.errors import RunCheckError, UserError
from mmcorpus.pipelines.runtime.runner import pipeline_options
from mmcorpus.pipelines.runtime.sink import TMP_DIR, Kind, WriteAll, count_rows, shard_files, shard_name
from mmcorpus.pipelines.runtime.stage import CPU_METRIC

RUN_FILE = "_run.json"
SUCCESS = "_SUCCESS"
STATS = "stats.json"
OWNED = ("data", "rejects", "_stats", TMP_DIR, progress.PROGRESS_DIR, RUN_FILE, SUCCESS, STATS)


@dataclass
class RunSpec:
    """What a pipeline command hands to `execute`."""

    command: str
    out_dir: str
    config: dict
    inputs: list[str]
    kinds: dict[str, Kind]
    # Stages in order for the main unit (documents, pairs): read = written + rejected is checked over them.
    stages: list[str]
    data_kind: str = "data"
    overwrite: bool = False
    extra_stats: dict = field(default_factory=dict)


HASH_LIMIT = 64 * 1024 * 1024  # inputs up to this size get a sha256 in the manifest; larger: size + mtime
_hash_cache: dict[tuple, str] = {}


def _sha256(path: str, size: int, mtime_ns: int) -> str:
    key = (os.path.abspath(path), size, mtime_ns)
    if key not in _hash_cache:
        with open(path, "rb") as f:
            _hash_cache[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _hash_cache[key]


def input_fingerprint(paths: list[str]) -> list[dict]:
    """Per input: absolute path, size, mtime, and sha256 for files up to HASH_LIMIT bytes (a folder: file count
    and total size; a remote file: size and the store's ETag / modification time, never downloaded). Enough to
    tell whether a rerun reads the same inputs."""
    out = []
    for p in paths:
        if storage.is_url(p):
            entry = {"path": storage.redact_url(p)}
            try:
                entry.update(storage.info(p))
            except (OSError, ValueError):  # unreachable now: named as it is; the read reports it
                pass
            out.append(entry)
        elif os.path.isfile(p):
            st = os.stat(p)
            entry = {"path": os.path.abspath(p), "bytes": st.st_size, "mtime": int(st.st_mtime)}
            if st.st_size <= HASH_LIMIT:
                try:
                    entry["sha256"] = _sha256(p, st.st_size, st.st_mtime_ns)
                except OSError:
                    pass
            out.append(entry)
        elif os.path.isdir(p):
            sizes = [os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs]
            out.append({"path": os.path.abspath(p), "files": len(sizes), "bytes": sum(sizes)})
        else:
            out.append({"path": p})
    return out


def fingerprint(spec: RunSpec) -> str:
    shards = {name: [k.folder, k.shards] for name, k in spec.kinds.items()}  # a resume must keep the shard names
    payload = json.dumps({"command": spec.command, "config": spec.config, "inputs": input_fingerprint(spec.inputs),
                          "shards": shards}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def prepare_output(spec: RunSpec, fp: str) -> str:
    """Check and claim the output folder. Returns 'fresh' or 'resumed'."""
    out = spec.out_dir
    try:
        return _prepare_output(spec, fp, out)
    except UserError:
        raise
    except (OSError, ValueError) as exc:  # an object store: missing bucket, denied access, bad endpoint
        raise UserError(f"output {storage.redact_url(out)!r}: {_why(exc)}") from None


def _why(exc: BaseException) -> str:
    if isinstance(exc, PermissionError):
        return f"access denied ({exc})"
    if isinstance(exc, FileNotFoundError):
        return f"bucket or folder does not exist ({exc})"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _prepare_output(spec: RunSpec, fp: str, out: str) -> str:
    if storage.isfile(out):
        raise UserError(f"output {out!r} exists and is not a folder")
    if spec.overwrite and storage.isdir(out):
        for name in OWNED:
            path = storage.join(out, name)
            try:
                storage.remove(path, recursive=True)
            except OSError as exc:
                raise UserError(f"--overwrite cannot clear {path!r}: {exc.strerror or exc}") from None
    state = "fresh"
    if storage.exists(storage.join(out, SUCCESS)):
        raise UserError(f"output {out!r} already holds a finished run; pass --overwrite to replace it")
    run_file = storage.join(out, RUN_FILE)
    if storage.exists(run_file):
        with storage.open(run_file, "rb") as f:
            previous = json.load(f).get("fingerprint")
        if previous != fp:
            raise UserError(f"output {out!r} holds an unfinished run with another command, config, input or shard "
                            f"count (fingerprint {previous} vs {fp}); pass --overwrite to replace it")
        state = "resumed"
    try:
        storage.makedirs(out)
        probe = storage.join(out, f".write-test-{os.getpid()}")
        storage.write_bytes(probe, b"ok")
        storage.remove(probe)
    except OSError as exc:
        raise UserError(f"output {storage.redact_url(out)!r} is not writable: {_why(exc)}") from None
    try:
        storage.remove(storage.join(out, TMP_DIR), recursive=True)  # half-written shards of a killed run
    except OSError:
        pass
    if state == "fresh":
        _write_json(run_file, {"fingerprint": fp, "command": spec.command, "started": _now()})
    return state


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: str, obj) -> None:
    storage.write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_counts(out_dir: str, kind: Kind) -> dict[tuple[str, str, str], int]:
    counts: dict[tuple[str, str, str], int] = {}
    for f in shard_files(out_dir, kind):
        for row in schemas.read_table(f, "stat").to_pylist():
            k = (row["stage"], row["metric"], row["reason"] or "")
            counts[k] = counts.get(k, 0) + row["count"]
    return counts


def summarise(counts: dict[tuple[str, str, str], int], stage_order: list[str]) -> list[dict]:
    """Per stage: in, out, rejected, rejected by reason, other counters, and the CPU seconds its function took
    on the workers (stages that time themselves; None for the others). Stages in pipeline order first."""
    stages: dict[str, dict] = {}
    for (stage, metric, reason), n in counts.items():
        s = stages.setdefault(stage, {"stage": stage, "in": 0, "out": 0, "rejected": 0, "reasons": {}, "counters": {},
                                      "cpu_seconds": None})
        if metric == CPU_METRIC:
            s["cpu_seconds"] = round((s["cpu_seconds"] or 0.0) + n / 1e6, 3)
        elif metric in ("in", "out"):
            s[metric] += n
        elif metric == "rejected":
            s["rejected"] += n
            s["reasons"][reason] = s["reasons"].get(reason, 0) + n
        else:
            s["counters"][metric] = s["counters"].get(metric, 0) + n
    order = {name: i for i, name in enumerate(stage_order)}
    return sorted(stages.values(), key=lambda s: (order.get(s["stage"], len(order)), s["stage"]))


def check_counts(spec: RunSpec, stages: list[dict], written: dict[str, int]) -> dict:
    """Verify every stage balances and the main chain adds up; raise RunCheckError if a runner lost rows."""
    problems = []
    by_name = {s["stage"]: s for s in stages}
    for s in stages:
        if s["in"] != s["out"] + s["rejected"]:
            problems.append(f"stage {s['stage']}: in {s['in']} != out {s['out']} + rejected {s['rejected']}")
    chain = [by_name.get(name, {"stage": name, "in": 0, "out": 0, "rejected": 0}) for name in spec.stages]
    for prev, cur in zip(chain, chain[1:]):
        if prev["out"] != cur["in"]:
            problems.append(f"stage {cur['stage']} read {cur['in']} but stage {prev['stage']} passed {prev['out']}")
    read = chain[0]["in"] if chain else 0
    rejected_main = sum(s["rejected"] for s in chain)
    final_out = chain[-1]["out"] if chain else 0
    if written.get(spec.data_kind, 0) != final_out:
        problems.append(f"{written.get(spec.data_kind, 0)} rows in {spec.kinds[spec.data_kind].folder}/ "
                        f"but the last stage passed {final_out}")
    all_rejected = sum(s["rejected"] for s in stages)
    if "rejects" in written and written["rejects"] != all_rejected:
        problems.append(f"{written['rejects']} reject rows written but stages counted {all_rejected}")
    if read != final_out + rejected_main:
        problems.append(f"read {read} != written {final_out} + rejected {rejected_main}")
    if problems:
        raise RunCheckError("run check failed (a runner may have lost rows): " + "; ".join(problems))
    return {"read": read, "written": final_out, "rejected": rejected_main, "reject_rows": all_rejected}


def fill_empty_shards(out_dir: str, kind: Kind, fp: str) -> None:
    """Shards that got no rows are written empty so a folder always has all N parts."""
    present = set(storage.listdir(storage.join(out_dir, kind.folder)))
    for i in range(kind.shards):
        name = shard_name(i, kind.shards, kind.suffix)
        if name in present:
            continue
        path = storage.join(out_dir, kind.folder, name)
        storage.makedirs(storage.dirname(path))
        if kind.writer is not None:  # its own empty file (an empty tar, ...)
            tmp_dir = storage.join(out_dir, TMP_DIR)
            storage.makedirs(tmp_dir)
            kind.writer.write([], path, tmp_dir, kind.schema, fp)
            continue
        buf = pa.BufferOutputStream()  # no row group at all: `datasets` refuses a 0-row group (batch size 0)
        pq.ParquetWriter(buf, schemas.with_metadata(kind.schema, fp), **schemas.parquet_options(kind.schema)).close()
        storage.write_bytes(path, buf.getvalue().to_pybytes())


def execute(spec: RunSpec, args, build) -> dict:
    """Run `build(pipeline) -> PCollection of sink tuples` into spec.out_dir and return the stats dict."""
    kinds = dict(spec.kinds)
    kinds.setdefault("rejects", Kind("reject", "rejects", kinds[spec.data_kind].shards))
    kinds.setdefault("stats", Kind("stat", "_stats", 1))
    spec.kinds = kinds
    fp = fingerprint(spec)
    state = prepare_output(spec, fp)
    started = time.time()
    start_iso = _now()
    how = progress.mode()
    folder = progress_folder(spec.out_dir) if how else None
    monitor = (progress.Monitor(folder, spec.command, spec.stages, how) if how else contextlib.nullcontext())
    with pipeline_options(args) as (options, runner_info), monitor:
        with beam.Pipeline(options=options) as p, progress.building(folder):
            build(p) | "WriteAll" >> WriteAll(spec.out_dir, kinds, fp)
        client = getattr(getattr(p, "result", None), "client", None)  # DaskRunner's; closed before its cluster
        if client is not None:
            client.close()
    for kind in kinds.values():
        fill_empty_shards(spec.out_dir, kind, fp)
    written = {name: count_rows(spec.out_dir, kind) for name, kind in kinds.items() if name != "stats"}
    stages = summarise(read_counts(spec.out_dir, kinds["stats"]), spec.stages)
    totals = check_counts(spec, stages, written)
    stats = {
        "schema_version": schemas.SCHEMA_VERSION,
        "command": spec.command,
        "argv": command_line(),  # --storage-option secrets replaced by ***
        "cwd": os.getcwd(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "config": spec.config,
        "inputs": input_fingerprint(spec.inputs),
        "fingerprint": fp,
        "runner": runner_info,
        "resumed": state == "resumed",
        "started": start_iso,
        "finished": _now(),
        "wall_seconds": round(time.time() - started, 3),
        "versions": versions(),
        "totals": totals,
        "files": {name: written[name] for name in written},
        "stages": stages,
        "main_stages": spec.stages,
        **spec.extra_stats,
    }
    schemas.validate_stats(stats)
    storage.remove(storage.join(spec.out_dir, TMP_DIR), recursive=True)
    _write_json(storage.join(spec.out_dir, STATS), stats)
    storage.write_bytes(storage.join(spec.out_dir, SUCCESS), (stats["finished"] + "\n").encode())
    return stats


def progress_folder(out_dir: str) -> str:
    """OUT/_progress; for an object-store output a local folder of this machine (workers elsewhere skip it)."""
    if not storage.is_url(out_dir):
        return os.path.join(os.path.abspath(out_dir), progress.PROGRESS_DIR)
    import tempfile

    key = hashlib.sha256(out_dir.encode()).hexdigest()[:12]
    return os.path.join(tempfile.gettempdir(), f"mmcorpus-progress-{key}")


def command_line() -> list[str]:
    """The command as typed (`mmcorpus ...`) when run through the CLI, else the process's argv."""
    cli = sys.modules.get("mmcorpus.pipelines.cli")
    return redact_argv(list(getattr(cli, "ARGV", None) or sys.argv))


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with --storage-option secrets and URL credentials replaced (stats.json is shared)."""
    out, after_option = [], False
    for item in argv:
        if after_option:
            item, after_option = storage.redact_options([item])[0], False
        elif item.startswith("--storage-option="):
            item = "--storage-option=" + storage.redact_options([item.split("=", 1)[1]])[0]
        elif item == "--storage-option":
            after_option = True
        elif storage.is_url(item):
            item = storage.redact_url(item)
        out.append(item)
    return out


def versions() -> dict:
    from importlib import metadata

    out = {"python": sys.version.split()[0]}
    for dist in ("mmcorpus", "apache-beam", "pyarrow", "trafilatura", "fastwarc", "img2dataset", "open_clip_torch",
                 "torch", "transformers", "imagehash", "datasketch", "py3langid"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out
