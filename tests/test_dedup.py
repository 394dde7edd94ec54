"""Exact, near-duplicate and repeated-image dedup on real extracted pages (trafilatura-eval), under DirectRunner
and DaskRunner, with counts that balance."""

import argparse
import gzip
import itertools
import json
import pickle

import apache_beam as beam
import numpy as np
import pyarrow.parquet as pq
import pytest
import trafilatura

from mmcorpus import schemas
from mmcorpus.filters import minhash
from mmcorpus.pipelines.interleaved import parking
from mmcorpus.pipelines.interleaved.dedup import (STAGE_EXACT, STAGE_IMAGES, STAGE_NEAR, DedupConfig, dedup_documents,
                                                  document_stages, drop_image_positions)
from mmcorpus.pipelines.runtime.run import RunSpec, execute
from mmcorpus.pipelines.runtime.runner import add_runner_args
from mmcorpus.pipelines.runtime.sink import Kind, park_folder
from mmcorpus.pipelines.runtime.stage import CPU_METRIC, Collector

BOILERPLATE = ["Cookie settings: we use cookies to improve your experience on our website.",
               "Subscribe to our newsletter and never miss a story. All rights reserved."]


def make_doc(doc_id, texts, images=(), url=None):
    """Texts then images (positions interleaved: text, image, text, ...)."""
    t, i = [], []
    images = list(images)
    for n, text in enumerate(texts):
        t.append(text), i.append(None)
        if n < len(images):
            t.append(None), i.append(images[n])
    for img in images[len(texts):]:
        t.append(None), i.append(img)
    return {"doc_id": doc_id, "url": url, "warc_record_id": None, "crawl_date": None, "source": f"test:{doc_id}",
            "language": None, "language_score": None, "texts": t, "images": i,
            "image_info": [None if x is None else {"url": x, "alt": None} for x in i], "metadata": {}}


def doc_row(doc):
    return {**doc, "metadata": schemas.metadata_json(doc["metadata"])}


def words(doc):
    return len(" ".join(t for t in doc["texts"] if t).split())


def shingle_set(doc):
    return minhash.shingles(minhash.normalize_text("\n".join(t for t in doc["texts"] if t)), 5)


@pytest.fixture(scope="module")
def pages(shared_data):
    folder = shared_data / "trafilatura-eval"
    evaldata = json.loads((folder / "evaldata.json").read_text())
    docs = []
    for path in sorted((folder / "pages").glob("*.html.gz")):
        name = path.name[:-3]
        html = gzip.decompress(path.read_bytes()).decode("utf-8", "replace")
        text = trafilatura.extract(html) or ""
        paragraphs = [p.strip() for p in text.split("\n") if p.strip()]
        docs.append(make_doc(f"page-{name}", paragraphs, url=evaldata.get(name, {}).get("url")))
    assert len(docs) == 144
    return docs


