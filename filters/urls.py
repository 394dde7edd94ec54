"""Pure URL rules for fetching pages: allowed schemes, refused address ranges, redirect bookkeeping."""

from __future__ import annotations

import ipaddress
from urllib.parse import SplitResult, urlsplit

ALLOWED_SCHEMES = ("http", "https")


def address_refusal(address: str) -> str | None:
    """Why an IP address is refused (anything not globally routable: private, loopback, link-local, shared,
    reserved; or multicast), or None. Raises ValueError when `address` is not an IP address."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    if not ip.is_global or ip.is_multicast:
        return f"address {ip} is private, loopback, link-local or reserved"
    return None


def split_url(url: str) -> tuple[SplitResult | None, str | None]:
    """(urlsplit parts, None), or (None, "malformed URL: ...") when the host or port cannot be parsed."""
    try:
        parts = urlsplit(url)
        parts.hostname, parts.port  # noqa: B018  (raise on a malformed host or port)
    except ValueError as exc:
        return None, f"malformed URL: {exc}"
    return parts, None


def url_refusal(url: str, allow_private: bool = False, resolve=None) -> str | None:
    """Why a URL is not fetched (None: fetch it): empty or with whitespace/control characters, malformed, not
    http(s), no host, or (unless `allow_private`) a host that is or resolves to a non-global address.
    `resolve(host) -> [addresses]` is the caller's name lookup (filters do no network I/O); without it only
    literal addresses and localhost names are checked."""
    if not url or any(ch.isspace() or ord(ch) < 32 for ch in url):
        return "empty URL or whitespace/control characters in URL"
    parts, malformed = split_url(url)
    if malformed:
        return malformed
    host = parts.hostname
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return f"scheme {parts.scheme or '(none)'!r} is not http(s)"
    if not host:
        return "URL has no host"
    if allow_private:
        return None
    if host == "localhost" or host.endswith(".localhost"):
        return f"host {host} is loopback"
    try:
        return address_refusal(host)
    except ValueError:
        pass  # a name, not an address
    for address in (resolve(host) if resolve else []):
        try:
            why = address_refusal(address)
        except ValueError:
            continue
        if why:
            return f"host {host} resolves to {why.removeprefix('address ')}"
    return None


def host_of(url: str) -> str:
    return (urlsplit(url).hostname or "").lower()


def redirect_problem(chain: list[str], max_redirects: int) -> str | None:
    """A redirect chain (URLs visited in order) that loops or is too long."""
    if len(chain) != len(set(chain)):
        return f"redirect loop: {' -> '.join(chain[-4:])}"
    if len(chain) - 1 > max_redirects:
        return f"more than {max_redirects} redirects"
    return None
