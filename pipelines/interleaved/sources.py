"""Input sources for `mmcorpus interleaved`: WARC files (plain or gzip) and folders of .html/.html.gz pages.

`expand_sources` turns SOURCE arguments (files, folders, globs, WARC listings; local or remote through
`schemas.storage`) into (kind, path) work items; `read_items` streams one file (never whole into memory for
WARCs; remote ones through ranged reads that resume after a dropped connection) and yields page records
`{"source", "url", "warc_record_id", "crawl_date", "html"}` or bad-record markers `{"source", "_reject": (reason,
detail)}` that the `read` stage turns into reject rows. Payload checks (status, content type, binary bytes,
size, charset) live in `decode_page`.
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
import re
import zlib
from typing import NamedTuple

from mmcorpus.filters.reasons import Reject, shorten
from mmcorpus.schemas import storage
from mmcorpus.pipelines.errors import UserError

HTML_SUFFIXES = (".html", ".htm", ".xhtml", ".html.gz", ".htm.gz", ".xhtml.gz")
HTML_TYPES = ("text/html", "application/xhtml+xml")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([a-zA-Z0-9_\-:.]+)""", re.I)


def _is_warc(path: str) -> bool:
    name = path.lower()
    return ".warc" in name or name.endswith((".arc", ".arc.gz"))


CC_PREFIX = "https://data.commoncrawl.org/"
REMOTE_RETRY = (5, 0.5)  # a remote WARC read: retries in a row at one offset, first backoff in seconds (doubling)
RANGE_BLOCK = 1 << 18  # bytes per ranged read of a WARC read in byte ranges (a whole one: 4 MiB blocks)
LISTING_SUFFIXES = (".paths", ".paths.gz", ".paths.txt")
_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f]")


def expand_sources(sources: list[str], path_prefix: str = CC_PREFIX, skip: int = 0,
                   limit: int | None = None, inputs: list | None = None) -> list[tuple]:
    """SOURCE arguments -> sorted work items (kind, path), kind 'warc' | 'html' | 'urls', plus ('bad', source,
    detail) for a listing line that is not a WARC path. A SOURCE is a local or remote (s3://, gs://, https://)
    file, folder or glob, or a WARC listing (warc.paths.gz; see `is_listing`) whose lines are joined to
    `path_prefix` and sliced by skip/limit: each WARC one item. Missing inputs, globs matching nothing and
    denied access raise UserError naming the input. `inputs`, when given, gets what a run's fingerprint should
    look at: each file, but a listing itself rather than its (maybe thousands of remote) WARCs."""
    items: list[tuple] = []
    inputs = [] if inputs is None else inputs
    for src in sources:
        for p in _matches(src):
            try:
                if storage.isdir(p):
                    found = [_classify(f) for f in storage.find(p)]
                    found = [i for i in found if i[0] in ("warc", "html")]
                    inputs += [f for _, f in found]
                elif is_listing(p):
                    found = listing_items(p, path_prefix, skip, limit)
                    inputs.append(p)
                else:
                    kind = _classify(p)[0]
                    found = [("html" if kind == "other" else kind, p)]
                    inputs.append(p)
                items += found
            except UserError:
                raise
            except (OSError, ValueError, EOFError) as exc:
                raise UserError(f"input {storage.redact_url(p)!r}: {_why(exc)}") from None
    if not items:
        raise UserError(f"no WARC, HTML or URL-list files found in {', '.join(sources)}")
    return sorted(set(items))


def _why(exc: BaseException) -> str:
    if isinstance(exc, PermissionError):
        return f"access denied ({exc})"
    if isinstance(exc, FileNotFoundError):
        return "does not exist (missing bucket, key or file)"
    return shorten(f"{type(exc).__name__}: {exc}", 300)


def _matches(src: str) -> list[str]:
    try:
        if storage.has_glob(src) and not src.lower().startswith(("http://", "https://")):
            paths = storage.glob(src)
            if not paths:
                raise UserError(f"input {storage.redact_url(src)!r}: the glob matches nothing")
            return paths
        if not storage.exists(src):
            raise UserError(f"input {storage.redact_url(src)!r} {storage.why_missing(src)}")
        return [src]
    except UserError:
        raise
    except (OSError, ValueError) as exc:
        raise UserError(f"input {storage.redact_url(src)!r}: {_why(exc)}") from None


