"""pipelines/interleaved/sources.py on every bundled WARC (broken ones included), on damaged copies of real WARCs, and on
real pages whose bytes and charset labels disagree."""

from __future__ import annotations

import gzip
import pathlib
import re
from collections import Counter

import pytest
from fastwarc.warc import ArchiveIterator

from mmcorpus.pipelines.errors import UserError
from mmcorpus.pipelines.interleaved.sources import (Part, decode_bytes, decode_page, dechunk, expand_sources,
                                                    file_sizes, looks_binary, ranged_sizes, read_items, read_part,
                                                    split_items, warc_record)

WARC_DIRS = ("warcio-samples", "resiliparse-warcs", "cc-whirlwind", "dolma-cc-warc")


def outcomes(item, max_bytes=5_000_000):
    c = Counter()
    for rec in read_items(item, max_bytes):
        if "_reject" in rec:
            c[rec["_reject"][0]] += 1
        else:
            r = decode_page(rec)
            c["page" if isinstance(r, dict) else r.reason] += 1
            if isinstance(r, dict):
                assert r["html"].strip() and r["source"].startswith(item[1])
    return c


def rejects_of(path, reason):
    return [r for r in read_items(("warc", str(path))) if r.get("_reject", ("",))[0] == reason]


def headers_in(path) -> int:
    data = pathlib.Path(path).read_bytes()
    return data.count(b"\r\nWARC-Type:") + data.startswith(b"WARC-Type:")


def test_every_bundled_warc_reads_without_crashing(shared_data):
    items = expand_sources([str(pathlib.Path(shared_data) / d) for d in WARC_DIRS])
    warcs = {pathlib.Path(p).name: p for k, p in items if k == "warc"}
    assert len(warcs) >= 20
    per_file = {name: outcomes(("warc", p)) for name, p in warcs.items()}
    # plain (uncompressed) WARCs: every record header in the bytes is one outcome
    for name in ("example.warc", "example-digest.warc", "example-iana.org-chunked.warc"):
        assert sum(per_file[name].values()) == headers_in(warcs[name]), name
    # the broken files, each with the reason it deserves
    assert per_file["clipped.warc.gz"] == Counter({"warc_file_truncated": 1})
    # example-trunc.warc: the response's Content-Length is 2 bytes short of its block, so the next header does
    # not start where fastwarc looks; the stretch is one reject, and the request record after it is still read
    trunc = per_file["example-trunc.warc"]
    assert trunc == Counter({"warc_not_response": 3, "page": 1, "warc_invalid_record": 1})
    stretch = rejects_of(warcs["example-trunc.warc"], "warc_invalid_record")[0]
    assert "resumed at byte 2566" in stretch["_reject"][1]  # where the request record's WARC/1.0 line starts
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
    sources = [r["source"] for p in warcs.values() for r in read_items(("warc", p))]
    assert len(sources) == len(set(sources))  # whole-file gzip streams repeat offsets: ids stay unique


@pytest.fixture(scope="module")
def crawl(shared_data):
    """The real crawl WARC (one gzip member per record) and its member offsets."""
    path = shared_data / "resiliparse-warcs" / "warcfile.warc.gz"
    with open(path, "rb") as f:
        starts = [rec.stream_pos for rec in ArchiveIterator(f)]
    assert len(starts) == 50
    return path.read_bytes(), starts


def test_damaged_gzip_member_is_one_reject_and_reading_goes_on(crawl, tmp_path):
    data, starts = crawl
    k = 5  # the 6th record: a 104 kB response
    broken = bytearray(data)
    for i in range(starts[k] + 200, starts[k] + 260):
        broken[i] ^= 0x55  # flip bits inside the member's deflate data
    path = tmp_path / "damaged.warc.gz"
    path.write_bytes(broken)
    items = list(read_items(("warc", str(path))))
    assert len(items) == 50  # 49 records read + 1 reject for the broken member: none after it lost
    bad = [r for r in items if r.get("_reject", ("",))[0] == "warc_invalid_record"]
    assert len(bad) == 1 and bad[0]["source"] == f"{path}:{starts[k]}"
    assert f"resumed at byte {starts[k + 1]}" in bad[0]["_reject"][1]
    read = [int(r["source"].rsplit(":", 1)[1]) for r in items if r is not bad[0]]
    assert read == starts[:k] + starts[k + 1:]


