"""Paragraph and document quality rules on the bundled real pages and on realistic degradations of them."""

import copy
import json
import re
from collections import Counter

import pytest

from mmcorpus.filters import quality
from mmcorpus.filters.documents import DocumentConfig, check_quality, clean_paragraphs, identify_language
from mmcorpus.filters.reasons import REASONS, Reject
from tests.filter_pages import eval_pages, warc_pages

ZEIT = "0a12df42d1764095989ab078ee0f940b.html"  # German news article
ARTICLES = [  # real article pages in five languages that must survive every document rule
    ZEIT,
    "en.wikipedia.org.tsne.html",
    "cbsnews.com.carolina.html",
    "independent.co.uk.penalty.html",
    "dalloz-actualite.fr.raoult.html",
    "infobae.com-ucrania.html",
    "ahlen.de.reparaturcafe.html",
    "nhk.or.jp.k100.html",
]
LONG = "theplanetarypress.com.forestlands.html"  # English article, ~1,000 words


@pytest.fixture(scope="module")
def pages(shared_data):
    return eval_pages(str(shared_data))


@pytest.fixture(scope="module")
def cfg():
    return DocumentConfig()


def prepared(pages, name, cfg):
    """The page as the pipeline has it when check_quality runs: language found, paragraphs cleaned."""
    doc = identify_language(copy.deepcopy(pages[name]["doc"]), cfg)
    assert isinstance(doc, dict), doc
    doc, _ = clean_paragraphs(doc, cfg)
    return doc


def lines_of(doc):
    return [x for t in doc["texts"] if t for x in t.split("\n") if x.strip()]


def with_lines(doc, lines):
    """The document with its text replaced by `lines` (one text position, images kept after it)."""
    doc = copy.deepcopy(doc)
    images = [i for i in doc["images"] if i is not None]
    doc["texts"] = ["\n".join(lines)] + [None] * len(images)
    doc["images"] = [None] + images
    doc["image_info"] = [None] + [{"url": u} for u in images]
    return doc


def reason(result):
    return result.reason if isinstance(result, Reject) else "keep"


# ---- configuration ----


def test_config_round_trip_and_errors():
    cfg = DocumentConfig.from_dict(
        {"language": {"allowed": ["en", "de"]}, "quality": {"max_top_ngram_chars": {"2": 0.3}, "min_words": 50}}
    )
    assert cfg.language.allowed == ["en", "de"] and cfg.quality.min_words == 50
    assert cfg.quality.max_top_ngram_chars == {2: 0.3}
    d = json.loads(json.dumps(cfg.to_dict()))  # what stats.json and the card hold
    assert d["quality"]["max_top_ngram_chars"] == {"2": 0.3}
    assert DocumentConfig.from_dict(d) == cfg
    assert DocumentConfig.from_dict(None) == DocumentConfig()
    with pytest.raises(ValueError, match="quality.min_wrds"):
        DocumentConfig.from_dict({"quality": {"min_wrds": 3}})
    with pytest.raises(ValueError, match="'colour'"):
        DocumentConfig.from_dict({"colour": {}})
    with pytest.raises(ValueError, match="images.max_per_doc"):
        DocumentConfig.from_dict({"images": {"max_per_doc": "many"}})
    with pytest.raises(ValueError, match="language.allowed"):
        DocumentConfig.from_dict({"language": {"allowed": "en"}})


def test_defaults_follow_obelics_and_gopher(cfg):
    assert cfg.language.min_score == 0.8
    assert (cfg.paragraphs.min_words, cfg.paragraphs.max_words) == (4, 1000)
    assert cfg.quality.min_words == 10 and cfg.quality.min_stop_word_ratio == 0.35
    assert cfg.quality.max_special_ratio == 0.275 and cfg.quality.min_punctuation_ratio == 0.03
    assert cfg.quality.max_duplicate_ngram_chars[5] == 0.15 and cfg.quality.max_top_ngram_chars[2] == 0.2
    assert (cfg.images.min_side, cfg.images.max_side, cfg.images.max_aspect_ratio) == (150, 20_000, 2.0)


# ---- real pages are kept ----


def test_real_articles_pass(pages, cfg):
    for name in ARTICLES:
        assert reason(check_quality(prepared(pages, name, cfg), cfg)) == "keep", name


