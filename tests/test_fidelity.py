"""Document fidelity on real pages: lists, tables, code and headings judged as units, the gutted-document
reject, article images put back where trafilatura left them out (against hand labels), and page URLs for
local HTML (canonical link, URL manifest)."""

import copy
import gzip
import json
import pathlib

import pyarrow.parquet as pq
import pytest

from mmcorpus.filters.documents import DocumentConfig, check_removed_share, clean_paragraphs, identify_language
from mmcorpus.filters.extract import extract
from mmcorpus.filters.reasons import REASONS, Reject
from mmcorpus.pipelines.cli import main
from mmcorpus.pipelines.errors import UserError
from mmcorpus.pipelines.interleaved.sources import load_url_manifest
from tests.filter_pages import eval_pages

LABELS = pathlib.Path(__file__).parent / "data" / "article_images.json"


@pytest.fixture(scope="module")
def pages(shared_data):
    return eval_pages(str(shared_data))


@pytest.fixture(scope="module")
def meta(shared_data):
    return json.loads((shared_data / "trafilatura-eval" / "evaldata.json").read_text())


def html_of(shared_data, name):
    return gzip.decompress((shared_data / "trafilatura-eval" / "pages" / f"{name}.gz").read_bytes()).decode(
        "utf-8", "replace")


def lines_with_units(doc):
    lines = [x for t in doc["texts"] if t for x in t.split("\n") if x.strip()]
    units = [u for us in doc["metadata"]["_units"] if us for u in us]
    assert len(lines) == len(units)
    return lines, units


def cleaned(pages, name, cfg):
    doc = identify_language(copy.deepcopy(pages[name]["doc"]), cfg)
    doc, _ = clean_paragraphs(doc, cfg)
    return doc


def kept_lines(doc):
    return {x for t in doc["texts"] if t for x in t.split("\n") if x.strip()}


def test_lists_and_tables_are_kept_or_removed_whole(pages):
    cfg = DocumentConfig()
    units_seen = whole = 0
    for name in pages:
        before = identify_language(copy.deepcopy(pages[name]["doc"]), cfg)
        if isinstance(before, Reject):
            continue
        lines, units = lines_with_units(before)
        after = kept_lines(clean_paragraphs(copy.deepcopy(before), cfg)[0])
        groups = {}
        for line, unit in zip(lines, units):
            if ":" in unit:
                groups.setdefault(unit, []).append(line in after)
        units_seen += len(groups)
        whole += sum(all(g) or not any(g) for g in groups.values())
    assert units_seen >= 100, units_seen
    assert whole == units_seen  # no list, table or code block is cut into pieces


def test_table_rows_are_lines_and_the_table_option_keeps_or_drops_them(pages):
    name = "90min.de-Bundesliga-Tabelle.html"  # the Bundesliga table is the article
    lines, units = lines_with_units(pages[name]["doc"])
    rows = [x for x, u in zip(lines, units) if u.startswith("tr:")]
    assert len(rows) >= 18 and all(" | " in r for r in rows)
    kept = kept_lines(cleaned(pages, name, DocumentConfig.from_dict({"paragraphs": {"tables": "keep"}})))
    assert set(rows) <= kept
    dropped = cleaned(pages, name, DocumentConfig.from_dict({"paragraphs": {"tables": "drop"}}))
    assert not set(rows) & kept_lines(dropped)
    assert dropped["metadata"]["removed_paragraphs"]["table_dropped"] == len(rows)
    with pytest.raises(ValueError, match="paragraphs.tables"):
        DocumentConfig.from_dict({"paragraphs": {"tables": "sometimes"}})


def test_short_article_lines_stay_where_obelics_line_rules_remove_them(pages):
    units, lines_cfg = DocumentConfig(), DocumentConfig.from_dict({"paragraphs": {"units": False}})
    # an article sentence with few stop words, between article paragraphs
    name, line = "pamelaandersonfoundation.org.yellow.html", "Lots of media see Yellow Vests protesters as criminals"
    assert any(x.startswith(line) for x in kept_lines(cleaned(pages, name, units)))
    assert not any(x.startswith(line) for x in kept_lines(cleaned(pages, name, lines_cfg)))
    # a recipe's steps: a list of short items stays whole, its heading with it
    name = "cybercook.com.br.sequilho.html"
    kept = kept_lines(cleaned(pages, name, units))
    assert "Como Fazer" in kept and sum(x.startswith("- ") for x in kept) == 7
    # the Wikipedia navbox (a table at the top of the content) still goes
    assert "Machine-learning venues" not in kept_lines(cleaned(pages, "en.wikipedia.org.tsne.html", units))