def _classify(path: str) -> tuple[str, str]:
    if _is_warc(path):
        return ("warc", path)
    if path.lower().endswith((".txt", ".urls", ".lst")):
        return ("urls", path)
    return ("html" if path.lower().endswith(HTML_SUFFIXES) else "other", path)


def is_listing(path: str) -> bool:
    """A WARC listing: named *.paths / *.paths.gz / *.paths.txt (Common Crawl's warc.paths.gz), or a .txt
    (.txt.gz) file whose first line is a WARC path rather than a page URL."""
    name = path.lower()
    if name.endswith(LISTING_SUFFIXES):
        return True
    if not name.endswith((".txt", ".txt.gz")):
        return False
    for line in _listing_lines(path):
        return _is_warc(line.strip().split("?")[0])
    return False


def _listing_lines(path: str):
    """Lines of a (gzipped or plain) listing, streamed, blank lines skipped."""
    with storage.open(path, "rb") as raw:
        head = raw.read(2)
        raw.seek(0)
        fh = gzip.GzipFile(fileobj=raw) if head == b"\x1f\x8b" else raw
        for line in fh:
            text = line.decode("utf-8", "replace").strip()
            if text:
                yield text


def listing_items(path: str, prefix: str, skip: int = 0, limit: int | None = None) -> list[tuple]:
    """Work items of one WARC listing: its non-blank lines from `skip`, at most `limit`; a relative line is
    joined to `prefix`, a URL or absolute path is taken as it is; a line that is not a WARC path is a
    ('bad', listing:line, detail) item, rejected as `listing_bad_line`."""
    out: list[tuple] = []
    for n, line in enumerate(_listing_lines(path)):
        if n < skip:
            continue
        if limit is not None and n >= skip + limit:
            break
        where = f"{storage.redact_url(path)}:{n + 1}"
        if _UNSAFE.search(line) or not _is_warc(line.split("?")[0]):
            out.append(("bad", where, f"line {n + 1} is not a WARC path: {shorten(line, 200)!r}"))
        elif storage.is_url(line) or os.path.isabs(line):
            out.append(("warc", line))
        else:
            out.append(("warc", storage.join(prefix, line.lstrip("/")) if storage.is_url(prefix)
                        else os.path.join(prefix, line.lstrip("/"))))
    return out


def bad(source: str, reason: str, detail: str) -> dict:
    return {"source": source, "_reject": (reason, detail)}


def load_url_manifest(path: str) -> dict[str, str]:
    """A .jsonl manifest, one `{"file": ..., "url": ...}` object a line (file relative to the manifest's folder
    or absolute) -> {absolute file path: URL}: the page address of each HTML file, for relative links and
    image URLs. UserError naming the manifest and line on anything else."""
    base = os.path.dirname(os.path.abspath(path))
    urls: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except ValueError:
                    raise UserError(f"URL manifest {path!r} line {n}: not a JSON object") from None
                if not (isinstance(entry, dict) and isinstance(entry.get("file"), str)
                        and isinstance(entry.get("url"), str) and entry["url"].startswith(("http://", "https://"))):
                    raise UserError(f"URL manifest {path!r} line {n}: expected {{\"file\": ..., \"url\": \"http(s)://...\"}}")
                urls[os.path.normpath(os.path.join(base, entry["file"]))] = entry["url"]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"URL manifest {path!r} cannot be read: {exc}") from None
    return urls


def read_items(item: tuple, max_bytes: int = 5_000_000, urls: dict[str, str] | None = None):
    """Yield page records / bad markers of one WARC or HTML work item (URL lists: fetching/pages.py); `urls`: page
    URLs of HTML files by absolute path (load_url_manifest)."""
    kind, path = item[:2]
    if kind == "bad":
        yield bad(path, "listing_bad_line", item[2])
    elif kind == "warc":
        yield from read_warc(path, max_bytes)
    elif kind == "html":
        rec = read_html_file(path, max_bytes)
        if urls and "_reject" not in rec:
            rec["url"] = urls.get(os.path.normpath(os.path.abspath(path)))
        yield rec
    else:
        raise ValueError(f"read_items reads WARC and HTML items, not {kind!r} ({path})")