def test_most_real_pages_pass(pages, cfg):
    results = Counter()
    for name in pages:
        doc = identify_language(copy.deepcopy(pages[name]["doc"]), cfg)
        if isinstance(doc, dict):
            doc, _ = clean_paragraphs(doc, cfg)
            results[reason(check_quality(doc, cfg))] += 1
    assert results["keep"] >= 0.8 * sum(results.values()), results
    assert set(results) <= set(REASONS) | {"keep"}


def test_clean_paragraphs_removes_short_and_furniture_lines_keeps_images(pages, cfg):
    doc = identify_language(copy.deepcopy(pages["en.wikipedia.org.tsne.html"]["doc"]), cfg)
    before_lines = lines_of(doc)
    before_images = [i for i in doc["images"] if i is not None]
    doc, removed = clean_paragraphs(doc, cfg)
    after = lines_of(doc)
    assert removed == len(before_lines) - len(after) > 0
    assert sum(doc["metadata"]["removed_paragraphs"].values()) == removed
    assert [i for i in doc["images"] if i is not None] == before_images  # images stay, in order
    assert all((t is None) != (i is None) for t, i in zip(doc["texts"], doc["images"]))
    assert len(doc["texts"]) == len(doc["images"]) == len(doc["image_info"])
    assert "Machine-learning venues" not in after  # 2-word table caption
    first = next(x for x in before_lines if x.startswith("T-distributed Stochastic Neighbor Embedding"))
    assert first in after  # the article's first paragraph survives unchanged
    assert all(x in before_lines for x in after)  # nothing rewritten


def test_clean_paragraphs_drops_empty_text_positions(pages, cfg):
    doc = identify_language(copy.deepcopy(pages[ZEIT]["doc"]), cfg)
    doc["texts"] = ["Teilen\nDrucken"] + doc["texts"] + ["Mehr zum Thema"]
    doc["images"] = [None] + doc["images"] + [None]
    doc["image_info"] = [None] + doc["image_info"] + [None]
    n_positions = len(doc["texts"])
    doc, removed = clean_paragraphs(doc, cfg)
    assert removed >= 3 and len(doc["texts"]) <= n_positions - 2
    assert "Teilen" not in "\n".join(t for t in doc["texts"] if t)


def test_paragraph_rules_each_drop_what_they_should(pages, cfg):
    p, lang = cfg.paragraphs, "de"
    real = max(lines_of(pages[ZEIT]["doc"]), key=len)
    assert quality.paragraph_reject_reason(real, lang, p) is None
    assert quality.paragraph_reject_reason("Mehr zum Thema", lang, p) == "too_few_words"
    nouns = " ".join(w for w in real.split() if w[:1].isupper())
    assert quality.paragraph_reject_reason(nouns, lang, p) == "stop_words"
    table = "Termin: 21.02.2020, 19:00 Uhr | 69,00 € | Tel. +49 152 0864 9244 | 12.03.2020"
    assert quality.paragraph_reject_reason(table, lang, p) == "special_character_ratio"
    no_punct = re.sub(r"[.,;:!?]", "", real)
    assert quality.paragraph_reject_reason(no_punct, lang, p) == "punctuation_ratio"
    words = real.split()[:12]
    assert quality.paragraph_reject_reason(" ".join(words * 3) + ".", lang, p) == "word_repetition"
    # language without a stop-word list: the stop-word rule is skipped, not failed
    assert quality.paragraph_reject_reason(nouns, None, p) is None


# ---- each document rule on real pages it keeps and real pages it drops ----

