"""Safety stages of the pipelines: opt-outs (page directives, user lists), blocklists, flagged words on images,
PII in texts, and the NSFW head over the CLIP embeddings `pairs` already computes. Decisions are made by
filters/safety.py and filters/pii.py; this module reads the list and weight files and counts.

interleaved: opt_out (before extract: the page's noai/noimageai directives, its URL on the lists)
             -> extract -> safety (the URL again when only the page's canonical URL named it; every image
             URL and alt text; PII masked or rejected), images dropped counted under safety_images.
pairs:       safety (image URL on the lists, flagged words in URL and caption, PII in the caption, before
             any download) ... clip_score -> nsfw (the head on the row's CLIP embedding; no second encoding).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mmcorpus.pipelines.errors import UserError

STAGE_OPT_OUT = "opt_out"
STAGE_SAFETY = "safety"
STAGE_SAFETY_IMAGES = "safety_images"
STAGE_NSFW = "nsfw"
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


def add_arguments(parser) -> None:
    """The safety options shared by `interleaved` and `pairs`."""
    g = parser.add_argument_group("safety and opt-outs")
    g.add_argument("--opt-out-list", action="append", default=[], metavar="FILE",
                   help="user opt-out list (domains, URL prefixes, image URLs; one a line), repeatable")
    g.add_argument("--blocklist", action="append", default=[], metavar="FILE",
                   help="URL/domain blocklist (UT1 'domains' or 'urls' format), repeatable")
    g.add_argument("--pii", default="mask", choices=PII_MODES,
                   help="e-mail/IP/phone in texts: mask with placeholders (default), reject the item, or off")
    g.add_argument("--ignore-ai-directives", action="store_true",
                   help="do not honour noai/noimageai page directives (stats.json and the card say so)")
    g.add_argument("--no-flagged-image-words", action="store_true",
                   help="do not drop images whose URL or alt text holds a flagged word")


# ---- interleaved ------------------------------------------------------------------------------------------

class PageOptOut:
    """Stage `opt_out` on a decoded page record (html + its X-Robots-Tag values), before extraction."""

    def __init__(self, spec: SafetySpec, lists=None):
        self.spec = spec
        self.lists = lists

    def setup(self):
        return PageOptOut(self.spec, self.spec.lists())

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


class DocSafety:
    """Stage `safety` on an extracted document: URL (a canonical one not checked before), images, PII."""

    def __init__(self, spec: SafetySpec, lists=None):
        self.spec = spec
        self.lists = lists

    def setup(self):
        return DocSafety(self.spec, self.spec.lists())

    def __call__(self, doc):
        from mmcorpus.filters.pii import describe, mask_pii
        from mmcorpus.filters.reasons import Reject
        from mmcorpus.filters.safety import image_reject, url_reject
        from mmcorpus.pipelines.runtime.stage import Count, ItemReject

        r = url_reject(doc.get("url"), self.lists, "page URL")
        if r is not None:
            return r
        events, keep, n_images = [], [], 0
        infos = doc.get("image_info") or [None] * len(doc["texts"])
        noimageai = doc.pop("_noimageai", None)
        for text, image, info in zip(doc["texts"], doc["images"], infos):
            if image is not None:
                n_images += 1
                why = image_reject(image, (info or {}).get("alt"), self.lists, self.spec.flagged_image_words,
                                   noimageai)
                if why is not None:
                    events.append(ItemReject(STAGE_SAFETY_IMAGES, Reject(why.reason, f"{image}: {why.detail}"),
                                             doc["source"]))
                    continue
            keep.append((text, image, info))
        if events:
            doc["texts"], doc["images"] = [k[0] for k in keep], [k[1] for k in keep]
            doc["image_info"] = [k[2] for k in keep]
            meta = doc.get("metadata") or {}
            if meta.get("declared_sizes"):  # a dropped image's URL must not stay in the output's metadata
                kept = set(doc["images"])
                doc["metadata"] = dict(meta, declared_sizes={u: v for u, v in meta["declared_sizes"].items() if u in kept})
        events = [Count(STAGE_SAFETY_IMAGES, "in", n_images), Count(STAGE_SAFETY_IMAGES, "out", n_images - len(events)),
                  *events]
        if self.spec.pii != "off":
            texts, counts = [], {}
            for t in doc["texts"]:
                if t is None:
                    texts.append(t)
                    continue
                masked, found = mask_pii(t)
                texts.append(masked)
                for k, n in found.items():
                    counts[k] = counts.get(k, 0) + n
            for info in doc.get("image_info") or []:
                if info and info.get("alt"):
                    masked, found = mask_pii(info["alt"])
                    info["alt"] = masked
                    for k, n in found.items():
                        counts[k] = counts.get(k, 0) + n
            if counts and self.spec.pii == "reject":
                return Reject("pii_found", describe(counts))
            if counts:
                doc["texts"] = texts
                doc["metadata"] = dict(doc.get("metadata") or {}, pii_masked=counts)
                events += [Count(STAGE_SAFETY, f"pii_masked_{k}", n) for k, n in counts.items()]
                events.append(Count(STAGE_SAFETY, "documents_pii_masked", 1))
        return [doc, *events]


def interleaved_stages(spec: SafetySpec) -> tuple[list[str], list[str]]:
    """(stages before extract, stages after extract) for the stats stage list."""
    return [STAGE_OPT_OUT], [STAGE_SAFETY]


# ---- pairs ------------------------------------------------------------------------------------------------

class PairSafety:
    """Stage `safety` on a pair before its image is fetched: the image URL (and the page it came from) on the
    lists, flagged words in the URL and caption, PII in the caption."""

    def __init__(self, spec: SafetySpec, lists=None):
        self.spec = spec
        self.lists = lists

    def setup(self):
        return PairSafety(self.spec, self.spec.lists())

    def __call__(self, row):
        from mmcorpus.filters.pii import describe, mask_pii
        from mmcorpus.filters.reasons import Reject
        from mmcorpus.filters.safety import image_reject, url_reject
        from mmcorpus.pipelines.runtime.stage import Count

        page = (row.get("metadata") or {}).get("doc_url")
        r = url_reject(page, self.lists, "page URL") if isinstance(page, str) else None
        if r is None:
            r = image_reject(row.get("url"), row.get("caption"), self.lists, self.spec.flagged_image_words)
        if r is not None:
            return r
        if self.spec.pii == "off" or not isinstance(row.get("caption"), str):
            return row
        masked, counts = mask_pii(row["caption"])
        if not counts:
            return row
        if self.spec.pii == "reject":
            return Reject("pii_found", describe(counts))
        meta = dict(row.get("metadata") or {}, pii_masked=counts)
        return [dict(row, caption=masked, metadata=meta), Count(STAGE_SAFETY, "documents_pii_masked", 1),
                *[Count(STAGE_SAFETY, f"pii_masked_{k}", n) for k, n in counts.items()]]


def load_nsfw_head(path: str | None, allow_random: bool, dim: int):
    """(NsfwHead or None, weights description). `path`: a torch state dict (.pt/.pth: `N.weight`/`N.bias`
    of an nn.Sequential of Linear layers, ReLU between) or an .npz of `weight_N`/`bias_N`; 'random' builds
    a one-layer head (needs --allow-random-weights). None: the stage is off."""
    import numpy as np

    from mmcorpus.filters.safety import NsfwHead

    if path is None:
        return None, "none"
    if path == "random":
        if not allow_random:
            raise UserError("--nsfw-head random needs --allow-random-weights")
        rng = np.random.default_rng(0)
        return NsfwHead([(rng.normal(0, 1, (1, dim)).astype(np.float32), np.zeros(1, np.float32))]), "random"
    if not os.path.isfile(path):
        raise UserError(f"--nsfw-head {path!r} does not exist (a .pt state dict or .npz of an MLP over CLIP "
                        "image embeddings)")
    try:
        if path.endswith(".npz"):
            with np.load(path) as z:
                keys = sorted({int(k.split("_")[1]) for k in z.files if k.startswith("weight_")})
                layers = [(z[f"weight_{i}"], z[f"bias_{i}"]) for i in keys]
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
            idx = sorted({int(k.split(".")[-2]) for k in state if k.endswith(".weight")})
            layers = [(next(v for k, v in state.items() if k.endswith(f"{i}.weight")).float().numpy(),
                       next(v for k, v in state.items() if k.endswith(f"{i}.bias")).float().numpy()) for i in idx]
        head = NsfwHead(layers)
    except Exception as exc:  # noqa: BLE001 - any unreadable weight file is one line naming it
        raise UserError(f"--nsfw-head {path!r}: not an MLP state dict ({type(exc).__name__}: {exc})") from None
    if head.input_dim != dim:
        raise UserError(f"--nsfw-head {path!r} takes {head.input_dim}-dimensional embeddings; the CLIP model "
                        f"gives {dim}")
    return head, os.path.abspath(path)


class NsfwStage:
    """Stage `nsfw` on a scored pair: the head on its CLIP image embedding (float16 bytes the clip_score stage
    left in the row), the score kept in `nsfw_score`, the row rejected above the policy's image threshold."""

    def __init__(self, head, policy):
        self.head = head
        self.policy = policy

    def __call__(self, row):
        import numpy as np

        from mmcorpus.pipelines.runtime.stage import Count

        emb = np.frombuffer(row["clip_embedding"], dtype="<f2").astype(np.float32)[None, :]
        score = float(self.head.scores(emb)[0])
        r = self.policy.image(score)
        if r is not None:
            return r
        return [dict(row, nsfw_score=score), Count(STAGE_NSFW, f"score_bin_{min(int(score * 10), 9)}", 1)]


