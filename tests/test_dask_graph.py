"""The Dask runner's own translation (pipelines/runtime/dask_graph.py) on a real in-process Dask cluster, where
every partition of a transform runs in the same process: outputs must not repeat (Beam's shared receivers
repeated them), and what a DoFn emits in finish_bundle (BatchElements' last batch of a bundle) must arrive."""

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
