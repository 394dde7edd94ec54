"""pipelines/sources.py on every bundled WARC (broken ones included) and on payload edge cases."""

from __future__ import annotations

import gzip
import pathlib
import zlib
from collections import Counter

import pytest

from filters.reasons import Reject
from pipelines.errors import UserError
from pipelines.sources import decode_bytes, decode_page, dechunk, expand_sources, read_items

WARC_DIRS = ("warcio-samples", "resiliparse-warcs", "cc-whirlwind", "dolma-cc-warc")


def outcomes(item):
    c = Counter()
    for rec in read_items(item):
        if "_reject" in rec:
            c[rec["_reject"][0]] += 1
        else:
            r = decode_page(rec)
            c["page" if isinstance(r, dict) else r.reason] += 1
            if isinstance(r, dict):
                assert r["html"].strip() and r["source"].startswith(item[1])
    return c


def test_every_bundled_warc_reads_without_crashing(shared_data):
    items = expand_sources([str(pathlib.Path(shared_data) / d) for d in WARC_DIRS])
    warcs = [p for k, p in items if k == "warc"]
    assert len(warcs) >= 20
    per_file = {pathlib.Path(p).name: outcomes(("warc", p)) for p in warcs}
    # plain (uncompressed) WARCs: every record header in the bytes is one outcome
    for name in ("example.warc", "example-digest.warc", "example-iana.org-chunked.warc"):
        path = next(p for p in warcs if p.endswith("/" + name))
        assert sum(per_file[name].values()) == pathlib.Path(path).read_bytes().count(b"\r\nWARC-Type:") + \
            pathlib.Path(path).read_bytes().startswith(b"WARC-Type:"), name
    # the broken files, each with the reason it deserves
    assert per_file["clipped.warc.gz"]["warc_file_truncated"] == 1
    assert per_file["example-trunc.warc"]["warc_file_truncated"] == 1
    assert per_file["example-trunc.warc"]["page"] >= 1  # the records before the cut are kept
    for arc in ("bad.arc", "example.arc", "example.arc.gz", "example-space-in-url.arc"):
        assert per_file[arc] == Counter({"warc_invalid_record": 1}), arc
    assert per_file["example-bad.warc.gz.bad"]["http_error_status"] >= 1
    assert per_file["post-test.warc.gz"]["not_html"] == 3
    # gzip content encoding and chunked transfer are undone, not mistaken for binary
    assert per_file["example.warc.gz"]["page"] == 1 and per_file["example-iana.org-chunked.warc"]["page"] == 1
    total = Counter()
    for c in per_file.values():
        total.update(c)
    assert total["page"] >= 40 and total["warc_not_response"] >= 100
    assert "binary_payload" not in total


def test_html_folder_and_missing_input(shared_data, tmp_path):
    pages = pathlib.Path(shared_data) / "trafilatura-eval" / "pages"
    items = expand_sources([str(pages)])
    assert len(items) == 144 and {k for k, _ in items} == {"html"}
    rec = next(read_items(items[0]))
    assert rec["payload"].lstrip().startswith(b"<") and rec["url"] is None
    with pytest.raises(UserError, match="nope"):
        expand_sources([str(tmp_path / "nope")])
    (tmp_path / "big.html").write_bytes(b"<html>" + b"x" * 2000 + b"</html>")
    assert next(read_items(("html", str(tmp_path / "big.html")), max_bytes=1000))["_reject"][0] == "too_large"


def page(payload: bytes, **kw):
    return {"source": "t", "url": "http://e.org/", "status": 200, "content_type": "text/html", "charset": None,
            "payload": payload, **kw}


def test_payload_checks_and_charsets():
    latin = "<html><head><meta charset=iso-8859-1></head><body><p>Café crème brûlée à Noël</p></body></html>"
    assert "Café crème" in decode_page(page(latin.encode("latin-1")))["html"]
    no_decl = ("<html><body><p>" + "Les élèves étudient à l'école près de la forêt. " * 20 + "</p></body></html>")
    assert "élèves" in decode_page(page(no_decl.encode("cp1252")))["html"]  # detected
    assert "élèves" in decode_page(page(no_decl.encode("latin-1"), charset="latin-1"))["html"]  # HTTP header
    assert decode_page(page(b"\xef\xbb\xbf<p>bom \xc3\xa9</p>"))["html"] == "<p>bom é</p>"
    assert decode_page(page(b"<p>x</p>", status=404)).reason == "http_error_status"
    assert decode_page(page(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)).reason == "binary_payload"
    assert decode_page(page(b"{}", content_type="application/json")).reason == "not_html"
    assert dechunk(b"4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n") == b"Wikipedia"
    assert dechunk(b"<html>not chunked</html>") == b"<html>not chunked</html>"
    assert isinstance(decode_bytes(b"abc", "no-such-charset"), str)