def test_headings_stay_only_with_their_section(pages):
    cfg = DocumentConfig()
    checked = 0
    for name in list(pages)[:60]:
        doc = identify_language(copy.deepcopy(pages[name]["doc"]), cfg)
        if isinstance(doc, Reject):
            continue
        doc, _ = clean_paragraphs(doc, cfg)
        lines = [x for t in doc["texts"] if t for x in t.split("\n") if x.strip()]
        units = [u for us in doc["metadata"]["_units"] if us for u in us]
        for i, u in enumerate(units):
            if u == "h" and len(lines[i].split()) < cfg.paragraphs.min_words:
                checked += 1
                section = units[i + 1:]
                end = section.index("h") if "h" in section else len(section)
                assert end > 0, (name, lines[i])  # a short heading kept has kept text of its section below it
    assert checked >= 20


def test_removed_word_share_recorded_and_gutted_documents_rejected(pages):
    cfg = DocumentConfig()
    assert "gutted_by_paragraph_rules" in REASONS
    # a whole article: little removed, kept
    doc = cleaned(pages, "theplanetarypress.com.forestlands.html", cfg)
    assert doc["metadata"]["extracted_words"] > 500 and doc["metadata"]["removed_word_share"] < 0.1
    assert check_removed_share(doc, cfg) is doc
    # the same article buried under a menu: most lines removed, the document rejected instead of published
    doc = identify_language(copy.deepcopy(pages["theplanetarypress.com.forestlands.html"]["doc"]), cfg)
    first = next(t for t in doc["texts"] if t).split("\n")[0]
    menu = [f"Section {i} Archive" for i in range(400)]
    doc["texts"] = ["\n".join(menu + [first])]
    doc["images"], doc["image_info"], doc["metadata"] = [None], [None], {}
    doc, _ = clean_paragraphs(doc, cfg)
    assert doc["metadata"]["removed_word_share"] > 0.5
    r = check_removed_share(doc, cfg)
    assert isinstance(r, Reject) and r.reason == "gutted_by_paragraph_rules" and "max 0.5" in r.detail
    off = DocumentConfig.from_dict({"paragraphs": {"max_removed_share": 1.0}})
    assert check_removed_share(doc, off) is doc


def test_article_images_put_back_match_the_hand_labels(shared_data, meta):
    labels = json.loads(LABELS.read_text())["pages"]
    assert len(labels) >= 30 and sum(len(v["article"]) for v in labels.values()) >= 25
    found = {False: set(), True: set()}
    added_total = 0
    for name, lab in labels.items():
        html = html_of(shared_data, name)
        for recover in (False, True):
            result = extract(html, meta[name]["url"], article_images=recover)
            if isinstance(result, tuple):
                found[recover] |= {(name, i) for i in result[1] if i}
                added_total += result[3]["article_images_added"] if recover else 0
    article = {(n, u) for n, v in labels.items() for u in v["article"]}
    added = found[True] - found[False]
    assert added_total == len(added) >= 8
    assert added <= article  # nothing put back is navigation, an ad or a sidebar
    assert len(found[True] & article) >= len(found[False] & article) + 8  # recall up


def test_put_back_images_sit_where_the_page_has_them(shared_data, meta):
    name = "0a12df42d1764095989ab078ee0f940b.html"  # Zeit article: the lead figure (in <noscript>) above the text
    texts, images, _, m = extract(html_of(shared_data, name), meta[name]["url"])
    assert m["article_images_added"] == 1
    assert images[0] and "bohren" in images[0] and texts[0] is None and len(texts[1]) > 100


def test_canonical_link_is_the_base_url_of_a_page_without_one(shared_data):
    html = html_of(shared_data, "SW1.News-Heimat.html")
    texts, images, _, m = extract(html, None)
    assert m["canonical_url"].startswith("https://sw1.news/fussball/")
    assert [i for i in images if i] and all(i.startswith("https://sw1.news/") for i in images if i)
    assert extract(html, "https://example.org/page.html")[3]["canonical_url"] is None  # a known URL wins


