"""Loaded only by the img2dataset processes that mmcorpus starts (pipelines.images puts this folder first on
their PYTHONPATH, so the spawned download workers load it too). Every redirect img2dataset follows is checked
with the same URL rules as the first request (filters.urls.url_refusal): a public image URL cannot redirect the
download to a private, loopback or link-local address, or to a scheme other than http(s).

MMCORPUS_IMG_REDIRECTS=public refuses non-global addresses; =any allows them (--allow-private-network)."""

import os
import socket
import urllib.error
import urllib.request


def _addresses(host: str) -> list[str]:
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except (OSError, UnicodeError):
        return []


class _CheckedRedirects(urllib.request.HTTPRedirectHandler):
    allow_private = False

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        from filters.urls import url_refusal

        target = urllib.parse.urljoin(req.full_url, newurl)
        why = url_refusal(target, self.allow_private, _addresses)
        if why:
            raise urllib.error.HTTPError(target, code, f"redirect to {target} refused: {why}", headers, fp)
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _install(policy: str) -> None:
    handler = _CheckedRedirects()
    handler.allow_private = policy == "any"
    urllib.request.install_opener(urllib.request.build_opener(handler))


if os.environ.get("MMCORPUS_IMG_REDIRECTS") in ("public", "any"):
    import urllib.parse

    _install(os.environ["MMCORPUS_IMG_REDIRECTS"])
