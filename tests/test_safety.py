"""Safety and opt-outs (issue 17): page directives, opt-out lists and blocklists, flagged image words, PII, the
NSFW head over CLIP embeddings. End to end on real pages from the bundled trafilatura evaluation set, edited to
carry each directive and PII kind and written into WARC records (X-Robots-Tag headers) here; list files are
written by the tests; the NSFW head has known weights over a tiny random CLIP."""

from __future__ import annotations

import gzip
import json
import pathlib

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from mmcorpus import schemas
from mmcorpus.filters.extract import extract
from mmcorpus.filters.pii import find_pii, mask_pii
from mmcorpus.filters.safety import Lists, NsfwHead, NsfwPolicy, flagged_in, image_reject, page_directives
from mmcorpus.filters.urllists import ListError, parse_list
from mmcorpus.pipelines.cli import main
from mmcorpus.pipelines.errors import UserError
from mmcorpus.pipelines.interleaved.sources import decode_bytes
from mmcorpus.pipelines.safety.nsfw import load_nsfw_head
from mmcorpus.pipelines.safety.stages import read_list

PAGES = "trafilatura-eval/pages"
EMAIL, IPV4, IPV6, PHONE = "anna.schmidt+news@Beispiel-Verlag.de", "203.0.113.57", "2001:db8:85a3::8a2e:370:7334", \
    "+49 (030) 5683 8000"


def real_page(shared_data, name: str) -> str:
    return decode_bytes(gzip.decompress((shared_data / PAGES / name).read_bytes()), None)


def with_meta(html: str, tag: str) -> str:
    """The page with `tag` inserted right after <head ...>."""
    at = html.lower().index("<head")
    at = html.index(">", at) + 1
    return html[:at] + tag + html[at:]


def warc(path: pathlib.Path, records: list[tuple[str, str, list[str]]]) -> pathlib.Path:
    """An uncompressed WARC of HTTP 200 responses (url, html, extra header lines)."""
    out = bytearray()
    for i, (url, html, headers) in enumerate(records):
        body = html.encode("utf-8")
        http = ("HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
                + "".join(h + "\r\n" for h in headers) + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
        head = (f"WARC/1.0\r\nWARC-Type: response\r\nWARC-Target-URI: {url}\r\nWARC-Date: 2026-12-01T00:00:00Z\r\n"
                f"WARC-Record-ID: <urn:uuid:00000000-0000-0000-0000-{i:012d}>\r\n"
                f"Content-Type: application/http; msgtype=response\r\nContent-Length: {len(http)}\r\n\r\n").encode()
        out += head + http + b"\r\n\r\n"
    path.write_bytes(bytes(out))
    return path


# ---- pure parts -----------------------------------------------------------------------------------------

def test_directives_in_meta_and_header_including_malformed():
    assert page_directives('<meta name="robots" content="noai, noimageai">') == {
        "noai": "meta name=robots", "noimageai": "meta name=robots"}
    assert page_directives("<META CONTENT='NoImageAI' NAME=Robots>") == {"noimageai": "meta name=robots"}
    assert page_directives('<meta content=noai name="ai"/>') == {"noai": "meta name=ai"}
    assert page_directives('<meta name="CCBot" content="noindex;noai">') == {"noai": "meta name=ccbot"}
    for html in ('<meta name="robots" content="noindex, nofollow">', '<meta name="robots" content>',
                 '<meta name="description" content="noai is a word here">', '<meta name="robots" content="no-ai">',
                 '<meta name="robots" content="noaix">', "<p>noai</p>", '<meta name="robots" content="noai',
                 "", None):
        assert page_directives(html) == {}, html
    assert page_directives("", ["otherbot: noimageai"]) == {"noimageai": "X-Robots-Tag"}
    assert page_directives("", ["noindex", "NOAI , noimageai"]) == {"noai": "X-Robots-Tag", "noimageai": "X-Robots-Tag"}
    assert page_directives("", [":::,,;", "unavailable_after: 25 Jun 2010 15:00:00 PST"]) == {}


def test_lists_match_subdomains_idn_case_credentials_ports_and_prefix_boundaries():
    lst = parse_list("optout.txt", ["\ufeff# user opt-outs", "", "Example.COM", "*.wild.test", ".dot.test",
                                    "BÜCHER.example", "https://photos.site.test/u/42/cat.jpg?size=large",
                                    "site.test/albums/", "http://[2001:db8::1]/x", "198.51.100.7"])
    assert len(lst) == 8
    hits = {
        "https://example.com/a": "example.com", "http://user:pw@WWW.Example.Com:8443/x?y=1": "example.com",
        "https://deep.sub.example.com.": "example.com", "https://a.wild.test/": "wild.test",
        "https://dot.test": "dot.test", "https://cdn.xn--bcher-kva.example/i.jpg": "xn--bcher-kva.example",
        "https://Bücher.Example/i.jpg": "xn--bcher-kva.example",
        "https://photos.site.test/u/42/cat.jpg?size=large": "photos.site.test/u/42/cat.jpg?size=large",
        "https://site.test/albums": "site.test/albums", "https://www.site.test/albums/2/x.jpg": "site.test/albums",
        "https://site.test/albums?page=2": "site.test/albums", "http://[2001:db8::1]:81/x/y": "2001:db8::1/x",
        "http://198.51.100.7:8080/": "198.51.100.7",
    }
    for url, entry in hits.items():
        assert lst.match(url) == entry, url
    for url in ("https://notexample.com/", "https://example.co/", "https://site.test/albums2/x.jpg",
                "https://photos.site.test/u/42/cat.jpg?size=small", "https://photos.site.test/u/42/cat.jpg",
                "https://site.test/", "http://[bad", "http://host:notaport/", "", "mailto:x@example.org"):
        assert lst.match(url) is None, url


def test_malformed_and_huge_list_files_name_the_line(tmp_path):
    with pytest.raises(ListError, match=r"bad\.txt, line 3: 'two words"):
        parse_list("bad.txt", ["ok.test", "# fine", "two words.test"])
    with pytest.raises(ListError, match="line 2: entry of 5,000 characters"):
        parse_list("huge.txt", ["ok.test", "a" * 5000])
    with pytest.raises(ListError, match="line 1: 'exa\\^mple.com' is not a domain"):
        parse_list("x.txt", ["exa^mple.com"])
    with pytest.raises(ListError, match="line 2: 'http://h:99999/p' is not a valid URL"):
        parse_list("x.txt", ["a.test", "http://h:99999/p"])
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"ok.test\nfine.test\n\xff\xfe\x00bad\n")
    with pytest.raises(UserError, match=r"binary\.txt.*not UTF-8 text near line 3"):
        read_list(str(binary))
    with pytest.raises(UserError, match="does not exist"):
        read_list(str(tmp_path / "missing.txt"))
    big = tmp_path / "big.txt"  # a large list (20k domains + prefixes; 1M: bench/bench_safety.py) reads and matches
    big.write_text("".join(f"host{i}.test\nsite{i}.test/p/{i}\n" for i in range(10_000)))
    lst = read_list(str(big))
    assert len(lst) == 20_000
    assert lst.match("https://a.host9999.test/x") == "host9999.test"
    assert lst.match("https://site7.test/p/7/img.jpg") == "site7.test/p/7" and lst.match("https://site7.test/p/8") is None