def edited_copies(pages):
    """Exact and lightly edited copies of real pages, with the doc each must be reported against."""
    long_pages = [d for d in pages if words(d) >= 400 and len([t for t in d["texts"] if t]) >= 4]
    a, b, c, d, e, f = long_pages[:6]
    extra, expected = [], {}  # rejected doc_id -> (reason, kept doc_id)

    copy = dict(a, doc_id="zz-exact-copy", source="test:zz-exact-copy")
    extra.append(copy)
    expected["zz-exact-copy"] = ("duplicate_exact", a["doc_id"])
    # Case and whitespace changes normalise away; this copy sorts before the original, so it survives.
    shouty = dict(b, doc_id="aa-shouty-copy", source="test:aa-shouty-copy",
                  texts=[None if t is None else "  " + t.upper() + "  " for t in b["texts"]])
    extra.append(shouty)
    expected[b["doc_id"]] = ("duplicate_exact", "aa-shouty-copy")

    texts = list(c["texts"])
    k = max(range(len(texts)), key=lambda n: len(texts[n] or ""))
    texts[k] = "This sentence was rewritten by an editor. " + texts[k].split(". ", 1)[-1]
    extra.append(dict(c, doc_id="zz-sentence-changed", source="test:zz-sentence-changed", texts=texts))
    expected["zz-sentence-changed"] = ("duplicate_near", c["doc_id"])

    extra.append(make_doc("zz-boilerplate-appended", [t for t in d["texts"] if t] + BOILERPLATE))
    expected["zz-boilerplate-appended"] = ("duplicate_near", d["doc_id"])

    # Two edits of the same page: both near duplicates of the original, and of each other.
    dropped_last = [t for t in e["texts"] if t][:-1]
    extra.append(make_doc("zz-last-paragraph-dropped", dropped_last))
    extra.append(make_doc("zz-last-paragraph-dropped-boilerplate", dropped_last + BOILERPLATE[:1]))
    expected["zz-last-paragraph-dropped"] = ("duplicate_near", e["doc_id"])
    expected["zz-last-paragraph-dropped-boilerplate"] = ("duplicate_near", e["doc_id"])
    # An exact copy of a page that also has a near copy: exact goes first, near second.
    extra.append(dict(f, doc_id="zz-exact-f", source="test:zz-exact-f"))
    extra.append(make_doc("zz-near-f", [t for t in f["texts"] if t] + BOILERPLATE[1:]))
    expected["zz-exact-f"] = ("duplicate_exact", f["doc_id"])
    expected["zz-near-f"] = ("duplicate_near", f["doc_id"])
    return extra, expected


def repeated_image_docs(coco):
    """A real photo URL in K+1 documents (boilerplate) and another in exactly K (kept). The documents' texts
    are the COCO captions of other photos (real, distinct text)."""
    recs = [json.loads(line) for line in (coco / "captions.jsonl").read_text().splitlines()]
    repeated, allowed = recs[0]["flickr_url"], recs[1]["flickr_url"]
    k = DedupConfig().max_image_repeats
    docs = []
    for n, rec in enumerate(recs[2:k + 3]):
        images = [repeated, allowed] if n < k else [repeated]
        docs.append(make_doc(f"img-{n:02d}", rec["captions"], images))
    return docs, repeated, allowed


def run_args(runner, workers):
    parser = argparse.ArgumentParser()
    add_runner_args(parser)
    return parser.parse_args(["--runner", runner, "--workers", str(workers)])


def build_for(docs, cfg, park_dir=None):
    def build(p):
        c = Collector()
        src = p | "Read" >> beam.Create(docs)
        c.count(src, "read", "in")
        c.count(src, "read", "out")
        kept = dedup_documents(c, src, cfg, park_dir)
        c.add(kept | "ToSink" >> beam.Map(lambda d: ("data", d["doc_id"], doc_row(d))))
        return c.finish()
    return build


def run_dedup(out, docs, runner="direct", workers=1, cfg=DedupConfig(), park=True):
    """The dedup transforms alone, documents parked in run files under the output's _tmp/ (or, `park` False,
    carried inside their stubs)."""
    spec = RunSpec(command="test-dedup", out_dir=str(out), config={}, inputs=[],
                   kinds={"data": Kind("interleaved", "data", 2)}, stages=["read", *document_stages(cfg)])
    stats = execute(spec, run_args(runner, workers), build_for(docs, cfg, park_folder(str(out)) if park else None))
    files = {}
    for sub in ("data", "rejects", "_stats"):
        for f in sorted((out / sub).iterdir()):
            # CPU seconds per stage are measured, so they differ run to run: compared without them
            files[f"{sub}/{f.name}"] = [r for r in pq.read_table(f).to_pylist() if r.get("metric") != CPU_METRIC]
    return stats, files


