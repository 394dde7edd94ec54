"""`mmcorpus pairs` on real data with a tiny random open_clip model built here: scores equal a direct
open_clip call, threshold/top-fraction keep exactly the expected pairs, dedup finds the imagededup-ukbench
copies and no false pairs among distinct coco-mini photos, bad images and captions become rejects, every
source kind is read (interleaved, COCO, table with paths, URLs through img2dataset), one run under Dask."""

import csv
import io
import json
import math
import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mmcorpus import schemas
from mmcorpus.filters.captions import check_caption, clean_caption
from mmcorpus.filters.imageinfo import to_rgb
from mmcorpus.filters.phash_index import PHashIndex, make_plan, near_pairs, plan, to_uint64
from mmcorpus.filters.reasons import Reject
from mmcorpus.pipelines.cli import main
from mmcorpus.pipelines.models.clip import ClipConfig, load_model
from mmcorpus.pipelines.pairs.dedup import semantic_duplicates
from tests.test_images import site  # noqa: F401  (fixture: real files served on 127.0.0.1)

TINY = {"embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "mmcorpus-tiny-clip.json"
    path.write_text(json.dumps(TINY))
    return str(path)


@pytest.fixture(scope="module")
def ukbench(shared_data):
    return shared_data / "imagededup-ukbench"


def direct_scores(tiny_clip, rows, batch=64):
    """clip_score by a plain open_clip call on PIL images (no pipeline, no nvJPEG path)."""
    loaded = load_model(ClipConfig(model=tiny_clip, allow_random=True))
    model, pre, tok = loaded.model, loaded.extras["preprocess"], loaded.extras["tokenizer"]
    out = {}
    with torch.no_grad():
        for start in range(0, len(rows), batch):
            part = rows[start:start + batch]
            img = model.encode_image(torch.stack([pre(to_rgb(r["image_bytes"])) for r in part]))
            txt = model.encode_text(tok([r["caption"] for r in part]))
            for r, s in zip(part, torch.nn.functional.cosine_similarity(img, txt).tolist()):
                out[r["image_id"]] = s
    return out


def run_cli(out, sources, *extra, clip=None, runner=("--workers", "1")):
    argv = ["pairs", *map(str, sources), "--output", str(out), "--allow-random-weights", "--num-shards", "2",
            *runner, *extra]
    if clip:
        argv += ["--clip-model", clip]
    assert main(argv) == 0
    stats = json.loads((out / "stats.json").read_text())
    data = pq.read_table(out / "data")
    schemas.validate(pq.read_table(out / "data").replace_schema_metadata(None), "pair")
    rejects = pq.read_table(out / "rejects").to_pylist()
    return stats, data.to_pylist(), rejects


def ukbench_table(ukbench, tmp):
    """Every image file of imagededup-ukbench that near_duplicates.json lists, or that belongs to no group."""
    groups = json.loads((ukbench / "near_duplicates.json").read_text())["groups"]
    listed = {p: g for g, files in groups.items() for p in files}
    rows = []
    for p in sorted(ukbench.rglob("*")):
        rel = p.relative_to(ukbench).as_posix()
        if p.is_file() and p.suffix.lower() not in (".json", ".md", ".txt") and rel != "alpha_channel_image.png":
            rows.append({"path": str(p), "caption": f"a photo of object {p.stem.replace('_', ' ')} on display"})
    path = tmp / "ukb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, listed


def variant(rel):
    """Which copies pHash cannot tie to the original: the ~30-degree rotations (black corners) stay apart;
    horizontal flips are caught with --phash-transforms (the original's flipped pHash matches)."""
    return "rotation" if "rotation" in rel else "plain"


# ---- pure parts -----------------------------------------------------------------------------------------

def test_captions_on_coco_and_boilerplate(coco):
    recs = [json.loads(line) for line in (coco / "captions.jsonl").read_text().splitlines()]
    caps = [c for r in recs for c in r["captions"]]
    kept = [check_caption(c) for c in caps]
    assert all(isinstance(k, str) for k in kept)  # human COCO captions all pass
    assert clean_caption("  A&amp;amp;B <b>dog</b>\u200b  on\n\tgrass ") == "A&B dog on grass"
    for text, reason in [(None, "caption_empty"), (3, "caption_empty"), ("   ", "caption_empty"),
                         ("<br>", "caption_empty"), ("image", "caption_boilerplate"),
                         ("Click here", "caption_boilerplate"), ("IMG_2034.JPG", "caption_boilerplate"),
                         ("DSC 0042", "caption_boilerplate"), ("untitled", "caption_boilerplate"),
                         ("http://x.com/a.png", "caption_boilerplate"), ("12 34 56", "caption_boilerplate"),
                         ("red car", "caption_too_short"), ("a b c", "caption_too_short"),
                         ("word " * 300, "caption_too_long")]:
        r = check_caption(text)
        assert isinstance(r, Reject) and r.reason == reason, (text, r)


def test_phash_index_exact_against_brute_force(coco, ukbench):
    from mmcorpus.filters.imageinfo import ImageInfo, inspect_image

    hexes = []
    for p in sorted((coco / "images").glob("*.jpg")) + sorted(ukbench.rglob("*.jpg")):
        info = inspect_image(p.read_bytes())
        if isinstance(info, ImageInfo):
            hexes.append(info.phash)
    rng = np.random.default_rng(0)
    base = to_uint64(hexes)
    flips = np.array([sum(1 << int(b) for b in rng.choice(64, rng.integers(0, 13), replace=False)) for _ in base],
                     dtype=np.uint64)
    hashes = np.concatenate([base, base ^ flips])  # real hashes plus copies 0-12 bits away
    d = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    for k in (0, 5, 10):
        brute = {(i, j) for i, j in zip(*np.triu_indices(len(hashes), 1)) if d[i, j] <= k}
        for p in (None, make_plan(k, k + 1), make_plan(k, k + 2), make_plan(k, k + 3)):
            got = near_pairs(hashes, k, p)
            assert {(int(a), int(b)) for a, b, _ in got} == brute, (k, p and p.m)
            assert all(int(dist) == d[a, b] for a, b, dist in got)
        index = PHashIndex(hexes, k)
        q = f"{int(base[3] ^ flips[3]):016x}"
        assert {i for i, _ in index.query(q)} == {str(i) for i in range(len(hexes)) if d[i, len(base) + 3] <= k}
    assert plan(10, 1_000_000).m > plan(10, 1_000).m  # longer keys for more hashes


def test_semantic_duplicates_finds_planted_copies():
    rng = np.random.default_rng(1)
    base = rng.normal(size=(200, 32)).astype(np.float32)
    copies = base[:20] + rng.normal(scale=0.02, size=(20, 32)).astype(np.float32)
    emb = np.concatenate([base, copies])
    ranks = [(0, f"{i:04d}") for i in range(len(emb))]
    found = semantic_duplicates(emb, ranks, eps=0.02, n_clusters=8)
    assert sorted((loser, winner) for loser, winner, _ in found) == [(200 + i, i) for i in range(20)]


# ---- the command --------------------------------------------------------------------------------------

def test_pairs_coco_and_ukbench(tmp_path, coco, ukbench, tiny_clip):
    table, listed = ukbench_table(ukbench, tmp_path)
    stats, kept, rejects = run_cli(tmp_path / "out", [coco, f"ukb={table}"], "--phash-transforms", clip=tiny_clip)
    assert stats["clip_weights"] == "random" and stats["config"]["clip_weights"] == "random"
    # every kept pair carries a score equal to a direct open_clip call
    direct = direct_scores(tiny_clip, kept)
    for row in kept:
        assert abs(row["clip_score"] - direct[row["image_id"]]) < 1e-4, row["image_id"]
    # distinct coco photos: no duplicate found, every caption of every photo kept
    n_captions = sum(len(json.loads(line)["captions"]) for line in (coco / "captions.jsonl").read_text().splitlines())
    assert sum(r["source_dataset"] == "coco-mini" for r in kept) == n_captions
    # ukbench: corrupt files rejected, one survivor per (photo, rotated or not), flips found, unlisted all kept
    root = str(ukbench) + "/"
    bad = {r["detail"].split(":", 1)[0].removeprefix(root) for r in rejects if r["reason"] == "image_decode_failed"}
    assert bad == {p for p in listed if "corrupt" in p}
    survivors = [json.loads(r["metadata"])["image_ref"].split(":", 1)[1].removeprefix(root) for r in kept
                 if r["source_dataset"] == "ukb"]
    seen = [(listed.get(s, s), variant(s)) for s in survivors]
    assert len(seen) == len(set(seen))
    expected = {(g, variant(p)) for p, g in listed.items() if "corrupt" not in p}
    unlisted = {p.relative_to(ukbench).as_posix() for p in ukbench.rglob("*") if p.is_file()
                and p.suffix.lower() not in (".json", ".md", ".txt")} - set(listed) - {"alpha_channel_image.png"}
    assert set(seen) == expected | {(p, "plain") for p in unlisted}
    dup = [r for r in rejects if r["reason"].startswith("duplicate_")]
    assert {r["reason"] for r in dup} == {"duplicate_exact", "duplicate_phash"}
    flips = [r for r in dup if "hflip" in r["source"] or "hflip" in r["detail"]]
    assert flips and all("hflip of one matches the other" in r["detail"] for r in flips if r["reason"] == "duplicate_phash")
    # counts: every stage balances, read = written + rejected, histogram covers every scored pair
    t = stats["totals"]
    assert t["read"] == t["written"] + t["rejected"] == len(kept) + len(rejects)
    hist = stats["clip_score_histogram"]
    assert sum(hist["scored"]) == len(kept) + len(dup) and sum(hist["kept"]) == len(kept)


def interleaved_source(tmp, coco):
    """An `mmcorpus interleaved`-style output folder with real photos, alt texts and neighbouring text."""
    recs = [json.loads(line) for line in (coco / "captions.jsonl").read_text().splitlines()[:4]]
    docs = []
    for i, rec in enumerate(recs):
        data = (coco / "images" / rec["file_name"]).read_bytes()
        alt = rec["captions"][0] if i != 1 else "IMG_0001.jpg"  # a file-name alt text: rejected
        info = {"url": f"http://photos.example/{rec['file_name']}", "sha256": None, "width": None, "height": None,
                "phash": None, "bytes": data if i != 3 else b"", "path": None, "alt": alt}  # doc 3: empty bytes
        docs.append({"doc_id": f"doc{i}", "url": f"http://site.example/{i}", "warc_record_id": None,
                     "crawl_date": None, "language": "en", "language_score": 0.9,
                     "texts": [rec["captions"][1] + " and more words", None],
                     "images": [None, info["url"]], "image_info": [None, info], "source": "test", "metadata": "{}"})
    folder = tmp / "interleaved"
    (folder / "data").mkdir(parents=True)
    pq.write_table(schemas.to_table(docs, "interleaved"), folder / "data" / "part-00000-of-00001.parquet")
    return folder, recs


def test_sources_threshold_decontamination_urls(tmp_path, coco, tiny_clip, site):  # noqa: F811
    base, _, _ = site
    recs = [json.loads(line) for line in (coco / "captions.jsonl").read_text().splitlines()]
    # a table of real photos by path (30 images, first caption), with bad rows mixed in
    rows = [{"path": f"images/{r['file_name']}", "caption": r["captions"][0]} for r in recs[10:40]]
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((coco / "images" / recs[40]["file_name"]).read_bytes()[:5000])
    (tmp_path / "zero.jpg").write_bytes(b"")
    rows += [{"path": str(truncated), "caption": "a truncated photo of a street"},
             {"path": str(tmp_path / "zero.jpg"), "caption": "an empty file with a caption"},
             {"path": "images/missing.jpg", "caption": "a photo that is not there"},
             {"caption": "a caption without any image"}]
    table = tmp_path / "photos.jsonl"
    table.write_text("".join(json.dumps(r) + "\n" for r in rows))
    os.symlink(coco / "images", tmp_path / "images")
    # threshold from the direct scores of the good table pairs
    probe = [{"image_id": i, "image_bytes": (coco / "images" / r["file_name"]).read_bytes(), "caption": r["captions"][0]}
             for i, r in enumerate(recs[13:40])]
    probe_scores = direct_scores(tiny_clip, probe)
    scores = sorted(probe_scores.values())
    threshold = (scores[len(scores) // 2] + scores[len(scores) // 2 - 1]) / 2
    # a photo that passes the threshold, also fetched by URL with the same caption: an exact duplicate across
    # datasets (equal scores; the smaller image_id, the table's, survives and is marked)
    shared = recs[13 + next(i for i, v in probe_scores.items() if v > threshold + 1e-3)]
    # URLs fetched from a local server: three good, one 404, one corrupt file
    with open(tmp_path / "web.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["url", "caption"])
        for r in (recs[41], recs[42], shared):
            w.writerow([f"{base}/coco/{r['file_name']}", r["captions"][0]])
        w.writerow([f"{base}/coco/not-there.jpg", "a photo that the server does not have"])
        w.writerow([f"{base}/ukb/mixed_images/ukbench09268_corrupt.jpg", "a broken photo of a building"])
    urls = tmp_path / "web.csv"
    inter, inter_recs = interleaved_source(tmp_path, coco)
    # evaluation set: half-size re-encoded copies of three table photos
    evald = tmp_path / "eval"
    evald.mkdir()
    for r in recs[10:13]:
        img = Image.open(coco / "images" / r["file_name"])
        img.resize((img.width // 2, img.height // 2)).save(evald / r["file_name"], quality=60)
    stats, kept, rejects = run_cli(tmp_path / "out", [f"photos={table}", f"web={urls}", f"site={inter}"],
                                   "--min-clip-score", f"{threshold:.6f}", "--decontaminate", str(evald),
                                   "--include-context-text", "--allow-private-urls", "--fetch-timeout", "3",
                                   "--dedup", "exact,phash,semantic", "--semantic-eps", "0.0001",
                                   "--store-embeddings", clip=tiny_clip)
    reasons = {}
    for r in rejects:
        reasons.setdefault(r["reason"], []).append(r)
    assert len(reasons["contaminated"]) == 3
    assert {r["source"] for r in reasons["missing_image"]} == {"photos.jsonl:34"}  # JSONL/CSV sources: line numbers
    assert len(reasons["read_failed"]) == 1 and "missing.jpg" in reasons["read_failed"][0]["detail"]
    # truncated, zero-byte, corrupt download, and the empty interleaved image (its alt and context pair)
    assert len(reasons["image_decode_failed"]) == 5
    assert len(reasons["image_fetch_failed"]) == 1 and "not-there" in reasons["image_fetch_failed"][0]["detail"]
    assert [r["source"] for r in reasons["caption_boilerplate"]] == ["part-00000-of-00001.parquet:doc1:1"]
    direct = direct_scores(tiny_clip, kept)
    low = reasons.get("clip_score_low", [])
    for row in kept:
        assert row["clip_score"] >= threshold and abs(row["clip_score"] - direct[row["image_id"]]) < 1e-4
        emb = np.frombuffer(row["clip_embedding"], dtype="<f2")
        assert emb.shape == (32,) and abs(float(np.linalg.norm(emb)) - 1) < 1e-2
    # the 27 probe photos split at the median of their direct scores: exactly the upper half is kept
    table_kept = {r["image_id"] for r in kept if r["source_dataset"] == "photos"}
    assert len(table_kept) == sum(s >= threshold for s in scores)
    by_stage = {s["stage"]: s for s in stats["stages"]}
    assert by_stage["clip_filter"]["rejected"] == len(low)
    assert {r["source_dataset"] for r in kept} <= {"photos", "web", "site"}
    kinds = {json.loads(r["metadata"]).get("caption_kind") for r in kept if r["source_dataset"] == "site"}
    assert kinds <= {"alt", "context"}
    marked = [r for r in kept if json.loads(r["metadata"]).get("also_in_datasets")]
    assert [(r["source_dataset"], json.loads(r["metadata"])["also_in_datasets"]) for r in marked] == [("photos", ["web"])]
    assert marked[0]["image_path"].endswith(shared["file_name"])
    assert [r["source"] for r in reasons["duplicate_exact"]] == ["web.csv:4"]
    assert by_stage["read"]["in"] == len(rows) + 5 + 4 * 2  # 8 interleaved pairs: alt + context per image
    t = stats["totals"]
    assert t["read"] == t["written"] + t["rejected"]


def test_missing_weights_is_a_clear_error(tmp_path, coco, capsys):
    rc = main(["pairs", str(coco), "--output", str(tmp_path / "out"), "--workers", "1"])
    err = capsys.readouterr().err
    assert rc == 2 and "--clip-pretrained" in err and "--allow-random-weights" in err
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_top_fraction_under_dask(tmp_path, coco, tiny_clip):
    recs = [json.loads(line) for line in (coco / "captions.jsonl").read_text().splitlines()]
    rows = [{"image_id": f"coco-mini:{r['file_name']}#{i}", "caption": c,
             "image_bytes": (coco / "images" / r["file_name"]).read_bytes()}
            for r in recs for i, c in enumerate(r["captions"])]
    direct = direct_scores(tiny_clip, rows)
    order = sorted(direct, key=lambda k: (-direct[k], k))
    # a cut near 30% where the score gap is wider than the float noise between batched and direct scoring
    n_keep = next(n for n in range(math.ceil(0.3 * len(rows)), len(rows))
                  if direct[order[n - 1]] - direct[order[n]] > 2e-4)
    fraction = n_keep / len(rows)
    stats, kept, rejects = run_cli(tmp_path / "out", [coco], "--keep-top-fraction", repr(fraction), "--dedup", "none",
                                   clip=tiny_clip, runner=("--runner", "dask", "--workers", "2"))
    assert stats["runner"]["runner"] == "dask"
    assert sorted(r["image_id"] for r in kept) == sorted(order[:n_keep])
    assert all(abs(r["clip_score"] - direct[r["image_id"]]) < 1e-4 for r in kept)
    assert {r["reason"] for r in rejects} == {"clip_rank_low"} and len(rejects) == len(rows) - n_keep


def test_img2dataset_folder_source(tmp_path, coco, tiny_clip, site):  # noqa: F811
    """A real img2dataset output folder (its own CLI, parquet format) is a source; its failed downloads are
    rejects, not silent drops."""
    import subprocess
    import sys

    import pyarrow as pa

    base, _, _ = site
    recs = [json.loads(line) for line in (coco / "captions.jsonl").read_text().splitlines()[50:53]]
    urls = [f"{base}/coco/{r['file_name']}" for r in recs] + [f"{base}/coco/not-there.jpg"]
    pq.write_table(pa.table({"url": urls, "caption": [r["captions"][0] for r in recs] + ["a photo of a missing cat"]}),
                   tmp_path / "urls.parquet")
    cmd = [os.path.join(os.path.dirname(sys.executable), "img2dataset"), "--url_list", str(tmp_path / "urls.parquet"),
           "--input_format", "parquet", "--url_col", "url", "--caption_col", "caption", "--output_format", "parquet",
           "--output_folder", str(tmp_path / "i2d"), "--resize_mode", "no", "--disable_all_reencoding", "True",
           "--processes_count", "1", "--thread_count", "4"]
    subprocess.run(cmd, check=True, capture_output=True, env=dict(os.environ, NO_ALBUMENTATIONS_UPDATE="1"))
    stats, kept, rejects = run_cli(tmp_path / "out", [tmp_path / "i2d"], "--dedup", "none", clip=tiny_clip)
    assert sorted(r["caption"] for r in kept) == sorted(r["captions"][0] for r in recs)
    assert all(r["image_bytes"] == (coco / "images" / rec["file_name"]).read_bytes()
               for r in kept for rec in recs if r["url"].endswith(rec["file_name"]))
    assert [(r["reason"], "not-there.jpg" in r["detail"]) for r in rejects] == [("image_fetch_failed", True)]
    assert stats["totals"]["read"] == 4


# ---- GPU-path logic, exercised on CPU (no GPU here) ------------------------------------------------------

def exif_rotated_jpeg(data):
    """The photo re-encoded with EXIF orientation 6 (display rotated 90 degrees clockwise)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


def test_device_decode_path_prefetch_and_oom_retry_on_cpu(coco, ukbench, tiny_clip):
    """The nvJPEG path (batched decode_jpeg, EXIF orientation, batched resize/crop/normalise; run with
    device='cpu') gives the tensors of open_clip's PIL preprocess; its prefetch chunking gives the scores of
    one big batch; a CUDA out-of-memory in the model or in the decode halves the chunk and gives the same
    scores; bf16 works."""
    from mmcorpus.pipelines.models.clip import ClipScorer

    pil = ClipScorer(ClipConfig(model=tiny_clip, allow_random=True, device="cpu", batch_size=32))
    dev = ClipScorer(ClipConfig(model=tiny_clip, allow_random=True, device="cpu", batch_size=32, decode="device"))
    assert not pil.on_device and dev.on_device
    files = sorted((coco / "images").glob("*.jpg"))[:22] + sorted(ukbench.rglob("*.png"))[:2]
    images = [p.read_bytes() for p in files]
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(images[0])).convert("CMYK").save(cmyk, "JPEG")
    images += [exif_rotated_jpeg(images[1]), cmyk.getvalue()]  # EXIF on the device; CMYK goes through PIL
    batched = dev.device_tensors(images)
    for i, (data, b) in enumerate(zip(images, batched)):
        a = pil._cpu_tensor(data)
        assert a.shape == b.shape == (3, 64, 64), i
        assert float((a - b).abs().mean()) < 0.01, i  # libjpeg vs PIL decode and resize rounding only
    rotated = pil._cpu_tensor(images[-2])
    assert float((rotated - pil._cpu_tensor(images[1])).abs().mean()) > 0.05  # orientation did matter
    # a truncated JPEG in a batch is a reject; the rest of the batch decodes
    mixed = dev.device_tensors([images[0][:4000], images[2]])
    assert isinstance(mixed[0], Reject) and mixed[0].reason == "image_decode_failed"
    assert float((mixed[1] - batched[2]).abs().max()) < 1e-6

    captions = [f"a photo number {i} of something" for i in range(len(images))]
    expected = dev.score(images, captions)
    assert all(abs(e[0] - p[0]) < 0.02 for e, p in zip(expected, pil.score(images, captions)))
    real_encode, real_decode, sizes, decoded = dev.encode_images, dev.device_tensors, [], []
    dev.encode_images = lambda px: sizes.append(len(px)) or real_encode(px)
    dev.batch_size = 8  # chunks of 8, each decoded on the prefetch thread while the previous one is embedded
    chunked = dev.score(images, captions)
    assert sizes == [8, 8, 8, 2]
    assert all(abs(g[0] - e[0]) < 1e-5 for g, e in zip(chunked, expected))

    def decode_with_memory_limit(blobs):  # fault injection: decoding more than 5 images runs out of memory
        decoded.append(len(blobs))
        if len(blobs) > 5:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected in decode)")
        return real_decode(blobs)

    dev.device_tensors = decode_with_memory_limit
    got = dev.score(images, captions)
    assert decoded[:2] == [8, 4] and dev.batch_size == 4 and max(decoded[2:]) == 4
    assert all(abs(g[0] - e[0]) < 1e-5 for g, e in zip(got, expected))

    def encode_with_memory_limit(pixels):  # fault injection: the device holds at most 3 images
        sizes.append(len(pixels))
        if len(pixels) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_encode(pixels)

    del sizes[:]
    pil.encode_images = encode_with_memory_limit
    got = pil.score(images, captions)
    assert sizes[:4] == [26, 13, 6, 3] and pil.batch_size == 3 and max(sizes[4:]) == 3
    assert all(abs(g[0] - e[0]) < 0.02 for g, e in zip(got, expected))

    half = ClipScorer(ClipConfig(model=tiny_clip, allow_random=True, device="cpu", precision="bf16"))
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert all(abs(h[0] - e[0]) < 0.05 for h, e in zip(half.score(images[:6], captions[:6]), expected))


def test_captions_of_one_image_share_one_image_embedding(coco, tiny_clip):
    """Pairs keyed by the same image are decoded and embedded once, with the scores of pair-by-pair scoring."""
    from mmcorpus.pipelines.models.clip import ClipScorer

    scorer = ClipScorer(ClipConfig(model=tiny_clip, allow_random=True, device="cpu", batch_size=64))
    recs = [json.loads(line) for line in (coco / "captions.jsonl").read_text().splitlines()[:6]]
    images, captions, keys = [], [], []
    for rec in recs:
        data = (coco / "images" / rec["file_name"]).read_bytes()
        for cap in rec["captions"]:
            images.append(data)
            captions.append(cap)
            keys.append(rec["file_name"])
    images.append(b"\xff\xd8 truncated")
    captions.append("a broken image")
    keys.append("broken")
    alone = scorer.score(images, captions)  # no keys: every pair on its own
    real_encode, encoded = scorer.encode_images, []
    scorer.encode_images = lambda px: encoded.append(len(px)) or real_encode(px)
    shared = scorer.score(images, captions, keys)
    assert encoded == [len(recs)]  # 6 photos embedded once each for their 30 captions; the broken one never
    assert isinstance(shared[-1], Reject) and shared[-1].reason == "image_decode_failed"
    for a, b in zip(alone[:-1], shared[:-1]):
        assert abs(a[0] - b[0]) < 1e-5
    assert shared[0][1] == shared[4][1] != shared[5][1]  # the same image's embedding bytes


# ---- bad input: readers, images, duplicate ids --------------------------------------------------------------

def png_bomb(width=30_000, height=30_000):
    """A PNG that declares width x height pixels with a tiny body: a decompression bomb (header only)."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def corrupt_row_group(path, group):
    """Overwrite the data of one row group's caption column: that row group cannot be read, the others can."""
    col = pq.ParquetFile(path).metadata.row_group(group).column(1)
    start = col.dictionary_page_offset or col.data_page_offset
    data = bytearray(path.read_bytes())
    data[start + 8:start + col.total_compressed_size] = b"\xab" * (col.total_compressed_size - 8)
    path.write_bytes(bytes(data))


def test_readers_turn_bad_records_into_rejects_and_account_for_every_row(tmp_path, coco):
    import pyarrow as pa
    import tarfile

    from mmcorpus.pipelines.pairs.sources import detect, read_task, tasks

    photo = sorted((coco / "images").glob("*.jpg"))[0]
    folder = tmp_path / "tables"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(b"".join([
        json.dumps({"path": str(photo), "caption": "a good photo of a thing"}).encode() + b"\n",
        b"[1, 2]\n",                                          # JSON, not an object
        json.dumps({"path": 3, "caption": "a path that is a number"}).encode() + b"\n",
        b'{"path": "x.jpg", "caption": "caf\xe9 latin-1"}\n',   # not UTF-8
        b"{not json\n",
        json.dumps({"image": {"bytes": None, "path": str(photo)}, "caption": "an HF image struct"}).encode() + b"\n"]))
    (folder / "b.json").write_text("3")                       # a scalar top level
    (folder / "c.csv").write_text('path,caption\n' + f'{photo},"a photo from a csv"\n' +
                                  'x.jpg,"too",many,fields\n' + '"' + "y" * 200_000 + '",big\n' +
                                  f'{photo},"after the bad rows"\n')
    pq.write_table(pa.table({"path": [str(photo)] * 6, "caption": [f"row number {i} of six" for i in range(6)]}),
                   folder / "d.parquet", row_group_size=2)
    corrupt_row_group(folder / "d.parquet", 1)
    # one caption per line (the original COCO layout) repeats file_name: image_ids must still be unique
    (folder / "e.jsonl").write_text("".join(json.dumps({"file_name": photo.name, "captions": [c]}) + "\n"
                                            for c in ("first caption here", "second caption here")))
    src = detect(f"t={folder}")
    rows = [r for task in tasks([src]) for r in read_task(task)]
    bad = {r["_bad"]: r["_detail"] for r in rows if "_bad" in r}
    good = [r for r in rows if "_bad" not in r]
    assert bad["a.jsonl:2"] == "not a record but list: [1, 2]"
    assert "'path' is int" in bad["a.jsonl:3"]
    assert "not UTF-8" in bad["a.jsonl:4"] and "bad JSON" in bad["a.jsonl:5"]
    assert "top level is int" in bad["b.json:0"]
    assert "4 fields, header has 2" in bad["c.csv:3"] and "field limit" in bad["c.csv:4"]
    assert {k for k in bad if k.startswith("d.parquet")} == {"d.parquet:2", "d.parquet:3"}
    assert all("row group 1 unreadable" in bad[f"d.parquet:{i}"] for i in (2, 3))
    assert sorted(r["caption"] for r in good if r["source"].startswith("d.parquet")) == \
        ["row number 0 of six", "row number 1 of six", "row number 4 of six", "row number 5 of six"]
    assert [r["image_path"] for r in good if r["caption"] == "an HF image struct"] == [str(photo)]
    # every line/row of every file is accounted for: 6 + 1 + 4 + 6 + 2
    assert len(rows) == 19 and len(bad) == 9
    assert len({r["row_key"] for r in rows}) == len(rows)
    assert len({r["image_id"] for r in good}) == len(good)  # e.jsonl's two lines, d.parquet's same path
    # read in chunks of a few records (a large file's read tasks): the same rows, offsets and ids; keys in order
    strip = [{k: v for k, v in r.items() if k != "row_key"} for r in rows]
    for size in (1, 2, 3):
        parts = tasks([src], size)
        assert len(parts) > 6  # a.jsonl, c.csv, d.parquet and e.jsonl split
        chunked = [r for task in parts for r in read_task(task)]
        assert [{k: v for k, v in r.items() if k != "row_key"} for r in chunked] == strip
        keys = [r["row_key"] for r in chunked]
        assert len(set(keys)) == len(keys) and keys == sorted(keys)
    # a tar that breaks off: the samples before the break, then one reject naming the byte offset
    i2d = tmp_path / "i2d"
    i2d.mkdir()
    (i2d / "00000_stats.json").write_text("{}")
    with tarfile.open(i2d / "00000.tar", "w") as tar:
        for key in ("000000000", "000000001", "000000002"):
            for ext, body in (("jpg", photo.read_bytes()), ("txt", f"caption of sample {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    whole = (i2d / "00000.tar").read_bytes()
    (i2d / "00000.tar").write_bytes(whole[:len(whole) // 2])
    out = list(read_task(tasks([detect(str(i2d))])[0]))
    assert [r["caption"] for r in out[:-1]] == ["caption of sample 000000000"]
    assert "tar unreadable from byte" in out[-1]["_detail"] and "_bad" in out[-1]


def test_csv_with_an_unreadable_header_rejects_every_row(tmp_path, coco):
    """A CSV header the csv module cannot read (a field over its limit): no data row is taken for the header;
    the header line and every data row after it are rejects saying why."""
    from mmcorpus.pipelines.pairs.sources import detect, read_task, tasks

    photo = sorted((coco / "images").glob("*.jpg"))[0]
    path = tmp_path / "h.csv"
    path.write_text('"' + "p" * 200_000 + '",caption\n' + f'{photo},"first data row"\n\n{photo},"second data row"\n')
    rows = list(read_task(tasks([detect(str(path))])[0]))
    assert [r.get("_bad") for r in rows] == ["h.csv:1", "h.csv:2", "h.csv:4"]
    assert "header (line 1) unreadable" in rows[0]["_detail"] and "field limit" in rows[0]["_detail"]
    assert all("columns unknown" in r["_detail"] for r in rows[1:])


def test_top_fraction_is_per_row_even_when_image_ids_repeat():
    """Two rows with the same image_id and the same score: the top-fraction cut keeps exactly one."""
    import apache_beam as beam
    from apache_beam.testing.util import assert_that, equal_to

    from mmcorpus.pipelines.pairs.dedup import keep_top_fraction
    from mmcorpus.pipelines.runtime.stage import Collector

    rows = [{"image_id": "same#0", "row_key": f"t/{f}:000000000", "clip_score": 0.5, "source": f"{f}:0"}
            for f in ("a.jsonl", "b.jsonl")]
    rows += [{"image_id": f"other#{i}", "row_key": f"t/c.jsonl:{i:09d}", "clip_score": 0.1 * i, "source": f"c:{i}"}
             for i in range(2)]
    with beam.Pipeline() as p:
        c = Collector()
        kept = keep_top_fraction(c, p | beam.Create(rows), 0.25)  # ceil(0.25 * 4) = 1 row
        assert_that(kept | beam.Map(lambda r: r["row_key"]), equal_to(["t/a.jsonl:000000000"]))


def test_phash_duplicates_collapse_identical_hashes_and_match_transforms():
    from mmcorpus.filters.phash_index import duplicates

    rng = np.random.default_rng(5)
    distinct = rng.integers(0, 2**64 - 1, size=300, dtype=np.uint64, endpoint=True)
    blank = np.full(30_000, distinct[7])  # 30k identical hashes (blank images): one group, found in O(n)
    hashes = np.concatenate([distinct, blank])
    rank = rng.permutation(len(hashes))
    got = duplicates(hashes, rank, 10)
    group = np.flatnonzero(hashes == distinct[7])
    best = group[np.argmin(rank[group])]
    d = np.bitwise_count(distinct[:, None] ^ distinct[None, :])
    near = {int(i) for i, j in zip(*np.nonzero((d <= 10) & (d > 0))) if rank[j] < rank[i]}
    assert set(got.loser.tolist()) == (set(group.tolist()) - {int(best)}) | near
    assert set(got.winner[np.isin(got.loser, group)].tolist()) <= {int(best)} | set(range(300))
    # a flipped copy: its hash is far from the original's, but the original's flip hash is not
    flip = np.uint64(0x0123456789ABCDEF)
    base = np.array([distinct[0], flip ^ np.uint64(0b101)], dtype=np.uint64)  # item 1 = flip(item 0) within 2 bits
    plain = duplicates(base, np.array([0, 1]), 10)
    assert not len(plain.loser)
    via = duplicates(base, np.array([0, 1]), 10, variants=(np.array([0]), np.array([flip]), np.array([1])))
    assert via.loser.tolist() == [1] and via.winner.tolist() == [0] and via.distance.tolist() == [2]
    assert via.via.tolist() == [1]


def test_phash_marks_cross_dataset_duplicates_with_more_than_64_datasets():
    """70 input datasets (more than one 64-bit mark word): every pHash duplicate pair across two datasets marks
    both images with the other's dataset, as a brute-force comparison finds them."""
    from mmcorpus.pipelines.pairs.dedup import phash_part

    rng = np.random.default_rng(11)
    hashes = rng.integers(0, 2**64 - 1, size=70, dtype=np.uint64, endpoint=True)
    for a, b, bits in ((0, 69, 0), (3, 66, 0b1011), (64, 65, 0b1), (10, 11, 0b11111)):  # planted copies
        hashes[b] = hashes[a] ^ np.uint64(bits)
    members = [(f"img{i:02d}", ((-0.5, f"img{i:02d}", ""), f"{int(h):016x}", f"ds{i:02d}", ()))
               for i, h in enumerate(hashes)]
    found = [t for part in range(2) for t in phash_part(members, 10, 0, part, 2, False)]
    d = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
    near = [(int(i), int(j)) for i, j in zip(*np.nonzero(d <= 10)) if i != j]
    assert {v for tag, v in found if tag == "mark"} == {(f"img{i:02d}", f"ds{j:02d}") for i, j in near}
    # the two parts' key shares may find one pair twice: compare sets
    assert {v[0] for tag, v in found if tag == "drop"} == {f"img{max(i, j):02d}" for i, j in near}
    assert ("img00", "ds69") in {v for tag, v in found if tag == "mark"}


def test_pairs_command_on_odd_images_bad_records_and_capfilt_rows(tmp_path, coco, tiny_clip):
    """CMYK, 16-bit, animated and decompression-bomb images and malformed records through `mmcorpus pairs`;
    a pairs input whose web and synthetic rows share an image_id (CapFilt's old output) keeps caption_source
    and itm_score; the same file at the same row of two tables gives two distinct rows."""
    photos = sorted((coco / "images").glob("*.jpg"))
    rgb = [Image.open(p).convert("RGB") for p in photos[:4]]
    rgb[0].convert("CMYK").save(tmp_path / "cmyk.jpg", quality=90)
    Image.fromarray(np.asarray(rgb[1].convert("L"), dtype=np.uint16) * 257).save(tmp_path / "grey16.png")
    rgb[2].save(tmp_path / "anim.gif", save_all=True, append_images=[rgb[2].rotate(90), rgb[2].rotate(180)],
                duration=100)
    (tmp_path / "bomb.png").write_bytes(png_bomb())
    lines = [json.dumps({"path": f, "caption": f"a photo stored as {f.split('.')[0]} here"})
             for f in ("cmyk.jpg", "grey16.png", "anim.gif", "bomb.png")]
    lines += ["[1, 2]", json.dumps({"path": 3, "caption": "a path that is a number"})]
    (tmp_path / "odd.jsonl").write_text("".join(line + "\n" for line in lines))
    two = tmp_path / "two"
    two.mkdir()
    for name in ("a.jsonl", "b.jsonl"):
        (two / name).write_text(json.dumps({"path": str(photos[5]), "caption": "the same photo in two tables"}) + "\n")
    up = tmp_path / "up"
    (up / "data").mkdir(parents=True)
    data = photos[6].read_bytes()
    pq.write_table(schemas.to_table([
        {"image_id": "img6", "image_bytes": data, "caption": "a web caption of the photo", "caption_source": "web",
         "itm_score": 0.61, "source_dataset": "coco"},
        {"image_id": "img6", "image_bytes": data, "caption": "a synthetic caption of the photo",
         "caption_source": "synthetic", "itm_score": 0.83, "source_dataset": "coco"}], "pair"),
        up / "data" / "part-00000-of-00001.parquet")
    stats, kept, rejects = run_cli(tmp_path / "out", [f"odd={tmp_path / 'odd.jsonl'}", f"two={two}", f"up={up}"],
                                   "--dedup", "none", clip=tiny_clip)
    by_reason = {}
    for r in rejects:
        by_reason.setdefault(r["reason"], []).append(r["source"])
    assert by_reason == {"image_too_large": ["odd.jsonl:4"], "read_failed": ["odd.jsonl:5", "odd.jsonl:6"]}
    meta = {r["caption"].split()[4]: json.loads(r["metadata"]) for r in kept if r["source_dataset"] == "odd"}
    assert meta["cmyk"]["image_mode"] == "CMYK" and meta["grey16"]["image_mode"].startswith("I")
    assert meta["anim"]["n_frames"] == 3 and meta["anim"]["image_format"] == "GIF"
    from_up = sorted((r["caption_source"], round(r["itm_score"], 2)) for r in kept if r["source_dataset"] == "up")
    assert from_up == [("synthetic", 0.83), ("web", 0.61)]
    assert len([r for r in kept if r["source_dataset"] == "two"]) == 2
    assert len({r["image_id"] for r in kept}) == len(kept) == 3 + 2 + 2
    t = stats["totals"]
    assert t["read"] == t["written"] + t["rejected"] == 10


def test_device_exif_orientation_matches_pil_for_all_eight():
    """nvJPEG ignores EXIF orientation, so the device path turns the tensor itself: like PIL's exif_transpose."""
    from PIL import ImageOps

    from mmcorpus.pipelines.models.clip import orient

    pixels = np.random.default_rng(0).integers(0, 255, (5, 7, 3)).astype(np.uint8)
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, "PNG", exif=exif.tobytes())
        expected = np.asarray(ImageOps.exif_transpose(Image.open(buf)))
        got = orient(torch.from_numpy(pixels).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
        assert got.shape == expected.shape and (got == expected).all(), orientation
