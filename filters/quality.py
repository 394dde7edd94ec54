"""Text quality rules: OBELICS paragraph (node) and document rules, Gopher line and repetition rules.

Units: a *paragraph* is one line of extracted text (trafilatura writes one block element - paragraph, heading,
list item - per line); a *block* is a run of lines between blank lines (Gopher's paragraph). Words are
whitespace tokens, except that CJK/kana/Thai characters count one word each (those scripts use no spaces).
Each rule is a small function returning `Reject(reason, "measured vs threshold")` or None.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections import Counter
from functools import cached_property

import numpy as np

from mmcorpus.filters.reasons import Reject
from mmcorpus.filters.wordlists import BOILERPLATE, FLAGGED_WORDS, stop_words

_NOSPACE = "\u0e00-\u0e7f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD_RE = re.compile(rf"[{_NOSPACE}]|[^\s{_NOSPACE}]+")
_NOSPACE_RE = re.compile(rf"[{_NOSPACE}]")
# Normalised words: lowercase letter/digit runs (inner ' ’ . - kept: "don't", "z.b", "e-mail"); CJK/Thai
# characters one each. Punctuation and symbols are not words here.
_NORM_RE = re.compile(rf"[{_NOSPACE}]|[^\W_{_NOSPACE}]+(?:['’.-][^\W_{_NOSPACE}]+)*")
# Whitespace tokens without a single letter (numbers, symbols, punctuation runs).
_NONALPHA_RE = re.compile(r"(?<!\S)(?:[^\s\w]|[\d_])+(?!\S)")
# OBELICS/BigScience "special characters": punctuation, digits, whitespace and typographic symbols.
_SPECIAL_RE = re.compile(
    r"[\s\d!-/:-@\[-`{-~¡-¿‐-⁞€-₿←-⯿"  # ASCII punctuation, Latin-1 symbols, general punctuation, arrows...
    r"\u3000-\u303f\uff01-\uff20\uff3b-\uff40\uff5b-\uff65\U0001F000-\U0001FAFF]"  # CJK/fullwidth forms, emoji
)
# Sentence punctuation, with the Arabic/Urdu, Devanagari, Ethiopic and Armenian marks
_PUNCT_RE = re.compile(r"[.!?…;:,。！？，、；：،؛؟۔।॥።፣፤։]")
_BULLET_RE = re.compile(r"^\s*[-*•●○◦▪▫■□►▸‣⁃→✓✔➤➢·]")
_BLANK_RE = re.compile(r"\n\s*\n")


class CharCounts:
    """Special characters, punctuation marks and CJK/Thai characters of a text, counted in one numpy pass
    over a code-point table built once from the regexes above (10x faster than the regexes on a page)."""

    _SIZE = 0x1FB00  # the table covers every code point the classes name; beyond it nothing is special

    def __init__(self, text: str):
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        c = np.bincount(_char_table()[np.minimum(codes, self._SIZE)], minlength=8).tolist()
        self.length = len(text)
        self.special = c[1] + c[3] + c[5] + c[7]
        self.punct = c[2] + c[3] + c[6] + c[7]
        self.nospace = c[4] + c[5] + c[6] + c[7]

    @classmethod
    def of_lines(cls, lines: list[str]) -> list["CharCounts"]:
        """CharCounts of each of `lines` (none empty) from one numpy pass over their concatenation."""
        lens = np.fromiter(map(len, lines), dtype=np.int64, count=len(lines))
        if not len(lines) or not lens.all():
            return [cls(line) for line in lines]
        codes = np.frombuffer("".join(lines).encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
        classes = _char_table()[np.minimum(codes, cls._SIZE)].astype(np.int64)
        starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
        bits = np.add.reduceat(np.stack([classes & 1, (classes >> 1) & 1, (classes >> 2) & 1]), starts, axis=1)
        out = []
        for length, special, punct, nospace in zip(lens.tolist(), *bits.tolist()):
            c = cls.__new__(cls)
            c.length, c.special, c.punct, c.nospace = length, special, punct, nospace
            out.append(c)
        return out


@functools.lru_cache(maxsize=1)
def _char_table() -> np.ndarray:
    table = np.zeros(CharCounts._SIZE + 1, dtype=np.uint8)
    for cp in range(CharCounts._SIZE):
        ch = chr(cp)
        special, punct, nospace = _SPECIAL_RE.match(ch), _PUNCT_RE.match(ch), _NOSPACE_RE.match(ch)
        table[cp] = bool(special) | bool(punct) << 1 | bool(nospace) << 2
    return table


def count_words(text: str, chars: CharCounts | None = None) -> int:
    """Whitespace words; CJK/Thai characters count one word each."""
    if (chars.nospace if chars is not None else _NOSPACE_RE.search(text)):
        return len(_WORD_RE.findall(text))
    return len(text.split())


def _normalise(text: str) -> list[str]:
    return _NORM_RE.findall(text.lower())


def _ratio(part: float, whole: float) -> float:
    return part / whole if whole else 0.0


def special_ratio(text: str) -> float:
    """OBELICS/BigScience special characters (punctuation, digits, whitespace, symbols, emoji) / characters."""
    c = CharCounts(text)
    return _ratio(c.special, c.length)


def punctuation_ratio(text: str, n_words: int) -> float:
    """Punctuation marks (. , ; : ! ? … and CJK forms) per word."""
    return _ratio(CharCounts(text).punct, n_words)


_P = np.uint64(1_000_003)
_MIX = np.uint64(0x9E3779B97F4A7C15)


def _window_hashes(codes: np.ndarray, n: int) -> np.ndarray:
    """64-bit polynomial hash of every window of n consecutive codes (uint64 arithmetic wraps)."""
    m = len(codes) - n + 1
    h = np.zeros(m, dtype=np.uint64)
    for j in range(n):
        h = h * _P + codes[j : j + m]
    return h


def char_repetition_ratios(texts: list[str], n: int) -> np.ndarray:
    """Character n-gram repetition of each text (OBELICS/BigScience style): the top min(sqrt(#distinct),
    #repeated) n-gram frequencies over all n-grams of the text; 0 for a text without repeats. All texts in
    one numpy pass (windows never cross from one text into the next)."""
    nt = len(texts)
    lens = np.fromiter(map(len, texts), dtype=np.int64, count=nt)
    codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
    if len(codes) < n:
        return np.zeros(nt)
    h = _window_hashes(codes, n)
    if nt == 1:
        _, counts = np.unique(h, return_counts=True)
        counts = -np.sort(-counts)
        k = min(int(math.sqrt(len(counts))), int((counts > 1).sum()))
        return np.array([counts[:k].sum() / len(h)])
    owner = np.repeat(np.arange(nt), lens)[: len(h)]
    valid = np.arange(len(h)) + n <= np.cumsum(lens)[owner]
    h, owner = h[valid], owner[valid]
    # one group per (text, n-gram): the hash mixed with the text number
    _, first, counts = np.unique(h ^ (owner.astype(np.uint64) * _MIX), return_index=True, return_counts=True)
    gowner = owner[first]
    distinct = np.bincount(gowner, minlength=nt)
    repeated = np.bincount(gowner, weights=counts > 1, minlength=nt).astype(np.int64)
    k = np.minimum(np.floor(np.sqrt(distinct)).astype(np.int64), repeated)
    by_count = np.lexsort((-counts, gowner))
    gowner, counts = gowner[by_count], counts[by_count]
    rank = np.arange(len(gowner)) - np.searchsorted(gowner, np.arange(nt))[gowner]
    top = rank < k[gowner]
    top_sum = np.bincount(gowner[top], weights=counts[top], minlength=nt)
    total = np.bincount(owner, minlength=nt)
    return np.divide(top_sum, total, out=np.zeros(nt), where=total > 0)


def char_repetition_ratio(text: str, n: int) -> float:
    return float(char_repetition_ratios([text], n)[0])


def word_repetition_ratio(words: list[str], n: int) -> float:
    """Share of word n-gram occurrences whose n-gram occurs more than once."""
    grams = list(zip(*(words[i:] for i in range(n))))
    if len(set(grams)) == len(grams):
        return 0.0
    counts = Counter(grams)
    return _ratio(sum(c for c in counts.values() if c > 1), len(grams))


class WordNgrams:
    """Word n-gram statistics of one text (Gopher), vectorised: words become ids, n-grams become hashes."""

    def __init__(self, words: list[str]):
        vocab: dict[str, int] = {}
        self.ids = np.array([vocab.setdefault(w, len(vocab)) for w in words], dtype=np.uint64)
        self.lens = np.array([len(w) for w in words], dtype=np.int64)
        self.chars = int(self.lens.sum())
        self._cache: dict[int, np.ndarray] = {}

    def position_counts(self, n: int) -> np.ndarray:
        """For each n-gram position, how often that n-gram occurs in the text."""
        if n not in self._cache:
            if len(self.ids) < n:
                self._cache[n] = np.zeros(0, dtype=np.int64)
            else:
                _, inverse, counts = np.unique(
                    _window_hashes(self.ids, n), return_inverse=True, return_counts=True
                )
                self._cache[n] = counts[inverse.ravel()]
        return self._cache[n]

    def top_char_fraction(self, n: int) -> float:
        """Characters covered by the most frequent n-gram (if repeated) / characters of all words."""
        pc = self.position_counts(n)
        if len(pc) == 0 or pc.max() < 2:
            return 0.0
        i = int(pc.argmax())
        return _ratio(int(pc[i]) * int(self.lens[i : i + n].sum()), self.chars)

    def duplicate_char_fraction(self, n: int) -> float:
        """Characters of words inside any n-gram occurring more than once / characters of all words."""
        pc = self.position_counts(n)
        if len(pc) == 0:
            return 0.0
        dup = pc > 1
        covered = np.zeros(len(self.ids), dtype=bool)
        for j in range(n):
            covered[j : j + len(dup)] |= dup
        return _ratio(int(self.lens[covered].sum()), self.chars)

    def repetition_ratio(self, n: int) -> float:
        """Share of n-gram occurrences whose n-gram occurs more than once."""
        pc = self.position_counts(n)
        return _ratio(int((pc > 1).sum()), len(pc))


def _duplicates(items: list[str]) -> tuple[int, int]:
    seen: set[str] = set()
    n = chars = 0
    for x in items:
        if x in seen:
            n += 1
            chars += len(x)
        else:
            seen.add(x)
    return n, chars


class _Text:
    """A document's text, split and counted once; rules read the parts they need."""

    def __init__(self, texts: list, language: str | None, units: list | None = None):
        self.blocks = [b.strip() for t in texts if t for b in _BLANK_RE.split(t) if b.strip()]
        self.text = "\n".join(self.blocks)
        self.language = language
        self._units = units if isinstance(units, list) and len(units) == len(texts) else None
        self._texts = texts

    @cached_property
    def prose(self) -> "_Text":
        """The paragraphs and headings alone (lists, tables and code blocks left out) when the document carries
        its line units and they hold at least 10 words; else the whole text. The ratio rules (stop words,
        letters, special characters, punctuation) describe prose: an article's ingredient list, results table
        or code listing is judged as a unit by the paragraph rules, not by the prose ratios."""
        if self._units is None:
            return self
        kept = []
        for text, units in zip(self._texts, self._units):
            lines = [x for x in (text or "").split("\n") if x.strip()]
            if text is not None and (units is None or len(units) != len(lines)):
                return self
            kept += [x for x, u in zip(lines, units or []) if ":" not in u]
        prose = _Text(["\n".join(kept)], self.language)
        return prose if prose.n_words >= 10 else self

    @cached_property
    def lines(self) -> list[str]:
        return [s for line in self.text.split("\n") if (s := line.strip())]

    @cached_property
    def n_words(self) -> int:
        return count_words(self.text, self.chars)

    @cached_property
    def chars(self) -> CharCounts:
        return CharCounts(self.text)

    @cached_property
    def norm(self) -> list[str]:
        return _normalise(self.text)

    @cached_property
    def grams(self) -> WordNgrams:
        return WordNgrams(self.norm)

    @cached_property
    def nospace(self) -> bool:
        """Mostly CJK/Thai character "words": word-length and word n-gram rules do not apply."""
        return self.chars.nospace > self.n_words / 2

    @cached_property
    def stops(self) -> frozenset[str]:
        return stop_words(self.language)


def _over(reason: str, name: str, value: float, limit: float) -> Reject | None:
    return Reject(reason, f"{name} {value:.3f} > max {limit}") if value > limit else None


def _under(reason: str, name: str, value: float, limit: float) -> Reject | None:
    return Reject(reason, f"{name} {value:.3f} < min {limit}") if value < limit else None


# ---- document rules: each takes (_Text, QualityConfig) ----


def rule_boilerplate(t: _Text, q) -> Reject | None:
    short = [x for x in t.lines if len(x) < 300]  # boilerplate comes in short lines
    if sum(map(len, short)) <= q.max_boilerplate_chars * len(t.text):
        return None  # even if every short line were boilerplate the share stays under the limit
    chars = sum(len(x) for x in short if BOILERPLATE.search(x.lower()))
    return _over("boilerplate_only", "boilerplate character share", _ratio(chars, len(t.text)), q.max_boilerplate_chars)


def rule_word_count(t: _Text, q) -> Reject | None:
    n = t.n_words
    if n < q.min_words:
        return Reject("too_few_words", f"{n} words < min {q.min_words}")
    if n > q.max_words:
        return Reject("too_many_words", f"{n} words > max {q.max_words}")
    return None


def rule_alpha_words(t: _Text, q) -> Reject | None:
    t = t.prose
    alpha = t.n_words - len(_NONALPHA_RE.findall(t.text))
    return _under("alphabetic_words", "share of words with a letter", _ratio(alpha, t.n_words), q.min_alpha_words)


def rule_mean_word_length(t: _Text, q) -> Reject | None:
    if t.nospace:
        return None
    mean = _ratio(sum(map(len, t.norm)), len(t.norm))
    if mean < q.min_mean_word_length or mean > q.max_mean_word_length:
        return Reject(
            "mean_word_length", f"{mean:.2f} outside [{q.min_mean_word_length}, {q.max_mean_word_length}]"
        )
    return None


def rule_symbols(t: _Text, q) -> Reject | None:
    symbols = t.text.count("#") + t.text.count("...") + t.text.count("…")
    return _over("symbol_ratio", "symbols (#, ...) per word", _ratio(symbols, t.n_words), q.max_symbol_ratio)


def rule_bullet_lines(t: _Text, q) -> Reject | None:
    share = _ratio(sum(1 for x in t.lines if _BULLET_RE.match(x)), len(t.lines))
    return _over("bullet_lines", "share of lines starting with a bullet", share, q.max_bullet_lines)


def rule_ellipsis_lines(t: _Text, q) -> Reject | None:
    share = _ratio(sum(1 for x in t.lines if x.endswith(("...", "…"))), len(t.lines))
    return _over("ellipsis_lines", "share of lines ending with an ellipsis", share, q.max_ellipsis_lines)


def rule_stop_words(t: _Text, q) -> Reject | None:
    t = t.prose
    if not t.stops:  # no list for this language (or unknown language): skip rather than reject
        return None
    n = sum(map(t.stops.__contains__, t.norm))
    if n < q.min_stop_words:
        return Reject("stop_words", f"{n} stop words ({t.language}) < min {q.min_stop_words}")
    return _under("stop_words", f"stop-word ratio ({t.language})", _ratio(n, len(t.norm)), q.min_stop_word_ratio)


def _flagged_ratio(norm: list[str]) -> float:
    if FLAGGED_WORDS.isdisjoint(norm):
        return 0.0
    return _ratio(sum(map(FLAGGED_WORDS.__contains__, norm)), len(norm))


def rule_flagged_words(t: _Text, q) -> Reject | None:
    return _over("flagged_words", "flagged-word ratio", _flagged_ratio(t.norm), q.max_flagged_ratio)


def rule_punctuation(t: _Text, q) -> Reject | None:
    t = t.prose
    value = _ratio(t.chars.punct, t.n_words)
    return _under("punctuation_ratio", "punctuation marks per word", value, q.min_punctuation_ratio)


def rule_special_characters(t: _Text, q) -> Reject | None:
    t = t.prose
    return _over("special_character_ratio", "special-character ratio", _ratio(t.chars.special, t.chars.length), q.max_special_ratio)


def rule_duplicate_lines(t: _Text, q) -> Reject | None:
    total = len(t.text)
    for unit, items, max_n, max_c in (
        ("lines", t.lines, q.max_duplicate_lines, q.max_duplicate_line_chars),
        ("paragraphs", t.blocks, q.max_duplicate_paragraphs, q.max_duplicate_paragraph_chars),
    ):
        n, chars = _duplicates(items)
        reason = "duplicate_lines" if unit == "lines" else "duplicate_paragraphs"
        r = _over(reason, f"duplicate {unit} share", _ratio(n, len(items)), max_n) or _over(
            reason, f"characters in duplicate {unit}", _ratio(chars, total), max_c
        )
        if r:
            return r
    return None


def rule_top_ngrams(t: _Text, q) -> Reject | None:
    if t.nospace:
        return None
    for n, limit in sorted(q.max_top_ngram_chars.items()):
        r = _over("top_ngram_fraction", f"top {n}-gram character share", t.grams.top_char_fraction(n), limit)
        if r:
            return r
    return None


def rule_duplicate_ngrams(t: _Text, q) -> Reject | None:
    if t.nospace:
        return None
    items = sorted(q.max_duplicate_ngram_chars.items())
    floor = min((limit for _, limit in items), default=1.0)
    for n, limit in items:
        value = t.grams.duplicate_char_fraction(n)
        r = _over("duplicate_ngram_fraction", f"duplicate {n}-gram character share", value, limit)
        if r:
            return r
        if value <= floor:  # coverage only shrinks as n grows: no larger n can fail
            return None
    return None


def rule_repetition(t: _Text, q) -> Reject | None:
    value = char_repetition_ratio(t.text, q.char_repetition_n)
    r = _over("character_repetition", f"character {q.char_repetition_n}-gram repetition", value, q.max_char_repetition)
    if r:
        return r
    value = t.grams.repetition_ratio(q.word_repetition_n)
    return _over("word_repetition", f"word {q.word_repetition_n}-gram repetition", value, q.max_word_repetition)


# Cheap rules first; the first failing rule names the reason.
DOCUMENT_RULES = (
    rule_boilerplate,
    rule_word_count,
    rule_alpha_words,
    rule_mean_word_length,
    rule_symbols,
    rule_bullet_lines,
    rule_ellipsis_lines,
    rule_stop_words,
    rule_flagged_words,
    rule_punctuation,
    rule_special_characters,
    rule_duplicate_lines,
    rule_top_ngrams,
    rule_duplicate_ngrams,
    rule_repetition,
)


def check_quality(doc: dict, cfg) -> dict | Reject:
    """Document-level quality: the document, or the Reject of the first rule it fails."""
    t = _Text(doc.get("texts") or [], doc.get("language"), (doc.get("metadata") or {}).get("_units"))
    for rule in DOCUMENT_RULES:
        r = rule(t, cfg.quality)
        if r is not None:
            return r
    return doc


# ---- paragraph (node) rules ----


def paragraph_reject_reason(line: str, language: str | None, p, chars_check: bool = True,
                            chars: CharCounts | None = None) -> str | None:
    """Reason the paragraph fails an OBELICS node-level rule, or None to keep it (`chars_check=False` leaves
    out character repetition, which clean_paragraphs computes for all paragraphs at once; `chars`: the line's
    CharCounts when the caller counted them already)."""
    chars = CharCounts(line) if chars is None else chars
    n = count_words(line, chars)
    if n < p.min_words:
        return "too_few_words"
    if n > p.max_words:
        return "too_many_words"
    if _ratio(chars.special, chars.length) > p.max_special_ratio:
        return "special_character_ratio"
    norm = _normalise(line)
    stops = stop_words(language)
    if stops and _ratio(sum(map(stops.__contains__, norm)), len(norm)) < p.min_stop_word_ratio:
        return "stop_words"
    if not FLAGGED_WORDS.isdisjoint(norm) and _flagged_ratio(norm) > p.max_flagged_ratio:
        return "flagged_words"
    if n >= p.punctuation_min_words and _ratio(chars.punct, n) < p.min_punctuation_ratio:
        return "punctuation_ratio"
    if n >= p.word_repetition_n and word_repetition_ratio(norm, p.word_repetition_n) > p.max_word_repetition:
        return "word_repetition"
    if chars_check and char_repetition_ratio(line, p.char_repetition_n) > p.max_char_repetition:
        return "character_repetition"
    return None


def _line_units(doc: dict, layout: list, n_lines: int) -> list[str]:
    """The unit of every line (extract's metadata "_units", taken out of the document): "p" for all lines when
    the document has none or they do not match its lines (a document edited since extraction)."""
    units = (doc.get("metadata") or {}).pop("_units", None)
    flat: list[str] = []
    if isinstance(units, list) and len(units) == len(layout):
        for (blocks, _, _), u in zip(layout, units):
            n = sum(map(len, blocks)) if blocks is not None else 0
            if (u is None) != (blocks is None) or (u is not None and len(u) != n):
                return ["p"] * n_lines
            flat.extend(u or [])
    return flat if len(flat) == n_lines else ["p"] * n_lines


SOFT_REASONS = frozenset({"too_few_words", "stop_words", "punctuation_ratio", "special_character_ratio"})
NEAR_GOOD_REASONS = frozenset({"stop_words", "punctuation_ratio"})  # sentences long enough, a ratio off


def _groups(units: list[str]) -> dict[str, list[int]]:
    """Line numbers of each unit in reading order: a list, table or code block is one unit, any other line one."""
    groups: dict[str, list[int]] = {}
    for i, u in enumerate(units):
        groups.setdefault(u if ":" in u else f"{u}#{i}", []).append(i)
    return groups


def _unit_verdicts(lines: list[str], units: list[str], language: str | None, p) -> list[str | None]:
    """Reject reason (or None) per line, judged by unit. A paragraph is judged alone, a list as one text (its
    items joined); tables and code blocks are kept or dropped whole (`p.tables`, `p.code`: keep, drop, or
    rules: judged as one text). A unit failing only a soft rule (SOFT_REASONS: short, few stop words, little
    punctuation, many digits or symbols) between two units that pass stays: inside an article it is a short
    line of the article; at the edges of the content it is furniture. A near-good unit (long enough, only a
    ratio off) needs one passing neighbour (jusText's context rules, Pomikalek 2011); a table, which has few stop
    words and little punctuation by nature, needs two.
    Headings are left to _judge_headings, character repetition to the caller."""
    verdict: list[str | None] = [None] * len(lines)
    groups = _groups(units)
    keys = list(groups)
    chars = CharCounts.of_lines([_joined(lines, g) for g in groups.values()])
    judged: dict[str, str | None] = {}  # unit -> reason, for the units the rules judge
    for key, c in zip(keys, chars):
        option = {"tr": p.tables, "code": p.code}.get(key.split(":")[0], "rules")
        if key.startswith("h#") or option == "keep":
            continue
        if option == "drop":
            reason = "table_dropped" if key.startswith("tr:") else "code_dropped"
        else:
            members = groups[key]
            unit_p = p  # a list's length limit holds for each item, not for the list
            if len(members) > 1 and max(count_words(lines[i]) for i in members) <= p.max_words:
                unit_p = dataclasses.replace(p, max_words=math.inf)
            reason = paragraph_reject_reason(_joined(lines, members), language, unit_p, chars_check=False, chars=c)
            judged[key] = reason
        for i in groups[key]:
            verdict[i] = reason
    order = [k for k in keys if k in judged and judged[k] not in SOFT_REASONS]  # units passing or hard-failing
    position = {k: n for n, k in enumerate(order)}
    nearest = {}
    last = None
    for k in keys:  # the nearest non-soft judged unit before each unit
        nearest[k] = last
        if k in position:
            last = k
    after = None
    for k in reversed(keys):
        if judged.get(k) in SOFT_REASONS:
            good = [n is not None and judged[n] is None for n in (nearest[k], after)]
            if all(good) or (any(good) and judged[k] in NEAR_GOOD_REASONS and not k.startswith("tr:")):
                for i in groups[k]:
                    verdict[i] = None
        if k in position:
            after = k
    return verdict


def _joined(lines: list[str], members: list[int]) -> str:
    """A list's items or a table's rows as one text ("- " item marks and " | " cell marks left out)."""
    if len(members) == 1:
        return lines[members[0]]
    return " ".join(lines[i].removeprefix("- ").replace(" | ", " ") for i in members)


def _judge_headings(units: list[str], keep: list[bool], passes: list[bool]) -> list[bool]:
    """A heading is kept when a non-heading line after it, before the next heading, is kept, or when it passes
    the paragraph rules itself (a long heading that is a sentence)."""
    keep = list(keep)
    section_kept = False
    for i in range(len(units) - 1, -1, -1):
        if units[i] == "h":
            keep[i] = section_kept or passes[i]
            section_kept = False
        elif keep[i]:
            section_kept = True
    return keep


def clean_paragraphs(doc: dict, cfg) -> tuple[dict, int]:
    """Remove text paragraphs failing a node-level rule, judged by unit (`p.units`; see _unit_verdicts) or line
    by line (OBELICS). Image positions stay; a text position left empty is removed. Returns (doc, paragraphs
    removed); counts per reason go to doc["metadata"]["removed_paragraphs"], the share of the extracted words
    removed to doc["metadata"]["removed_word_share"] (with "extracted_words")."""
    p = cfg.paragraphs
    if not p.enabled:
        (doc.get("metadata") or {}).pop("_units", None)
        return doc, 0
    language = doc.get("language")
    removed: Counter = Counter()
    # pass 1: every rule but character repetition (characters counted for all lines or units at once)
    layout = []  # per position: (blocks as lists of line numbers | None, image, info)
    lines: list[str] = []
    info_list = doc.get("image_info") or [None] * len(doc["texts"])
    for text, image, info in zip(doc["texts"], doc["images"], info_list):
        blocks = None
        if text is not None:
            blocks = []
            for block in _BLANK_RE.split(text):
                numbers = []
                for line in block.split("\n"):
                    if line.strip():
                        numbers.append(len(lines))
                        lines.append(line)
                blocks.append(numbers)
        layout.append((blocks, image, info))
    units = _line_units(doc, layout, len(lines))
    if p.units:
        reasons = _unit_verdicts(lines, units, language, p)
    else:
        reasons = [paragraph_reject_reason(line, language, p, chars_check=False, chars=c)
                   for line, c in zip(lines, CharCounts.of_lines(lines))]
        units = ["p"] * len(lines)
    keep = [r is None for r in reasons]
    # pass 2: character repetition of all remaining units at once (tables and code kept whole are not judged)
    groups = {k: g for k, g in _groups(units).items()
              if keep[g[0]] and not k.startswith("h#")
              and {"tr": p.tables, "code": p.code}.get(k.split(":")[0], "rules") == "rules"}
    ok = char_repetition_ratios([_joined(lines, g) for g in groups.values()], p.char_repetition_n)
    for members, value in zip(groups.values(), ok):
        if value > p.max_char_repetition:
            for i in members:
                keep[i], reasons[i] = False, "character_repetition"
    if p.units:
        heads = [i for i, u in enumerate(units) if u == "h"]
        passes = [False] * len(lines)
        for i in heads:
            passes[i] = keep[i] and paragraph_reject_reason(lines[i], language, p) is None
        keep = _judge_headings(units, keep, passes)
    for i, k in enumerate(keep):
        if not k:
            removed[reasons[i] or "empty_section"] += 1
    texts, images, infos, kept_units = [], [], [], []
    for blocks, image, info in layout:
        text, text_units = None, None
        if blocks is not None:
            parts = ["\n".join(lines[i] for i in block if keep[i]) for block in blocks]
            text = "\n\n".join(x for x in parts if x)
            if not text:
                continue
            text_units = [units[i] for block in blocks for i in block if keep[i]]
        texts.append(text)
        images.append(image)
        infos.append(info)
        kept_units.append(text_units)
    doc["texts"], doc["images"], doc["image_info"] = texts, images, infos
    meta = doc.setdefault("metadata", {})
    if p.units:
        meta["_units"] = kept_units  # for the document rules (check_quality); "_" keys are never written
    words = [count_words(x) for x in lines]
    total = sum(words)
    meta["extracted_words"] = total
    meta["removed_word_share"] = round(_ratio(sum(w for w, k in zip(words, keep) if not k), total), 4)
    removed = +removed
    if removed:
        meta["removed_paragraphs"] = dict(sorted(removed.items()))
    return doc, sum(removed.values())


def check_removed_share(doc: dict, cfg) -> dict | Reject:
    """Reject a document the paragraph rules gutted: more than `paragraphs.max_removed_share` of its extracted
    words removed (a page whose article failed the rules, published as a remnant otherwise)."""
    meta = doc.get("metadata") or {}
    share, limit = meta.get("removed_word_share") or 0.0, cfg.paragraphs.max_removed_share
    if share > limit:
        return Reject("gutted_by_paragraph_rules",
                      f"{share:.3f} of {meta.get('extracted_words')} extracted words removed > max {limit}")
    return doc