def test_image_decisions_and_flagged_words():
    lists = Lists(opt_out=(parse_list("o.txt", ["optout.test"]),), block=(parse_list("b.txt", ["bad.test/adult"]),))
    assert image_reject("https://x.optout.test/a.jpg", "", lists).reason == "opt_out_list"
    assert image_reject("https://bad.test/adult/a.jpg", "", lists).reason == "blocklist"
    assert image_reject("https://ok.test/a.jpg", "", lists, noimageai="X-Robots-Tag").reason == "opt_out_noimageai"
    assert image_reject("https://ok.test/hot-porn_2.jpg", "", lists).reason == "flagged_image_words"
    assert image_reject("https://ok.test/a.jpg", "Hot XXX pics", lists).reason == "flagged_image_words"
    assert image_reject("https://ok.test/a.jpg", "Hot XXX pics", lists, flagged_words=False) is None
    assert flagged_in("https://ok.test/sussex-pornic-beach.jpg", "Pornic, a town in France") is None  # whole words
    assert image_reject("https://ok.test/garden.jpg", "a garden", lists) is None


def test_doc_safety_copies_its_input_checks_a_page_url_once_and_screens_captions():
    import copy

    from mmcorpus.pipelines.safety.stages import DocSafety, SafetySpec, screen_caption

    lists = Lists(opt_out=(parse_list("o.txt", ["optout.test"]),))
    stage = DocSafety(SafetySpec(), lists)
    doc = {"url": "https://www.optout.test/a", "_record_url": "https://www.optout.test/a", "_noimageai": None,
           "source": "x.warc:0", "texts": [f"mail {EMAIL}", None], "images": [None, "https://ok.test/g.jpg"],
           "image_info": [None, {"alt": f"call {PHONE}"}], "metadata": {}}
    before = copy.deepcopy(doc)
    out = stage(doc)
    assert doc == before  # the Beam element is not changed; the stage returns a copy
    kept = out[0]  # the record's own URL was opt_out's to check: not a second time here
    assert kept["texts"][0] == "mail [EMAIL]" and kept["image_info"][1]["alt"] == "call [PHONE]"
    assert "_record_url" not in kept and "_noimageai" not in kept
    canonical = dict(before, _record_url=None)  # a URL only extraction found (the page's canonical one) is checked
    assert stage(canonical).reason == "opt_out_list"
    noimageai = stage(dict(before, _noimageai="X-Robots-Tag"))
    assert noimageai[0]["images"] == [None] and doc == before
    assert screen_caption("a porn cat", SafetySpec()).reason == "flagged_image_words"
    assert screen_caption("a porn cat", SafetySpec(flagged_image_words=False)) == ("a porn cat", {})
    assert screen_caption(f"call {PHONE}", SafetySpec()) == ("call [PHONE]", {"phone": 1})
    assert screen_caption(f"call {PHONE}", SafetySpec(pii="reject")).detail == "1 phone"
    assert screen_caption(f"call {PHONE}", SafetySpec(pii="off")) == (f"call {PHONE}", {})