NO_PARAGRAPHS = {"paragraphs": {"enabled": False}}  # rules seeing the page as extracted, before node cleaning
LINE_BY_LINE = {"paragraphs": {"units": False}}  # OBELICS's node rules, each line judged alone
# (rule, real page, config, reason): a bundled page (trafilatura-eval, or WARC "DIR/FILE:OFFSET") failing the rule
# under the default config or a real alternative (paragraph cleaning off; OBELICS's 2,000-word bound). Rules with
# no real page to drop (mean word length, symbols, flagged words, boilerplate, duplicate paragraphs) are
# covered by the degraded real pages further down.
REAL_DROPS = [
    # onlinemarketing.de: all trafilatura finds is the site's tagline twice (a line the stop-word rule removes)
    ("rule_word_count", "OnlineMarketing.de-Instagram.html", {}, "too_few_words"),
    ("rule_word_count", "healthline.com.fat.html", {"quality": {"max_words": 2000}}, "too_many_words"),
    ("rule_alpha_words", "abenteuer-astronomie.de.plejaden.html", NO_PARAGRAPHS, "alphabetic_words"),
    # a recipe: every line a bullet once OBELICS's line-by-line rules removed its headings (the structure-aware
    # rules keep the heading of the steps list, so bullets stay under the 0.9 share)
    ("rule_bullet_lines", "cybercook.com.br.sequilho.html", LINE_BY_LINE, "bullet_lines"),
    ("rule_bullet_lines", "denkanstoos.com.2012.html", LINE_BY_LINE, "bullet_lines"),
    ("rule_ellipsis_lines", "warcio-samples/example.warc:1197", NO_PARAGRAPHS, "ellipsis_lines"),  # "More information..."
    ("rule_stop_words", "echte-demokratie-jetzt.de.blog.html", NO_PARAGRAPHS, "stop_words"),
    ("rule_punctuation", "resiliparse-warcs/warcfile.warc.gz:32353", {}, "punctuation_ratio"),
    ("rule_special_characters", "resiliparse-warcs/warcfile.warc.gz:48321", {}, "special_character_ratio"),
    ("rule_duplicate_lines", "archive.ordnungsrausch.com.orga-life.html", NO_PARAGRAPHS, "duplicate_lines"),
    ("rule_duplicate_lines", "happyface313.com.plantur.html", NO_PARAGRAPHS, "duplicate_lines"),
    ("rule_top_ngrams", "feuerwehrverband.de-vorbereitungstagung.html", {}, "top_ngram_fraction"),
    ("rule_duplicate_ngrams", "sheego.de.cleaning.html", {}, "duplicate_ngram_fraction"),
    ("rule_duplicate_ngrams", "sportowefakty.wp.pl.falubaz.html", {}, "duplicate_ngram_fraction"),
    ("rule_repetition", "golfpost.de-premiere.html", NO_PARAGRAPHS, "character_repetition"),
    ("rule_repetition", "archive.ordnungsrausch.com.orga-life.html", NO_PARAGRAPHS, "word_repetition"),
]


@pytest.fixture(scope="module")
def all_pages(shared_data, pages):
    return {**pages, **warc_pages(str(shared_data))}


def as_checked(page, cfg):
    """The page's text as check_quality sees it under `cfg` (language found, paragraphs cleaned if on)."""
    doc = identify_language(copy.deepcopy(page["doc"]), cfg)
    assert isinstance(doc, dict), doc
    doc, _ = clean_paragraphs(doc, cfg)
    return quality._Text(doc["texts"], doc["language"])


@pytest.mark.parametrize("rule,name,overrides,expected", REAL_DROPS, ids=[f"{r[0]}-{r[1]}" for r in REAL_DROPS])
def test_rule_drops_a_real_page_and_keeps_real_articles(all_pages, rule, name, overrides, expected):
    cfg = DocumentConfig.from_dict(overrides)
    fn = getattr(quality, rule)
    r = fn(as_checked(all_pages[name], cfg), cfg.quality)
    assert isinstance(r, Reject) and r.reason == expected, (name, r)
    kept = [n for n in (LONG, "en.wikipedia.org.tsne.html", ZEIT) if fn(as_checked(all_pages[n], cfg), cfg.quality) is None]
    assert len(kept) >= 2, (rule, kept)  # the same rule and config keep real articles


def test_paragraph_rules_on_real_lines(pages, cfg):
    """Real paragraphs of the bundled pages, each failing one node rule; and real ones that pass."""
    p = cfg.paragraphs
    cases = [  # (page, line prefix, language, reason)
        ("0b4609a864eb4fa0bbcb2b395f6be9eb.html", "Bildquelle:", "de", "too_few_words"),
        ("0a4a8ab61c054192b1ec70cc3570cf45.html", "Neues gastronomisches Konzept:", "de", "stop_words"),
        ("0b4609a864eb4fa0bbcb2b395f6be9eb.html", "14.10.2020 ∙ 14:00 Uhr", "de", "special_character_ratio"),
        ("bergsteigen.com-skibergsteigen.html", "- Das Steigeisenfach kann dank", "de", "punctuation_ratio"),
        ("modepilot.de.duschkopf.html", "Allerdings sieht es wie ein Dildo aus", "de", "flagged_words"),
        ("pamelaandersonfoundation.org.yellow.html", "Getting a new car is probably", "en", "word_repetition"),
        # Arabic sentences end with "؟" (and use "،"): punctuation, so the interview questions stay
        ("assabah.com.tn.article.html", "*ما الذي يحدث في السودان", "ar", None),
        (ZEIT, "Weltweit finanzieren Banken und Investoren", "de", None),
        (LONG, "However, incursions into their territories", "en", None),
    ]
    for name, prefix, lang, expected in cases:
        line = next(x for x in lines_of(pages[name]["doc"]) if x.startswith(prefix))
        assert quality.paragraph_reject_reason(line, lang, p) == expected, (name, line)


