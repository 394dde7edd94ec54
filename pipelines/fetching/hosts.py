"""Host name lookups for the URL rules (filters.urls.url_refusal takes the lookup as an argument). Beam-free,
so the start-up hooks of child processes (child-site/sitecustomize.py) use it too."""

from __future__ import annotations

import socket


def resolve(host: str) -> list[str]:
    """Addresses of `host`; [] when it does not resolve (the request then fails with its own error)."""
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except (OSError, UnicodeError):
        return []


class HostResolver:
    """`resolve` with a per-instance cache (one lookup per host, not per URL), cleared past `limit` hosts."""

    def __init__(self, limit: int = 100_000):
        self.limit, self._hosts = limit, {}

    def __call__(self, host: str) -> list[str]:
        if host not in self._hosts:
            if len(self._hosts) > self.limit:
                self._hosts.clear()
            self._hosts[host] = resolve(host)
        return self._hosts[host]
