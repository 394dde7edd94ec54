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
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

MAX_LINE = 4096  # characters; a longer line is an error (a binary or wrongly formatted file)
_BAD_HOST_CHARS = set(" \t\r\n\\\"'<>{}|^`%/?#@")


class ListError(ValueError):
    """A list line that cannot be read; the message names the list and the line."""


def normalise_host(host: str) -> str | None:
    """Lowercased, IDNA (punycode) host without trailing dot; None when it is not a valid host name."""
    host = host.strip().rstrip(".").lower()
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


def split_target(url: str) -> tuple[str, str] | None:
    """(normalised host, path[?query]) of an absolute URL, or of `host/path` without scheme; None if malformed.
    Credentials and port are dropped; the path is percent-decoded so `%2F`-style spellings match."""
    url = url.strip()
    if "://" not in url:
        url = "http://" + url.lstrip("/")
    try:
        parts = urlsplit(url)
        hostname = parts.hostname  # drops user:password@ and :port; raises on a malformed port or bracket
        parts.port  # noqa: B018
    except ValueError:
        return None
    host = normalise_host(hostname or "")
    if host is None:
        return None
    path = unquote(parts.path) or "/"
    return host, path + ("?" + parts.query if parts.query else "")


def host_suffixes(host: str) -> list[str]:
    """`a.b.example.com` -> [a.b.example.com, b.example.com, example.com, com] (an IP address: itself)."""
    if host.replace(".", "").isdigit() or ":" in host:
        return [host]
    labels = host.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]


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
        if target is None:
            return None
        host, path = target
        for h in host_suffixes(host):
            if h in self.domains:
                return h
        if self.prefixes:
            prefixes = path_prefixes(path)
            for h in host_suffixes(host):
                for p in prefixes:
                    if h + p in self.prefixes:
                        return h + p
        return None


def parse_list(name: str, lines: Iterable[str]) -> UrlList:
    """A UrlList from the lines of file `name`; ListError naming the first bad line."""
    out = UrlList(name)
    for number, line in enumerate(lines, 1):
        out.add_line(line, number)
    return out


def first_match(lists: Iterable[UrlList], url: str) -> tuple[str, str] | None:
    """(list name, entry) of the first list `url` falls under, or None."""
    for lst in lists:
        hit = lst.match(url)
        if hit is not None:
            return lst.name, hit
    return None
