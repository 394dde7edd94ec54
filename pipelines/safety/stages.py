"""Safety stages of the pipelines: opt-outs (page directives, user lists), blocklists, flagged words on images,
PII in texts; the NSFW head is in nsfw.py. Decisions are made by filters/safety.py and filters/pii.py; this module
reads the list files and counts.

interleaved: opt_out (before extract: the page's noai/noimageai directives, its URL on the lists)
             -> extract -> safety (the URL only when extraction found it, i.e. the page's canonical URL: a
             record's own URL was checked by opt_out; every image URL and alt text; PII masked or rejected),
             images dropped counted under safety_images.
pairs:       safety (image URL on the lists, flagged words in URL and caption, PII in the caption, before
             any download) ... clip_score -> nsfw (the head on the row's CLIP embedding; no second encoding).
capfilt:     each synthetic caption: flagged words, PII (`screen_caption`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mmcorpus.pipelines.errors import UserError

STAGE_OPT_OUT = "opt_out"
STAGE_SAFETY = "safety"
STAGE_SAFETY_IMAGES = "safety_images"
PII_MODES = ("mask", "reject", "off")


def read_list(path: str):
    """A parsed UrlList of one file; UserError naming the file (and line) when it cannot be read."""
    from mmcorpus.filters.urllists import ListError, parse_list

    if not os.path.isfile(path):
        raise UserError(f"list file {path!r} does not exist")
    try:
        with open(path, encoding="utf-8", newline=None) as f:
            return parse_list(path, f)
    except UnicodeDecodeError as exc:
        with open(path, "rb") as f:
            line = f.read(exc.start if hasattr(exc, "start") else 0).count(b"\n") + 1
        raise UserError(f"list file {path!r}: not UTF-8 text near line {line} (one domain or URL a line)") from None
    except ListError as exc:
        raise UserError(f"list file {exc}") from None
    except OSError as exc:
        raise UserError(f"list file {path!r} cannot be read: {exc.strerror or exc}") from None


def _sha256(path: str) -> str:
    from mmcorpus.pipelines.runtime.run import _sha256 as cached_sha256  # one hashing of inputs, cached

    st = os.stat(path)
    return cached_sha256(path, st.st_size, st.st_mtime_ns)


@dataclass
class SafetySpec:
    """What a run applies (picklable: lists are read again on each worker, never shipped in the graph)."""

    opt_out_lists: list[str] = field(default_factory=list)
    blocklists: list[str] = field(default_factory=list)
    directives: bool = True
    flagged_image_words: bool = True
    pii: str = "mask"

    @classmethod
    def from_args(cls, args) -> "SafetySpec":
        pii = getattr(args, "pii", "mask")
        if pii not in PII_MODES:
            raise UserError(f"--pii {pii!r}: choose from {', '.join(PII_MODES)}")
        return cls(opt_out_lists=[os.path.abspath(p) for p in getattr(args, "opt_out_list", None) or []],
                   blocklists=[os.path.abspath(p) for p in getattr(args, "blocklist", None) or []],
                   directives=not getattr(args, "ignore_ai_directives", False),
                   flagged_image_words=not getattr(args, "no_flagged_image_words", False), pii=pii)

    def lists(self):
        from mmcorpus.filters.safety import Lists

        return Lists(tuple(read_list(p) for p in self.opt_out_lists), tuple(read_list(p) for p in self.blocklists))

    def describe(self, lists=None) -> dict:
        """For stats.json: the opt-outs and checks applied, each list with its entries and sha256."""
        lists = lists or self.lists()

        def entry(lst):
            return {"path": lst.name, "entries": len(lst), "domains": len(lst.domains),
                    "url_prefixes": len(lst.prefixes), "sha256": _sha256(lst.name)}

        return {"page_directives": ["noai", "noimageai"] if self.directives else [],
                "opt_out_lists": [entry(x) for x in lists.opt_out], "blocklists": [entry(x) for x in lists.block],
                "flagged_image_words": self.flagged_image_words, "pii": self.pii}


def add_arguments(parser, lists: bool = True) -> None:
    """The safety options of `interleaved` and `pairs`; `capfilt` (lists=False) checks only the texts it adds."""
    g = parser.add_argument_group("safety and opt-outs")
    if lists:
        g.add_argument("--opt-out-list", action="append", default=[], metavar="FILE",
                       help="user opt-out list (domains, URL prefixes, image URLs; one a line), repeatable")
        g.add_argument("--blocklist", action="append", default=[], metavar="FILE",
                       help="URL/domain blocklist (UT1 'domains' or 'urls' format), repeatable")
    g.add_argument("--pii", default="mask", choices=PII_MODES,
                   help="e-mail/IP/phone in texts: mask with placeholders (default), reject the item, or off")
    if lists:
        g.add_argument("--ignore-ai-directives", action="store_true",
                       help="do not honour noai/noimageai page directives (stats.json and the card say so)")
    g.add_argument("--no-flagged-image-words", action="store_true",
                   help="do not drop images (captions) whose URL, alt text or caption holds a flagged word")


# ---- shared by the stages ----------------------------------------------------------------------------------

class _WithLists:
    """A stage that needs the parsed lists: the spec travels in the graph, each worker reads the lists once
    (`setup` returns the stage with them)."""

    def __init__(self, spec: SafetySpec, lists=None):
        self.spec = spec
        self.lists = lists

    def setup(self):
        from mmcorpus.pipelines.runtime.shared import file_stamp, per_process

        key = ("safety-lists", tuple(map(file_stamp, self.spec.opt_out_lists)),
               tuple(map(file_stamp, self.spec.blocklists)))
        return type(self)(self.spec, per_process(key, self.spec.lists))  # read once per worker process


def masked(text: str, counts: dict) -> str:
    """`text` with its PII replaced by placeholders; what was found is added to `counts`."""
    from mmcorpus.filters.pii import mask_pii

    out, found = mask_pii(text)
    for k, n in found.items():
        counts[k] = counts.get(k, 0) + n
    return out


def pii_counts(counts: dict) -> list:
    """The counters of one item whose texts had PII masked."""
    from mmcorpus.pipelines.runtime.stage import Count

    return [Count(STAGE_SAFETY, "documents_pii_masked", 1), *[Count(STAGE_SAFETY, f"pii_masked_{k}", n)
                                                              for k, n in counts.items()]]


def pii_reject(counts: dict):
    from mmcorpus.filters.pii import describe
    from mmcorpus.filters.reasons import Reject

    return Reject("pii_found", describe(counts))


def drop_positions(doc: dict, keep: list[int]) -> dict:
    """A copy of `doc` with only the positions `keep` of texts/images/image_info; a dropped image's URL also
    leaves the metadata's declared sizes."""
    infos = doc.get("image_info") or [None] * len(doc["images"])
    out = dict(doc, texts=[doc["texts"][i] for i in keep], images=[doc["images"][i] for i in keep],
               image_info=[infos[i] for i in keep])
    meta = doc.get("metadata") or {}
    if meta.get("declared_sizes"):  # a dropped image's URL must not stay in the output's metadata
        kept = set(out["images"])
        out["metadata"] = dict(meta, declared_sizes={u: v for u, v in meta["declared_sizes"].items() if u in kept})
    return out


