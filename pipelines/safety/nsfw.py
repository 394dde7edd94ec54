"""The NSFW head over CLIP image embeddings (filters/safety.py NsfwHead, NsfwPolicy) in the pipelines.

pairs:       `NsfwStage` runs the head on the embedding clip_score left in the row (no second encoding).
interleaved: `score_images` embeds every fetched image once (its references grouped by hash(sha256): an
             image on many pages is embedded once), in batches, reading its spooled bytes only there; the
             scores join back to the documents (image_info.nsfw_score); then `DocNsfw` (stage `nsfw`) applies the policy: a document
             with an image above the document threshold is rejected whole (OBELICS style), images above the
             image threshold are dropped (rejects under `nsfw_images`, the text stays).
"""

from __future__ import annotations

import os

import apache_beam as beam

from mmcorpus.pipelines.errors import UserError

STAGE_NSFW = "nsfw"
STAGE_NSFW_IMAGES = "nsfw_images"


def add_arguments(parser, documents: bool) -> None:
    """--nsfw-head and its thresholds (`documents`: also the document threshold of interleaved)."""
    what = "images" if documents else "pairs whose image scores"
    n = parser.add_argument_group("NSFW (a head over CLIP image embeddings)")
    n.add_argument("--nsfw-head", default=None, metavar="PATH",
                   help="MLP weights (.pt state dict or .npz) over CLIP image embeddings; 'random' with "
                        "--allow-random-weights; without it the NSFW check is off (stats and card say so)")
    n.add_argument("--nsfw-threshold", type=float, default=0.5, help=f"{what} above this NSFW score are rejected")
    if documents:
        n.add_argument("--nsfw-document-threshold", type=float, default=None,
                       help="reject the whole document when any of its images scores above this (OBELICS style; "
                            "default: off, only the images above --nsfw-threshold go)")


def policy_from_args(args):
    from mmcorpus.filters.safety import NsfwPolicy

    document = getattr(args, "nsfw_document_threshold", None)
    try:
        return NsfwPolicy(image_threshold=args.nsfw_threshold, document_threshold=document)
    except ValueError as exc:
        option = "--nsfw-threshold" if not 0 <= args.nsfw_threshold <= 1 else "--nsfw-document-threshold"
        raise UserError(f"{option}: {exc}") from None


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


def score_bin(score: float) -> str:
    return f"score_bin_{min(int(score * 10), 9)}"


# ---- pairs ------------------------------------------------------------------------------------------------

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
        return [dict(row, nsfw_score=score), Count(STAGE_NSFW, score_bin(score), 1)]


# ---- interleaved: one embedding per distinct image, joined back to the documents ---------------------------

def _image_refs(doc, groups: int):
    """(batch group, (sha256, doc_id, image bytes or their spool reference)) for every fetched image of a
    document; the group follows from the sha256, so all references to one image meet in one group."""
    from mmcorpus.pipelines.runtime.sink import stable_hash

    for url, info in zip(doc["images"], doc.get("image_info") or []):
        if url is not None and info and info.get("sha256"):
            yield stable_hash(info["sha256"]) % groups, (info["sha256"], doc["doc_id"], info.get("bytes"))


def distinct_images(refs) -> list[tuple]:
    """(sha256, bytes ref, the doc_ids showing it) per distinct image of a batch group, in sha256 order."""
    by_sha: dict = {}
    for sha, doc_id, data in refs:
        entry = by_sha.setdefault(sha, [None, set()])
        entry[0] = entry[0] if entry[0] is not None else data
        entry[1].add(doc_id)
    return [(sha, data, sorted(ids)) for sha, (data, ids) in sorted(by_sha.items())]


class _ScoreImages(beam.DoFn):
    """A batch group of image references: each distinct image's bytes read (chunk by chunk), CLIP-embedded once,
    scored by the head; yields (doc_id, (sha256, score or why it could not be scored)) for every document
    showing the image."""

    def __init__(self, clip_cfg, head):
        self.clip_cfg = clip_cfg
        self.head = head

    def setup(self):
        from mmcorpus.pipelines.models.clip import shared_scorer

        self.scorer = shared_scorer(self.clip_cfg)

    def process(self, element):
        import numpy as np

        from mmcorpus.filters.reasons import Reject
        from mmcorpus.pipelines.runtime.sink import FileBytes
        from mmcorpus.pipelines.runtime.stage import COUNTS

        images = distinct_images(element[1])
        step = max(1, self.clip_cfg.batch_size)
        for start in range(0, len(images), step):
            chunk = images[start:start + step]
            blobs, problems = [], {}
            for sha, data, _ in chunk:
                try:
                    blobs.append(data.read() if isinstance(data, FileBytes) else data)
                except OSError as exc:
                    blobs.append(None)
                    problems[sha] = ("missing_image", f"spooled bytes unreadable: {exc.strerror or exc}")
                if blobs[-1] is None and sha not in problems:
                    problems[sha] = ("missing_image", "no image bytes kept (fetch keep_bytes: false)")
            todo = [i for i, (sha, _, _) in enumerate(chunk) if sha not in problems]
            embedded = self.scorer.embed_images([blobs[i] for i in todo]) if todo else []
            good = [(i, e) for i, e in zip(todo, embedded) if not isinstance(e, Reject)]
            for i, e in zip(todo, embedded):
                if isinstance(e, Reject):
                    problems[chunk[i][0]] = (e.reason, e.detail)
            scores = self.head.scores(np.stack([e for _, e in good])) if good else []
            outcome = {chunk[i][0]: float(s) for (i, _), s in zip(good, scores)}
            outcome.update(problems)
            yield COUNTS, ((STAGE_NSFW, "images_embedded", ""), len(good))
            for sha, _, doc_ids in chunk:
                for doc_id in doc_ids:
                    yield "score", (doc_id, (sha, outcome[sha]))


