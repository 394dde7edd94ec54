"""Language identification with py3langid (langid.py's bundled model; no download at run time)."""

from __future__ import annotations

import functools

from mmcorpus.filters.reasons import Reject


@functools.lru_cache(maxsize=1)
def _identifier():
    from py3langid.langid import MODEL_DIR, MODEL_FILE, LanguageIdentifier

    # norm_probs=True: a probability over the ~100 languages, comparable to OBELICS's fastText confidence.
    return LanguageIdentifier.from_modelpath(MODEL_DIR / MODEL_FILE, norm_probs=True)


def document_text(doc: dict) -> str:
    return "\n".join(t for t in doc.get("texts") or () if t)


def detect(text: str, max_chars: int = 1000) -> tuple[str | None, float]:
    """(ISO code, probability) of `text`, or (None, 0.0) when it holds no letters."""
    sample = text[:max_chars]
    if not any(c.isalpha() for c in sample):
        return None, 0.0
    lang, prob = _identifier().classify(sample)
    return lang, float(prob)


def identify_language(doc: dict, cfg) -> dict | Reject:
    """Set doc["language"] / doc["language_score"]; reject below the confidence threshold or outside the
    allowed list (an empty list allows every language)."""
    lc = cfg.language
    lang, score = detect(document_text(doc), lc.max_chars)
    doc["language"] = lang
    doc["language_score"] = round(score, 4)
    if lang is None:
        return Reject("language_low_confidence", "no letters to identify a language from")
    if score < lc.min_score:
        return Reject("language_low_confidence", f"{lang} score {score:.3f} < min {lc.min_score}")
    if lc.allowed and lang not in lc.allowed:
        return Reject("language_not_allowed", f"{lang} ({score:.3f}) not in {sorted(lc.allowed)}")
    return doc