# ---- degraded real pages are dropped with the right reason ----


@pytest.fixture(scope="module")
def base(pages, cfg):
    return prepared(pages, LONG, cfg)


def test_base_page_passes(base, cfg):
    assert reason(check_quality(base, cfg)) == "keep"
    assert base["language"] == "en"


def test_repeated_text(base, cfg):
    assert reason(check_quality(with_lines(base, lines_of(base) * 3), cfg)) == "duplicate_lines"


def test_bullet_list(base, cfg):
    assert reason(check_quality(with_lines(base, ["• " + x for x in lines_of(base)]), cfg)) == "bullet_lines"


def test_truncated(base, cfg):
    doc = with_lines(base, [" ".join(lines_of(base)[0].split()[:5])])
    r = check_quality(doc, cfg)
    assert reason(r) == "too_few_words" and r.detail.endswith("< min 10")


def test_navigation_menu(base, cfg):
    menu = ["Home", "News", "Politics", "Environment", "Science", "About us", "Contact", "Donate", "Archive",
            "Search", "Subscribe", "Privacy"]
    doc = with_lines(base, menu)
    doc, removed = clean_paragraphs(doc, cfg)
    assert removed == len(menu) and lines_of(doc) == []
    assert reason(check_quality(doc, cfg)) == "too_few_words"


def test_teaser_lines_ending_in_ellipsis(base, cfg):
    teasers = [" ".join(x.split()[:12]) + " ..." for x in lines_of(base)]
    assert reason(check_quality(with_lines(base, teasers), cfg)) == "ellipsis_lines"


def test_hashtag_spam(base, cfg):
    tagged = [" ".join("#" + w for w in x.split()) for x in lines_of(base)]
    assert reason(check_quality(with_lines(base, tagged), cfg)) == "symbol_ratio"


def test_glued_words(base, cfg):
    glued = ["-".join(x.split()) for x in lines_of(base)]
    r = check_quality(with_lines(base, glued), cfg)
    assert reason(r) == "too_few_words" or reason(r) == "mean_word_length"
    long_glue = [" ".join("-".join(x.split()[i : i + 3]) for i in range(0, len(x.split()), 3)) for x in lines_of(base)]
    assert reason(check_quality(with_lines(base, long_glue), cfg)) == "mean_word_length"


def test_numbers_table(base, cfg):
    table = [" ".join(f"{w} 2020 | 19.00" for w in x.split()) for x in lines_of(base)]
    assert reason(check_quality(with_lines(base, table), cfg)) == "alphabetic_words"


def test_keyword_list_without_stop_words(base, cfg):
    stops = quality.stop_words("en")
    keywords = [" ".join(w for w in x.split() if w.lower().strip(".,;:") not in stops) for x in lines_of(base)]
    r = check_quality(with_lines(base, keywords), cfg)
    assert reason(r) == "stop_words" and "(en)" in r.detail
    unknown = with_lines(base, keywords)
    unknown["language"] = None  # no list for the language: rule skipped, not failed
    assert reason(check_quality(unknown, cfg)) != "stop_words"


def test_flagged_words(base, cfg):
    spam = [" ".join(w + (" porn" if i % 15 == 0 else "") for i, w in enumerate(x.split())) for x in lines_of(base)]
    assert reason(check_quality(with_lines(base, spam), cfg)) == "flagged_words"


def test_no_punctuation(base, cfg):
    stripped = [re.sub(r"[.,;:!?…]", "", x) for x in lines_of(base)]
    assert reason(check_quality(with_lines(base, stripped), cfg)) == "punctuation_ratio"


def test_special_characters(base, cfg):
    quoted = [" ".join(f"«{w}»," for w in x.split()) for x in lines_of(base)]
    assert reason(check_quality(with_lines(base, quoted), cfg)) == "special_character_ratio"