def test_minhash_estimates_jaccard_of_real_edited_pages(pages):
    extra, expected = edited_copies(pages)
    by_id = {d["doc_id"]: d for d in pages + extra}
    for dup, (_, original) in expected.items():
        a, b = shingle_set(by_id[dup]), shingle_set(by_id[original])
        exact = minhash.jaccard(a, b)
        sig_a, sig_b = minhash.signature(a), minhash.signature(b)
        estimate = minhash.jaccard_estimate(sig_a, sig_b)
        assert abs(exact - estimate) < 0.1, (dup, exact, estimate)
        # the low bytes the LSH join carries estimate the same (b-bit minwise hashing)
        low = [np.frombuffer(minhash.low_bytes(s), dtype=np.uint8) for s in (sig_a, sig_b)]
        assert abs(float(minhash.low_byte_estimates(low[0][None], low[1])[0]) - estimate) < 0.03
        assert exact >= 0.85, (dup, exact)  # lightly edited: well above the 0.8 threshold
    assert minhash.normalize_text("  Hello,   WORLD!\u00a0ﬁne_day ") == "hello world fine day"
    assert minhash.shingles("a b c", 5) == {"a b c"} and minhash.shingles("", 5) == set()
    bands, rows = minhash.lsh_params(0.8, 128, 0.1, 0.9)
    assert bands * rows <= 128 and minhash.collision_probability(0.9, bands, rows) > 0.99
    assert minhash.collision_probability(0.5, bands, rows) < 0.05


def test_distinct_real_pages_are_far_apart(pages):
    """The premise of the pipeline test: no two of the 144 pages are near duplicates (exact Jaccard)."""
    sets = [shingle_set(d) for d in pages]
    worst = max(minhash.jaccard(a, b) for a, b in itertools.combinations(sets, 2) if a and b)
    assert worst < 0.5
    # unrelated pages' low bytes agree 1/256 of the time by chance: the estimate corrects that away
    lows = np.stack([np.frombuffer(minhash.low_bytes(minhash.signature(x)), dtype=np.uint8) for x in sets if x])
    assert max(float(minhash.low_byte_estimates(lows[:i], lows[i]).max()) for i in range(1, len(lows))) < 0.5


def test_dedup_pipeline_direct_and_dask(tmp_path, pages, coco):
    extra, expected = edited_copies(pages)
    image_docs, repeated, allowed = repeated_image_docs(coco)
    docs = pages + extra + image_docs
    cfg = DedupConfig()
    stats, files = run_dedup(tmp_path / "direct", docs, cfg=cfg)
    dask_stats, dask_files = run_dedup(tmp_path / "dask", docs, "dask", 2, cfg=cfg)
    assert files == dask_files  # same shards, rows and order under both runners
    assert stats["totals"] == dask_stats["totals"]
    held_stats, held_files = run_dedup(tmp_path / "held", docs, cfg=cfg, park=False)
    assert held_files == files and held_stats["totals"] == stats["totals"]  # parking changes no decision

    rejects = [r for name, rows in files.items() if name.startswith("rejects/") for r in rows]
    doc_rejects = {r["source"].removeprefix("test:"): r for r in rejects if r["stage"] in (STAGE_EXACT, STAGE_NEAR)}
    assert sorted(doc_rejects) == sorted(expected)  # every planted duplicate found, no distinct page paired
    for doc_id, (reason, kept) in expected.items():
        row = doc_rejects[doc_id]
        assert row["reason"] == reason
        assert f"doc {kept}" in row["detail"], (doc_id, row["detail"])
        if reason == "duplicate_near":
            estimate = float(row["detail"].rsplit("Jaccard ", 1)[1].rstrip(")"))
            assert cfg.threshold <= estimate <= 1.0

    kept = {r["doc_id"]: r for name, rows in files.items() if name.startswith("data/") for r in rows}
    assert set(kept) == {d["doc_id"] for d in docs} - set(expected)
    assert stats["totals"] == {"read": len(docs), "written": len(kept), "rejected": len(expected),
                               "reject_rows": len(rejects)}

    # Repeated image: gone from all K+1 documents; the image in exactly K stays; text untouched. (The one
    # document whose only image it was keeps its text here; `mmcorpus interleaved` then rejects it at
    # image_count_after_dedup: tests/test_interleaved.py test_url_list_with_image_fetching.)
    by_id = {d["doc_id"]: d for d in image_docs}
    for doc_id, original in by_id.items():
        row = kept[doc_id]
        assert repeated not in row["images"]
        assert [t for t in row["texts"] if t] == [t for t in original["texts"] if t]
        assert (allowed in row["images"]) == (allowed in original["images"])
        schemas.validate(schemas.to_table([row], "interleaved"), "interleaved")
    image_rejects = [r for r in rejects if r["stage"] == STAGE_IMAGES]
    assert len(image_rejects) == len(image_docs)
    assert all(r["reason"] == "image_repeated" and r["detail"].startswith(repeated) for r in image_rejects)
    stages = {s["stage"]: s for s in stats["stages"]}
    n_images = sum(u is not None for d in image_docs for u in d["images"])
    assert stages[STAGE_IMAGES]["in"] == n_images
    assert stages[STAGE_IMAGES]["out"] == n_images - len(image_docs)
    assert stages[STAGE_EXACT]["in"] == len(docs)
    assert stages[STAGE_NEAR]["in"] == stages[STAGE_EXACT]["out"]


