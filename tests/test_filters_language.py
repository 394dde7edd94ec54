"""Language identification on the bundled real pages (trafilatura-eval)."""

import copy
from urllib.parse import urlsplit

import pytest

from mmcorpus.filters.documents import DocumentConfig, identify_language
from mmcorpus.filters.reasons import Reject
from tests.filter_pages import eval_pages

# Pages whose language is known from the site (not from our own output).
KNOWN = {
    "0a12df42d1764095989ab078ee0f940b.html": "de",  # zeit.de
    "en.wikipedia.org.tsne.html": "en",
    "cbsnews.com.carolina.html": "en",
    "independent.co.uk.penalty.html": "en",
    "100noticias.com-millones.html": "es",
    "infobae.com-ucrania.html": "es",
    "dalloz-actualite.fr.raoult.html": "fr",
    "laviedesidees.fr.evaluation.html": "fr",
    "assabah.com.tn.article.html": "ar",
    "nhk.or.jp.k100.html": "ja",
    "cybercook.com.br.sequilho.html": "pt",
    "sportowefakty.wp.pl.falubaz.html": "pl",
}


@pytest.fixture(scope="module")
def pages(shared_data):
    return eval_pages(str(shared_data))


def _doc(pages, name):
    return copy.deepcopy(pages[name]["doc"])


def test_known_pages_get_their_language(pages):
    cfg = DocumentConfig()
    for name, lang in KNOWN.items():
        doc = identify_language(_doc(pages, name), cfg)
        assert not isinstance(doc, Reject), (name, doc)
        assert doc["language"] == lang, name
        assert doc["language_score"] >= cfg.language.min_score


def test_german_sites_are_german(pages):
    cfg = DocumentConfig()
    de = [n for n, p in pages.items() if (urlsplit(p["url"]).hostname or "").endswith(".de")]
    assert len(de) > 40
    found = [identify_language(_doc(pages, n), cfg) for n in de]
    assert sum(isinstance(d, dict) and d["language"] == "de" for d in found) >= 0.95 * len(de)


def test_allowed_list_rejects_other_languages(pages):
    cfg = DocumentConfig.from_dict({"language": {"allowed": ["en"]}})
    german = identify_language(_doc(pages, "0a12df42d1764095989ab078ee0f940b.html"), cfg)
    assert isinstance(german, Reject) and german.reason == "language_not_allowed"
    assert "de" in german.detail
    english = identify_language(_doc(pages, "en.wikipedia.org.tsne.html"), cfg)
    assert isinstance(english, dict) and english["language"] == "en"


def test_default_keeps_every_confident_language(pages):
    cfg = DocumentConfig()
    assert cfg.language.allowed == []
    kept = [identify_language(_doc(pages, n), cfg) for n in pages]
    assert sum(isinstance(d, dict) for d in kept) >= 0.97 * len(pages)
    assert len({d["language"] for d in kept if isinstance(d, dict)}) >= 6


def test_low_confidence_and_no_letters_are_rejected(pages):
    cfg = DocumentConfig()
    doc = _doc(pages, "statisticsglobe.com.ggplot2.html")
    # a real navigation word alone is ambiguous; a row of numbers has no language at all
    doc["texts"] = ["Impressum" if t is not None else None for t in doc["texts"]]
    r = identify_language(doc, cfg)
    assert isinstance(r, Reject) and r.reason == "language_low_confidence"
    assert doc["language_score"] < cfg.language.min_score
    doc["texts"] = ["0 2 4 6 8" if t is not None else None for t in doc["texts"]]
    r = identify_language(doc, cfg)
    assert isinstance(r, Reject) and r.reason == "language_low_confidence"
    assert doc["language"] is None and doc["language_score"] == 0.0


def test_threshold_is_configurable(pages):
    doc = _doc(pages, "en.wikipedia.org.tsne.html")
    doc["texts"] = ["Impressum" if t is not None else None for t in doc["texts"]]
    cfg = DocumentConfig.from_dict({"language": {"min_score": 0.0}})
    assert isinstance(identify_language(doc, cfg), dict)


def test_real_crawl_page_below_confidence_is_dropped(shared_data):
    """A Chinese spam page from the real crawl WARC: the identifier hesitates (wuu/zh) and the page goes."""
    from tests.filter_pages import warc_pages

    cfg = DocumentConfig()
    doc = copy.deepcopy(warc_pages(str(shared_data))["resiliparse-warcs/warcfile.warc.gz:99077"]["doc"])
    r = identify_language(doc, cfg)
    assert isinstance(r, Reject) and r.reason == "language_low_confidence"
    assert doc["language"] in ("wuu", "zh") and doc["language_score"] < cfg.language.min_score
    english = warc_pages(str(shared_data))["warcio-samples/example.warc:1197"]["doc"]  # example.com
    assert identify_language(copy.deepcopy(english), cfg)["language"] == "en"