def test_repeated_paragraph_blocks(base, cfg):
    # the same paragraphs again, but as one block with lines merged: no duplicate line, duplicate n-grams
    lines = lines_of(base)
    doc = with_lines(base, lines + [" ".join(lines[:8])])
    assert reason(check_quality(doc, cfg)) == "duplicate_ngram_fraction"


def test_repeated_short_phrase(base, cfg):
    words = " ".join(lines_of(base)).split()
    stuffed = " ".join(" ".join(words[i : i + 3]) + " buy now" for i in range(0, len(words), 3))
    lines = [stuffed[i : i + 400] for i in range(0, len(stuffed), 400)]
    assert reason(check_quality(with_lines(base, lines), cfg)) == "top_ngram_fraction"


def test_character_and_word_repetition(base, cfg):
    loose = DocumentConfig.from_dict(
        {"quality": {"max_top_ngram_chars": {}, "max_duplicate_ngram_chars": {}, "max_duplicate_lines": 1.0,
                     "max_duplicate_line_chars": 1.0, "max_duplicate_paragraphs": 1.0,
                     "max_duplicate_paragraph_chars": 1.0}}
    )
    spam = with_lines(base, lines_of(base) + ["Click here to win! " * 100])
    assert reason(check_quality(spam, loose)) == "character_repetition"
    no_chars = DocumentConfig.from_dict({**loose.to_dict(), "quality": {**loose.to_dict()["quality"],
                                                                       "max_char_repetition": 1.0}})
    assert reason(check_quality(spam, no_chars)) == "word_repetition"
    assert reason(check_quality(base, loose)) == "keep"


def test_boilerplate_only_page(base, cfg):
    banner = [
        "Diese Website verwendet Cookies, um Ihnen ein besseres Nutzererlebnis zu bieten.",
        "Mit der Nutzung unserer Seite stimmen Sie der Cookie-Richtlinie und der Datenschutzerklärung zu.",
        "Alle akzeptieren",
        "Impressum | Datenschutz | Nutzungsbedingungen",
        "Newsletter abonnieren und nichts mehr verpassen!",
        "© 2024 Beispiel Verlag GmbH. Alle Rechte vorbehalten.",
    ]
    real = lines_of(base)[0]
    r = check_quality(with_lines(base, banner + [real]), cfg)
    assert reason(r) == "boilerplate_only"
    # a real article with the same footer is kept
    assert reason(check_quality(with_lines(base, lines_of(base) + banner[3:]), cfg)) == "keep"


# ---- the vectorised statistics agree with plain definitions on real text ----


def _dup_fraction(words, n):
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    covered = set()
    for i in range(len(words) - n + 1):
        if grams[tuple(words[i : i + n])] > 1:
            covered.update(range(i, i + n))
    return sum(len(words[i]) for i in covered) / sum(map(len, words))


def _top_fraction(words, n):
    grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
    gram, count = grams.most_common(1)[0]
    return 0.0 if count < 2 else count * sum(map(len, gram)) / sum(map(len, words))


def _char_repetition(text, n):
    freqs = sorted(Counter(text[i : i + n] for i in range(len(text) - n + 1)).values(), reverse=True)
    k = min(int(len(freqs) ** 0.5), sum(f > 1 for f in freqs))
    return sum(freqs[:k]) / sum(freqs)


@pytest.mark.parametrize("name", ["sheego.de.cleaning.html", "whiskyverkostung.com.halle.html", LONG])
def test_vectorised_statistics_match_definitions(pages, name):
    t = quality._Text(pages[name]["doc"]["texts"], None)
    for n in (5, 7, 10):
        assert t.grams.duplicate_char_fraction(n) == pytest.approx(_dup_fraction(t.norm, n))
    for n in (2, 3, 4):
        assert t.grams.top_char_fraction(n) == pytest.approx(_top_fraction(t.norm, n))
    assert quality.char_repetition_ratio(t.text, 10) == pytest.approx(_char_repetition(t.text, 10))
    assert t.grams.repetition_ratio(5) == pytest.approx(quality.word_repetition_ratio(t.norm, 5))
    lines = [x for t in pages[name]["doc"]["texts"] if t for x in t.split("\n")]
    batch = quality.char_repetition_ratios(lines, 10)
    together = quality.CharCounts.of_lines([x for x in lines if x])
    assert [vars(c) for c in together] == [vars(quality.CharCounts(x)) for x in lines if x]
    assert list(batch) == pytest.approx([_char_repetition(x, 10) if len(x) >= 10 else 0.0 for x in lines])