# ---- interleaved ------------------------------------------------------------------------------------------

class PageOptOut(_WithLists):
    """Stage `opt_out` on a decoded page record (html + its X-Robots-Tag values), before extraction."""

    def __call__(self, rec):
        from mmcorpus.filters.reasons import Reject
        from mmcorpus.filters.safety import NOAI, NOIMAGEAI, page_directives, url_reject

        r = url_reject(rec.get("url"), self.lists, "page URL")
        if r is not None:
            return r
        if not self.spec.directives:
            return rec
        found = page_directives(rec.get("html"), rec.get("robots_tags") or ())
        if NOAI in found:
            return Reject("opt_out_noai", f"noai in the page's {found[NOAI]}")
        if NOIMAGEAI in found:
            return dict(rec, _noimageai=found[NOIMAGEAI])
        return rec


# what extract_record carries over from the opt_out stage: the page's noimageai directive, and the record's own
# URL (checked there), so `safety` checks a URL only when extraction found it (the page's canonical URL)
OPT_OUT_KEYS = ("_noimageai", "_record_url")


class DocSafety(_WithLists):
    """Stage `safety` on an extracted document: its URL when opt_out did not see it, images, PII. The input
    element is never changed: a changed document is a copy."""

    def __call__(self, doc):
        from mmcorpus.filters.reasons import Reject
        from mmcorpus.filters.safety import image_reject, url_reject
        from mmcorpus.pipelines.runtime.stage import Count, ItemReject

        carried = {k: doc.get(k) for k in OPT_OUT_KEYS}
        doc = {k: v for k, v in doc.items() if k not in OPT_OUT_KEYS}
        if doc.get("url") != carried["_record_url"]:
            r = url_reject(doc.get("url"), self.lists, "page URL")
            if r is not None:
                return r
        rejects, keep, n_images = [], [], 0
        infos = doc.get("image_info") or [None] * len(doc["texts"])
        for pos, (image, info) in enumerate(zip(doc["images"], infos)):
            if image is not None:
                n_images += 1
                why = image_reject(image, (info or {}).get("alt"), self.lists, self.spec.flagged_image_words,
                                   carried["_noimageai"])
                if why is not None:
                    rejects.append(ItemReject(STAGE_SAFETY_IMAGES, Reject(why.reason, f"{image}: {why.detail}"),
                                              doc["source"]))
                    continue
            keep.append(pos)
        if rejects:
            doc = drop_positions(doc, keep)
        events = [Count(STAGE_SAFETY_IMAGES, "in", n_images), Count(STAGE_SAFETY_IMAGES, "out", n_images - len(rejects)),
                  *rejects]
        if self.spec.pii == "off":
            return [doc, *events]
        counts: dict = {}
        texts = [t if t is None else masked(t, counts) for t in doc["texts"]]
        infos = [dict(i, alt=masked(i["alt"], counts)) if i and i.get("alt") else i
                 for i in doc.get("image_info") or []]
        if counts and self.spec.pii == "reject":
            return pii_reject(counts)
        if counts:
            doc = dict(doc, texts=texts, image_info=infos or doc.get("image_info"),
                       metadata=dict(doc.get("metadata") or {}, pii_masked=counts))
            events += pii_counts(counts)
        return [doc, *events]


