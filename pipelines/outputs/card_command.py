"""`mmcorpus card OUT`: write the Hugging Face dataset card (README.md + PNG plots) of a finished run."""

from __future__ import annotations

HELP = "write OUT/README.md, a Hugging Face dataset card with plots, from a finished run"
DESCRIPTION = (
    "Write OUT/README.md for the finished run in OUT: Hugging Face YAML front matter (configs with data_files "
    "globs for data/ and rejects/, features, license, task and size categories, languages found in the data), "
    "then how the data was built (sources, stages, parameters, versions), the filtering funnel per stage and "
    "reject reason, distributions, dedup figures and, when a training report exists, the trainer's verdict on "
    "whether the images carry information. Plots are written as PNG files beside the card. Counts come from "
    "stats.json and are checked against the Parquet files first; image bytes are never read."
)


def add_arguments(parser) -> None:
    parser.add_argument("out", metavar="OUT", help="output folder of a finished mmcorpus run")
    parser.add_argument("--name", default=None, help="dataset name shown in the card (default: OUT's folder name)")
    parser.add_argument("--license", default="other",
                        help="license identifier for the front matter (Hugging Face ids such as cc-by-4.0, odc-by); "
                             "'other' states that the web content's licenses vary")
    parser.add_argument("--description", default="", help="one-paragraph summary at the top of the card")
    parser.add_argument("--train-report", default=None, metavar="REPORT_JSON",
                        help="report.json of `mmcorpus train` (default: OUT/report.json, or a sibling folder's "
                             "report.json that has a dataset of this name)")


def run(args) -> int:
    import json

    from mmcorpus.pipelines.outputs.card import write_card
    from mmcorpus.pipelines.errors import UserError
    from mmcorpus.schemas import storage

    try:
        with storage.open(storage.join(args.out, "stats.json"), "rb") as f:
            command = json.load(f).get("command")
    except (OSError, ValueError, AttributeError):
        command = None  # write_card names what is missing or broken
    if command == "export":
        raise UserError(f"{args.out!r} is an `mmcorpus export` output; card the output it was exported from")
    if args.train_report and not storage.isfile(args.train_report):
        raise UserError(f"--train-report {args.train_report!r} does not exist")
    result = write_card(args.out, name=args.name, license_id=args.license, description=args.description,
                        train_report=args.train_report)
    print(f"card: {result['card']} ({result['rows']:,} rows; {len(result['plots'])} plots: "
          f"{', '.join(result['plots'])})" + (f"; verdict from {result['train_report']}" if result["train_report"] else ""))
    return 0