def test_pii_on_real_text_is_masked_and_ordinary_numbers_stay(shared_data):
    texts, *_ = extract(real_page(shared_data, "tour-magazin.de-unfall.html.gz"), "https://www.tour-magazin.de/x")
    text = "\n".join(t for t in texts if t)
    assert find_pii(text) == []  # a real article's dates, times, scores and prices are not PII
    planted = (f"{text}\nKontakt: {EMAIL} oder {PHONE}. Server {IPV4} und {IPV6}. Fax 0345 122 99 84.\n"
               "Stand 16.10.2019 18:15 Uhr, ISBN 978-3-16-148410-0, doi:10.1109/5.771073, Version 1.2.3.4.5")
    masked, counts = mask_pii(planted)
    assert counts == {"email": 1, "phone": 2, "ip": 2}
    for value in (EMAIL, PHONE, IPV4, IPV6, "0345 122 99 84"):
        assert value not in masked
    assert masked.startswith(text) and "16.10.2019 18:15" in masked and "978-3-16-148410-0" in masked
    assert "[EMAIL] oder [PHONE]. Server [IP_ADDRESS] und [IP_ADDRESS]." in masked


def test_nsfw_head_policy_and_weight_files(tmp_path):
    w1 = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], np.float32)
    head = NsfwHead([(w1, np.zeros(3, np.float32)), (np.array([[2.0, -2.0, 0.0]], np.float32), np.zeros(1, np.float32))])
    s = head.scores(np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]))
    np.testing.assert_allclose(s, 1 / (1 + np.exp(-np.array([2.0, -2.0, 0.0]))), rtol=1e-6)  # ReLU zeroes -1
    policy = NsfwPolicy(image_threshold=0.8, document_threshold=0.6)
    assert policy.image(0.85).reason == "nsfw_image" and policy.image(0.8) is None
    assert policy.document([0.1, 0.7]).reason == "nsfw_document" and policy.document([0.1, 0.5]) is None
    with pytest.raises(ValueError, match="not in"):
        NsfwPolicy(image_threshold=1.5)
    seq = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    torch.save(seq.state_dict(), tmp_path / "head.pt")
    loaded, where = load_nsfw_head(str(tmp_path / "head.pt"), False, 2)
    x = torch.randn(5, 2)
    np.testing.assert_allclose(loaded.scores(x.numpy()), torch.sigmoid(seq(x))[:, 0].detach().numpy(), rtol=1e-5)
    np.savez(tmp_path / "head.npz", weight_0=w1, bias_0=np.zeros(3), weight_1=np.ones((1, 3)), bias_1=np.zeros(1))
    assert load_nsfw_head(str(tmp_path / "head.npz"), False, 2)[0].input_dim == 2
    with pytest.raises(UserError, match="takes 2-dimensional embeddings; the CLIP model gives 32"):
        load_nsfw_head(str(tmp_path / "head.pt"), False, 32)
    (tmp_path / "junk.pt").write_bytes(b"not a state dict")
    with pytest.raises(UserError, match="junk.pt.*not an MLP state dict"):
        load_nsfw_head(str(tmp_path / "junk.pt"), False, 2)
    with pytest.raises(UserError, match="needs --allow-random-weights"):
        load_nsfw_head("random", False, 2)
    assert load_nsfw_head(None, True, 2) == (None, "none")
    # interleaved: the policy on a document whose images carry scores (one could not be scored)
    from mmcorpus.pipelines.safety.nsfw import DocNsfw, distinct_images

    urls = ["https://x.test/a.jpg", "https://x.test/b.jpg", "https://x.test/c.jpg"]
    doc = {"doc_id": "d", "source": "s", "texts": ["t0", None, "t1", None, None],
           "images": [None, urls[0], None, urls[1], urls[2]], "metadata": {"declared_sizes": {u: [9, 9] for u in urls}},
           "image_info": [None, {"nsfw_score": 0.2}, None, {"nsfw_score": 0.9}, {"nsfw_score": None}],
           "_nsfw_unscored": {urls[2]: ("image_decode_failed", "CLIP preprocess: broken")}}
    kept, *events = DocNsfw(NsfwPolicy(image_threshold=0.8))(doc)
    assert kept["images"] == [None, urls[0], None] and kept["texts"] == ["t0", None, "t1"]
    assert set(kept["metadata"]["declared_sizes"]) == {urls[0]} and "_nsfw_unscored" not in kept
    assert [(e.reject.reason, e.reject.detail) for e in events if hasattr(e, "reject")] == [
        ("nsfw_image", f"{urls[1]}: nsfw_score 0.9000 > 0.8"), ("image_decode_failed", f"{urls[2]}: not scored: "
                                                                "CLIP preprocess: broken")]
    assert {(e.metric, e.n) for e in events if not hasattr(e, "reject")} >= {("in", 3), ("out", 1)}
    assert DocNsfw(NsfwPolicy(0.8, document_threshold=0.85))(doc).reason == "nsfw_document"
    assert distinct_images([("s2", "d1", None), ("s1", "d2", "p1"), ("s2", "d3", "p2"), ("s1", "d2", "p1")]) == [
        ("s1", "p1", ["d2"]), ("s2", "p2", ["d1", "d3"])]