# ---- what stats.json and the card say ----------------------------------------------------------------------

ALWAYS_UNCHECKED = [
    "text toxicity and hate speech",
    "faces and other personal data in images (not detected, not blurred)",
    "names and postal addresses in text (only e-mails, IP addresses and phone numbers are found)",
    "known abuse material by image hash (no hash list is matched)",
]


def safety_stats(spec: SafetySpec, nsfw: dict | None, kind: str = "interleaved") -> dict:
    """The `safety` entry of stats.json: what was applied, and what was NOT checked. `nsfw`: {'weights',
    'image_threshold', 'document_threshold'} when the NSFW head ran, else None."""
    out = spec.describe()
    not_checked = []
    if not spec.directives:
        not_checked.append("noai/noimageai page directives (--ignore-ai-directives)")
    if not out["opt_out_lists"]:
        not_checked.append("user opt-out lists (none given)")
    if not out["blocklists"]:
        not_checked.append("URL/domain blocklists (none given)")
    if spec.pii == "off":
        not_checked.append("PII in texts (--pii off)")
    if not spec.flagged_image_words:
        not_checked.append("flagged words in image URLs and alt texts (--no-flagged-image-words)")
    if nsfw is None:
        not_checked.append("NSFW images: no classifier run" + (
            " (interleaved computes no CLIP embeddings; run `pairs --nsfw-head` on its images)"
            if kind == "interleaved" else " (no --nsfw-head weights given)"))
    elif nsfw.get("weights") == "random":
        not_checked.append("NSFW images: the classifier had RANDOM weights (--allow-random-weights); its "
                           "scores are meaningless")
    out["nsfw"] = nsfw
    out["not_checked"] = not_checked + ALWAYS_UNCHECKED
    return out
