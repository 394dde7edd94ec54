"""The one filesystem layer: local paths and fsspec URLs (s3://, gs://, http(s)://, ...) alike.

Every room reads and writes through these helpers, so a run can take its inputs from object stores or the web
and write its output to a bucket. Local paths keep the plain OS calls (atomic `os.replace`); a URL goes to its
fsspec filesystem. Credentials and endpoints come the standard way (AWS_* variables including
AWS_ENDPOINT_URL, Google application default credentials); extra fsspec options come from `configure`
(the commands' `--storage-option KEY=VALUE`), passed to worker processes in MMCORPUS_STORAGE_OPTIONS.

Object stores have no rename: `move` copies (a server-side copy that appears whole or not at all) and deletes
the source, so writers put a file under a temporary name first and move it to its final name.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import re
import time

ENV = "MMCORPUS_STORAGE_OPTIONS"
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
_SECRET = re.compile(r"secret|token|password|passwd|credential|session|key", re.I)
_NOT_SECRET = {"endpoint_url", "region_name", "anon", "requester_pays", "project", "use_ssl", "block_size"}
log = logging.getLogger("mmcorpus.storage")


def protocol(path: str) -> str:
    m = _SCHEME.match(path)
    return m.group(1).lower() if m else "file"


def _local(path: str) -> str:
    """A local path, file:// URLs included, as the OS names it."""
    return path[len("file://"):] if path.startswith("file://") else path


def is_url(path) -> bool:
    """A path another machine can reach (not a local path or file:// URL)."""
    return isinstance(path, str) and protocol(path) not in ("file", "local")


def parse_options(pairs: list[str]) -> dict:
    """`KEY=VALUE` strings -> {protocol or '*': {key: value}}. `s3:KEY=VALUE` applies to one protocol only; a
    plain KEY applies to every object store (not http). Dotted keys nest (client_kwargs.region_name=...).
    Values are JSON when they parse (true, 3, {...}), else strings. ValueError names a bad pair."""
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--storage-option {pair!r}: expected KEY=VALUE")
        proto, _, key = key.strip().rpartition(":")
        try:
            parsed = json.loads(value)
        except ValueError:
            parsed = value
        target = out.setdefault(proto or "*", {})
        *parents, leaf = key.split(".")
        for part in parents:
            target = target.setdefault(part, {})
        target[leaf] = parsed
    return out


def configure(options: dict) -> None:
    """Use these fsspec options in this process and the worker processes it starts."""
    if options:
        os.environ[ENV] = json.dumps(options)
    else:
        os.environ.pop(ENV, None)


def options_for(proto: str) -> dict:
    raw = os.environ.get(ENV)
    if not raw:
        return {}
    opts = json.loads(raw)
    merged = {} if proto in ("http", "https") else dict(opts.get("*", {}))
    merged.update(opts.get(proto, {}))
    return merged


def redact_options(pairs: list[str]) -> list[str]:
    """`--storage-option` values as they may be recorded: secrets replaced by ***."""
    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        leaf = key.rpartition(":")[2].rpartition(".")[2]
        out.append(f"{key}=***" if sep and leaf not in _NOT_SECRET and _SECRET.search(leaf) else pair)
    return out


def redact_url(path: str) -> str:
    """A URL without user:password@ or a query string (presigned signatures)."""
    if not is_url(path):
        return path
    path = re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", path)
    return path.split("?", 1)[0]


def filesystem(path: str):
    """(fsspec filesystem, path as that filesystem names it)."""
    import fsspec

    proto = protocol(path)
    return fsspec.core.url_to_fs(path, **options_for(proto))


def _fresh(path: str):
    """filesystem(path) with its listing cache dropped, so what other processes wrote since is seen."""
    fs, p = filesystem(path)
    fs.invalidate_cache()
    return fs, p


def full(fs, path: str) -> str:
    """A filesystem's path back as a URL (local: as it is)."""
    if "file" in _protocols(fs) or "local" in _protocols(fs):
        return path
    return fs.unstrip_protocol(path)