# ---- interleaved end to end -----------------------------------------------------------------------------

def rebuilt_page(shared_data, name: str, url: str, images: list[tuple[str, str]], extra: str = "") -> str:
    """A real page's extracted paragraphs (text kept) in a plain article, with `images` (src, alt) between
    them and `extra` as the second paragraph."""
    texts, *_ = extract(real_page(shared_data, name), url)
    paras = [p for t in texts if t for p in t.split("\n") if p.strip()][:12]
    paras.insert(1, extra)
    body = ""
    for i, p in enumerate(paras):
        body += f"<p>{p}</p>"
        if i < len(images):
            body += f'<figure><img src="{images[i][0]}" alt="{images[i][1]}" width="800" height="600"></figure>'
    return f"<html><head><title>{name}</title></head><body><article>{body}</article></body></html>"


@pytest.fixture(scope="module")
def safety_run(shared_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("safety")
    optout = tmp / "optout.txt"  # Spawning-style: domains and exact image URLs
    optout.write_text("# do not train\nTour-Magazin.DE\nhttps://photos.spawning-test.org/u/42/cat.jpg?size=large\n"
                      "optout-domain.test\n")
    block = tmp / "adult_urls"  # UT1 'urls' format: host/path, plus a domains line
    block.write_text("infobae.com/america/mundo/\nBÜCHER.example\n")
    images = [("https://Photos.Spawning-Test.org/u/42/cat.jpg?size=large", "a cat on a sofa"),
              ("https://photos.spawning-test.org/u/42/cat.jpg?size=small", "the same cat, smaller"),
              ("https://user:secret@IMG.optout-domain.test:8443/p/garden.jpg", "a garden"),
              ("https://cdn.xn--bcher-kva.example/img/shelf.jpg", "a bookshelf"),
              ("https://static.site.test/uploads/porn-star.jpg", "a portrait"),
              ("https://static.site.test/uploads/party.jpg", "Hot XXX pics"),
              ("https://static.site.test/uploads/workshop.jpg", f"our workshop, call {PHONE}")]
    pii = (f"If you have questions about this post, you can write to the author at {EMAIL} or call him on "
           f"{PHONE}, and the test server that was used for it ran at {IPV4} and at {IPV6} for a while.")
    records = [
        ("https://www.holzwerken.net/blog/saege", real_page(shared_data, "holzwerken.net-Kreissaege.html.gz"),
         ["X-Robots-Tag: noai"]),
        ("https://de.motor1.com/news/545242/", real_page(shared_data, "motor1.de-erwischt.html.gz"),
         ["X-Robots-Tag: noindex", "X-Robots-Tag: otherbot: noimageai"]),
        ("https://berkutschi.com/de/front/news/10759",
         with_meta(real_page(shared_data, "berkutschi.com-willingen.html.gz"), "<META CONTENT='NoAI' NAME=Robots>"), []),
        ("https://user:pw@www.TOUR-magazin.de:8443/profisport/news/unfall",
         real_page(shared_data, "tour-magazin.de-unfall.html.gz"), []),
        ("https://www.infobae.com/america/mundo/2022/05/03/el-nobel/",
         real_page(shared_data, "infobae.com-ucrania.html.gz"), []),
        ("https://www.caktusgroup.com/blog/2015/06/08/testing/",
         rebuilt_page(shared_data, "caktusgroup.com.django.html.gz", "https://www.caktusgroup.com/blog/x", images, pii),
         ["X-Robots-Tag: malformed;;: ,,"]),
    ]
    src = warc(tmp / "safety.warc", records)
    config = tmp / "config.yaml"
    config.write_text("images: {min_per_doc: 0}\n")
    out = tmp / "out"
    assert main(["interleaved", str(src), "-o", str(out), "--no-images", "--workers", "1", "--num-shards", "1",
                 "--config", str(config), "--opt-out-list", str(optout), "--blocklist", str(block)]) == 0
    return src, config, optout, block, out, images


def test_interleaved_honours_directives_lists_and_masks_pii(safety_run):
    src, _, optout, block, out, images = safety_run
    stats = json.loads((out / "stats.json").read_text())
    t = stats["totals"]
    assert t["read"] == t["written"] + t["rejected"] == 6
    rejects = pq.read_table(out / "rejects").to_pylist()
    by_source = {}
    for r in rejects:
        by_source.setdefault((r["stage"], r["reason"]), []).append(r)
    assert {r["detail"] for r in by_source[("opt_out", "opt_out_noai")]} == {
        "noai in the page's X-Robots-Tag", "noai in the page's meta name=robots"}
    assert "tour-magazin.de" in by_source[("opt_out", "opt_out_list")][0]["detail"]
    assert "infobae.com/america/mundo" in by_source[("opt_out", "blocklist")][0]["detail"]
    # motor1 (noimageai, addressed to another bot): every image rejected, the text kept
    assert len(by_source[("safety_images", "opt_out_noimageai")]) >= 10
    rows = [r for f in sorted((out / "data").glob("*.parquet")) for r in schemas.read_table(str(f), "interleaved").to_pylist()]
    assert {r["url"] for r in rows} == {"https://de.motor1.com/news/545242/",
                                        "https://www.caktusgroup.com/blog/2015/06/08/testing/"}
    motor1 = next(r for r in rows if "motor1" in r["url"])
    assert not any(motor1["images"]) and sum(len(t.split()) for t in motor1["texts"]) > 200
    # caktus: images by list, IDN blocklist, credentials+port, flagged URL and alt; the other two kept
    caktus = next(r for r in rows if "caktus" in r["url"])
    kept = [i for i in caktus["images"] if i]
    assert kept == [images[1][0], images[6][0]]
    reasons = {r["detail"].split(": ")[0]: r["reason"] for r in rejects
               if r["stage"] == "safety_images" and r["reason"] != "opt_out_noimageai"}
    assert reasons == {images[0][0]: "opt_out_list", images[2][0]: "opt_out_list", images[3][0]: "blocklist",
                       images[4][0]: "flagged_image_words", images[5][0]: "flagged_image_words"}
    text = "\n".join(t for t in caktus["texts"] if t)
    assert ("write to the author at [EMAIL] or call him on [PHONE], and the test server that was used for it ran "
            "at [IP_ADDRESS] and at [IP_ADDRESS] for a while.") in text
    alts = [i["alt"] for i in caktus["image_info"] if i]
    assert alts[-1] == "our workshop, call [PHONE]"
    assert json.loads(caktus["metadata"])["pii_masked"] == {"email": 1, "phone": 2, "ip": 2}
    assert set(json.loads(caktus["metadata"])["declared_sizes"]) == set(kept)  # dropped images' URLs gone
    everything = json.dumps(rows) + json.dumps(rejects) + (out / "stats.json").read_text()
    for value in (EMAIL, PHONE, IPV4, IPV6):
        assert value not in everything
    # stats.json names the opt-outs applied; the card's section reads them back with what was not checked
    safety = stats["safety"]
    assert [x["path"] for x in safety["opt_out_lists"]] == [str(optout)] and safety["opt_out_lists"][0]["entries"] == 3
    assert safety["blocklists"][0]["url_prefixes"] == 1 and safety["blocklists"][0]["domains"] == 1
    assert main(["card", str(out)]) == 0
    card = (out / "README.md").read_text()
    section = card[card.index("## Safety and opt-outs"):card.index("## Limitations")]
    assert str(optout) in section and "3 entries (2 domains, 1 URL prefixes)" in section
    assert "| `opt_out` | `opt_out_noai` | 2 |" in section and "| `safety_images` | `flagged_image_words` | 2 |" in section
    assert "pii_masked_email (masked, kept) | 1" in section
    assert "NOT checked" in section and "NSFW images: no classifier run" in section


def test_pii_reject_mode_and_bad_list_is_exit_2(safety_run, tmp_path, capsys):
    src, config, optout, block, _, _ = safety_run
    out = tmp_path / "reject"
    assert main(["interleaved", str(src), "-o", str(out), "--no-images", "--workers", "1", "--num-shards", "1",
                 "--config", str(config), "--pii", "reject"]) == 0
    rejects = pq.read_table(out / "rejects").to_pylist()
    pii = [r for r in rejects if r["reason"] == "pii_found"]
    assert len(pii) == 1 and pii[0]["detail"] == "1 email, 2 ip, 2 phone" and pii[0]["stage"] == "safety"
    assert not any(EMAIL in r["detail"] or PHONE in r["detail"] for r in rejects)
    bad = tmp_path / "bad.txt"
    bad.write_text("ok.test\n\nnot a domain\n")
    capsys.readouterr()
    assert main(["interleaved", str(src), "-o", str(tmp_path / "x"), "--opt-out-list", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bad.txt, line 3" in err[0]
    assert main(["interleaved", str(src), "-o", str(tmp_path / "y"), "--no-images", "--nsfw-head", "random",
                 "--allow-random-weights"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--nsfw-head" in err[0] and "--no-images" in err[0]
    assert main(["interleaved", str(src), "-o", str(tmp_path / "z"), "--nsfw-head", "random"]) == 2
    assert "--allow-random-weights" in capsys.readouterr().err


# ---- pairs: lists, flagged captions, PII and the NSFW head over tiny CLIP features ------------------------

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def test_pairs_nsfw_head_with_known_weights_end_to_end(tmp_path, coco):
    from mmcorpus.filters.imageinfo import to_rgb
    from mmcorpus.pipelines.models.clip import ClipConfig, load_model

    clip = tmp_path / "mmcorpus-tiny-safety-clip.json"
    clip.write_text(json.dumps(TINY))
    files = sorted((coco / "images").glob("*.jpg"))[:24]
    rows = [{"path": str(f), "caption": f"a photo number {i} of everyday life", "url": f"https://img{i}.photos.test/p/{i}.jpg"}
            for i, f in enumerate(files)]
    rows[3]["caption"] = "hot xxx pics of everyday life"
    rows[4]["caption"] = f"write to {EMAIL} for a print of this photo"
    table = tmp_path / "pairs.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "optout.txt").write_text("IMG1.photos.test\n")
    (tmp_path / "block.txt").write_text("img2.photos.test/p/\n")
    # known weights: a direction through the images' own embeddings, so scores spread over both sides
    loaded = load_model(ClipConfig(model=str(clip), allow_random=True))
    with torch.no_grad():
        emb = loaded.model.encode_image(torch.stack([loaded.extras["preprocess"](to_rgb(f.read_bytes())) for f in files]))
        emb = torch.nn.functional.normalize(emb, dim=-1).numpy()
    direction = emb[7] - emb.mean(0)
    w = (direction / np.linalg.norm(direction) * 40).astype(np.float32)[None, :]
    b = -(emb @ w[0]).mean() * np.ones(1, np.float32)
    seq = torch.nn.Sequential(torch.nn.Linear(32, 1))
    seq.load_state_dict({"0.weight": torch.from_numpy(w), "0.bias": torch.from_numpy(b.astype(np.float32))})
    torch.save(seq.state_dict(), tmp_path / "nsfw.pt")
    expected = NsfwHead([(w, b)]).scores(emb)
    threshold = 0.5
    out = tmp_path / "out"
    assert main(["pairs", f"web={table}", "-o", str(out), "--clip-model", str(clip), "--allow-random-weights",
                 "--workers", "1", "--num-shards", "1", "--dedup", "none", "--opt-out-list", str(tmp_path / "optout.txt"),
                 "--blocklist", str(tmp_path / "block.txt"), "--nsfw-head", str(tmp_path / "nsfw.pt"),
                 "--nsfw-threshold", str(threshold)]) == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["totals"]["read"] == stats["totals"]["written"] + stats["totals"]["rejected"] == 24
    kept = pq.read_table(out / "data").to_pylist()
    schemas.validate(pq.read_table(out / "data").replace_schema_metadata(None), "pair")
    rejects = pq.read_table(out / "rejects").to_pylist()
    safety = {r["reason"] for r in rejects if r["stage"] == "safety"}
    assert safety == {"opt_out_list", "blocklist", "flagged_image_words"}
    assert not any(r["url"] in (rows[1]["url"], rows[2]["url"], rows[3]["url"]) for r in kept)
    nsfw_rejected = [r for r in rejects if r["stage"] == "nsfw"]
    assert nsfw_rejected and all(r["reason"] == "nsfw_image" for r in nsfw_rejected)
    by_url = {r["url"]: r for r in kept}
    clear = [i for i in range(5, 24) if abs(expected[i] - threshold) > 0.02]
    assert len(clear) >= 12
    for i in clear:  # pipeline (float16 embedding stored by clip_score) == the head on a direct encoding
        assert (rows[i]["url"] in by_url) == (expected[i] <= threshold), i
        if rows[i]["url"] in by_url:
            assert by_url[rows[i]["url"]]["nsfw_score"] == pytest.approx(float(expected[i]), abs=0.02)
    masked = by_url.get(rows[4]["url"])
    if masked is not None:
        assert masked["caption"] == "write to [EMAIL] for a print of this photo"
    assert stats["safety"]["nsfw"]["weights"] == str(tmp_path / "nsfw.pt")
    assert main(["card", str(out)]) == 0
    section = (out / "README.md").read_text().split("## Safety and opt-outs")[1].split("## Limitations")[0]
    assert "NSFW head over the CLIP image embedding" in section and "`nsfw_image`" in section


def test_older_files_read_with_nsfw_score_null(tmp_path):
    old = schemas.PAIR.remove(schemas.PAIR.get_field_index("nsfw_score"))
    table = __import__("pyarrow").Table.from_pylist(
        [{"image_id": "a", "caption": "a cat", "caption_source": "web", "source_dataset": "x"}],
        schema=old.with_metadata({schemas.META_SCHEMA: b"pair", schemas.META_VERSION: b"1.0"}))
    pq.write_table(table, tmp_path / "old.parquet")
    back = schemas.read_table(str(tmp_path / "old.parquet"), "pair")
    assert back.column_names == schemas.PAIR.names and back.column("nsfw_score").to_pylist() == [None]
    assert schemas.read_table(str(tmp_path / "old.parquet"), "pair", columns=["caption", "nsfw_score"]).to_pylist() == [
        {"caption": "a cat", "nsfw_score": None}]
    # interleaved 1.1: image_info without nsfw_score (schema 1.2 added it to the struct)
    pa = __import__("pyarrow")
    info_11 = pa.struct([f for f in schemas.IMAGE_INFO if f.name != "nsfw_score"])
    old = schemas.INTERLEAVED.set(schemas.INTERLEAVED.get_field_index("image_info"),
                                  pa.field("image_info", pa.list_(info_11)))
    doc = {"doc_id": "d", "texts": ["a cat", None], "images": [None, "https://x.test/c.jpg"], "source": "s",
           "image_info": [None, {"url": "https://x.test/c.jpg", "sha256": "ab", "width": 200, "alt": "a cat"}]}
    pq.write_table(pa.Table.from_pylist([doc], schema=old.with_metadata(
        {schemas.META_SCHEMA: b"interleaved", schemas.META_VERSION: b"1.1"})), tmp_path / "old-docs.parquet")
    back = schemas.read_table(str(tmp_path / "old-docs.parquet"), "interleaved")
    assert back.schema.field("image_info").type == schemas.INTERLEAVED.field("image_info").type
    info = back.column("image_info").to_pylist()[0]
    assert info[0] is None and info[1]["nsfw_score"] is None and info[1]["sha256"] == "ab" and info[1]["width"] == 200


# ---- interleaved: the NSFW head over one CLIP embedding per fetched image ----------------------------------

from tests.test_interleaved import server  # noqa: E402,F401  (photo-story pages and COCO photos on 127.0.0.1)


def _gap_threshold(values, lo: float, hi: float) -> float:
    """The middle of the widest gap between sorted `values` whose lower side lies at quantile lo..hi."""
    v = sorted(values)
    i = max(range(int(lo * (len(v) - 1)), int(hi * (len(v) - 1)) + 1), key=lambda k: v[k + 1] - v[k])
    assert v[i + 1] - v[i] > 0.01  # a clear margin on both sides
    return float((v[i] + v[i + 1]) / 2)


def test_interleaved_nsfw_head_drops_images_and_documents_end_to_end(server, coco, tmp_path, capsys):
    from mmcorpus.filters.imageinfo import to_rgb
    from mmcorpus.pipelines.outputs.card import _table
    from mmcorpus.pipelines.outputs.safety_card import safety_section
    from mmcorpus.pipelines.models.clip import ClipConfig, load_model

    clip = tmp_path / "mmcorpus-tiny-safety-clip.json"
    clip.write_text(json.dumps(TINY))
    pages = {"page0.html": range(0, 3), "page1.html": range(3, 6), "page2.html": range(6, 9),
             "page3.html": range(9, 12), "repost.html": [11]}  # the server's stories: photos by caption index
    photos = [json.loads(line)["file_name"] for line in (coco / "captions.jsonl").read_text().splitlines()][:12]
    loaded = load_model(ClipConfig(model=str(clip), allow_random=True))
    with torch.no_grad():
        emb = loaded.model.encode_image(torch.stack([loaded.extras["preprocess"](to_rgb((coco / "images" / f).read_bytes()))
                                                     for f in photos]))
        emb = torch.nn.functional.normalize(emb, dim=-1).numpy()
    direction = emb[4] - emb.mean(0)  # known weights: a direction through the photos' own embeddings
    w = (direction / np.linalg.norm(direction) * 40).astype(np.float32)[None, :]
    b = (-(emb @ w[0]).mean() * np.ones(1)).astype(np.float32)
    np.savez(tmp_path / "nsfw.npz", weight_0=w, bias_0=b)
    expected = dict(zip(photos, NsfwHead([(w, b)]).scores(emb).tolist()))
    doc_max = {p: max(expected[photos[i]] for i in idx) for p, idx in pages.items()}
    doc_threshold = _gap_threshold(list(doc_max.values()), 0.5, 0.99)  # the top document(s) go whole
    kept_docs = [p for p, m in doc_max.items() if m <= doc_threshold]
    image_threshold = _gap_threshold([expected[photos[i]] for p in kept_docs for i in pages[p]], 0.2, 0.8)
    urls = tmp_path / "urls.txt"
    urls.write_text("".join(f"{server}/{p}\n" for p in pages))
    config = tmp_path / "c.yaml"
    config.write_text("pages: {host_delay: 0.0, retries: 0, timeout: 5}\nfetch: {batch_urls: 4}\n"
                      "quality: {max_duplicate_ngram_chars: {}}\n")
    out = tmp_path / "out"
    assert main(["interleaved", str(urls), "-o", str(out), "--allow-private-network", "--config", str(config),
                 "--workers", "1", "--num-shards", "1", "--nsfw-head", str(tmp_path / "nsfw.npz"),
                 "--clip-model", str(clip), "--allow-random-weights", "--nsfw-threshold", str(image_threshold),
                 "--nsfw-document-threshold", str(doc_threshold)]) == 0
    assert "RANDOM weights" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    t = stats["totals"]
    assert t["read"] == t["written"] + t["rejected"] == 5
    by_stage = {s["stage"]: s for s in stats["stages"]}
    assert by_stage["nsfw"]["counters"]["images_embedded"] == 12  # repost's photo is page3's: embedded once
    rejects = pq.read_table(out / "rejects").to_pylist()
    line_of = {p: f"urls.txt:{i + 1}" for i, p in enumerate(pages)}  # a page's reject source names its list line
    doc_rejects = {r["source"].rsplit("/", 1)[-1] for r in rejects if r["stage"] == "nsfw"}
    assert doc_rejects == {line_of[p] for p, m in doc_max.items() if m > doc_threshold} and doc_rejects
    assert all(r["reason"] == "nsfw_document" for r in rejects if r["stage"] == "nsfw")
    dropped = {r["detail"].split(": ")[0].rsplit("/", 1)[-1] for r in rejects if r["stage"] == "nsfw_images"}
    assert all(r["reason"] == "nsfw_image" for r in rejects if r["stage"] == "nsfw_images")
    above = {photos[i] for p in kept_docs for i in pages[p] if expected[photos[i]] > image_threshold}
    assert dropped == above and above
    n_kept_images = sum(len(pages[p]) for p in kept_docs)
    assert by_stage["nsfw_images"]["in"] == n_kept_images and by_stage["nsfw_images"]["out"] == n_kept_images - len(
        [r for r in rejects if r["stage"] == "nsfw_images"])
    rows = [r for f in sorted((out / "data").glob("*.parquet")) for r in schemas.read_table(str(f), "interleaved").to_pylist()]
    assert rows
    for row in rows:  # the document stays, its text too, without the dropped images; every image left is scored
        page = row["url"].rsplit("/", 1)[-1]
        images = [u.rsplit("/", 1)[-1] for u in row["images"] if u]
        assert page in kept_docs and images == [photos[i] for i in pages[page] if photos[i] not in dropped]
        assert row["texts"][0].startswith(("Photo story", "Repost"))
        for url, info in zip(row["images"], row["image_info"]):
            if url is not None:
                name = url.rsplit("/", 1)[-1]
                assert info["nsfw_score"] == pytest.approx(expected[name], abs=1e-3) and expected[name] <= image_threshold
    nsfw = stats["safety"]["nsfw"]
    assert nsfw["weights"] == str(tmp_path / "nsfw.npz") and nsfw["clip_weights"] == "random"
    assert nsfw["document_threshold"] == doc_threshold
    section = "\n".join(safety_section(stats, _table))  # the card's section (the whole card: test_card.py)
    assert "NSFW head over the CLIP image embedding" in section and f"above {doc_threshold} dropped whole" in section
    assert "| `nsfw` | `nsfw_document` |" in section and "| `nsfw_images` | `nsfw_image` |" in section
    assert "CLIP model had RANDOM weights" in section and "no classifier run" not in section