def read_html_file(path: str, max_bytes: int) -> dict:
    try:
        with storage.open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
        if raw[:2] == b"\x1f\x8b":
            with storage.open(path, "rb") as f, gzip.GzipFile(fileobj=f) as g:
                raw = g.read(max_bytes + 1)
    except (OSError, EOFError) as exc:
        return bad(path, "read_failed", str(exc))
    if len(raw) > max_bytes:
        return bad(path, "too_large", f"more than {max_bytes} bytes")
    return {"source": path, "url": None, "warc_record_id": None, "crawl_date": None,
            "status": 200, "content_type": "text/html", "charset": None, "payload": raw}


def read_warc(path: str, max_bytes: int, lo: int = 0, hi: int | None = None):
    """Yield the page records / bad markers of one WARC file (see `warc_records`), or of the records that start in
    bytes [lo, hi) of it (a `Part`). A remote WARC is streamed through `storage.ResumingReader` (ranged reads of
    a few MB, a dropped connection resumed at the offset reached); one that still fails ends in one
    `read_failed` reject naming it and the offset."""
    source = storage.redact_url(path)
    ranged = bool(lo) or hi is not None
    try:
        if storage.is_url(path):  # a range reads little past its end, and seeks back after its first scan
            fh = storage.ResumingReader(path, *REMOTE_RETRY, **({"block_size": RANGE_BLOCK, "cache_type": "blockcache"}
                                                                 if ranged else {}))
        else:
            fh = open(path, "rb")
    except (OSError, ValueError) as exc:  # each range of a file reports its own failure
        yield bad(f"{source}:{lo}" if lo else source, "read_failed", _why(exc))
        return
    with fh:
        try:
            yield from warc_records(fh, source, max_bytes, lo, hi)
        except storage.ReadFailed as exc:
            yield bad(f"{source}:{fh.tell()}", "read_failed", shorten(str(exc), 500))


def warc_records(fh, path: str, max_bytes: int, lo: int = 0, hi: int | None = None):
    """Every record of a WARC stream, one item each; a record that fails is one reject and reading goes on.

    When fastwarc cannot parse on (bad header, broken gzip member), reading resumes at the next place a record
    parses (a gzip member start in a .gz file, a `WARC/1.` line in a plain one) and the stretch skipped becomes
    one `warc_invalid_record` reject naming its byte offsets; an unreadable remainder is one reject naming the
    offset where it starts. Bodies of non-response records are not read into memory (fastwarc skips them).

    With a byte range (lo > 0 or hi; the file has a member per record: `ranged_sizes` checked): only the records
    whose gzip member starts in [lo, hi). A damaged stretch is reported by the range of the record before it (the
    first range at the file's start)."""
    gz = fh.read(2) == b"\x1f\x8b"
    start, last, n, last_failed = 0, -1, 0, False
    if lo:  # the first record start in the range; what lies before it belongs to an earlier part
        start = _resume_point(fh, lo, gz, chunk=SCAN_CHUNK, limit=hi)[0]
        if start is None:
            return
    while True:
        fh.seek(start)
        records = iter(_archive_iterator(fh))
        error, got = None, 0
        while True:
            try:
                rec = next(records)
            except StopIteration:
                break
            except storage.ReadFailed:  # the remote file, not its content: read_warc names it
                raise
            except Exception as exc:  # fastwarc raises OSError/ValueError on bad headers and broken gzip
                error = shorten(f"{type(exc).__name__}: {exc}", 300)
                break
            pos = rec.stream_pos
            if hi is not None and pos >= hi:  # the next part's
                return
            if (lo or hi is not None) and pos <= last:  # not a member per record after all: the range is unsure
                yield bad(f"{path}:{pos}", "warc_invalid_record", "several records in one gzip member of a WARC "
                          "read in byte ranges: the rest of this range is not read (read the file whole: "
                          "--read-parts 1)")
                return
            n, got = n + 1, got + 1
            # a whole-file gzip stream reports the same compressed offset for several records
            source = f"{path}:{pos}" if pos > last else f"{path}:{pos}:record{n}"
            last = max(last, pos)
            try:
                item = warc_record(rec, source, max_bytes)
            except Exception as exc:  # a record whose headers or payload cannot be read
                item = bad(source, "warc_invalid_record", shorten(f"{type(exc).__name__}: {exc}", 500))
            last_failed = item.get("_reject", ("",))[0] == "warc_invalid_record"
            yield item
        if error is None:
            if n == 0 and not lo:
                yield bad(path, "warc_invalid_record", "no WARC record in the file")
            return
        begin = last + 1 if got else start  # the first byte that may hold what could not be read
        resume, skipped = _resume_point(fh, begin if got else begin + 1, gz)
        if resume is None:
            what = "no WARC record" if n == 0 else f"nothing readable after the record at byte {last}"
            yield bad(f"{path}:{begin}", "warc_invalid_record" if n == 0 else "warc_file_truncated",
                      f"{what} up to the end of the file ({error})")
            return
        if skipped or not last_failed:  # else the stretch is the rest of the record already rejected
            first = skipped[0] if skipped else begin
            yield bad(f"{path}:{first}", "warc_invalid_record",
                      f"bytes {first}-{resume} unreadable ({error}); reading resumed at byte {resume}")
        if hi is not None and resume >= hi:
            return
        start, last_failed = resume, False


