"""Runner selection shared by every pipeline command.

`--runner auto` (default): Beam's DirectRunner in its in-memory mode for `--workers 1`, else the DaskRunner on a
local cluster (see README "Choice of default runner and memory": the DirectRunner's multi-process mode lost
rows and counters of large elements in Beam 2.78). `--runner direct`: the DirectRunner (multi-process for more
than one worker). `--runner dask`: Beam's DaskRunner on a `distributed.LocalCluster` started here, or on the
cluster at `--dask-address`. Any other value is passed to Beam as the runner name (Flink, Spark, Dataflow,
...), with extra `--beam-option KEY=VALUE` pairs.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os

from apache_beam.options.pipeline_options import PipelineOptions

from mmcorpus.pipelines.runtime.childenv import children_started_with
from mmcorpus.pipelines.errors import UserError

DASK_RUNNER = "mmcorpus.pipelines.runtime.dask_graph.BoundedDaskRunner"  # Beam's, with bounded partitions
BEAM_DASK_RUNNER = "apache_beam.runners.dask.dask_runner.DaskRunner"


def add_runner_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("runner")
    g.add_argument("--runner", default="auto",
                   help="auto (default: direct in-memory for --workers 1, else a local dask cluster), direct, dask, "
                        "or any Beam runner name (FlinkRunner, DataflowRunner, ...)")
    g.add_argument("--workers", type=int, default=0,
                   help="worker processes for direct/dask (default: number of CPU cores)")
    g.add_argument("--dask-address", default=None,
                   help="scheduler address of a running Dask cluster (default: start a local one)")
    g.add_argument("--beam-option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra Beam pipeline option, repeatable (e.g. --beam-option project=my-gcp-project)")


def _extra(args) -> list[str]:
    out = []
    for item in args.beam_option:
        if "=" not in item:
            raise UserError(f"--beam-option {item!r}: expected KEY=VALUE")
        out.append("--" + item.lstrip("-"))
    return out


def _harness_level(args) -> str:
    """Worker processes log at the command's --log-level when it asks for detail, else errors only (Beam's
    workers report every bundle, and libraries warn per page; rejects carry those reasons instead)."""
    level = getattr(args, "log_level", "WARNING")
    return level if level in ("DEBUG", "INFO") else "ERROR"


def _quiet_distributed(args) -> None:
    """distributed sets its loggers to INFO when first imported: back to the command's level (>= WARNING)."""
    level = max(logging.WARNING, logging.getLevelName(getattr(args, "log_level", "WARNING")))
    for name in list(logging.root.manager.loggerDict):
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(level)


def _dask_partitions(args) -> list[str]:
    """`--dask_npartitions` from a command's `args.dask_partitions` (its work items: the DaskRunner otherwise
    puts up to 128 created items in one partition, and every later step keeps that partitioning), unless the
    user set the partitioning with --beam-option."""
    n = getattr(args, "dask_partitions", 0)
    if not n or any(o.lstrip("-").startswith(("dask_npartitions", "dask_partition_size")) for o in args.beam_option):
        return []
    return [f"--dask_npartitions={n}"]


def worker_count(args) -> int:
    return args.workers or os.cpu_count() or 1


def chosen_runner(args) -> str:
    """'direct' or 'dask' for the embedded runners (`auto` resolved), else the Beam runner name as given."""
    if args.runner == "auto":
        return "direct" if worker_count(args) == 1 else "dask"
    if args.runner in ("dask", DASK_RUNNER, BEAM_DASK_RUNNER, "DaskRunner"):
        return "dask"
    return args.runner


@contextlib.contextmanager
def pipeline_options(args):
    """Yield (PipelineOptions, runner description) for the chosen runner; closes a local Dask cluster after."""
    workers = worker_count(args)
    runner = chosen_runner(args)
    extra = _extra(args)  # a bad --beam-option is refused before any cluster starts
    if runner == "direct":
        mode = "in_memory" if workers == 1 else "multi_processing"
        if mode == "multi_processing":
            logging.getLogger(__name__).warning(
                "--runner direct with %d workers: Beam's multi-process DirectRunner has lost rows of large "
                "elements (the run check stops such a run with exit 3); --runner dask is the safe choice", workers)
        level = _harness_level(args)
        flags = ["--runner=DirectRunner", f"--direct_running_mode={mode}", f"--direct_num_workers={workers}",
                 f"--default_sdk_harness_log_level={level}"]
        quiet = {"MMCORPUS_QUIET_BEAM_WORKER": "1"} if level == "ERROR" else {}
        with children_started_with(**quiet):  # Beam starts its worker processes with this process's environment
            yield PipelineOptions(flags + extra), {"runner": "direct", "mode": mode, "workers": workers}
        return
    if runner == "dask":
        if getattr(args, "log_level", "WARNING") != "DEBUG":  # a notice per run about Beam's own partitioning
            logging.getLogger("apache_beam.runners.dask.transform_evaluator").setLevel(logging.ERROR)
        flags = [f"--runner={DASK_RUNNER}"] + _dask_partitions(args)
        if args.dask_address:
            flags += [f"--dask_client_address={args.dask_address}"]
            yield PipelineOptions(flags + extra), {"runner": "dask", "address": args.dask_address}
            return
        import dask
        from distributed import LocalCluster

        _quiet_distributed(args)

        # dashboard on any free port: no clash with another cluster on this machine, no warning; no statistical
        # profiler sampling every worker's stack each 10 ms (the workers get this process's dask config)
        with dask.config.set({"distributed.worker.profile.enabled": False}), \
                LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                             dashboard_address=":0", silence_logs=40) as cluster:
            flags += [f"--dask_client_address={cluster.scheduler_address}"]
            yield PipelineOptions(flags + extra), {"runner": "dask", "local_cluster_workers": workers}
        return
    yield PipelineOptions([f"--runner={runner}"] + extra), {"runner": runner}
