"""Live progress of a pipeline run, and the summary printed when it ends.

Beam workers run in other processes (DirectRunner multi_processing, Dask workers), so counters cannot be
read from memory. While a run is built with progress on, `Collector.finish` taps the stream of counter events
with `TapCounts`: each worker instance adds them up and, about once a second, replaces its own small JSON file
under `OUT/_progress/`. A `Monitor` thread in the driver sums those files and renders one status line on a
terminal (records read, rate, current stage, rows kept, rejects by reason), or logs a line every 30 s when
stderr is not a terminal and the log level is INFO or lower; otherwise progress is off and nothing is tapped.
Workers that cannot reach the folder (remote runners) skip writing; the run itself is unaffected.
The folder is removed when the run ends.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import threading
import time
import uuid

import apache_beam as beam

PROGRESS_DIR = "_progress"
FLUSH_SECONDS = 1.0
log = logging.getLogger("mmcorpus.progress")

_active_dir: str | None = None  # set while `execute` builds a pipeline with progress on


def active_dir() -> str | None:
    return _active_dir


@contextlib.contextmanager
def building(folder: str | None):
    """Within this block, `Collector.finish` adds the progress tap writing to `folder` (None: no tap)."""
    global _active_dir
    previous, _active_dir = _active_dir, folder
    try:
        yield
    finally:
        _active_dir = previous


def mode(stream=None) -> str | None:
    """'tty' (a live line), 'log' (INFO lines every 30 s) or None (off). MMCORPUS_PROGRESS=0 turns it off."""
    if os.environ.get("MMCORPUS_PROGRESS", "") == "0":
        return None
    stream = stream if stream is not None else sys.stderr
    try:
        if stream.isatty():
            return "tty"
    except (AttributeError, ValueError):
        pass
    return "log" if log.isEnabledFor(logging.INFO) else None


# Counters of this process per run (Dask makes one DoFn instance per partition: they share one file per process).
_process_counts: dict[str, dict[str, int]] = {}
_process_lock = threading.Lock()


class TapCounts(beam.DoFn):
    """Pass counter events `((stage, metric, reason), n)` through, adding them to this process's progress file."""

    def __init__(self, folder: str, every: float = FLUSH_SECONDS):
        self.folder = folder
        self.every = every
        self.run_token = uuid.uuid4().hex[:8]  # made once in the driver: the same for every worker of this run
        self._counts = None

    def _init(self):
        with _process_lock:
            self._counts = _process_counts.setdefault(self.run_token, {})
        self._file = os.path.join(self.folder, f"{socket.gethostname()}-{os.getpid()}-{self.run_token}.json")
        self._last = time.monotonic()
        self._ok = True

    def process(self, element):
        if self._counts is None:
            self._init()
        (stage, metric, reason), n = element
        key = f"{stage}\t{metric}\t{reason or ''}"
        with _process_lock:
            self._counts[key] = self._counts.get(key, 0) + n
        if time.monotonic() - self._last >= self.every:
            self._flush()
        yield element

    def finish_bundle(self):
        self._flush()

    def teardown(self):
        self._flush()

    def _flush(self):
        if self._counts is None or not self._ok:
            return
        self._last = time.monotonic()
        if not os.path.isdir(self.folder):  # remote worker, or the run already ended: never create it here
            return
        tmp = f"{self._file}.{threading.get_ident()}.tmp"
        try:
            with _process_lock:
                snapshot = dict(self._counts)
            with open(tmp, "w") as f:
                json.dump(snapshot, f)
            os.replace(tmp, self._file)
        except OSError:
            self._ok = False


def read_counts(folder: str) -> dict[tuple[str, str, str], int]:
    """Sum of every worker file under `folder` (files being replaced are skipped this time)."""
    total: dict[tuple[str, str, str], int] = {}
    try:
        names = [n for n in os.listdir(folder) if n.endswith(".json")]
    except OSError:
        return total
    for name in names:
        try:
            with open(os.path.join(folder, name)) as f:
                counts = json.load(f)
        except (OSError, ValueError):
            continue
        for key, n in counts.items():
            stage, metric, reason = key.split("\t")
            total[(stage, metric, reason)] = total.get((stage, metric, reason), 0) + n
    return total


