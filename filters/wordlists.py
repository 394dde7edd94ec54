"""Word lists for the document filters.

Stop words come from jusText's stoplists (BSD-2-Clause, github.com/miso-belica/jusText; frequent words per
language from Wikipedia, installed with trafilatura). The flagged-word list and boilerplate patterns below are
mmcorpus's own, short on purpose: they target pornographic spam pages and cookie/login/error pages.
"""

from __future__ import annotations

import functools
import re

# ISO 639-1/3 codes (py3langid labels) -> jusText stoplist names.
JUSTEXT_NAMES = {
    "af": "Afrikaans", "an": "Aragonese", "ar": "Arabic", "az": "Azerbaijani", "be": "Belarusian",
    "bg": "Bulgarian", "bn": "Bengali", "br": "Breton", "bs": "Bosnian", "ca": "Catalan", "cs": "Czech",
    "cy": "Welsh", "da": "Danish", "de": "German", "el": "Greek", "en": "English", "eo": "Esperanto",
    "es": "Spanish", "et": "Estonian", "eu": "Basque", "fa": "Persian", "fi": "Finnish", "fr": "French",
    "fy": "West_Frisian", "ga": "Irish", "gl": "Galician", "gu": "Gujarati", "he": "Hebrew", "hi": "Hindi",
    "hr": "Croatian", "ht": "Haitian", "hu": "Hungarian", "hy": "Armenian", "id": "Indonesian", "ig": "Igbo",
    "is": "Icelandic", "it": "Italian", "jv": "Javanese", "ka": "Georgian", "kk": "Kazakh", "kn": "Kannada",
    "ko": "Korean", "ku": "Kurdish", "ky": "Kyrgyz", "la": "Latin", "lb": "Luxembourgish", "lt": "Lithuanian",
    "lv": "Latvian", "mk": "Macedonian", "ml": "Malayalam", "mr": "Marathi", "ms": "Malay", "mt": "Maltese",
    "ne": "Nepali", "nl": "Dutch", "nn": "Norwegian_Nynorsk", "no": "Norwegian_Bokmal", "oc": "Occitan",
    "pl": "Polish", "pt": "Portuguese", "qu": "Quechua", "ro": "Romanian", "ru": "Russian", "sk": "Slovak",
    "sl": "Slovenian", "sq": "Albanian", "sr": "Serbian", "sv": "Swedish", "sw": "Swahili", "ta": "Tamil",
    "te": "Telugu", "tk": "Turkmen", "tl": "Tagalog", "tr": "Turkish", "uk": "Ukrainian", "ur": "Urdu",
    "uz": "Uzbek", "vi": "Vietnamese", "wa": "Walloon", "yo": "Yoruba",
}

_STRIP = "\"'()[]{}.,;:!?«»„“”‘’‚<>"


@functools.lru_cache(maxsize=None)
def stop_words(language: str | None) -> frozenset[str]:
    """Lowercase stop words of a language (ISO code); empty when no list exists (rules are then skipped)."""
    name = JUSTEXT_NAMES.get((language or "").lower())
    if name is None:
        return frozenset()
    import justext  # ships with trafilatura

    words = set()
    for w in justext.get_stoplist(name):
        w = w.strip(_STRIP).lower()
        if w and not any(c.isdigit() for c in w):
            words.add(w)
    return frozenset(words)


# Pornographic spam terms (OBELICS removes such pages by a flagged-word ratio). Matched as whole lowercased
# words. Words with everyday meanings ("naked", "escort", "cum laude", "tits" the birds, "chatte" the cat)
# are left out on purpose: on real news pages they cost whole paragraphs.
FLAGGED_WORDS = frozenset(
    """
    porn porno pornography pornographic porns pornos xxx xxxx sexcam sexcams camgirl camgirls webcamsex
    livesex sexchat sextape sexvideo sexvideos pussy pussies cumshot cumshots creampie blowjob blowjobs
    handjob deepthroat gangbang bukkake milf milfs hentai dildo dildos fisting bdsm orgy orgies horny slut
    sluts whore whores masturbation masturbate nacktbilder ficken sexkontakte salope puta putas follar
    """.split()
)

# Lines that are site furniture rather than content (cookie banners, consent, login walls, error pages,
# sharing and newsletter prompts, copyright footers), in English, German, French and Spanish. Lowercase.
BOILERPLATE = re.compile(
    r"cookie|javascript|datenschutz|privacy policy|privacy settings|terms of (use|service)|"
    r"nutzungsbedingungen|all rights reserved|alle rechte vorbehalten|tous droits réservés|"
    r"todos los derechos reservados|copyright|©|\bimpressum\b|page not found|seite nicht gefunden|"
    r"\b404\b|access denied|zugriff verweigert|\bsign (in|up)\b|\blog ?in\b|\banmelden\b|\bregistrieren\b|"
    r"newsletter|subscribe|abonnieren|share (on|this)|teilen auf|\bfollow us\b|folgen sie uns|"
    r"enable (javascript|cookies)|your browser|ihr browser|se connecter|connexion|iniciar sesión|"
    r"accept(ez)? (all|tous)|alle akzeptieren|einwilligung|consent|skip to (main )?content|"
    r"zum inhalt springen|lorem ipsum|read more|weiterlesen|mehr erfahren|learn more"
)  # searched in lowercased text (IGNORECASE makes the search ~3x slower)
