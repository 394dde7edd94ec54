"""Pure URL rules for fetching pages: allowed schemes, refused address ranges, redirect bookkeeping."""

from __future__ import annotations

import ipaddress
from urllib.parse import urlsplit

ALLOWED_SCHEMES = ("http", "https")


def address_refusal(address: str) -> str | None:
    """Why an IP address is refused (private, loopback, link-local, reserved, multicast), or None."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return f"{address} is not an IP address"
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    for name in ("loopback", "private", "link_local", "reserved", "multicast", "unspecified"):
        if getattr(ip, f"is_{name}"):
            return f"{address} is a {name.replace('_', '-')} address"
    return None


def scheme_refusal(url: str) -> str | None:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        return f"unparseable URL: {exc}"
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        return f"scheme {parts.scheme or '(none)'!r} is not http(s)"
    if not parts.hostname:
        return "URL has no host"
    return None


def url_refusal(url: str, addresses: list[str], allow_private: bool = False) -> str | None:
    """Refusal for a URL whose host resolved to `addresses` (empty: unresolvable), or None to fetch it."""
    why = scheme_refusal(url)
    if why or allow_private:
        return why
    for a in addresses:
        why = address_refusal(a)
        if why:
            return why
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
