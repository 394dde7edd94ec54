"""One object per worker process: models, lists and downloaders that DoFns build in `setup`.

On the Dask runner a DoFn is set up for every bundle (a partition: one read chunk), and the DirectRunner sets up
every DoFn instance; loading a CLIP or BLIP model, or a million-entry opt-out list, for each would cost more than
the work. `per_process(key, make)` builds the object once per process and hands the same one to every caller
with an equal key. Keys carry the settings and, through `file_stamp`, the size and time of the files read, so a
changed weights file is loaded again. The newest `KEEP` objects are kept.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

KEEP = 8

_OBJECTS: OrderedDict = OrderedDict()
_LOCK = threading.Lock()


def file_stamp(path: str | None) -> tuple:
    """(path, size, mtime) of a local file; the path alone for names and remote paths."""
    if path and os.path.isfile(path):
        st = os.stat(path)
        return path, st.st_size, st.st_mtime_ns
    return (path,)


def per_process(key: Hashable, make: Callable[[], Any]) -> Any:
    """The process's object for `key`, built by `make()` the first time (under a lock: one build per key)."""
    with _LOCK:
        if key in _OBJECTS:
            _OBJECTS.move_to_end(key)
            return _OBJECTS[key]
        obj = _OBJECTS[key] = make()
        while len(_OBJECTS) > KEEP:
            _OBJECTS.popitem(last=False)
        return obj
