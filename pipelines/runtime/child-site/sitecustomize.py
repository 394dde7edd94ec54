"""Start-up hooks for the child processes mmcorpus starts itself: Beam's multi-process workers
(pipelines/runtime/childenv.py puts this folder first on their PYTHONPATH; the folder name has a
dash so it is never imported as a package). Each hook runs only when its variable is set, then any other
`sitecustomize` on the path is loaded as it would have been.

MMCORPUS_QUIET_BEAM_WORKER=1: stderr logging at WARNING from the first line, so a worker's start-up neither
  prints Beam's optional-BigQuery notice nor its INFO bootstrap lines; warnings and errors still show.
"""

import importlib
import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _quiet_beam_worker() -> None:
    import mmcorpus.pipelines  # noqa: F401 - the import installs BeamOptionalGcpNotice on the root logger

    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)  # Beam's harness sets the root logger to INFO while it starts
    logging.getLogger().addHandler(handler)


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
_chain()