def interleaved_stages(spec: SafetySpec) -> tuple[list[str], list[str]]:
    """(stages before extract, stages after extract) for the stats stage list."""
    return [STAGE_OPT_OUT], [STAGE_SAFETY]


# ---- pairs ------------------------------------------------------------------------------------------------

class PairSafety(_WithLists):
    """Stage `safety` on a pair before its image is fetched: the image URL (and the page it came from) on the
    lists, flagged words in the URL and caption, PII in the caption."""

    def __call__(self, row):
        from mmcorpus.filters.safety import image_reject, url_reject

        page = (row.get("metadata") or {}).get("doc_url")
        r = url_reject(page, self.lists, "page URL") if isinstance(page, str) else None
        if r is None:
            r = image_reject(row.get("url"), row.get("caption"), self.lists, self.spec.flagged_image_words)
        if r is not None:
            return r
        if self.spec.pii == "off" or not isinstance(row.get("caption"), str):
            return row
        counts: dict = {}
        caption = masked(row["caption"], counts)
        if not counts:
            return row
        if self.spec.pii == "reject":
            return pii_reject(counts)
        meta = dict(row.get("metadata") or {}, pii_masked=counts)
        return [dict(row, caption=caption, metadata=meta), *pii_counts(counts)]


# ---- capfilt ----------------------------------------------------------------------------------------------

def screen_caption(text: str, spec: SafetySpec):
    """A synthetic caption checked as web captions are: (caption with PII masked, {kind: count}) or a Reject
    (a flagged word; PII with --pii reject)."""
    from mmcorpus.filters.reasons import Reject
    from mmcorpus.filters.safety import flagged_word

    if spec.flagged_image_words:
        word = flagged_word(text)
        if word:
            return Reject("flagged_image_words", f"flagged word {word!r} in the synthetic caption")
    counts: dict = {}
    if spec.pii == "off":
        return text, counts
    out = masked(text, counts)
    if counts and spec.pii == "reject":
        return pii_reject(counts)
    return out, counts


# ---- what stats.json and the card say ----------------------------------------------------------------------

ALWAYS_UNCHECKED = [
    "text toxicity and hate speech",
    "faces and other personal data in images (not detected, not blurred)",
    "names and postal addresses in text (only e-mails, IP addresses and phone numbers are found)",
    "known abuse material by image hash (no hash list is matched)",
]


def safety_stats(spec: SafetySpec, nsfw: dict | None, kind: str = "interleaved", nsfw_off: str = "") -> dict:
    """The `safety` entry of stats.json: what was applied, and what was NOT checked. `nsfw`: nsfw.nsfw_stats()
    when the NSFW head ran, else None (`nsfw_off`: why, when not for want of --nsfw-head). `kind` capfilt:
    only the synthetic captions it adds are checked."""
    out = spec.describe()
    not_checked = []
    if kind == "capfilt":
        out["applies_to"] = "the synthetic captions CapFilt adds"
        not_checked.append("the input pairs' images, URLs and web captions: checked (or not) by the run that "
                           "wrote them (see its stats.json and card)")
    else:
        if not spec.directives:
            not_checked.append("noai/noimageai page directives (--ignore-ai-directives)")
        if not out["opt_out_lists"]:
            not_checked.append("user opt-out lists (none given)")
        if not out["blocklists"]:
            not_checked.append("URL/domain blocklists (none given)")
    if spec.pii == "off":
        not_checked.append("PII in texts (--pii off)")
    if not spec.flagged_image_words:
        not_checked.append("flagged words in image URLs, alt texts and captions (--no-flagged-image-words)")
    if kind != "capfilt" and nsfw is None:
        not_checked.append(f"NSFW images: no classifier run ({nsfw_off or 'no --nsfw-head weights given'})")
    elif nsfw is not None and "random" in (nsfw.get("weights"), nsfw.get("clip_weights")):
        not_checked.append("NSFW images: the classifier or its CLIP model had RANDOM weights "
                           "(--allow-random-weights); its scores are meaningless")
    out["nsfw"] = nsfw
    out["not_checked"] = not_checked + ALWAYS_UNCHECKED
    return out
