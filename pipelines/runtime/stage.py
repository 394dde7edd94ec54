"""Named pipeline stages that keep or reject, and the counters that prove nothing was lost.

A stage function takes one element and returns the element (possibly changed), a `Reject`, or a list of
those (to fan out), optionally with `ItemReject`/`Count` events for sub-items (images of a document). `Stage` applies it as a Beam DoFn: kept elements go on, each `Reject` becomes a reject
row tagged with the stage name, and every element is counted, so stats.json can check
in = out + rejected for every stage.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from mmcorpus.filters.reasons import Reject, shorten
from mmcorpus.pipelines.runtime import progress

KEPT = "kept"
REJECTS = "rejects"
COUNTS = "counts"
CPU_METRIC = "cpu_us"  # CPU microseconds the stage function took (summed per bundle); stats.json: cpu_seconds
FLUSH_SECONDS = 1.0  # counters summed on a worker are emitted at least this often (live progress sees them)


def reject_row(stage: str, reject: Reject, source: str) -> dict:
    return {"stage": stage, "reason": reject.reason, "source": source, "detail": shorten(reject.detail)}


def reject_output(stage: str, reject: Reject, source: str) -> tuple[str, str, dict]:
    """A reject row as the sink's `(kind, key, row)` tuple."""
    row = reject_row(stage, reject, source)
    return "rejects", f"{source}\x00{stage}\x00{reject.reason}", row


@dataclass(frozen=True)
class ItemReject:
    """A sub-item (an image of a document, a caption of an image) rejected by `stage` while its parent goes on.
    Counted as `rejected` of that stage; the sub-stage's `in`/`out` are counted with `Count`."""

    stage: str
    reject: Reject
    source: str


@dataclass(frozen=True)
class Count:
    """A counter event a stage function returns beside its result: `n` more of `metric` in `stage`."""

    stage: str
    metric: str
    n: int = 1
    reason: str = ""


class SummedCounts:
    """For a DoFn: counter events summed on the worker and emitted every FLUSH_SECONDS (`flush`, from `process`)
    and when the bundle finishes, a few counter elements per second instead of one or more per element (the
    DaskRunner has no combiner lifting, so every counter element would cross the counters' shuffle)."""

    def start_bundle(self):
        self._counts = {}
        self._flushed = time.monotonic()

    def _add(self, key, n=1):
        self._counts[key] = self._counts.get(key, 0) + n

    def count_events(self, events):
        """Yield the reject rows of Count/ItemReject `events` (tagged REJECTS); their counters are summed."""
        for item in events:
            if isinstance(item, Count):
                if item.n:
                    self._add((item.stage, item.metric, item.reason), item.n)
            else:
                yield REJECTS, reject_output(item.stage, item.reject, item.source)
                self._add((item.stage, "rejected", item.reject.reason))

    def kept_and_events(self, outputs):
        """(KEPT, item) for each item of `outputs`, which may also hold Count/ItemReject events (counted, or
        yielded as reject rows by `count_events`)."""
        for out in outputs:
            if isinstance(out, (Count, ItemReject)):
                yield from self.count_events((out,))
            else:
                yield KEPT, out

    def _drain(self) -> list:
        counts, self._counts = self._counts, {}
        return list(counts.items())

    def flush(self):
        if time.monotonic() - self._flushed > FLUSH_SECONDS:
            self._flushed = time.monotonic()
            for item in self._drain():
                yield COUNTS, item

    def finish_bundle(self):
        for item in self._drain():
            yield GlobalWindows.windowed_value((COUNTS, item))


