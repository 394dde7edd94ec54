"""Input sources for `mmcorpus interleaved`: WARC files (plain or gzip) and folders of .html/.html.gz pages.

`expand_sources` turns SOURCE arguments (files, folders, globs) into (kind, path) work items; `read_items`
streams one file (never whole into memory for WARCs) and yields page records
`{"source", "url", "warc_record_id", "crawl_date", "html"}` or bad-record markers `{"source", "_reject": (reason,
detail)}` that the `read` stage turns into reject rows. Payload checks (status, content type, binary bytes,
size, charset) live in `decode_page`.
"""

from __future__ import annotations

import glob
import gzip
import os
import pathlib
import re

from filters.reasons import Reject
from pipelines.errors import UserError

HTML_SUFFIXES = (".html", ".htm", ".xhtml", ".html.gz", ".htm.gz", ".xhtml.gz")
HTML_TYPES = ("text/html", "application/xhtml+xml")
_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([a-zA-Z0-9_\-:.]+)""", re.I)


def _is_warc(path: str) -> bool:
    name = path.lower()
    return ".warc" in name or name.endswith((".arc", ".arc.gz"))


def expand_sources(sources: list[str]) -> list[tuple[str, str]]:
    """SOURCE arguments -> sorted [(kind, path)], kind 'warc' | 'html' | 'urls'. Missing inputs raise UserError."""
    items: list[tuple[str, str]] = []
    for src in sources:
        paths = sorted(glob.glob(src)) if any(c in src for c in "*?[") else [src]
        if not paths or not all(os.path.exists(p) for p in paths):
            raise UserError(f"input {src!r} does not exist")
        for p in paths:
            if os.path.isdir(p):
                for f in sorted(pathlib.Path(p).rglob("*")):
                    if not f.is_file():
                        continue
                    s = str(f)
                    if _is_warc(s):
                        items.append(("warc", s))
                    elif s.lower().endswith(HTML_SUFFIXES):
                        items.append(("html", s))
            elif _is_warc(p):
                items.append(("warc", p))
            elif p.lower().endswith((".txt", ".urls", ".lst")):
                items.append(("urls", p))
            else:
                items.append(("html", p))
    if not items:
        raise UserError(f"no WARC, HTML or URL-list files found in {', '.join(sources)}")
    return sorted(set(items))


def bad(source: str, reason: str, detail: str) -> dict:
    return {"source": source, "_reject": (reason, detail)}


def read_items(item: tuple[str, str], max_bytes: int = 5_000_000):
    """Yield page records / bad markers of one WARC or HTML work item (URL lists: pipelines.fetch)."""
    kind, path = item
    if kind == "warc":
        yield from read_warc(path, max_bytes)
    elif kind == "html":
        yield read_html_file(path, max_bytes)
    else:
        raise ValueError(f"read_items reads WARC and HTML items, not {kind!r} ({path})")


def read_html_file(path: str, max_bytes: int) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read(max_bytes + 1)
        if raw[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                raw = f.read(max_bytes + 1)
    except (OSError, EOFError) as exc:
        return bad(path, "read_failed", str(exc))
    if len(raw) > max_bytes:
        return bad(path, "too_large", f"more than {max_bytes} bytes")
    return {"source": path, "url": None, "warc_record_id": None, "crawl_date": None,
            "status": 200, "content_type": "text/html", "charset": None, "payload": raw}


def read_warc(path: str, max_bytes: int):
    from fastwarc.warc import ArchiveIterator, WarcRecordType

    try:
        fh = open(path, "rb")
    except OSError as exc:
        yield bad(path, "read_failed", str(exc))
        return
    n = 0
    with fh:
        try:
            for rec in ArchiveIterator(fh, parse_http=True, record_types=WarcRecordType.any_type):
                n += 1
                source = f"{path}:{rec.stream_pos}"
                if rec.record_type != WarcRecordType.response or not rec.is_http:
                    rec.reader.read()  # consume (bounded by the record)
                    yield bad(source, "warc_not_response", str(rec.record_type).split(".")[-1])
                    continue
                body = rec.reader.read(max_bytes + 1)
                if len(body) > max_bytes:
                    yield bad(source, "too_large", f"payload over {max_bytes} bytes")
                    continue
                expected = rec.content_length
                http_len = len(rec.http_headers.status_line or "") if rec.http_headers is not None else 0
                if expected and http_len and len(body) + http_len < expected - 4096 and not rec.reader.read(1):
                    yield bad(source, "warc_file_truncated", f"record holds {len(body)} payload bytes of {expected}")
                    continue
                h = rec.headers
                ctype = rec.http_content_type or ""
                body = unwrap_http(body, rec.http_headers, max_bytes)
                if isinstance(body, tuple):
                    yield bad(source, *body)
                    continue
                yield {"source": source, "url": h.get("WARC-Target-URI", "").strip("<> ") or None,
                       "warc_record_id": h.get("WARC-Record-ID"), "crawl_date": h.get("WARC-Date"),
                       "status": rec.http_headers.status_code, "content_type": ctype,
                       "charset": rec.http_charset, "payload": body}
        except Exception as exc:  # fastwarc raises OSError/ValueError on invalid headers and broken gzip
            reason = "warc_invalid_record" if n == 0 else "warc_file_truncated"
            yield bad(f"{path}:record{n}", reason, f"{type(exc).__name__}: {exc}"[:500])


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


def looks_binary(raw: bytes) -> bool:
    head = raw[:4096]
    if not head:
        return False
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"%PDF", b"PK\x03\x04", b"\x1f\x8b")):
        return True
    controls = sum(1 for b in head if b < 9 or 13 < b < 32)
    return controls / len(head) > 0.05


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
    if looks_binary(raw):
        return Reject("binary_payload", f"labelled {ctype or 'html'} but holds binary bytes")
    text = decode_bytes(raw, rec.get("charset"))
    if isinstance(text, Reject):
        return text
    out = {k: v for k, v in rec.items() if k not in ("payload", "status", "content_type", "charset")}
    out["html"] = text
    return out


def decode_bytes(raw: bytes, declared: str | None) -> str | Reject:
    """HTTP charset, then <meta charset>, then BOM, then charset_normalizer detection."""
    candidates = []
    if declared:
        candidates.append(declared)
    m = _META_CHARSET.search(raw[:4096])
    if m:
        candidates.append(m.group(1).decode("ascii", "ignore"))
    for bom, enc in ((b"\xef\xbb\xbf", "utf-8-sig"), (b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if raw.startswith(bom):
            candidates.insert(0, enc)
    for enc in candidates:
        try:
            return raw.decode(enc)
        except (LookupError, UnicodeDecodeError):
            continue
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        pass
    from charset_normalizer import from_bytes

    results = from_bytes(raw[:200_000])
    best = results.best()
    if best is not None:
        # windows-1252 is the web's most common legacy charset; prefer it when it reads as cleanly as the best
        western = [r for r in results if r.encoding in ("cp1252", "latin_1", "iso8859_15")]
        if western and western[0].chaos <= best.chaos + 0.01 and western[0].coherence >= best.coherence - 0.05:
            best = western[0]
    if best is None:
        return Reject("decode_failed", f"no charset decodes the bytes (tried {candidates or 'detection'})")
    try:
        return raw.decode(best.encoding, errors="replace")
    except LookupError:
        return Reject("decode_failed", f"detected charset {best.encoding} unknown")
