"""Documents parked in run files while dedup decides on them.

Every dedup shuffle (text hashes, LSH bands and their join, image URLs and their join) waits for all documents
of the run, so the workers held every document at once, at each of these barriers. `Park` writes each document,
pickled, to run files under OUT/_tmp/parked/ (one file per RUN_BYTES or bundle, written before any of its
references leaves) and emits a stub in its place: the ids, the image URLs, the exact-dedup key and the MinHash
signature, and the `Section` where the document lies. The shuffles carry stubs; `Unpark` reads the survivors
back, a batch at a time in file order (one open per file), and applies the image positions dedup dropped.
Without a folder (unit pipelines) the stub carries the document itself: the same decisions, held in memory.
"""

from __future__ import annotations

import pickle
from collections import defaultdict

import apache_beam as beam
from apache_beam.transforms.window import GlobalWindows

from mmcorpus.filters import minhash
from mmcorpus.pipelines.runtime.sink import RUN_BYTES, Section, write_run
from mmcorpus.schemas import storage

READ_BATCH = 256  # stubs whose documents `Unpark` reads together


def doc_text(doc: dict) -> str:
    return "\n".join(t for t in doc["texts"] if t)


def make_stub(doc: dict, cfg) -> dict:
    """What the dedup shuffles need of a document (`cfg`: DedupConfig)."""
    stub = {"doc_id": doc["doc_id"], "source": doc.get("source"), "url": doc.get("url"),
            "images": list(doc["images"]), "keep": None}
    if cfg.exact or cfg.near:
        normalized = minhash.normalize_text(doc_text(doc))
        if cfg.exact:
            stub["exact"] = "text:" + minhash.text_hash(normalized) if normalized else "empty:" + doc["doc_id"]
        if cfg.near:
            hashed = minhash.shingle_hashes(normalized, cfg.ngram)
            stub["sig"] = minhash.signature_from_hashes(hashed, cfg.num_perm, cfg.seed).tobytes() \
                if len(hashed) else None
    return stub


def take_positions(doc: dict, keep: list[int]) -> dict:
    """`doc` with only the positions `keep` of its aligned texts / images / image_info."""
    new = dict(doc)
    for field in ("texts", "images", "image_info"):
        if doc.get(field) is not None:
            new[field] = [doc[field][i] for i in keep]
    return new


class Park(beam.DoFn):
    """Document -> stub; the documents to run files under `folder` (or inside the stub when `folder` is None)."""

    def __init__(self, folder: str | None, cfg):
        self.folder = folder
        self.cfg = cfg

    def start_bundle(self):
        self.buffer = bytearray()
        self.waiting: list[tuple[dict, int, int]] = []

    def process(self, doc):
        stub = make_stub(doc, self.cfg)
        if self.folder is None:
            stub["doc"] = doc
            yield stub
            return
        data = pickle.dumps(doc, protocol=pickle.HIGHEST_PROTOCOL)
        self.waiting.append((stub, len(self.buffer), len(data)))
        self.buffer += data
        if len(self.buffer) >= RUN_BYTES:
            yield from self._flush()

    def finish_bundle(self):
        for stub in self._flush():
            yield GlobalWindows.windowed_value(stub)

    def _flush(self) -> list[dict]:
        if not self.waiting:
            return []
        path = write_run(self.folder, bytes(self.buffer))
        out = []
        for stub, offset, length in self.waiting:
            stub["parked"] = Section(path, offset, length)
            out.append(stub)
        self.buffer = bytearray()
        self.waiting = []
        return out


def _read(stubs: list[dict]) -> list[dict]:
    """The parked documents of `stubs`, in their order: each file opened once, its sections read by offset."""
    docs: dict[int, dict] = {}
    by_path: dict[str, list[int]] = defaultdict(list)
    for n, stub in enumerate(stubs):
        if "doc" in stub:
            docs[n] = stub["doc"]
        else:
            by_path[stub["parked"].path].append(n)
    for path, members in by_path.items():
        members.sort(key=lambda n: stubs[n]["parked"].offset)
        with storage.open(path, "rb") as f:
            for n in members:
                section = stubs[n]["parked"]
                f.seek(section.offset)
                docs[n] = pickle.loads(f.read(section.length))
    return [docs[n] for n in range(len(stubs))]


class Unpark(beam.DoFn):
    """Stub -> its document, with only the positions the stub keeps (`keep`; None: all)."""

    def start_bundle(self):
        self.stubs: list[dict] = []

    def process(self, stub):
        self.stubs.append(stub)
        if len(self.stubs) >= READ_BATCH:
            yield from self._flush()

    def finish_bundle(self):
        for doc in self._flush():
            yield GlobalWindows.windowed_value(doc)

    def _flush(self) -> list[dict]:
        stubs, self.stubs = self.stubs, []
        return [doc if stub["keep"] is None else take_positions(doc, stub["keep"])
                for stub, doc in zip(stubs, _read(stubs))]