HEAD_BYTES = (1 << 16, 1 << 18)  # read at a WARC's start to check its first member: first try, most
SCAN_CHUNK = 1 << 16  # a range looks for its first member start this many bytes at a time


def one_record_members(path: str) -> bool:
    """Whether the first gzip member of a .gz WARC holds exactly one record, as the WARC standard recommends and
    Common Crawl writes: then every member starts a record, and a byte offset finds one. A whole-file gzip stream,
    a member of several records, a damaged start, a first member longer than HEAD_BYTES: False (the file is then
    read whole). One ranged read of the file's start (a second, larger one when the first member does not end in
    it); a read that fails raises."""
    for size in HEAD_BYTES:
        d = zlib.decompressobj(31)
        head = storage.read_range(path, 0, size, *REMOTE_RETRY)
        try:
            out = d.decompress(head, 1 << 22)
        except zlib.error:
            return False
        if d.eof or len(head) < size:
            break
    end = out.find(b"\r\n\r\n")
    length = _CONTENT_LENGTH.search(out[:end]) if end >= 0 else None
    if not d.eof or not out.startswith(b"WARC/") or length is None:
        return False
    return len(out) - (end + 4 + int(length.group(1))) in range(0, 65)  # the block, its CRLF CRLF, nothing more


_CONTENT_LENGTH = re.compile(rb"(?im)^content-length:[ \t]*(\d+)")


def _archive_iterator(fh):
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    return ArchiveIterator(fh, parse_http=True, record_types=WarcRecordType.any_type)


_GZIP_MAGIC = b"\x1f\x8b\x08"
_WARC_LINE = b"\nWARC/1."


def _resume_point(fh, offset: int, gz: bool, chunk: int = 1 << 20,
                  limit: int | None = None) -> tuple[int | None, list[int]]:
    """The first record start at or after `offset` (and before `limit`) where a record parses, and the candidate
    starts passed over on the way (broken gzip members, damaged headers). Scans the file in chunks, never whole."""
    marker = _GZIP_MAGIC if gz else _WARC_LINE
    skip = 0 if gz else 1  # a WARC line starts after its newline
    skipped: list[int] = []
    pos = max(offset - skip, 0)
    while True:
        fh.seek(pos)
        data = fh.read(chunk + len(marker))
        at = data.find(marker)
        if at < 0:
            if len(data) <= len(marker) or (limit is not None and pos + chunk >= limit):
                return None, skipped
            pos += chunk
            continue
        candidate = pos + at + skip
        if limit is not None and candidate >= limit:
            return None, skipped
        if _parses_at(fh, candidate):
            return candidate, skipped
        skipped.append(candidate)
        pos += at + 1


def _parses_at(fh, offset: int) -> bool:
    fh.seek(offset)
    try:
        next(iter(_archive_iterator(fh)))
        return True
    except Exception:  # StopIteration included: nothing parses here
        return False


