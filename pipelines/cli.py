"""The `mmcorpus` command line. Each subcommand lives in its own module (SUBCOMMANDS), which
defines `HELP` (one line), `DESCRIPTION`, `add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import time

from mmcorpus.pipelines.errors import RunCheckError, UserError
from mmcorpus.schemas import SchemaError
from mmcorpus.trainer.weights import WeightsMissing

SUBCOMMANDS = {  # name -> module, in the order `mmcorpus --help` lists them
    "interleaved": "mmcorpus.pipelines.interleaved.command",
    "pairs": "mmcorpus.pipelines.pairs.command",
    "capfilt": "mmcorpus.pipelines.capfilt.command",
    "export": "mmcorpus.pipelines.export.command",
    "train": "mmcorpus.pipelines.train.command",
    "card": "mmcorpus.pipelines.outputs.card_command",
    "inspect": "mmcorpus.pipelines.outputs.inspect",
}
LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
TOP_OPTIONS = ("-h", "--help", "--log-level")


def _misplaced_option(argv: list[str]) -> str | None:
    """The first option before the command that `mmcorpus` itself does not take (argparse would only say that
    COMMAND is missing)."""
    items = iter(argv)
    for item in items:
        if not item.startswith("-"):
            return None
        if item.split("=", 1)[0] not in TOP_OPTIONS:
            return item
        if item == "--log-level":
            next(items, None)  # its value (argparse checks it)
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmcorpus",
        description="Turn raw web crawls into training-ready multimodal corpora and check them with a small "
        "Flamingo run. Each subcommand writes OUT/data/*.parquet, OUT/rejects/*.parquet, OUT/stats.json "
        "and OUT/_SUCCESS.",
        epilog="Run 'mmcorpus COMMAND --help' for a command's options.",
    )
    parser.add_argument("--log-level", default=os.environ.get("MMCORPUS_LOG_LEVEL", "WARNING"),
                        choices=LOG_LEVELS, help="logging level (default WARNING; also MMCORPUS_LOG_LEVEL)")
    common = argparse.ArgumentParser(add_help=False)  # --log-level after the command too
    common.add_argument("--log-level", default=argparse.SUPPRESS, choices=LOG_LEVELS,
                        help="logging level (default WARNING; also MMCORPUS_LOG_LEVEL)")
    common.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec option for remote paths (s3://, gs://, https://), repeatable; "
                             "PROTOCOL:KEY=VALUE for one protocol (s3:endpoint_url=http://...); dotted keys nest "
                             "(client_kwargs.region_name=...). Credentials: the standard AWS_*/Google variables; "
                             "secrets given here are never written to stats.json")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION, parents=[common],
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module)
    return parser


class _CurrentStderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is when a record is logged (main() may run in-process, under a test's or a
    notebook's replaced stderr that is closed later)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


ARGV: list[str] | None = None  # the command line of the running command, as stats.json records it


def main(argv: list[str] | None = None) -> int:
    global ARGV
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    parser = build_parser()
    given = sys.argv[1:] if argv is None else [str(a) for a in argv]
    bad = _misplaced_option(given)
    if bad:
        parser.error(f"unrecognized option {bad!r} before the command; command options go after it "
                     "(mmcorpus COMMAND --help lists them)")
    args = parser.parse_args(given)
    ARGV = ["mmcorpus", *given]
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        handlers=[_CurrentStderr()],
                        force=True)  # a library's import-time logging.warning() may have configured root already
    if args.log_level != "DEBUG":  # Beam and Dask log every bundle and worker at INFO: keep them to warnings
        for name in ("apache_beam", "distributed"):
            logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(args.log_level)))
    started = time.time()
    try:
        from mmcorpus.schemas import storage

        try:
            storage.configure(storage.parse_options(args.storage_option))
        except ValueError as exc:
            raise UserError(str(exc)) from None
        code = int(args._module.run(args) or 0)
        output = getattr(args, "output", None)
        if code == 0 and isinstance(output, str):
            from mmcorpus.pipelines.runtime import progress

            progress.print_summary(output, started)
        return code
    except (UserError, WeightsMissing, SchemaError) as exc:  # SchemaError: a damaged or foreign file, named
        print(f"mmcorpus {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except RunCheckError as exc:
        print(f"mmcorpus {args.command}: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"mmcorpus {args.command}: interrupted; finished shards are kept, rerun the same command to resume",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