class _StageFn(SummedCounts, beam.DoFn):
    """Yields `(tag, value)` with tag 'kept', 'rejects' or 'counts'.

    One output stream with explicit tags instead of `with_outputs`: Beam 2.77's DaskRunner feeds every tagged
    output of a multi-output ParDo to every consumer, so tagged outputs are split by `_Pick` instead. Counters
    (in, out, rejected by reason, CPU time) are summed on the worker and emitted every FLUSH_SECONDS and when
    the bundle finishes: a few counter elements per second instead of two or more per element (the DaskRunner
    has no combiner lifting, so every counter element would cross its shuffle).
    """

    def __init__(self, name: str, fn: Callable[[Any], Any], source_of: Callable[[Any], str], setup: Callable | None):
        self.name = name
        self.fn = fn
        self.source_of = source_of
        self._setup = setup
        self._call = fn
        self._counts: dict = {}
        self._flushed = 0.0

    def setup(self):
        if self._setup is not None:  # e.g. load a model once per worker
            self._call = self._setup()

    def process(self, element):
        yield from self._step(self.name, self._call, element)
        yield from self.flush()

    _clock = staticmethod(time.process_time)  # the worker process's CPU: threads a stage starts are counted too

    def _step(self, name: str, call, element):
        """One element through one stage function: its rejects and kept items tagged, its counters summed."""
        self._add((name, "in", ""))
        t = self._clock()
        result = call(element)
        self._add((name, CPU_METRIC, ""), int((self._clock() - t) * 1e6))
        results = result if isinstance(result, list) else [result]
        for item in results:
            if isinstance(item, Count):
                self._add((item.stage, item.metric, item.reason), item.n)
            elif isinstance(item, ItemReject):
                yield REJECTS, reject_output(item.stage, item.reject, item.source)
                self._add((item.stage, "rejected", item.reject.reason))
            elif isinstance(item, Reject):
                yield REJECTS, reject_output(name, item, self.source_of(element))
                self._add((name, "rejected", item.reason))
            else:
                self._add((name, "out", ""))
                yield KEPT, item


class _ChainFn(_StageFn):
    """Several stages in one DoFn: each element goes through them in turn (counted per stage as `_StageFn`
    counts), and only what the last one keeps, the rejects and the counters leave it. The DaskRunner keeps each
    ParDo's output for a whole partition in memory, and a stage's output until its three `_Pick`s have run: a
    chain of stages held a partition's pages once per stage; chained, it holds them once.

    `tail`: a last step that works on batches of what the stages keep while they go on (fetching/images.py
    `ImageFill`: setup(), start(), add(item) and finish() yield items and Count/ItemReject events, teardown())."""

    def __init__(self, steps: list[tuple], source_of: Callable[[Any], str], tail=None):
        super().__init__(steps[0][0], steps[0][1], source_of, None)
        self.steps, self.tail = steps, tail
        if tail is not None:  # the tail's threads run beside the stages: each stage counts its own thread's CPU
            self._clock = time.thread_time
        self._calls = [fn for _, fn, _ in steps]

    def setup(self):
        self._calls = [setup() if setup is not None else fn for _, fn, setup in self.steps]
        if self.tail is not None:
            self.tail.setup()

    def start_bundle(self):
        super().start_bundle()
        if self.tail is not None:
            self.tail.start()

    def process(self, element):
        items = [element]
        for (name, _, _), call in zip(self.steps, self._calls):
            kept = []
            for item in items:
                for tag, value in self._step(name, call, item):
                    if tag == KEPT:
                        kept.append(value)
                    else:
                        yield tag, value
            items = kept
        for item in items:
            if self.tail is None:
                yield KEPT, item
            else:
                yield from self.kept_and_events(self.tail.add(item))
        yield from self.flush()

    def finish_bundle(self):
        if self.tail is not None:
            for item in self.kept_and_events(self.tail.finish()):
                yield GlobalWindows.windowed_value(item)
        yield from super().finish_bundle()

    def teardown(self):
        if self.tail is not None:
            self.tail.teardown()


class _Pick(beam.DoFn):
    def __init__(self, tag: str):
        self.tag = tag

    def process(self, element):
        tag, value = element
        if tag == self.tag:
            yield value


def split_tags(pcoll, tags: tuple[str, ...] = (KEPT, REJECTS, COUNTS), label: str = "") -> dict:
    """Split a stream of `(tag, value)` into one PCollection per tag (runner-portable `with_outputs`)."""
    return {tag: pcoll | f"{label}Pick_{tag}" >> beam.ParDo(_Pick(tag)) for tag in tags}


class Stage(beam.PTransform):
    """Apply `fn` as stage `name`. Returns a dict with 'kept', 'rejects' (sink tuples) and 'counts'.

    `setup`, when given, is called once per worker and returns the function to call instead of `fn`
    (for stages that load a model).
    """

    def __init__(self, name: str, fn: Callable[[Any], Any], source_of: Callable[[Any], str], setup: Callable | None = None):
        super().__init__(name)
        self.stage_name = name
        self.fn = fn
        self.source_of = source_of
        self.setup_fn = setup

    def expand(self, pcoll):
        tagged = pcoll | "Apply" >> beam.ParDo(_StageFn(self.stage_name, self.fn, self.source_of, self.setup_fn))
        return split_tags(tagged)


