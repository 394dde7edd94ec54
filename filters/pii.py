"""Personal data in text: e-mail addresses, IP addresses and phone numbers found and replaced by fixed
placeholders (or counted, to reject the document instead). Pure regular expressions, no I/O.

What is found (and what is not):
  - e-mail: `local@domain.tld` (dots, plus, percent, hyphen in the local part; a 2-24 letter TLD);
  - IP: IPv4 dotted quads with every octet <= 255 (not inside a longer dotted number such as a version
    `1.2.3.4.5`), and IPv6 addresses that `ipaddress` accepts with at least two colons and one group of 3-4 hex
    digits (so times like 12:30:45 stay);
  - phone: 9-15 digits in groups separated by spaces, dots, hyphens or slashes, optionally led by `+CC` and/or
    an area code in parentheses; groups of at least 2 digits (ISBNs' 1-digit groups, dates YYYY-MM-DD and
    year ranges are left). Numbers written without separators (`5551234567`) are not found: too many ids,
    prices and counts look like that.
Placeholders are fixed strings so trainers see one token pattern and counts stay checkable.
"""

from __future__ import annotations

import ipaddress
import re

PLACEHOLDERS = {"email": "[EMAIL]", "ip": "[IP_ADDRESS]", "phone": "[PHONE]"}
KINDS = tuple(PLACEHOLDERS)

_EMAIL = re.compile(r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]{0,63}@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
                    r"[A-Za-z]{2,24}(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_PHONE = re.compile(r"(?<![\w+\-/.:])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,5}(?:[ ./-]\d{2,8}){1,5}(?![\w])"
                    r"|(?<![\w+\-/.:])\+\d{1,3}[ .-]?\d{6,12}(?![\w])")
_DATE = re.compile(r"\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4}|\d{4}\s?[-/]\s?\d{4}")
_IDENTIFIER = re.compile(r"(?:isbn|issn|doi|arxiv|pmid|id|no|nr)\W{0,3}$", re.I)  # numbers named as ids
_NUMBER_RUN = re.compile(r"[+(]?\d[\d ()./:-]{5,}\d")  # where an IPv4 address or a phone number can be
_CHEAP = re.compile(r"@|\d")  # text without '@' and digits holds none of the three


def _valid_ipv4(s: str) -> bool:
    return all(int(p) <= 255 and (p == "0" or not p.startswith("0")) for p in s.split("."))


def _valid_ipv6(s: str) -> bool:
    if not re.search(r"[0-9A-Fa-f]{3,4}", s):
        return False
    try:
        ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return True


def _valid_phone(s: str) -> bool:
    digits = sum(c.isdigit() for c in s)
    if not 9 <= digits <= 15:
        return False
    if _DATE.match(s.strip()):  # a date, or a date and time (16.10.2019 18:15)
        return False
    return not (s.count(".") >= 2 and not s.startswith("+") and "(" not in s
                and all(len(g) <= 3 for g in s.split(".")))  # 1.234.567.890-style number grouping


def find_pii(text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, kind) spans in `text`, in order."""
    if not text or not _CHEAP.search(text):
        return []
    spans: list[tuple[int, int, str]] = []
    taken: list[tuple[int, int]] = []

    def free(a: int, b: int) -> bool:
        return all(b <= x or a >= y for x, y in taken)

    for m in _EMAIL.finditer(text) if "@" in text else ():
        spans.append((m.start(), m.end(), "email"))
        taken.append(m.span())
    runs = [(m.start(), min(m.end() + 1, len(text))) for m in _NUMBER_RUN.finditer(text)]
    for a, b in runs:  # the IPv4 and phone patterns only where a run of digits and separators is
        for m in _IPV4.finditer(text, a, b):
            if _valid_ipv4(m.group()) and free(*m.span()):
                spans.append((m.start(), m.end(), "ip"))
                taken.append(m.span())
    if text.count(":") >= 2:
        for m in _IPV6.finditer(text):
            if _valid_ipv6(m.group()) and free(*m.span()):
                spans.append((m.start(), m.end(), "ip"))
                taken.append(m.span())
    for a, b in runs:
        for m in _PHONE.finditer(text, a, b):
            if (_valid_phone(m.group()) and free(*m.span())
                    and not _IDENTIFIER.search(text[max(0, m.start() - 8):m.start()])):
                spans.append((m.start(), m.end(), "phone"))
                taken.append(m.span())
    return sorted(spans)


def mask_pii(text: str) -> tuple[str, dict[str, int]]:
    """(`text` with each e-mail / IP / phone replaced by its placeholder, {kind: count} of what was replaced)."""
    spans = find_pii(text)
    if not spans:
        return text, {}
    out, pos, counts = [], 0, {}
    for start, end, kind in spans:
        out += [text[pos:start], PLACEHOLDERS[kind]]
        pos = end
        counts[kind] = counts.get(kind, 0) + 1
    out.append(text[pos:])
    return "".join(out), counts


def describe(counts: dict[str, int]) -> str:
    """'2 email, 1 phone': counts only, never the values (reject details must not carry the PII)."""
    return ", ".join(f"{counts[k]} {k}" for k in KINDS if counts.get(k))
