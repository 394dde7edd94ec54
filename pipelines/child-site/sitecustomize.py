"""Start-up hooks for the child processes mmcorpus starts itself: Beam's multi-process workers and the
img2dataset downloads (pipelines.childenv puts this folder first on their PYTHONPATH; the folder name has a
dash so it is never imported as a package). Each hook runs only when its variable is set, then any other
`sitecustomize` on the path is loaded as it would have been.

MMCORPUS_QUIET_BEAM_WORKER=1: stderr logging at WARNING from the first line, so a worker's start-up neither
  prints Beam's optional-BigQuery notice nor its INFO bootstrap lines; warnings and errors still show.
MMCORPUS_IMG_REDIRECTS=public|any: every redirect urllib follows (img2dataset downloads with urllib) is checked
  with filters.urls.url_refusal, as the first request was: a public image URL cannot redirect the download to a
  private, loopback or link-local address (public), or to a scheme other than http(s) (public and any).
"""

import importlib
import logging
import os
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


class _AtLeastWarning(logging.Filter):
    """Beam's harness sets the root logger to INFO while it starts; keep stderr to warnings and errors."""

    def filter(self, record):
        return record.levelno >= logging.WARNING


def _quiet_beam_worker() -> None:
    from pipelines import BeamOptionalGcpNotice  # the filter the command's own process uses

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(BeamOptionalGcpNotice())
    handler.addFilter(_AtLeastWarning())
    logging.getLogger().addHandler(handler)


def _addresses(host: str) -> list:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except (OSError, UnicodeError):
        return []


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    allow_private = False

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        from filters.urls import url_refusal

        target = urllib.parse.urljoin(req.full_url, newurl)
        why = url_refusal(target, self.allow_private, _addresses)
        if why:
            raise urllib.error.HTTPError(target, code, f"redirect to {target} refused: {why}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _check_redirects(policy: str) -> None:
    handler = _CheckedRedirects()
    handler.allow_private = policy == "any"
    urllib.request.install_opener(urllib.request.build_opener(handler))


def _chain() -> None:
    """Load the sitecustomize this one shadows, if there is one."""
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
    this = sys.modules.pop("sitecustomize", None)
    try:
        importlib.import_module("sitecustomize")
    except ImportError:
        if this is not None:
            sys.modules["sitecustomize"] = this


if os.environ.get("MMCORPUS_QUIET_BEAM_WORKER") == "1":
    _quiet_beam_worker()
if os.environ.get("MMCORPUS_IMG_REDIRECTS") in ("public", "any"):
    _check_redirects(os.environ["MMCORPUS_IMG_REDIRECTS"])
_chain()