class Collector:
    """Gathers every PCollection bound for the sink, so a pipeline ends in exactly one leaf."""

    def __init__(self) -> None:
        self.outputs: list = []  # PCollections of (kind, key, row)
        self.counts: list = []  # PCollections of ((stage, metric, reason), n)

    def stage(self, pcoll, name: str, fn, source_of, setup=None):
        """Run a Stage and collect its rejects and counts; return the kept elements."""
        result = pcoll | name >> Stage(name, fn, source_of, setup)
        self.outputs.append(result[REJECTS])
        self.counts.append(result[COUNTS])
        return result[KEPT]

    def chain(self, pcoll, label: str, steps: list[tuple], source_of, tail=None):
        """Run stages `steps` = [(name, fn, setup or None)] one after the other in one DoFn (`_ChainFn`), with
        the same rejects and counters as a `stage` each, then `tail` (a batch step, see `_ChainFn`) if given;
        return what the last one keeps."""
        tagged = pcoll | label >> beam.ParDo(_ChainFn(steps, source_of, tail))
        result = split_tags(tagged, label=f"{label}_")
        self.outputs.append(result[REJECTS])
        self.counts.append(result[COUNTS])
        return result[KEPT]

    def add(self, pcoll) -> None:
        """Add sink tuples `(kind, key, row)`."""
        self.outputs.append(pcoll)

    def add_counts(self, pcoll) -> None:
        """Add counter events `((stage, metric, reason), n)`."""
        self.counts.append(pcoll)

    def count(self, pcoll, stage: str, metric: str) -> None:
        """Count the elements of `pcoll` as `metric` of `stage`."""
        label = f"Count_{stage}_{metric}"
        self.counts.append(pcoll | label >> beam.Map(lambda _, s=stage, m=metric: ((s, m, ""), 1)))

    def finish(self, pipeline_label: str = "Outputs") -> tuple:
        """Everything collected plus the summed counters as 'stats' rows: a tuple of PCollections of sink tuples,
        which the sink takes as they are (each writes its own run files; see runtime/sink.py), so rows never
        wait in a Flatten for a branch behind a GroupByKey. Each counter branch is summed per bundle first (and
        tapped for live progress), so no event per element and stage crosses a shuffle."""
        root = self.outputs[0].pipeline if self.outputs else self.counts[0].pipeline
        tap = progress.TapCounts(progress.active_dir()) if progress.active_dir() else None
        summed = []
        for i, pcoll in enumerate(self.counts):
            if tap is not None:  # live progress: workers add the counter events to OUT/_progress/ files
                pcoll = pcoll | f"{pipeline_label}_Progress_{i}" >> beam.ParDo(tap)
            summed.append(pcoll | f"{pipeline_label}_SumInBundle_{i}" >> beam.ParDo(_SumInBundle()))
        counts = (
            tuple(summed)
            | f"{pipeline_label}_FlattenCounts" >> beam.Flatten(pipeline=root)
            | f"{pipeline_label}_SumCounts" >> beam.CombinePerKey(sum)
            | f"{pipeline_label}_StatRows" >> beam.Map(_stat_output)
        )
        return (*self.outputs, counts)


class _SumInBundle(SummedCounts, beam.DoFn):
    """Counter events `(key, n)` summed per key within a bundle before the shuffle: one event per element and
    stage would otherwise cross it (runners that do not lift combiners, like the DaskRunner, held them all)."""

    def process(self, event):
        self._add(*event)
        return ()

    def finish_bundle(self):
        for item in self._drain():
            yield GlobalWindows.windowed_value(item)


def _stat_output(item) -> tuple[str, str, dict]:
    (stage, metric, reason), n = item
    row = {"stage": stage, "metric": metric, "reason": reason or None, "count": int(n)}
    return "stats", f"{stage}\x00{metric}\x00{reason}", row


def as_output(kind: str, key_of: Callable[[Any], str], row_of: Callable[[Any], dict] = lambda x: x):
    """A Map that turns elements into sink tuples of `kind`."""
    return beam.Map(lambda e: (kind, key_of(e), row_of(e)))