def test_dedups_can_be_switched_off(tmp_path, pages):
    extra, expected = edited_copies(pages)
    cfg = DedupConfig(near=False, images=False)
    stats, files = run_dedup(tmp_path, pages + extra, cfg=cfg)
    reasons = {r["reason"] for name, rows in files.items() if name.startswith("rejects/") for r in rows}
    assert reasons == {"duplicate_exact"}
    assert stats["totals"]["rejected"] == sum(1 for r, _ in expected.values() if r == "duplicate_exact")
    with pytest.raises(ValueError, match="threshold"):
        DedupConfig(threshold=1.5)
    assert np.array_equal(minhash.text_signature("same words here"), minhash.text_signature("Same  words, here!"))


def _run_dofn(fn, elements):
    """Every output of a DoFn over one bundle, as the runners call it."""
    fn.start_bundle()
    out = [o for e in elements for o in fn.process(e)]
    return out + [wv.value for wv in fn.finish_bundle()]


def test_parked_documents_come_back_whole_from_small_stubs(tmp_path, pages, coco, monkeypatch):
    """Dedup's shuffles carry stubs: documents wait in run files (several here) and come back equal, each in
    its place, with the image positions the image dedup dropped removed from texts, images and image_info."""
    monkeypatch.setattr(parking, "RUN_BYTES", 200_000)
    monkeypatch.setattr(parking, "READ_BATCH", 50)
    image_docs, repeated, allowed = repeated_image_docs(coco)
    docs = pages + image_docs
    folder = tmp_path / "parked"
    stubs = _run_dofn(parking.Park(str(folder), DedupConfig()), docs)
    assert [s["doc_id"] for s in stubs] == [d["doc_id"] for d in docs]
    assert len(list(folder.iterdir())) > 1 and all("doc" not in s for s in stubs)
    assert sum(len(pickle.dumps(s)) for s in stubs) < sum(len(pickle.dumps(d)) for d in docs) / 3
    trimmed = {}
    for n, stub in enumerate(stubs):
        if repeated in stub["images"]:
            stubs[n], events = drop_image_positions(stub, {repeated: "boilerplate"}, STAGE_IMAGES, "image_repeated")
            trimmed[stub["doc_id"]] = events
    assert len(trimmed) == len(image_docs)
    back = _run_dofn(parking.Unpark(), stubs[::-1])[::-1]  # any order: each stub gets its own document
    for doc, original in zip(back, docs):
        if doc["doc_id"] not in trimmed:
            assert doc == original
            continue
        keep = [i for i, u in enumerate(original["images"]) if u != repeated]
        assert doc["images"] == [original["images"][i] for i in keep] and repeated not in doc["images"]
        assert doc["texts"] == [original["texts"][i] for i in keep]
        assert doc["image_info"] == [original["image_info"][i] for i in keep]
        assert [e.metric for e in trimmed[doc["doc_id"]] if hasattr(e, "metric")] == ["in", "out"]