def _with_scores(element):
    """A document (each of a doc_id's) with image_info.nsfw_score set from its images' outcomes; an image
    that could not be scored keeps a null score and (reason, detail) in `_nsfw_unscored` (DocNsfw rejects it)."""
    _, grouped = element
    outcome = dict(grouped["score"])
    for doc in grouped["doc"]:
        infos, unscored = [], {}
        for url, info in zip(doc["images"], doc.get("image_info") or [None] * len(doc["images"])):
            got = outcome.get((info or {}).get("sha256"))
            if url is not None and info is not None:
                if isinstance(got, float):
                    info = dict(info, nsfw_score=got)
                else:
                    unscored[url] = got or ("image_decode_failed", "no NSFW score")
            infos.append(info)
        yield dict(doc, image_info=infos, _nsfw_unscored=unscored)


def score_images(collector, docs, clip_cfg, head, groups: int):
    """Documents with image_info[i].nsfw_score filled (see the module docstring)."""
    from mmcorpus.pipelines.interleaved.dedup import key_by_doc_id
    from mmcorpus.pipelines.runtime.stage import COUNTS, split_tags

    tagged = (docs | "Nsfw_Refs" >> beam.FlatMap(_image_refs, groups)
              | "Nsfw_GroupBatches" >> beam.GroupByKey()  # batches from a shuffle: the DaskRunner loses
              | "Nsfw_Score" >> beam.ParDo(_ScoreImages(clip_cfg, head)))  # BatchElements' last batches
    parts = split_tags(tagged, ("score", COUNTS), label="Nsfw_")
    collector.add_counts(parts[COUNTS])
    keyed = docs | "Nsfw_KeyDocs" >> beam.Map(key_by_doc_id)
    return {"doc": keyed, "score": parts["score"]} | "Nsfw_Join" >> beam.CoGroupByKey() \
        | "Nsfw_Attach" >> beam.FlatMap(_with_scores)


class DocNsfw:
    """Stage `nsfw` on a document whose images carry nsfw_score: the document rejected when an image scores
    above the document threshold; else images above the image threshold (or not scorable) dropped, text kept."""

    def __init__(self, policy):
        self.policy = policy

    def __call__(self, doc):
        from mmcorpus.filters.reasons import Reject
        from mmcorpus.pipelines.runtime.stage import Count, ItemReject
        from mmcorpus.pipelines.safety.stages import drop_positions

        doc = dict(doc)
        unscored = doc.pop("_nsfw_unscored", None) or {}
        infos = doc.get("image_info") or [None] * len(doc["images"])
        scores = [i.get("nsfw_score") for u, i in zip(doc["images"], infos) if u is not None and i]
        r = self.policy.document([s for s in scores if s is not None])
        if r is not None:
            return r
        events, keep, n = [], [], 0
        for pos, (url, info) in enumerate(zip(doc["images"], infos)):
            score = (info or {}).get("nsfw_score")
            if url is None:
                why = None
            elif score is None:
                reason, detail = unscored.get(url, ("image_decode_failed", "no NSFW score"))
                why = Reject(reason, f"{url}: not scored: {detail}")
            else:
                events.append(Count(STAGE_NSFW_IMAGES, score_bin(score)))
                why = self.policy.image(score)
                why = why and Reject(why.reason, f"{url}: {why.detail}")
            n += url is not None
            if why is None:
                keep.append(pos)
            else:
                events.append(ItemReject(STAGE_NSFW_IMAGES, why, doc["source"]))
        dropped = len(doc["images"]) - len(keep)
        if dropped:
            doc = drop_positions(doc, keep)
        return [doc, Count(STAGE_NSFW_IMAGES, "in", n), Count(STAGE_NSFW_IMAGES, "out", n - dropped), *events]


def nsfw_stats(weights: str, clip_weights: str, policy, clip_model: str, policy_text: str) -> dict:
    """The `nsfw` entry of stats.json's safety section."""
    return {"weights": weights, "clip_model": clip_model, "clip_weights": clip_weights,
            "image_threshold": policy.image_threshold, "document_threshold": policy.document_threshold,
            "policy": policy_text}
