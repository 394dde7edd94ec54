"""Beam's DaskRunner with a bounded number of partitions per Flatten branch and into and out of every GroupByKey
(which gives exactly that many), and a ParDo whose output receivers belong to one partition.

Beam 2.78's DaskRunner turns a Flatten into `dask.bag.concat`, which adds up its inputs' partitions, and a
GroupByKey into `bag.groupby` keeping them. Every stage of a pipeline here feeds its rejects and counters into
the one sink, so the sink's shuffle had some hundred input partitions and each later step as many tasks: 11,645
tasks for 576 WARC records (`interleaved --no-images`, 2 workers), against 717 with the bound: a fifth less CPU
in all (the scheduler's own nearly halved), the same output files. A Flatten never joins partitions of different
branches (one would wait for the other: rows held); a GroupByKey joins its inputs (it waits for all anyway).
The bound is two per worker thread of the cluster, or `--dask_npartitions` when that is more (up to
SHUFFLE_BOUND): a command sets it to its number of work items (e.g. `pairs`' read chunks), so a partition holds
about one work item's rows however large the input (the rows of one partition are one list in one worker's memory).
"""

from __future__ import annotations

from apache_beam import pvalue
from apache_beam.pipeline import PipelineVisitor
from apache_beam.runners.dask import transform_evaluator as te
from apache_beam.runners.dask.dask_runner import DaskOptions, DaskRunner, DaskRunnerResult
from apache_beam.runners.dask.overrides import _Flatten, _GroupByKeyOnly, dask_overrides
from apache_beam.transforms.core import ParDo
from apache_beam.transforms.sideinputs import SideInputMap


def _joined(*parts):
    return [item for part in parts for item in part]


def _coalesced(bag, limit: int):
    """`bag` in at most `limit` partitions, partition i joining every limit-th input partition from i."""
    from dask import bag as db
    from dask import delayed

    if bag.npartitions <= limit:
        return bag
    parts = bag.to_delayed(optimize_graph=False)
    return db.from_delayed([delayed(_joined, pure=True)(*parts[i::limit]) for i in range(limit)])


class _BoundedFlatten(te.Flatten):
    """Each branch keeps its own partitions (at most `bound` of them): a partition never waits for another
    branch. Joining across branches (Dask's repartition after concat) made every read chunk's rows wait for a
    branch behind a GroupByKey (`pairs`' URL fetch, empty for local files): all rows of the run held at once."""

    def apply(self, input_bag, side_inputs=None):
        from dask import bag as db

        limit = self.bag_kwargs["bound"]
        return db.concat([_coalesced(bag, limit) for bag in input_bag])


class _BoundedGroupByKey(te.GroupByKey):
    def apply(self, input_bag, side_inputs=None):
        def values(item):
            key, grouped = item
            return key, [te.defenestrate(v[1]) for v in grouped]

        # its input joined into `bound` partitions first (a GroupByKey waits for all of them anyway: nothing is
        # held longer), so the shuffle's tasks do not grow with the branches flattened into it; and always
        # `bound` partitions out: a keyed shuffle spreads work that came from few partitions (one URL list)
        limit = self.bag_kwargs["bound"]
        return _coalesced(input_bag, limit).groupby(lambda item: item[0], npartitions=limit).map(values)


def _bundle(items, fn, label, window_fn, side_inputs, args, kwargs):
    """One partition through a DoFn, as Beam's `apply_dofn_to_bundle`, with a copy of the DoFn and output receivers
    of its own (a DoFn processes one bundle at a time: its per-bundle state must not be another thread's)."""
    from apache_beam.internal import pickler
    from apache_beam.runners.common import DoFnContext, DoFnInvoker, DoFnSignature, _OutputHandler
    from apache_beam.transforms.core import DoFn

    fn = pickler.loads(pickler.dumps(fn))  # a DoFn of its own: partitions on other threads share the graph's
    receivers = te.OneReceiver()
    handler = _OutputHandler(window_fn=window_fn, main_receivers=receivers[None], tagged_receivers=receivers,
                             per_element_output_counter=None, output_batch_converter=None,
                             process_yields_batches=False, process_batch_yields_elements=False)
    invoker = DoFnInvoker.create_invoker(DoFnSignature(fn), handler, context=DoFnContext(label, state=None),
                                         side_inputs=side_inputs, input_args=args, input_kwargs=kwargs,
                                         user_state_context=None, bundle_finalizer_param=DoFn.BundleFinalizerParam())
    invoker.invoke_setup()
    invoker.invoke_start_bundle()
    for item in items:
        invoker.invoke_process(item)
    invoker.invoke_finish_bundle()
    invoker.invoke_teardown()
    return [v.value for v in receivers.values]


