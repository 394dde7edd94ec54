"""URL and domain lists (user opt-outs, Spawning-style "do not train" lists, UT1-style blocklists) and their
matching. Pure: the caller reads the file and hands its lines here.

A list holds one entry a line (`#` comments and blank lines skipped, a UTF-8 byte-order mark ignored):
  - a domain (`example.com`, `*.example.com`, `.example.com`, an IP address): the host and all its subdomains;
  - a URL or URL prefix, with or without scheme (`https://example.com/photos/`, `example.com/photos/cat.jpg`,
    UT1's `urls` files): that path and everything under it, at a `/` boundary (`/photos` covers `/photos`,
    `/photos/x.jpg` and `/photos?id=1`, not `/photos2`); a URL with a query matches only that query.
Hosts are compared lowercased, IDNA-encoded (`bücher.de` = `xn--bcher-kva.de`), without trailing dot, port or
credentials; the scheme is ignored. Matching costs a few set look-ups per URL (host labels x path segments),
whatever the list's size.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

MAX_LINE = 4096  # characters; a longer line is an error (a binary or wrongly formatted file)
_BAD_HOST_CHARS = set(" \t\r\n\\\"'<>{}|^`%/?#@")


class ListError(ValueError):
    """A list line that cannot be read; the message names the list and the line."""


_PLAIN_HOST = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,62}\.)*[a-z0-9_-]{0,63}")  # ASCII name, labels <= 63
_IP_LIKE = re.compile(r"[0-9.]+|.*:.*")


def normalise_host(host: str) -> str | None:
    """Lowercased, IDNA (punycode) host without trailing dot; None when it is not a valid host name."""
    host = host.strip().rstrip(".").lower()
    if _PLAIN_HOST.fullmatch(host) and not _IP_LIKE.fullmatch(host) and ".." not in host and len(host) <= 253:
        return host  # the common case, without the slower checks below
    if not host or any(c in _BAD_HOST_CHARS or ord(c) < 32 for c in host):
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host.isascii():
        try:
            host = host.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    labels = host.split(".")
    if any(not label or len(label) > 63 for label in labels) or len(host) > 253:
        return None
    return host


_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://")
_OTHER_SCHEME = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*:(?![0-9])")
_SIMPLE_AUTHORITY = re.compile(r"[^@/?#:\[\]\\]+(?::[0-9]{1,5})?")  # host[:port], no credentials or brackets


def split_target(url: str) -> tuple[str, str] | None:
    """(normalised host, path[?query]) of an absolute URL, or of `host/path` without scheme; None if malformed.
    Credentials and port are dropped; the path is percent-decoded so `%2F`-style spellings match."""
    url = url.strip()
    m = _SCHEME.match(url)
    if m is None and _OTHER_SCHEME.match(url):  # mailto:, data:, javascript: ... name no host
        return None
    rest = url[m.end():] if m else url.lstrip("/")
    end = len(rest)
    for ch in "/?#":
        i = rest.find(ch)
        if 0 <= i < end:
            end = i
    authority, tail = rest[:end], rest[end:]
    if _SIMPLE_AUTHORITY.fullmatch(authority):  # fast path: no credentials, brackets or odd characters
        hostname, _, port = authority.partition(":")
        if port and int(port) > 65535:
            return None
        path, _, query = tail.partition("#")[0].partition("?")
    else:
        try:
            parts = urlsplit("http://" + rest)
            hostname = parts.hostname  # drops user:password@ and :port; raises on a malformed port or bracket
            parts.port  # noqa: B018
        except ValueError:
            return None
        path, query = parts.path, parts.query
    host = normalise_host(hostname or "")
    if host is None:
        return None
    if "%" in path:
        path = unquote(path)
    return host, (path or "/") + ("?" + query if query else "")


def host_suffixes(host: str) -> list[str]:
    """`a.b.example.com` -> [a.b.example.com, b.example.com, example.com, com] (an IP address: itself)."""
    if ":" in host or host.replace(".", "").isdigit():
        return [host]
    out = [host]
    pos = host.find(".")
    while pos >= 0:
        out.append(host[pos + 1:])
        pos = host.find(".", pos + 1)
    return out


def path_prefixes(path: str) -> list[str]:
    """The prefixes of `path[?query]` an entry may name: every `/` boundary, the path, and path?query."""
    base, _, query = path.partition("?")
    out = []
    pos = base.find("/", 1)
    while pos > 0:
        out.append(base[:pos])
        pos = base.find("/", pos + 1)
    out.append(base)
    if query:
        out.append(path)
    return out


@dataclass
class UrlList:
    """Domains and URL prefixes of one list file. `name` (the file) is what reject details and stats cite."""

    name: str
    domains: set[str] = field(default_factory=set)
    prefixes: set[str] = field(default_factory=set)  # "host" + "/path" (no trailing slash but for "/")

    def __len__(self) -> int:
        return len(self.domains) + len(self.prefixes)

    def add_line(self, line: str, number: int) -> None:
        entry = line.strip()
        if number == 1:
            entry = entry.lstrip("\ufeff")
        if not entry or entry.startswith("#"):
            return
        if len(entry) > MAX_LINE:
            raise ListError(f"{self.name}, line {number}: entry of {len(entry):,} characters (max {MAX_LINE})")
        if any(ch.isspace() or ord(ch) < 32 for ch in entry):
            raise ListError(f"{self.name}, line {number}: {entry[:80]!r} holds whitespace or control characters "
                            "(one domain or URL a line)")
        bare = entry.split("://", 1)[1] if "://" in entry else entry
        if "/" not in bare and "?" not in bare:
            host = normalise_host(bare.removeprefix("*.").lstrip("."))
            if host is None:
                raise ListError(f"{self.name}, line {number}: {entry[:80]!r} is not a domain or URL")
            self.domains.add(host)
            return
        target = split_target(entry)
        if target is None:
            raise ListError(f"{self.name}, line {number}: {entry[:80]!r} is not a valid URL")
        host, path = target
        if path in ("/", ""):
            self.domains.add(host)
            return
        base, sep, query = path.partition("?")
        base = base.rstrip("/") or "/"
        self.prefixes.add(host + base + (sep + query if query else ""))

    def match(self, url: str) -> str | None:
        """The entry `url` falls under (a domain or a host/path prefix), or None. A URL that does not parse
        matches nothing here (the URL rules reject it)."""
        target = split_target(url) if isinstance(url, str) and url else None
        return None if target is None else self.match_target(host_suffixes(target[0]), target[1])

    def match_target(self, hosts: list[str], path: str, prefixes: list[str] | None = None) -> str | None:
        """`match` on a URL already split: its host suffixes, its path (and path prefixes, when known)."""
        for h in hosts:
            if h in self.domains:
                return h
        if self.prefixes:
            for p in prefixes if prefixes is not None else path_prefixes(path):
                for h in hosts:
                    if h + p in self.prefixes:
                        return h + p
        return None


def parse_list(name: str, lines: Iterable[str]) -> UrlList:
    """A UrlList from the lines of file `name`; ListError naming the first bad line."""
    out = UrlList(name)
    for number, line in enumerate(lines, 1):
        out.add_line(line, number)
    return out


def first_match(lists, url: str) -> tuple[str, str] | None:
    """(list name, entry) of the first list `url` falls under, or None. The URL is split once for all lists."""
    if not lists or not isinstance(url, str) or not url:
        return None
    target = split_target(url)
    if target is None:
        return None
    hosts = host_suffixes(target[0])
    prefixes = path_prefixes(target[1]) if any(lst.prefixes for lst in lists) else []
    for lst in lists:
        hit = lst.match_target(hosts, target[1], prefixes)
        if hit is not None:
            return lst.name, hit
    return None