def status_line(command: str, counts: dict, stages: list[str], elapsed: float) -> str:
    """One line: elapsed, records read and rate, furthest active stage, kept so far, rejects by reason."""
    def get(stage, metric):
        return sum(n for (s, m, _), n in counts.items() if s == stage and m == metric)

    chain = stages or sorted({s for s, _, _ in counts})
    read = get(chain[0], "in") if chain else 0
    rate = read / elapsed if elapsed > 0 else 0.0
    parts = [f"{command} {_clock(elapsed)}", f"read {read:,} ({rate:,.0f}/s)"]
    active = [s for s in chain if get(s, "in")]
    if active and active[-1] != chain[0]:
        parts.append(f"at {active[-1]} {get(active[-1], 'in'):,}")
    if chain and get(chain[-1], "out"):
        parts.append(f"kept {get(chain[-1], 'out'):,}")
    reasons: dict[str, int] = {}  # rows of the main chain; sub-item rejects (images of a document) are not rows
    for (stage, metric, reason), n in counts.items():
        if metric == "rejected" and stage in chain:
            reasons[reason] = reasons.get(reason, 0) + n
    if reasons:
        top = sorted(reasons.items(), key=lambda kv: -kv[1])[:3]
        parts.append(f"rejected {sum(reasons.values()):,}: " + ", ".join(f"{r} {n:,}" for r, n in top)
                     + (", ..." if len(reasons) > 3 else ""))
    return " | ".join(parts)


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Monitor:
    """Driver thread that renders the workers' progress files until `stop()`; removes the folder at the end."""

    def __init__(self, folder: str, command: str, stages: list[str], how: str, stream=None,
                 every: float = 0.5, log_every: float = 30.0):
        self.folder, self.command, self.stages, self.how = folder, command, list(stages), how
        self.stream = stream if stream is not None else sys.stderr
        self.every = every if how == "tty" else log_every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mmcorpus-progress", daemon=True)
        self._start = time.monotonic()
        self._shown = False

    def __enter__(self):
        shutil.rmtree(self.folder, ignore_errors=True)
        os.makedirs(self.folder, exist_ok=True)
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self.render()  # the final counts: the last bundles' files often land after the last periodic frame
        if self.how == "tty" and self._shown:
            self._write("\r\x1b[K")
        for _ in range(3):  # a worker may be replacing its file right now
            shutil.rmtree(self.folder, ignore_errors=True)
            if not os.path.exists(self.folder):
                break
            time.sleep(0.2)
        return False

    def _loop(self):
        while not self._stop.wait(self.every):
            self.render()

    def render(self):
        line = status_line(self.command, read_counts(self.folder), self.stages, time.monotonic() - self._start)
        if self.how == "tty":
            width = shutil.get_terminal_size((120, 20)).columns - 1
            self._write("\r\x1b[K" + (line if len(line) <= width else line[: width - 1] + "…"))
            self._shown = True
        else:
            log.info("%s", line)

    def _write(self, text: str):
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass


# ---- end-of-run summary -------------------------------------------------------------------------------------

def summary(out_dir: str, stats: dict, width: int = 100) -> str:
    """A one-screen summary of a finished run: funnel per stage with top reasons, and where everything is."""
    t = stats.get("totals", {})
    runner = stats.get("runner", {})
    workers = runner.get("workers") or runner.get("local_cluster_workers")
    how = runner.get("runner", "?") + (f", {workers} worker{'s' if workers != 1 else ''}" if workers else "")
    read, written = t.get("read", 0), t.get("written", 0)
    share = f" ({100 * written / read:.1f}%)" if read else ""
    lines = [f"mmcorpus {stats.get('command', '?')}: finished in {stats.get('wall_seconds', 0):.1f} s ({how})"
             + (" [resumed]" if stats.get("resumed") else ""),
             f"  read {read:,} -> written {written:,}{share}, rejected {t.get('rejected', 0):,}", ""]
    stages = stats.get("stages", [])
    if stages:
        name_w = max(12, *(len(s["stage"]) for s in stages))
        cpu_total = sum(s.get("cpu_seconds") or 0.0 for s in stages)
        lines.append(f"  {'stage':<{name_w}} {'in':>9} {'out':>9} {'rejected':>9} {'cpu s':>8} {'cpu%':>4}  top reasons")
        for s in stages[:14]:
            top = ", ".join(f"{r} {n:,}" for r, n in sorted(s["reasons"].items(), key=lambda kv: -kv[1])[:2])
            cpu = s.get("cpu_seconds")
            cpu_cols = (f"{cpu:>8.1f} {100 * cpu / cpu_total:>3.0f}%" if cpu is not None and cpu_total
                        else f"{'-':>8} {'':>4}")
            row = f"  {s['stage']:<{name_w}} {s['in']:>9,} {s['out']:>9,} {s['rejected']:>9,} {cpu_cols}  {top}"
            lines.append(row if len(row) <= width else row[: width - 1] + "…")
        if len(stages) > 14:
            lines.append(f"  ... {len(stages) - 14} more stages in stats.json")
    reasons: dict[str, int] = {}
    for s in stages:
        for r, n in s["reasons"].items():
            reasons[r] = reasons.get(r, 0) + n
    files = stats.get("files", {})
    lines += ["",
              f"  data     {os.path.join(out_dir, 'data')}/  ({files.get('data', written):,} rows)",
              f"  rejects  {os.path.join(out_dir, 'rejects')}/  ({files.get('rejects', 0):,} rows)",
              f"  stats    {os.path.join(out_dir, 'stats.json')}"]
    card = os.path.join(out_dir, "README.md")
    if os.path.exists(card):
        lines.append(f"  card     {card}")
    elif stats.get("command") != "export":  # an export is carded through its source
        lines.append(f"  card     mmcorpus card {out_dir}")
    if reasons:
        top = max(reasons, key=reasons.get)
        lines.append(f"  inspect  mmcorpus inspect {out_dir}   (rejects: --reason {top})")
    else:
        lines.append(f"  inspect  mmcorpus inspect {out_dir}")
    return "\n".join(lines)


def print_summary(out_dir: str, since: float, stream=None) -> bool:
    """Print the summary when `out_dir` holds a run finished after `since` (epoch seconds)."""
    from mmcorpus.schemas import storage

    path = storage.join(out_dir, "stats.json")
    try:
        if storage.is_url(path):  # an object store: the run's own finish time, not the object's
            import datetime as dt

            stats = json.loads(storage.read_bytes(path))
            if dt.datetime.fromisoformat(stats["finished"]).timestamp() < since - 1:
                return False
        else:
            if os.path.getmtime(path) < since - 1:
                return False
            with open(path) as f:
                stats = json.load(f)
    except (OSError, ValueError, KeyError, TypeError):
        return False
    stream = stream if stream is not None else sys.stderr
    print(summary(out_dir, stats), file=stream, flush=True)
    return True
