"""Article images trafilatura leaves out: a lead image before the first paragraph and images in <figure>
elements inside the article, put back into trafilatura's body at the place they sat on the page.

The article is located from the extracted text itself: the page elements whose own text starts like the
body's blocks are found in one pass, and the article scope is the deepest element holding 80% of them, widened to an
enclosing <article> or <main> a few levels up (where lead figures sit, beside the text column). Inside the
scope an image is taken when it sits in a <figure>, or when it is the first image before the first paragraph
(the lead image); never inside navigation, asides, footers, forms, or containers named like sidebars,
widgets, teasers, related links, ads, share bars, comments, author boxes, logos. Each image goes before the
body block that follows it on the page (after the last block when none follows).
"""

from __future__ import annotations

import re

from lxml import etree

_WS = re.compile(r"\s+")
_KEY_CHARS = 40
_MIN_KEY = 20  # blocks with less own text are not used to place the article
_SCOPE_TAGS = ("article", "main")
_SCOPE_LEVELS = 6
_BAD_TAGS = {"nav", "aside", "footer", "form", "button", "select"}
_SKIP = {"head", "script", "style", "template", "title", "textarea"}  # text never shown as the article
_BAD_NAMES = re.compile(
    r"sidebar|widget|teaser|related|recommend|promo|advert|(?:^|[-_\s])ads?(?:$|[-_\s])|sponsor|share|social|"
    r"comment|author|avatar|byline|newsletter|subscribe|banner|logo|nav|menu|footer|breadcrumb|pinterest|"
    r"popup|modal|cookie|more-?stories|read-?more|gallery-thumb|thumbnail"
)


def _same_image(src: str | None) -> str:
    """An image URL without its query and fragment: the same picture at another size or crop counts once."""
    return (src or "").strip().split("#")[0].split("?")[0]


def _key(text: str | None) -> str:
    return _WS.sub(" ", text or "").strip()[:_KEY_CHARS].lower()


def _body_keys(body) -> list[tuple[str, object]]:
    """(key, block) for each top-level block of trafilatura's body with enough text to be recognised."""
    out = []
    for block in body:
        if block.tag == "graphic":
            continue
        key = _key(" ".join(block.itertext()))
        if len(key) >= _MIN_KEY:
            out.append((key, block))
    return out


def _bad(el, stop) -> bool:
    """True when `el` or an ancestor below `stop` is navigation, an aside, an ad, a teaser, ..."""
    node = el
    while node is not None and node is not stop:
        if node.tag in _BAD_TAGS:
            return True
        names = f"{node.get('class') or ''} {node.get('id') or ''}".lower()
        if names.strip() and _BAD_NAMES.search(names):
            return True
        node = node.getparent()
    return False


def _article_root(elements: list):
    """The deepest element holding at least 80% of `elements` (a few stray matches elsewhere on the page, a
    teaser repeating the lead paragraph, do not pull the article up to <body>)."""
    counts: dict = {}
    depth: dict = {}
    for e in elements:
        chain = [e, *e.iterancestors()]
        for d, a in enumerate(reversed(chain)):
            counts[a] = counts.get(a, 0) + 1
            depth[a] = d
    need = 0.8 * len(elements)
    return max((a for a, c in counts.items() if c >= need), key=depth.__getitem__, default=None)


def _scope(container):
    node = container
    for _ in range(_SCOPE_LEVELS):
        if node is None:
            break
        if node.tag in _SCOPE_TAGS:
            return node
        node = node.getparent()
    return container


def recover_article_images(tree, body) -> int:
    """Insert `<graphic src alt>` into `body` for each article image of `tree` the body lacks (images already
    rewritten to absolute src by normalise_images). Returns the number inserted."""
    blocks = _body_keys(body)
    if not blocks:
        return 0
    wanted = {}
    for n, (key, _) in enumerate(blocks):
        wanted.setdefault(key, n)
    events = []  # document order: ("text", block number, element) | ("img", element)
    root = tree.find("body") if tree.find("body") is not None else tree
    for el in root.iter():
        if not isinstance(el.tag, str) or el.tag in _SKIP:  # (script, style: text without element children)
            continue
        if el.tag == "img":
            events.append(("img", None, el))
        elif el.text and el.text.strip():
            n = wanted.get(_key("".join(el.itertext())))
            if n is not None:
                events.append(("text", n, el))
    matched = [e for kind, _, e in events if kind == "text"]
    if len(matched) < 2:
        return 0  # one block is too little to tell where the article is
    scope = _scope(_article_root(matched))
    if scope is None or scope.tag in ("html", "body"):
        return 0
    have = {_same_image(g.get("src")) for g in body.iter("graphic")}
    page_order = {}  # image key -> first event number of an <img> loading it
    for i, (kind, _, el) in enumerate(events):
        if kind == "img":
            page_order.setdefault(_same_image(el.get("src")), i)
    inside = set(scope.iter())
    # for each event, the block number of the next text event inside the scope (one pass from the end)
    following_block: list = [None] * len(events)
    next_block = None
    for i in range(len(events) - 1, -1, -1):
        following_block[i] = next_block
        kind, n, el = events[i]
        if kind == "text" and el in inside:
            next_block = n
    first_text = next((i for i, (kind, _, el) in enumerate(events) if kind == "text" and el in inside), len(events))
    lead_taken = False
    inserts = []  # (block number to insert before | None for the end, img)
    for i, (kind, _, el) in enumerate(events):
        if kind != "img" or el not in inside:
            continue
        src = (el.get("src") or "").strip()
        if not src.startswith(("http://", "https://")) or _same_image(src) in have or _bad(el, scope):
            continue
        in_figure = any(a.tag == "figure" for a in el.iterancestors() if a in inside)
        lead = i < first_text and not lead_taken
        if not (in_figure or lead):
            continue
        lead_taken = lead_taken or i < first_text
        inserts.append((following_block[i], i, el))
        have.add(_same_image(src))
    for following, at, el in inserts:
        graphic = etree.Element("graphic", src=el.get("src").strip())
        alt = el.get("alt") or el.get("title")
        if alt:
            graphic.set("alt", alt)
        if following is None:
            body.append(graphic)
            continue
        anchor = blocks[following][1]  # before the block, and before the images there that come later on the page
        while (anchor.getprevious() is not None and anchor.getprevious().tag == "graphic"
               and page_order.get(_same_image(anchor.getprevious().get("src")), -1) > at):
            anchor = anchor.getprevious()
        anchor.addprevious(graphic)
    return len(inserts)
