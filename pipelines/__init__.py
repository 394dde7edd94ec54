"""Beam wiring, sources and sinks, and the `mmcorpus` command line."""

import logging


class BeamOptionalGcpNotice(logging.Filter):
    """Beam logs on the root logger at import that its optional BigQuery clients are missing; no mmcorpus command
    uses them, so the line would only precede every command's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.name == "root" and str(record.msg).startswith("apitools not found"))


logging.getLogger().addFilter(BeamOptionalGcpNotice())