class _ParDo(te.ParDo):
    """Beam's ParDo, but the receivers that collect a partition's outputs are made per partition: Beam's are made
    once per transform, so partitions run in one process (an in-process cluster, threads) share one list:
    outputs repeated (`pairs` failed its run check, exit 3), and with two threads the run crashed."""

    def apply(self, input_bag, side_inputs=None):
        transform = self.transform
        args, kwargs = transform.raw_side_inputs
        main_input = next(iter(self.applied.main_inputs.values()))
        window_fn = main_input.windowing.windowfn if hasattr(main_input, "windowing") else None
        return input_bag.map(te.get_windowed_value, window_fn).map_partitions(
            _bundle, transform.fn, transform.label, window_fn, side_inputs, list(args), kwargs)


OPS = {**te.TRANSLATIONS, _Flatten: _BoundedFlatten, _GroupByKeyOnly: _BoundedGroupByKey, ParDo: _ParDo}


class _ToBags(PipelineVisitor):
    """Each applied transform -> the dask bag it produces (in topological order)."""

    def __init__(self, bag_kwargs: dict, lazy_side_inputs: bool):
        self.bag_kwargs = bag_kwargs
        self.lazy_side_inputs = lazy_side_inputs
        self.bags: dict = {}

    def visit_transform(self, node) -> None:
        op = OPS.get(type(node.transform), te.NoOp)(node, bag_kwargs=self.bag_kwargs)
        inputs = [None if isinstance(i, pvalue.PBegin) else self.bags[i.producer]
                  for i in node.inputs if isinstance(i, pvalue.PBegin) or i.producer in self.bags]
        if not inputs:
            main = None
        elif len(inputs) == 1 and not isinstance(op, te.Flatten):
            main = inputs[0]
        else:
            main = inputs
        sides = [SideInputMap(type(si), si._view_options(),
                              te.DaskBagWindowedIterator(self.bags.get(si.pvalue.producer), si._window_mapping_fn,
                                                         self.lazy_side_inputs))
                 for si in node.side_inputs] or None
        self.bags[node] = op.apply(input_bag=main, side_inputs=sides)


SHUFFLE_BOUND = 512  # most partitions out of a GroupByKey (and per Flatten branch): tasks grow with them


def shuffle_bound(work_items: int, threads: int) -> int:
    """Partitions after a GroupByKey and per Flatten branch: a command's work items (read chunks, WARC ranges)
    when there are more than two per thread, so partitions stay about one work item's rows; at most
    SHUFFLE_BOUND (a run over hundreds of WARCs has tens of thousands of ranges, and a tasks shuffle of that
    many partitions would be hundreds of thousands of tasks). What crosses the shuffles is small (stubs, reject
    rows, counters, run-file sections); the reads before them keep one partition per work item."""
    return max(2 * threads, min(work_items, SHUFFLE_BOUND))


class BoundedDaskRunner(DaskRunner):
    """DaskRunner whose Flatten and GroupByKey keep at most `bound` partitions."""

    def run_pipeline(self, pipeline, options):
        import dask
        import dask.distributed as ddist

        dask_options = options.view_as(DaskOptions).get_all_options(drop_default=True, current_only=True)
        bag_kwargs = DaskOptions._extract_bag_kwargs(dask_options)
        lazy = dask_options.pop("lazy_side_inputs", False)
        client = ddist.Client(**dask_options)
        threads = sum(client.nthreads().values()) or 1
        bag_kwargs["bound"] = shuffle_bound(bag_kwargs.get("npartitions") or 0, threads)
        pipeline.replace_all(dask_overrides())
        visitor = _ToBags(bag_kwargs, lazy)
        pipeline.visit(visitor)
        # every output ends in the one sink: its bag depends on all the others
        graph = dask.optimize(list(visitor.bags.values())[-1])
        return DaskRunnerResult(client, client.compute(graph))
