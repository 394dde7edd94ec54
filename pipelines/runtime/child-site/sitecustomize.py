"""Start-up hooks for the child processes mmcorpus starts itself: Beam's multi-process workers and the
img2dataset downloads (pipelines/runtime/childenv.py puts this folder first on their PYTHONPATH; the folder name has a
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
import sys
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))


def _quiet_beam_worker() -> None:
    import mmcorpus.pipelines  # noqa: F401 - the import installs BeamOptionalGcpNotice on the root logger

    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)  # Beam's harness sets the root logger to INFO while it starts
    logging.getLogger().addHandler(handler)


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    def __init__(self, allow_private: bool):
        super().__init__()
        self.allow_private = allow_private

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        from mmcorpus.filters.urls import url_refusal
        from mmcorpus.pipelines.fetching.hosts import resolve

        target = urllib.parse.urljoin(req.full_url, newurl)
        why = url_refusal(target, self.allow_private, resolve)
        if why:
            raise urllib.error.HTTPError(target, code, f"redirect to {target} refused: {why}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _check_redirects(policy: str) -> None:
    urllib.request.install_opener(urllib.request.build_opener(_CheckedRedirects(allow_private=policy == "any")))


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
