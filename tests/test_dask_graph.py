"""The Dask runner's own translation (pipelines/runtime/dask_graph.py) on a real in-process Dask cluster, where
every partition of a transform runs in the same process: outputs must not repeat (Beam's shared receivers
repeated them), and what a DoFn emits in finish_bundle (BatchElements' last batch of a bundle) must arrive."""

import time

import apache_beam as beam
import dask
from apache_beam.options.pipeline_options import PipelineOptions
from distributed import LocalCluster

from mmcorpus.pipelines.runtime.runner import DASK_RUNNER


class _Tagged(beam.DoFn):
    def process(self, n):
        yield ("even" if n % 2 == 0 else "odd", n)


def test_in_process_cluster_keeps_every_element_once():
    with dask.config.set({"distributed.worker.profile.enabled": False}), \
            LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
        options = PipelineOptions([f"--runner={DASK_RUNNER}", f"--dask_client_address={cluster.scheduler_address}",
                                   "--dask_npartitions=6"])
        p = beam.Pipeline(options=options)
        numbers = p | beam.Create(list(range(1000)))
        batched = numbers | beam.BatchElements(min_batch_size=1, max_batch_size=64) | beam.FlatMap(lambda b: b)
        keyed = batched | beam.ParDo(_Tagged()) | beam.GroupByKey()
        keyed | beam.MapTuple(lambda k, v: (k, len(v), sum(v)))
        result = p.run()
        result.wait_until_finish()
        out = sorted(getattr(v, "value", v) for f in result.futures for v in f.result())  # the last bag
        result.client.close()
        assert out == [("even", 500, sum(range(0, 1000, 2))),
                                             ("odd", 500, sum(range(1, 1000, 2)))]


class _BundleContents(beam.DoFn):
    """One element per bundle (a partition on this runner): what the bundle held. Slow enough that partitions on
    the cluster's two threads overlap: each must have its own DoFn (per-bundle state is not shared)."""

    def start_bundle(self):
        self.seen = []

    def process(self, item):
        time.sleep(0.0005)
        self.seen.append(item)

    def finish_bundle(self):
        from apache_beam.transforms.window import GlobalWindows

        yield GlobalWindows.windowed_value(sorted(self.seen))


def test_flatten_never_makes_a_branch_wait_for_another():
    """After a Flatten each partition holds one branch's partition (one read chunk's rows, rejects or counters):
    joining branches made every chunk's rows wait for a branch behind a GroupByKey, all rows held at once."""
    with dask.config.set({"distributed.worker.profile.enabled": False}), \
            LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=":0") as cluster:
        options = PipelineOptions([f"--runner={DASK_RUNNER}", f"--dask_client_address={cluster.scheduler_address}",
                                   "--dask_npartitions=4"])
        p = beam.Pipeline(options=options)
        numbers = p | beam.Create(list(range(400)))  # 4 partitions of 100 consecutive numbers
        branches = [numbers | f"Tag{t}" >> beam.Map(lambda n, t=t: (t, n)) for t in "ab"]
        late = (numbers | beam.Map(lambda n: (n % 3, n)) | beam.GroupByKey()  # a branch behind a shuffle
                | beam.FlatMapTuple(lambda k, ns: [("c", n) for n in ns]))
        (*branches, late) | beam.Flatten() | beam.ParDo(_BundleContents())
        result = p.run()
        result.wait_until_finish()
        bundles = [getattr(v, "value", v) for f in result.futures for v in f.result()]
        result.client.close()
    early = [b for b in bundles if b and b[0][0] in "ab"]
    assert len(early) == 8  # 2 branches x 4 chunks, each alone in its partition
    for bundle in early:
        assert len({t for t, _ in bundle}) == 1 and len({n // 100 for _, n in bundle}) == 1 and len(bundle) == 100
    assert sorted(x for b in bundles for x in b) == sorted([(t, n) for t in "abc" for n in range(400)])


def test_reads_keep_their_partitions_and_shuffles_stop_at_the_bound(monkeypatch):
    """Work items keep a partition each (a WARC range's pages stay apart), while a GroupByKey gives at most
    SHUFFLE_BOUND partitions however many work items there are (a run over many WARCs: tasks stay bounded)."""
    from mmcorpus.pipelines.runtime import dask_graph

    assert dask_graph.shuffle_bound(40_000, 2) == dask_graph.SHUFFLE_BOUND and dask_graph.shuffle_bound(3, 2) == 4
    monkeypatch.setattr(dask_graph, "SHUFFLE_BOUND", 3)
    with dask.config.set({"distributed.worker.profile.enabled": False}), \
            LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0") as cluster:
        options = PipelineOptions([f"--runner={DASK_RUNNER}", f"--dask_client_address={cluster.scheduler_address}",
                                   "--dask_npartitions=12"])
        p = beam.Pipeline(options=options)
        numbers = p | beam.Create(list(range(240)))  # 12 work items of 20 numbers
        reads = numbers | "Reads" >> beam.ParDo(_BundleContents()) | "TagReads" >> beam.Map(lambda b: ("read", b))
        grouped = (numbers | beam.Map(lambda n: (n % 30, n)) | beam.GroupByKey() | beam.FlatMapTuple(lambda k, ns: ns)
                   | "Shuffled" >> beam.ParDo(_BundleContents()) | "TagShuffled" >> beam.Map(lambda b: ("shuffled", b)))
        (reads, grouped) | beam.Flatten() | beam.Map(lambda x: x)
        result = p.run()
        result.wait_until_finish()
        bundles = [getattr(v, "value", v) for f in result.futures for v in f.result()]
        result.client.close()
    reads = [b for t, b in bundles if t == "read"]
    shuffled = [b for t, b in bundles if t == "shuffled" and b]
    assert len(reads) == 12 and all(len(b) == 20 for b in reads)
    assert len(shuffled) == 3 and sorted(n for b in shuffled for n in b) == list(range(240))