def warc_record(rec, source: str, max_bytes: int) -> dict:
    """One fastwarc record -> a page record or a bad marker. Only response bodies are read, at most
    max_bytes + 1 bytes of them; a payload declared larger is refused before reading."""
    from fastwarc.warc import WarcRecordType

    if rec.record_type != WarcRecordType.response or not rec.is_http:
        return bad(source, "warc_not_response", str(rec.record_type).split(".")[-1])
    expected = rec.content_length
    if expected > max_bytes:
        return bad(source, "too_large", f"payload of {expected} bytes over {max_bytes}")
    body = rec.reader.read(max_bytes + 1)
    if len(body) > max_bytes:
        return bad(source, "too_large", f"payload over {max_bytes} bytes")
    if len(body) < expected:
        return bad(source, "warc_file_truncated", f"record holds {len(body)} payload bytes of {expected}")
    h = rec.headers
    body = unwrap_http(body, rec.http_headers, max_bytes)
    if isinstance(body, tuple):
        return bad(source, *body)
    return {"source": source, "url": h.get("WARC-Target-URI", "").strip("<> ") or None,
            "warc_record_id": h.get("WARC-Record-ID"), "crawl_date": h.get("WARC-Date"),
            "status": rec.http_headers.status_code, "content_type": rec.http_content_type or "",
            "charset": rec.http_charset, "payload": body,
            "robots_tags": list(rec.http_headers.get_multiple("X-Robots-Tag") or ())}  # page's own directives


def dechunk(body: bytes) -> bytes:
    """Undo HTTP chunked transfer encoding (a body that is not chunked is returned as it is)."""
    out, pos = bytearray(), 0
    while pos < len(body):
        end = body.find(b"\r\n", pos)
        if end < 0:
            return body
        try:
            size = int(body[pos:end].split(b";")[0].strip() or b"x", 16)
        except ValueError:
            return body  # declared chunked but is not (common in crawls)
        if size == 0:
            break
        out += body[end + 2:end + 2 + size]
        pos = end + 2 + size + 2
    return bytes(out)


def unwrap_http(body: bytes, headers, max_bytes: int):
    """Undo chunked transfer and gzip/deflate content encoding; (reason, detail) on failure."""
    te = (headers.get("Transfer-Encoding") or "").lower()
    if "chunked" in te:
        body = dechunk(body)
    ce = (headers.get("Content-Encoding") or "").lower().strip()
    if ce in ("gzip", "x-gzip", "deflate") or (not ce and body[:2] == b"\x1f\x8b"):
        import zlib

        wbits = 31 if body[:2] == b"\x1f\x8b" else (15 if ce == "deflate" else 31)
        try:
            d = zlib.decompressobj(wbits)
            out = d.decompress(body, max_bytes + 1)
        except zlib.error as exc:
            return "decode_failed", f"content encoding {ce or 'gzip'}: {exc}"
        if len(out) > max_bytes:
            return "too_large", f"decompressed payload over {max_bytes} bytes"
        body = out
    elif ce and ce != "identity":
        return "decode_failed", f"unsupported content encoding {ce}"
    return body


_CONTROL_BYTES = bytes(b for b in range(32) if b < 9 or b > 13)
_NOT_CONTROL = bytes(b for b in range(256) if b not in _CONTROL_BYTES)


_UNKNOWN = object()  # utf16_order(raw) not yet computed by the caller