def _protocols(fs) -> tuple:
    p = fs.protocol
    return p if isinstance(p, (tuple, list)) else (p,)


def join(base: str, *parts: str) -> str:
    if is_url(base):
        return posixpath.join(base.rstrip("/"), *parts) if parts else base
    return os.path.join(base, *parts)


def abspath(path: str) -> str:
    return path if is_url(path) else os.path.abspath(path)


def basename(path: str) -> str:
    return posixpath.basename(path.rstrip("/")) if is_url(path) else os.path.basename(path)


def dirname(path: str) -> str:
    return posixpath.dirname(path.rstrip("/")) if is_url(path) else os.path.dirname(path)


def has_glob(path: str) -> bool:
    return any(c in path for c in "*?[")


def exists(path: str) -> bool:
    if not is_url(path):
        return os.path.exists(_local(path))
    fs, p = _fresh(path)
    return fs.exists(p)


def why_missing(path: str) -> str:
    """Why `exists(path)` is false, in words: an HTTP status where a server gave one."""
    if protocol(path) in ("http", "https"):
        fs, p = filesystem(path)
        try:
            fs.info(p)
        except Exception as exc:  # fsspec raises FileNotFoundError from the server's status error
            status = getattr(exc.__cause__ or exc.__context__, "status", None)
            if status == 403 or status == 401:
                return f"access denied (HTTP {status})"
            if status:
                return f"does not exist (HTTP {status})"
    return "does not exist"


def isdir(path: str) -> bool:
    if not is_url(path):
        return os.path.isdir(_local(path))
    if protocol(path) in ("http", "https"):
        return False
    fs, p = _fresh(path)
    return fs.isdir(p)


def isfile(path: str) -> bool:
    if not is_url(path):
        return os.path.isfile(_local(path))
    fs, p = _fresh(path)
    return fs.isfile(p)


def glob(pattern: str) -> list[str]:
    """Sorted matches of a glob (local or object store; http(s) has no listing)."""
    if not is_url(pattern):
        import glob as _glob

        return sorted(_glob.glob(pattern))
    if protocol(pattern) in ("http", "https"):
        raise ValueError(f"{pattern}: http(s) has no listing, so globs are not supported there")
    fs, p = _fresh(pattern)
    return sorted(full(fs, m) for m in fs.glob(p))


def find(folder: str) -> list[str]:
    """Every file under a folder, sorted."""
    if not is_url(folder):
        return sorted(os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs)
    fs, p = _fresh(folder)
    return sorted(full(fs, f) for f in fs.find(p))


def listdir(folder: str) -> list[str]:
    """Names directly in a folder (empty when it does not exist)."""
    if not is_url(folder):
        return sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    fs, p = _fresh(folder)
    try:
        return sorted(posixpath.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))
    except FileNotFoundError:
        return []


def info(path: str) -> dict:
    """Size and version marks of one file: {"bytes", "mtime"} locally; {"bytes", "etag"/"mtime"} remote."""
    if not is_url(path):
        st = os.stat(path)
        return {"bytes": st.st_size, "mtime": int(st.st_mtime)}
    fs, p = filesystem(path)
    i = fs.info(p)
    out = {"bytes": i.get("size")}
    for key in ("ETag", "etag", "md5Hash", "LastModified", "mtime", "updated"):
        if i.get(key) is not None:
            out[key.lower()] = str(i[key]).strip('"')
    return out


def open(path: str, mode: str = "rb", **kwargs):  # noqa: A001 - the filesystem layer's open
    if not is_url(path):
        import builtins

        return builtins.open(_local(path), mode, **kwargs)
    fs, p = filesystem(path)
    return fs.open(p, mode, **kwargs)


def makedirs(path: str) -> None:
    if not is_url(path):
        os.makedirs(path, exist_ok=True)  # object stores have no folders to make


