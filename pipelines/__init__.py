"""Beam wiring, sources and sinks, and the `mmcorpus` command line, in rooms that follow the data flow:

  interleaved/  WARC / URL list / HTML folder -> documents (command, sources, dedup)
  pairs/        alt texts and caption datasets -> image-text pairs (command, sources, dedup)
  capfilt/      pairs -> synthetic captions + ITM filter (command, stages)
  export/       finished outputs -> WebDataset tars / Hugging Face folders (command, pipeline, samples, writers)
  train/        the `mmcorpus train` command (the trainer itself is mmcorpus.trainer)
  fetching/     network fetching shared by the pipelines: host lookup, page fetching, image downloads (one downloader per worker, per-URL record)
  models/       model runners used by the pipelines: CLIP scoring, BLIP captioning and ITM
  runtime/      shared run machinery: stages and counters, the sink, runners, run checks, progress
  safety/       opt-outs, blocklists, flagged words, PII masking (stages), the NSFW head over CLIP (nsfw)
  outputs/      what reads a finished output: dataset card, plots, inspect
"""

import logging


class BeamOptionalGcpNotice(logging.Filter):
    """Beam logs on the root logger at import that its optional BigQuery clients are missing; no mmcorpus command
    uses them, so the line would only precede every command's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and str(record.msg).startswith("apitools not found"))


logging.getLogger().addFilter(BeamOptionalGcpNotice())
