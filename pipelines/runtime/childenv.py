"""Environment for the child processes mmcorpus starts (Beam's workers): `child-site/` first on
their PYTHONPATH, and the variables that switch its start-up hooks on (see child-site/sitecustomize.py)."""

from __future__ import annotations

import contextlib
import os

CHILD_SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "child-site")


def child_env(base: dict | None = None, **hooks: str) -> dict:
    """A copy of `base` (default os.environ) with child-site on PYTHONPATH and the given hook variables."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (CHILD_SITE, env.get("PYTHONPATH")) if p)
    env.update(hooks)
    return env


@contextlib.contextmanager
def children_started_with(**hooks: str):
    """Within the block, processes started from this one (by libraries that pass os.environ on) get child_env."""
    names = ("PYTHONPATH", *hooks)
    saved = {k: os.environ.get(k) for k in names}
    env = child_env(**hooks)
    os.environ.update({k: env[k] for k in names})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