def test_parts_of_a_damaged_warc_yield_every_item_once(crawl, tmp_path):
    """A WARC cut into interleaved parts (one per worker) yields, over its parts, exactly what reading it whole
    yields: records, the reject for a damaged member and the truncated end, each once."""
    data, starts = crawl
    broken = bytearray(data[: (starts[47] + starts[48]) // 2])  # cut end
    for i in range(starts[5] + 200, starts[5] + 260):
        broken[i] ^= 0x55  # a damaged member
    path = tmp_path / "damaged.warc.gz"
    path.write_bytes(broken)
    whole = [(r["source"], r.get("_reject")) for r in read_items(("warc", str(path)))]
    assert len(whole) == 48 and whole[-1][1][0] == "warc_file_truncated"
    items = [("warc", str(path)), ("html", str(tmp_path / "page.html"))]
    assert split_items(items, 3) == [Part(items[0], 0, 3), Part(items[0], 1, 3), Part(items[0], 2, 3), Part(items[1])]
    parts = [[(r["source"], r.get("_reject")) for r in read_part(item)] for item in split_items(items[:1], 3)]
    assert [len(p) for p in parts] == [16, 16, 16]
    assert sorted(sum(parts, [])) == sorted(whole)


def test_byte_ranges_of_a_warc_yield_every_item_once(crawl, tmp_path):
    """A .gz WARC read in byte ranges (each range the records whose gzip member starts in it) yields, over its
    ranges and at any range size, exactly what reading it whole yields: damaged members, junk between members
    and a cut end included. A whole-file gzip stream cannot be cut: it is one task reading it all."""
    data, starts = crawl
    damaged = bytearray(data[: (starts[47] + starts[48]) // 2])  # cut end
    for k in (3, 4, 30):  # two damaged members in a row, and one more
        for i in range(starts[k] + 200, starts[k] + 260):
            damaged[i] ^= 0x55
    junk = b"this is not a gzip member " * 4
    files = {"clean": data, "damaged": bytes(damaged), "junk": data[:starts[20]] + junk + data[starts[20]:],
             "whole_gzip": gzip.compress(gzip.decompress(data))}
    for name, blob in files.items():
        item = ("warc", str(tmp_path / f"{name}.warc.gz"))
        pathlib.Path(item[1]).write_bytes(blob)
        whole = sorted((r["source"], r.get("_reject")) for r in read_items(item))
        for size in (997, 20_011, 100_003, 10**7):
            tasks = split_items([item], 2, size, ranged_sizes([item], file_sizes([item[1]]), size))
            assert len(tasks) == (1 if name == "whole_gzip" else -(-len(blob) // size))
            got = [[(r["source"], r.get("_reject")) for r in read_part(t)] for t in tasks]
            assert sorted(sum(got, [])) == whole, (name, size)
            if name == "clean" and size == 100_003:  # every range reads its own records from its offset
                assert [len(g) for g in got] == [sum(lo <= s < lo + size for s in starts) for lo in range(0, len(blob), size)]
            if name == "whole_gzip":  # one task, from the file's start
                assert len(got) == 1 and len(got[0]) == 50 and tasks[0].hi is None
    assert split_items([("warc", "a.warc")], 2, 1000, {"a.warc": 5000}) == [Part(("warc", "a.warc"), 0, 2),
                                                                            Part(("warc", "a.warc"), 1, 2)]


def test_garbage_between_members_and_cut_end(crawl, tmp_path):
    data, starts = crawl
    junk = b"this is not a gzip member " * 4
    path = tmp_path / "junk.warc.gz"
    path.write_bytes(data[:starts[20]] + junk + data[starts[20]:])
    items = list(read_items(("warc", str(path))))
    assert len(items) == 51  # every record, plus one reject for the junk
    (bad,) = [r for r in items if "_reject" in r and r["_reject"][0] == "warc_invalid_record"]
    assert f"resumed at byte {starts[20] + len(junk)}" in bad["_reject"][1]
    # cut in the middle of the last response (record 47): the records before it are kept, the cut one is named
    cut = tmp_path / "cut.warc.gz"
    cut.write_bytes(data[: (starts[47] + starts[48]) // 2])
    items = list(read_items(("warc", str(cut))))
    assert [int(r["source"].rsplit(":", 1)[1]) for r in items] == starts[:48]
    assert items[-1]["_reject"][0] == "warc_file_truncated"


def test_damaged_header_in_plain_warc(shared_data, tmp_path):
    data = (shared_data / "warcio-samples" / "example.warc").read_bytes()
    at = data.index(b"WARC/1.0", 1)  # the second record
    path = tmp_path / "example-damaged.warc"
    path.write_bytes(data[:at] + b"WARX/1.0" + data[at + 8:])
    items = list(read_items(("warc", str(path))))
    bad = [r for r in items if r.get("_reject", ("",))[0] == "warc_invalid_record"]
    assert len(bad) == 1 and len(items) == headers_in(path)  # the damaged record is the one reject
    assert sum("_reject" not in r for r in items) == 1  # the response after it is still read


def test_bodies_not_read_unless_needed(shared_data):
    """Non-response records and responses declared over the limit are answered without reading their body."""
    path = shared_data / "resiliparse-warcs" / "warcfile.warc.gz"
    limit = 20_000
    seen = Counter()
    with open(path, "rb") as f:
        for rec in ArchiveIterator(f):
            item = warc_record(rec, "t", limit)
            reason = item["_reject"][0] if "_reject" in item else "page"
            seen[reason] += 1
            if reason in ("warc_not_response", "too_large"):
                assert rec.reader.tell() == 0, reason
            if reason == "too_large":
                assert rec.content_length > limit and f"payload of {rec.content_length} bytes" in item["_reject"][1]
            else:
                assert reason != "page" or len(item["payload"]) <= limit
    assert seen["too_large"] >= 5 and seen["page"] >= 3 and seen["warc_not_response"] == 34


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


def real_page(shared_data, name) -> bytes:
    return gzip.decompress((shared_data / "trafilatura-eval" / "pages" / f"{name}.gz").read_bytes())


MOJIBAKE = ("Ã", "Â", "\ufffd")


def test_utf8_page_labelled_latin1_by_the_server(shared_data):
    raw = real_page(shared_data, "0a12df42d1764095989ab078ee0f940b.html")  # zeit.de: UTF-8, <meta charset=utf-8>
    assert b'charset="utf-8"' in raw.lower() or b"charset=utf-8" in raw.lower()
    for label in ("ISO-8859-1", "windows-1252", "us-ascii"):
        text = decode_page(page(raw, charset=label))["html"]
        assert "Börsenhändler waren überrascht" in text and not any(m in text for m in MOJIBAKE), label


def test_mixed_page_utf8_with_stray_latin1_bytes(shared_data):
    # tierschutzpartei.de: declared and mostly UTF-8, but one alt text was pasted in as ISO-8859-1 bytes
    raw = real_page(shared_data, "tierschutzpartei.de-wildvogelauffang.html")
    assert b"Mitgef\xfchl w\xe4hlen" in raw and "Wildvögel".encode() in raw
    text = decode_page(page(raw))["html"]
    assert "Mitgefühl wählen" in text and "Wildvögel" in text
    assert not any(m in text for m in MOJIBAKE)


def test_cp1252_page_with_wrong_or_no_label(shared_data):
    raw = real_page(shared_data, "landwirt.com.sensortechnik.html")  # windows-1252 bytes, <meta iso-8859-1>
    for label in (None, "utf-16", "UTF-16LE", "utf-8"):
        text = decode_page(page(raw, charset=label))["html"]
        assert "Letzte Chance für Kuh und Kalb" in text and not any(m in text for m in MOJIBAKE), label
    even = real_page(shared_data, "nnz-online.de-Quantensprung.html")  # an even byte count decodes as UTF-16
    assert len(even) % 2 == 0
    assert "Login für Vote" in decode_page(page(even, charset="utf-16"))["html"]
    late = real_page(shared_data, "nmb-media.de.ebay.html")  # windows-1252, <meta> charset 58 kB into the page
    label = re.search(rb"<meta[^>]+charset=iso-8859-1\">", late)
    assert label.start() > 50_000
    assert "zwingend für Ihren Einkauf" in decode_page(page(late))["html"]
    unlabelled = late[:label.start()] + late[label.end():]  # the same bytes with no label: detected
    assert "zwingend für Ihren Einkauf" in decode_page(page(unlabelled))["html"]


def test_iso2022_page_without_label(shared_data):
    text = real_page(shared_data, "nhk.or.jp.k100.html").decode("utf-8")  # NHK, Japanese
    raw = text.replace('charset="utf-8"', "").replace("charset=utf-8", "").encode("iso2022_jp", "xmlcharrefreplace")
    assert max(raw) < 128  # 7-bit bytes: valid ASCII/UTF-8 too, but they mean Japanese
    assert decode_page(page(raw))["html"] == raw.decode("iso2022_jp")


def test_utf16_pages_are_text_not_binary(shared_data):
    text = real_page(shared_data, "0a12df42d1764095989ab078ee0f940b.html").decode("utf-8")
    for raw, label in ((text.encode("utf-16"), None), (text.encode("utf-16-le"), "utf-16"),
                       (text.encode("utf-16-be"), "UTF-16"), (text.encode("utf-16-le"), None)):
        assert not looks_binary(raw)
        assert decode_page(page(raw, charset=label))["html"].lstrip("\ufeff") == text