def write_bytes(path: str, data: bytes) -> None:
    """Write a whole small file so it appears whole: local via a temporary file and rename, remote with one PUT
    (an object store makes an object visible only when its upload completes)."""
    if not is_url(path):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with io.open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
        return
    fs, p = filesystem(path)
    fs.pipe_file(p, data)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_range(path: str, start: int, end: int, retries: int = 5, backoff: float = 0.5) -> bytes:
    """Bytes [start, end) of a file (fewer at its end): of a remote one, one ranged read, retried as
    `ResumingReader` retries (then ReadFailed)."""
    if not is_url(path):
        with open(path, "rb") as f:
            f.seek(start)
            return f.read(end - start)
    with ResumingReader(path, retries, backoff, block_size=max(1, end - start)) as r:
        r.seek(start)
        return r.read(end - start)


def move(src: str, dst: str) -> None:
    """Rename (local, atomic) or copy then delete (object stores: the copy appears whole or not at all)."""
    if not is_url(src):
        os.replace(src, dst)
        return
    fs, s = filesystem(src)
    _, d = filesystem(dst)
    fs.copy(s, d)
    fs.rm(s)


def remove(path: str, recursive: bool = False) -> None:
    """Remove a file or (recursive) a folder; missing is fine."""
    if not is_url(path):
        import shutil

        if os.path.isdir(path) and not os.path.islink(path):
            if recursive:
                shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        return
    fs, p = _fresh(path)
    try:
        if fs.exists(p):
            fs.rm(p, recursive=recursive)
    except FileNotFoundError:
        pass


class ReadFailed(OSError):
    """A remote file could not be read on after the bounded retries; the message names it and the offset."""


class ResumingReader(io.RawIOBase):
    """A seekable binary stream of one remote file, read block by block (never whole): a dropped connection or
    a failed ranged read is retried from the byte offset reached (HTTP Range / ranged GET on a fresh handle),
    up to `retries` times in a row with exponential backoff; then ReadFailed naming the file and the offset.
    Missing files and denied access are not retried."""

    def __init__(self, path: str, retries: int = 5, backoff: float = 0.5, block_size: int = 4 << 20,
                 cache_type: str = "readahead"):
        super().__init__()
        self.path, self.retries, self.backoff, self.block_size = path, retries, backoff, block_size
        self.cache_type = cache_type  # fsspec's; "blockcache" keeps recent blocks for reads that seek back
        self.pos = 0
        self.resumes = 0  # reopenings after a failure, for logs and tests
        self._fh = None
        self._fs, self._p = filesystem(path)
        self.size = self._fs.size(self._p)  # FileNotFoundError / PermissionError: the caller names the input

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size or 0}[whence]
        self.pos = max(base + offset, 0)
        if self._fh is not None:
            self._fh.seek(self.pos)
        return self.pos

    def _handle(self):
        if self._fh is None:
            # the size is known: no second HEAD per (re)opening
            self._fh = self._fs.open(self._p, "rb", block_size=self.block_size, size=self.size,
                                     cache_type=self.cache_type)
            self._fh.seek(self.pos)
        return self._fh

    def read(self, n: int = -1) -> bytes:
        failures = 0
        while True:
            try:
                data = self._handle().read(n)
            except (FileNotFoundError, PermissionError):
                raise
            except Exception as exc:  # connection reset, payload cut short, timeouts, 5xx from the store
                self._drop()
                failures += 1
                if failures > self.retries:
                    raise ReadFailed(f"{redact_url(self.path)}: read failed at byte {self.pos} after "
                                     f"{self.retries} retries ({type(exc).__name__}: {exc})") from None
                self.resumes += 1
                log.info("%s: resuming at byte %d after %s", redact_url(self.path), self.pos, type(exc).__name__)
                time.sleep(self.backoff * 2 ** (failures - 1))
                continue
            self.pos += len(data)
            return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def _drop(self) -> None:
        fh, self._fh = self._fh, None
        if fh is not None:
            try:
                fh.close()
            except Exception:  # a broken connection may fail to close; the handle is dropped either way
                pass

    def close(self) -> None:
        self._drop()
        super().close()