def looks_binary(raw: bytes, order=_UNKNOWN) -> bool:
    """Image/archive magic, or more than 5% control characters in the first 4 KiB (UTF-16 text decoded first).
    `order`: utf16_order(raw), when the caller has it."""
    head = raw[:4096]
    if not head:
        return False
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"%PDF", b"PK\x03\x04", b"\x1f\x8b")):
        return True
    if order is _UNKNOWN:
        order = utf16_order(raw)
    if order:
        text = head[: len(head) // 2 * 2].decode(order, "replace").lstrip("\ufeff")
        controls = sum(1 for c in text if c < "\t" or "\r" < c < " ")
        return controls > 0.05 * len(text)
    return len(head.translate(None, _NOT_CONTROL)) > 0.05 * len(head)


def decode_page(rec: dict):
    """Page record -> {..., "html": str} with the payload checked, or a Reject."""
    if rec.get("status") != 200:
        return Reject("http_error_status", f"status {rec.get('status')}")
    ctype = (rec.get("content_type") or "").split(";")[0].strip().lower()
    if ctype and ctype not in HTML_TYPES:
        return Reject("not_html", f"content type {ctype}")
    raw = rec["payload"]
    if not raw.strip():
        return Reject("extraction_empty", "empty payload")
    order = utf16_order(raw)
    if looks_binary(raw, order):
        return Reject("binary_payload", f"labelled {ctype or 'html'} but holds binary bytes")
    text = decode_bytes(raw, rec.get("charset"), order)
    if isinstance(text, Reject):
        return text
    out = {k: v for k, v in rec.items() if k not in ("payload", "status", "content_type", "charset")}
    out["html"] = text
    return out


# Labels the web means differently from Python's codec of that name (WHATWG Encoding Standard), or Python lacks.
_LABEL_ALIASES = {"iso8859-1": "cp1252", "ascii": "cp1252", "iso8859-9": "cp1254", "iso8859-11": "cp874",
                  "tis-620": "cp874", "gb2312": "gbk", "euc_kr": "cp949", "ks_c_5601-1987": "cp949",
                  "shift_jis": "cp932", "x-sjis": "cp932", "windows-31j": "cp932", "unicode": "utf-16-le",
                  "ucs-2": "utf-16-le", "x-user-defined": "cp1252"}
_WIDE = ("utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le", "utf-32-be")
_SEVEN_BIT = ("iso2022_jp", "iso2022_jp_2", "iso2022_kr", "utf-7", "hz")  # ASCII bytes that mean other text
_BOMS = ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe\x00\x00", "utf-32"), (b"\x00\x00\xfe\xff", "utf-32"),
         (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16"))
_XML_ENCODING = re.compile(rb"""^\s*<\?xml[^>]+encoding\s*=\s*["']([a-zA-Z0-9_\-:.]+)""")
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes surrogateescape could not decode as UTF-8
_NON_ASCII = re.compile("[^\x00-\x7f]")
# windows-1252 for each byte; its five undefined bytes (0x81, 0x8d, 0x8f, 0x90, 0x9d) as latin-1, as browsers do
_CP1252 = [bytes([b]).decode("cp1252", "ignore") or chr(b) for b in range(256)]


def _cp1252_bytes(exc):
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    return "".join(_CP1252[b] for b in exc.object[exc.start:exc.end]), exc.end


codecs.register_error("mmcorpus-cp1252", _cp1252_bytes)


def codec_of(label) -> str | None:
    """A charset label (HTTP, <meta>, XML) -> the Python codec the web means by it; None when unknown."""
    if not label:
        return None
    label = label.strip().strip("\"'").lower()
    try:
        name = codecs.lookup(label).name
    except (LookupError, ValueError):
        return _LABEL_ALIASES.get(label)
    return _LABEL_ALIASES.get(name, name)


def utf16_order(raw: bytes) -> str | None:
    """"utf-16-le"/"utf-16-be" when the bytes look like UTF-16 (HTML markup is ASCII: every other byte NUL)."""
    head = raw[:4096]
    if raw.startswith(b"\xff\xfe") and not raw.startswith(b"\xff\xfe\x00\x00"):
        return "utf-16-le"
    if raw.startswith(b"\xfe\xff"):
        return "utf-16-be"
    pairs = len(head) // 2
    if pairs < 8:
        return None
    even, odd = head[0:pairs * 2:2].count(0), head[1:pairs * 2:2].count(0)
    if odd > 0.3 * pairs and even < 0.05 * pairs:
        return "utf-16-le"
    if even > 0.3 * pairs and odd < 0.05 * pairs:
        return "utf-16-be"
    return None


def _mostly_utf8(raw: bytes) -> bool:
    """UTF-8 with a few stray legacy bytes (pages pasted together from two charsets): valid multi-byte
    characters outnumber the undecodable bytes. Legacy single-byte text is almost never valid UTF-8."""
    text = raw.decode("utf-8", "surrogateescape")
    invalid = len(_ESCAPED.findall(text))
    return len(_NON_ASCII.findall(text)) - invalid > 2 * invalid


def decode_bytes(raw: bytes, declared: str | None, order=_UNKNOWN) -> str | Reject:
    """Page bytes -> text. Order: a byte-order mark; UTF-16 when the bytes are laid out so (a UTF-16/32 label
    on bytes that are not is ignored);
    a declared 7-bit encoding (ISO-2022, UTF-7); valid UTF-8 (whatever the labels say: legacy text with
    non-ASCII bytes is practically never valid UTF-8, while servers labelling UTF-8 pages ISO-8859-1 are
    common); mostly-UTF-8 with stray windows-1252 bytes; the labels (HTTP charset, then <meta charset>, then
    <?xml encoding>) that decode the bytes; charset_normalizer detection. `order`: utf16_order(raw), when the
    caller has it."""
    for bom, enc in _BOMS:
        if raw.startswith(bom):
            return raw.decode(enc, "replace")
    if order is _UNKNOWN:
        order = utf16_order(raw)
    if order:  # labelled or not: ASCII markup with every other byte NUL is UTF-16
        return raw.decode(order, "replace")
    head = raw[:65536]  # pages put <meta charset> after long inline scripts (one bundled page at 58 kB)
    m = _META_CHARSET.search(head)
    x = _XML_ENCODING.search(head)
    labels = list(dict.fromkeys(c for c in (codec_of(declared), codec_of(m and m.group(1).decode("ascii")),
                                             codec_of(x and x.group(1).decode("ascii"))) if c))
    labels = [c for c in labels if c not in _WIDE]  # a UTF-16/32 claim the bytes do not fit
    seven_bit = [c for c in labels[:1] if c in _SEVEN_BIT]
    if b"\x1b$" in head:  # ISO-2022 escape sequences, labelled or not
        seven_bit += ["iso2022_jp", "iso2022_kr"]
    for enc in seven_bit:
        try:
            return raw.decode(enc)
        except UnicodeDecodeError:
            continue
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    if _mostly_utf8(raw):
        return raw.decode("utf-8", "mmcorpus-cp1252")
    for enc in labels:
        try:
            return raw.decode(enc, "mmcorpus-cp1252" if enc == "cp1252" else "strict")
        except (LookupError, UnicodeDecodeError):
            continue
    return detect_and_decode(raw, labels)


def detect_and_decode(raw: bytes, tried: list[str]) -> str | Reject:
    from charset_normalizer import from_bytes

    results = from_bytes(raw[:200_000])
    best = results.best()
    if best is not None:
        # windows-1252 is the web's most common legacy charset; prefer it when it reads as cleanly as the best
        western = [r for r in results if r.encoding in ("cp1252", "latin_1", "iso8859_15")]
        if western and western[0].chaos <= best.chaos + 0.01 and western[0].coherence >= best.coherence - 0.05:
            best = western[0]
    if best is None:
        return Reject("decode_failed", f"no charset decodes the bytes (tried {tried or 'detection'})")
    enc = "cp1252" if best.encoding == "latin_1" else best.encoding
    try:
        return raw.decode(enc, "mmcorpus-cp1252" if enc == "cp1252" else "replace")
    except LookupError:
        return Reject("decode_failed", f"detected charset {best.encoding} unknown")


# a .gz WARC is read in byte ranges of this size, each its own task: a worker holds one range's pages at a time
# (the DaskRunner keeps a step's output for a whole partition as one list), not a whole file's
PART_BYTES = 4 << 20


class Part(NamedTuple):
    """One read task of a work item: its records i with i % n == k (a WARC cut into `n` interleaved parts, each
    read through), or, with `hi` set, the records whose gzip member starts in bytes [lo, hi) (the last range of
    a file: hi = -1, to its end)."""

    item: tuple
    k: int = 0
    n: int = 1
    lo: int = 0
    hi: int | None = None


def _gz_warc(item: tuple) -> bool:
    return item[0] == "warc" and item[1].lower().endswith(".gz")


def _each(fn, paths: list[str], threads: int = 16) -> dict:
    """fn(path) for each of `paths` (remote ones asked in parallel); None where it raises (the file's own read
    names the problem)."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(path):
        try:
            return fn(path)
        except Exception:  # noqa: BLE001
            return None

    paths = sorted(set(paths))
    with ThreadPoolExecutor(max(1, min(threads, len(paths)))) as pool:
        return dict(zip(paths, pool.map(ask, paths)))


def file_sizes(paths: list[str]) -> dict[str, int | None]:
    """Bytes of each file; None where that fails."""
    return _each(lambda path: storage.info(path)["bytes"], paths)


def ranged_sizes(items: list[tuple], sizes: dict[str, int | None], part_bytes: int) -> dict[str, int]:
    """Sizes of the WARCs to read in byte ranges of `part_bytes`: .gz ones larger than that with a gzip member per
    record (`one_record_members`, asked once per file here, so every range of a file is read the same way). A
    file whose check fails is read whole, by one task."""
    paths = [item[1] for item in items if part_bytes and _gz_warc(item) and (sizes.get(item[1]) or 0) > part_bytes]
    return {path: sizes[path] for path, ok in _each(one_record_members, paths).items() if ok}


def line_count(path: str, chunk: int = 1 << 20) -> int:
    """Lines of a text file (a URL list), read in chunks; 0 when it cannot be read (its read names the problem)."""
    try:
        with storage.open(path, "rb") as f:
            n, last = 0, b"\n"
            while data := f.read(chunk):
                n, last = n + data.count(b"\n"), data[-1:]
        return n + (last != b"\n")
    except Exception:  # noqa: BLE001
        return 0


def sized_items(items: list[tuple]) -> list[str]:
    """The paths whose size plans the run: the WARCs (byte ranges, output shards)."""
    return [item[1] for item in items if item[0] == "warc"]


def split_items(items: list[tuple], parts: int, part_bytes: int = 0,
                sizes: dict[str, int | None] | None = None) -> list[Part]:
    """Work items -> read tasks. With `part_bytes`, a .gz WARC in `sizes` (`ranged_sizes`) is cut into byte ranges
    of that size (`warc_records`: each range read from its own offset) and any other .gz WARC is one task; other
    WARCs are cut into `parts` interleaved parts (record i goes to part i % parts), so one big file spreads over
    every worker; other items stay whole."""
    out: list[Part] = []
    for item in items:
        ranged = bool(part_bytes) and _gz_warc(item)  # a .gz WARC not in `sizes` is one task
        size = (sizes or {}).get(item[1]) if ranged else None
        if size:
            starts = range(0, size, part_bytes)
            out += [Part(item, lo=lo, hi=lo + part_bytes if lo + part_bytes < size else -1) for lo in starts]
        elif item[0] == "warc" and parts > 1 and not ranged:
            out += [Part(item, k, parts) for k in range(parts)]
        else:
            out.append(Part(item))
    return [Part(p.item) if p.hi == -1 and p.lo == 0 else p for p in out]


def read_part(part: Part, max_bytes: int = 5_000_000, urls: dict[str, str] | None = None):
    """The records of one read task (see `Part`). Interleaved parts each read the file through (the reader's
    resynchronisation after damage stays exactly as for a whole file) and yield every n-th item; byte ranges
    read from their offset. Either way the parts together yield each record and bad marker once."""
    part = Part(*part)
    if part.hi is not None:
        yield from read_warc(part.item[1], max_bytes, part.lo, None if part.hi == -1 else part.hi)
        return
    for i, rec in enumerate(read_items(part.item, max_bytes, urls)):
        if i % part.n == part.k:
            yield rec


def task_batches(tasks: list[Part], html_per_batch: int = 256) -> list[list[Part]]:
    """Read tasks as the pipeline's work elements: each WARC part on its own, HTML files `html_per_batch` at a
    time (on the Dask runner each element is its own partition)."""
    html = [t for t in tasks if t.item[0] == "html"]
    return [[t] for t in tasks if t.item[0] != "html"] + [html[i:i + html_per_batch]
                                                           for i in range(0, len(html), html_per_batch)]


def read_batch(batch: list[Part], max_bytes: int = 5_000_000, urls: dict[str, str] | None = None):
    """The records of a `task_batches` element."""
    for part in batch:
        yield from read_part(part, max_bytes, urls)