def test_url_manifest_gives_local_pages_their_address(shared_data, meta, tmp_path):
    folder = tmp_path / "pages"
    folder.mkdir()
    names = ["SW1.News-Heimat.html", "blog.amp.dev.axios.html"]
    for n in names:
        (folder / n).write_text(html_of(shared_data, n))
    manifest = tmp_path / "urls.jsonl"
    manifest.write_text("".join(json.dumps({"file": f"pages/{n}", "url": meta[n]["url"]}) + "\n" for n in names))
    assert load_url_manifest(str(manifest)) == {str(folder / n): meta[n]["url"] for n in names}
    config = tmp_path / "keep-all.yaml"
    config.write_text("images: {min_per_doc: 0}\n")  # keep documents whatever their images: URLs are checked
    out = tmp_path / "out"
    assert main(["interleaved", str(folder), "-o", str(out), "--no-images", "--workers", "1", "--num-shards", "1",
                 "--url-manifest", str(manifest), "--config", str(config)]) == 0
    from mmcorpus import schemas

    rows = [r for f in sorted((out / "data").glob("*.parquet")) for r in schemas.read_table(str(f), "interleaved").to_pylist()]
    assert sorted(r["url"] for r in rows) == sorted(meta[n]["url"] for n in names)
    rejects = pq.read_table(out / "rejects").to_pylist()
    assert not [r for r in rejects if "relative" in (r["detail"] or "")]  # relative image URLs resolved
    images = [i for r in rows for i in r["images"] if i]
    assert images and all(i.startswith(("https://sw1.news/", "https://blog.amp.dev/")) for i in images)
    stats = json.loads((out / "stats.json").read_text())
    para = next(s for s in stats["stages"] if s["stage"] == "paragraphs")
    metas = [json.loads(r["metadata"]) for r in rows]  # both pages kept: the counters add up their fields
    assert para["counters"]["words_extracted"] == sum(m["extracted_words"] for m in metas) > 500
    assert para["counters"].get("words_removed", 0) == sum(round(m["extracted_words"] * m["removed_word_share"])
                                                           for m in metas)
    assert para["counters"]["article_images_added"] >= 5  # the blog's figures trafilatura leaves out


def test_bad_url_manifest_is_one_clear_error(tmp_path, capsys):
    bad = tmp_path / "urls.jsonl"
    bad.write_text('{"file": "a.html", "url": "https://e.org/a"}\n{"file": "b.html"}\n')
    with pytest.raises(UserError, match="line 2"):
        load_url_manifest(str(bad))
    page = tmp_path / "a.html"
    page.write_text("<html><body><p>text</p></body></html>")
    assert main(["interleaved", str(page), "-o", str(tmp_path / "out"), "--url-manifest", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "urls.jsonl" in err and "line 2" in err and "Traceback" not in err


def test_card_reports_the_fidelity_figures(tmp_path_factory, shared_data):
    from mmcorpus.pipelines.outputs.card import parse_card
    from tests.test_card import real_run, table_rows

    out = real_run("interleaved", tmp_path_factory, shared_data)  # the card tests' run, shared in a session
    assert main(["card", str(out), "--name", "fidelity", "--license", "cc-by-4.0"]) == 0
    _, body = parse_card(str(out / "README.md"))
    stats = json.loads((out / "stats.json").read_text())
    para = next(s for s in stats["stages"] if s["stage"] == "paragraphs")
    c = para["counters"]
    rows = {r[0]: r[1] for r in table_rows(body[body.index("## Document fidelity"):], "| ")}
    assert rows["words extracted (documents reaching the paragraph rules)"].replace(",", "") == str(c["words_extracted"])
    assert rows["words removed by the paragraph rules"].startswith(f"{c['words_removed']:,} (")
    gutted = para["reasons"].get("gutted_by_paragraph_rules", 0)
    assert rows["documents rejected as gutted (more than 0.5 of their words removed)"].startswith(f"{gutted:,} (")
    assert float(rows["images per document at extraction"]) == round(c["images_extracted"] / para["in"], 2)
    assert rows["article images put back where trafilatura left them out"] == str(c["article_images_added"])
    assert 0 < c["words_removed"] < 0.2 * c["words_extracted"] and c["article_images_added"] > 10
