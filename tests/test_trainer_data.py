"""Trainer loader on real coco-mini photos: samples, skipped rows, sharding, determinism and exact resume.

Also holds the trainer test helpers (coco Parquet writers, a word-level tokenizer trained on the captions,
tiny GPT-2 / Llama and open_clip configs) that test_trainer_model.py and test_trainer_train.py import.
"""

from __future__ import annotations

import io
import json
import random

import pyarrow.parquet as pq
import pytest
import torch

from mmcorpus import schemas
from mmcorpus.trainer import data as D

TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                                             "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


# ------------------------------------------------------------------ helpers shared by the trainer tests

_RECORDS = {}


def coco_records(coco) -> list[dict]:
    """[{image_id, bytes, captions}] for the 165 coco-mini photos (read once per session)."""
    if str(coco) not in _RECORDS:
        recs = []
        with open(coco / "captions.jsonl") as f:
            for line in f:
                rec = json.loads(line)
                recs.append({"image_id": str(rec["image_id"]), "captions": rec["captions"],
                             "bytes": (coco / "images" / rec["file_name"]).read_bytes()})
        _RECORDS[str(coco)] = recs
    return _RECORDS[str(coco)]


def pair_rows(records, captions_per_image=1, shuffle_captions_seed=None) -> list[dict]:
    """Pair rows; with `shuffle_captions_seed` every image gets the captions of another image."""
    caps = [r["captions"] for r in records]
    if shuffle_captions_seed is not None:
        order = list(range(len(records)))
        random.Random(shuffle_captions_seed).shuffle(order)
        caps = [caps[order[(i + 1) % len(order)]] for i in order]  # a derangement in shuffled order
        caps = [c for _, c in sorted(zip(order, caps))]
    rows = []
    for rec, cs in zip(records, caps):
        for j, cap in enumerate(cs[:captions_per_image]):
            rows.append({"image_id": f"{rec['image_id']}-{j}", "image_bytes": rec["bytes"], "caption": cap,
                         "caption_source": "web", "source_dataset": "coco-mini"})
    return rows


def write_parquet(path, rows, kind, row_group_size=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(schemas.to_table(rows, kind), path, row_group_size=row_group_size)
    return path


def interleaved_rows(records, per_doc=3) -> list[dict]:
    """Documents of `per_doc` photos: a title caption, then image, caption, image, caption ..."""
    rows = []
    for d in range(0, len(records) - per_doc + 1, per_doc):
        texts, images, infos = [records[d]["captions"][4]], [None], [None]
        for rec in records[d: d + per_doc]:
            texts += [None, rec["captions"][0]]
            images += [f"http://img/{rec['image_id']}.jpg", None]
            infos += [{"url": f"http://img/{rec['image_id']}.jpg", "bytes": rec["bytes"]}, None]
        rows.append({"doc_id": f"doc-{d}", "texts": texts, "images": images, "image_info": infos,
                     "source": "coco-mini"})
    return rows


def word_tokenizer(records, out_dir):
    """A word-level tokenizer trained on the captions, saved where `load_tokenizer` can read it."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator((c for r in records for c in r["captions"]),
                            trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"], min_frequency=1))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
    fast.save_pretrained(out_dir)
    return str(out_dir)


def tiny_lm(out_dir, vocab_size, arch="gpt2", layers=2, dim=64, init_range=0.02, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_embd=dim, n_layer=layers, n_head=2,
                                           n_positions=300, initializer_range=init_range))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=dim, intermediate_size=dim * 2,
                                             num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=300, initializer_range=init_range))
    model.save_pretrained(out_dir)
    return str(out_dir)


def tiny_clip_json(out_dir, name="mmc-tiny-vit"):
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The tiny models gain nothing from intra-op threads, and on a shared 2-core machine two threads per
    process fight over the cores (measured: 5x slower training steps under load). Modules importing this
    fixture get it too."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def assets(coco, tmp_path_factory):
    """Tokenizer, tiny LM (GPT-2) and tiny open_clip config built from coco-mini, in a module temp dir."""
    root = tmp_path_factory.mktemp("trainer_assets")
    recs = coco_records(coco)
    tok_dir = word_tokenizer(recs, root / "tok")
    from mmcorpus.trainer.weights import load_tokenizer

    vocab = len(load_tokenizer(tok_dir))
    return {"root": root, "records": recs, "tokenizer": tok_dir, "lm": tiny_lm(root / "lm", vocab),
            "llama": tiny_lm(root / "llama", vocab, "llama"), "clip": tiny_clip_json(root)}


def load_tok(assets):
    from mmcorpus.trainer.weights import load_tokenizer

    tok = load_tokenizer(assets["tokenizer"])
    D.ensure_special_tokens(tok)
    return tok


# ------------------------------------------------------------------ tests

@pytest.fixture(scope="module")
def pair_files(assets):
    """Two pair files (3 row groups each) with a few bad rows planted in the second."""
    recs = assets["records"][:60]
    root = assets["root"] / "pairs"
    write_parquet(root / "data" / "part-0.parquet", pair_rows(recs[:30]), "pair", row_group_size=10)
    bad = [dict(r) for r in pair_rows(recs[30:33])]
    bad[0]["image_bytes"] = None  # missing bytes
    bad[1]["image_bytes"] = b"\xff\xd8 not a jpeg"  # undecodable
    bad[2]["caption"] = "   "  # empty text
    write_parquet(root / "data" / "part-1.parquet", bad + pair_rows(recs[33:60]), "pair", row_group_size=10)
    return root


def _loader(path, tok, kind="pair", state=None, workers=0, rank=0, world=1, batch=4, buffer=16, holdout=0.0,
            **kw):
    spec = D.DatasetSpec("d", str(path), kind, batch_size=batch, holdout=holdout, **kw)
    return D.DatasetLoader(spec, tok, D.image_transform(64), seed=3, shuffle_buffer=buffer, num_workers=workers,
                           rank=rank, world_size=world, state=state)


def _ids(batches):
    return [b["keys"] for b in batches]


def test_pair_samples_resized_and_tokenised(assets, pair_files):
    tok = load_tok(assets)
    b = next(_loader(pair_files, tok))
    img, eoc = tok.convert_tokens_to_ids(D.IMAGE_TOKEN), tok.convert_tokens_to_ids(D.EOC_TOKEN)
    assert b["images"].shape == (4, 1, 3, 64, 64)
    assert b["input_ids"].shape == (4, 32)
    for ids, mask in zip(b["input_ids"], b["attention_mask"]):
        n = int(mask.sum())
        assert ids[0] == img and ids[n - 1] == eoc and n > 3
    assert (b["labels"][:, 0] == -100).all()  # the <image> token is not a target


def test_bad_rows_skipped_and_counted(assets, pair_files):
    tok = load_tok(assets)
    loader = _loader(pair_files, tok, batch=19)
    keys = [k for _ in range(3) for k in next(loader)["keys"]]  # 57 = one epoch of the 57 good rows
    assert loader.skipped() == {"empty_text": 1, "missing_image_bytes": 1, "undecodable_image": 1}
    assert len(set(keys)) == 57 and loader.rows_ok() == 57


def test_deterministic_and_shuffled(assets, pair_files):
    tok = load_tok(assets)
    a = _ids([next(_loader(pair_files, tok)) for _ in range(1)])
    l1, l2 = _loader(pair_files, tok), _loader(pair_files, tok)
    run1, run2 = _ids([next(l1) for _ in range(10)]), _ids([next(l2) for _ in range(10)])
    assert run1 == run2 and run1[0] == a[0]
    flat = [k for b in run1 for k in b]
    assert flat[:20] != sorted(flat[:20])  # shuffled, not file order


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_sees_same_batches(assets, pair_files, workers):
    tok = load_tok(assets)
    full = _loader(pair_files, tok, workers=workers)
    straight = _ids([next(full) for _ in range(21)])  # crosses the epoch boundary (57 rows, 4 per batch)
    first = _loader(pair_files, tok, workers=workers)
    head = _ids([next(first) for _ in range(7)])
    state = json.loads(json.dumps(first.state()))  # what a checkpoint stores
    resumed = _loader(pair_files, tok, workers=workers, state=state)
    tail = _ids([next(resumed) for _ in range(14)])
    assert head + tail == straight
    assert resumed.skipped() == full.skipped()


def test_shards_split_rows_across_ranks(assets, pair_files):
    tok = load_tok(assets)
    seen = []
    for rank in range(2):
        loader = _loader(pair_files, tok, rank=rank, world=2, batch=1, buffer=4)
        rows = [next(loader)["keys"][0] for _ in range(40)]
        seen.append(set(rows))
    assert not seen[0] & seen[1]
    assert len(seen[0] | seen[1]) == 57


def test_holdout_split_by_image(assets, pair_files):
    tok = load_tok(assets)
    spec = D.DatasetSpec("d", str(pair_files), "pair", holdout=0.3)
    held, _ = D.holdout_samples(spec, tok, D.image_transform(64), 1000)
    train = _loader(pair_files, tok, batch=1, holdout=0.3)
    train_keys = {next(train)["keys"][0] for _ in range(60)}
    assert held and not {s.key for s in held} & train_keys
    assert 10 <= len(held) <= 25 and len(held) + len(train_keys) == 57


def test_interleaved_m3w_samples(assets):
    tok = load_tok(assets)
    recs = assets["records"][:24]
    rows = interleaved_rows(recs, per_doc=6)
    rows[0]["image_info"][3] = {"url": "http://img/x.jpg", "bytes": None}  # an image that was never fetched
    rows[1]["image_info"][1] = {"url": "http://img/y.jpg", "bytes": b"GIF89a broken"}
    path = write_parquet(assets["root"] / "inter" / "docs.parquet", rows, "interleaved")
    loader = _loader(path, tok, kind="interleaved", batch=4, max_images=5)
    b = next(loader)
    img, eoc = tok.convert_tokens_to_ids(D.IMAGE_TOKEN), tok.convert_tokens_to_ids(D.EOC_TOKEN)
    assert b["input_ids"].shape == (4, 256)
    n_img = (b["input_ids"] == img).sum(1)
    assert (n_img == b["image_mask"].sum(1)).all() and n_img.max() == 5  # 6 photos a doc, at most 5 kept
    for ids in b["input_ids"].tolist():
        seq = [t for t in ids if t in (img, eoc)]
        assert seq == [img, eoc] * (len(seq) // 2)  # <image>text<|endofchunk|> chunks
        assert ids[0] not in (img, eoc)  # the document's title comes before the first image
    assert loader.skipped() == {"image_missing_image_bytes": 1, "image_undecodable_image": 1}


def test_mixture_modes(assets, pair_files):
    tok = load_tok(assets)
    mix = D.MixtureSpec.from_dict({"mode": "weighted", "seed": 1, "shuffle_buffer": 8, "num_workers": 0, "datasets": [
        {"name": "a", "path": str(pair_files), "kind": "pair", "weight": 3.0, "batch_size": 2, "holdout": 0},
        {"name": "b", "path": str(pair_files), "kind": "pairs", "weight": 1.0, "batch_size": 2, "holdout": 0}]})
    loader = D.MixtureLoader(mix, tok, D.image_transform(64))
    picks = [loader.chosen(s)[0].name for s in range(400)]
    assert 0.68 < picks.count("a") / 400 < 0.82
    mix.mode = "round_robin"
    assert [s.name for step in range(4) for s in loader.chosen(step)] == ["a", "b", "a", "b"]
    mix.mode = "flamingo"
    assert [s.name for s, _ in loader.step(0)] == ["a", "b"]
    with pytest.raises(D.DataError, match="mode"):
        D.MixtureSpec.from_dict({"mode": "zip", "datasets": [{"path": "x", "kind": "pair"}]})


def test_wrong_schema_is_a_clear_error(assets, pair_files, tmp_path):
    tok = load_tok(assets)
    with pytest.raises(D.DataError, match="holds 'pair' rows, expected 'interleaved'"):
        _loader(pair_files, tok, kind="interleaved")
    with pytest.raises(D.DataError, match="no such file"):
        _loader(tmp_path / "nope", tok)


def _images_of_docs(rows) -> dict[str, list[str]]:
    """doc_id -> sha256 of the image bytes it holds, as written."""
    import hashlib

    return {r["doc_id"]: [hashlib.sha256(i["bytes"]).hexdigest() for i in r["image_info"] if i and i.get("bytes")]
            for r in rows}


def test_holdout_by_image_content_across_datasets(assets):
    """Pairs and photo stories built from the same photos: no image held out by either is trained on by either."""
    import hashlib

    tok, tf = load_tok(assets), D.image_transform(64)
    recs = assets["records"][:90]
    root = assets["root"] / "shared_photos"
    pairs = write_parquet(root / "pairs.parquet", pair_rows(recs), "pair")
    docs_rows = interleaved_rows(recs, per_doc=3)
    docs = write_parquet(root / "docs.parquet", docs_rows, "interleaved")
    mix = D.MixtureSpec.from_dict({"num_workers": 0, "datasets": [
        {"name": "pairs", "path": str(pairs), "kind": "pair", "holdout": 0.2},
        {"name": "docs", "path": str(docs), "kind": "interleaved", "holdout": 0.1}]})
    doc_images = _images_of_docs(docs_rows)
    held, trained, skipped = {}, {}, {}
    for spec in mix.datasets:
        for split, out in (("eval", held), ("train", trained)):
            samples, skipped[spec.name, split] = D.split_samples(spec, tok, tf, 10_000, split)
            out[spec.name] = {k for s in samples for k in s.image_keys}
            if split == "train" and spec.kind == "interleaved":  # a trained document keeps all its photos
                assert all(s.image_keys == doc_images[s.key] for s in samples)
    all_held, all_trained = held["pairs"] | held["docs"], trained["pairs"] | trained["docs"]
    assert held["pairs"] and held["docs"] and trained["pairs"] and trained["docs"]
    assert not all_held & all_trained
    # the case this guards against is in the data: photos held out of the pairs sit in the documents
    assert held["pairs"] & {sha for shas in doc_images.values() for sha in shas}
    # a held-out document shows only its held-out photos; the others are counted, not trained on
    assert skipped["docs", "eval"].get("image_other_split", 0) > 0
    photos = {hashlib.sha256(r["bytes"]).hexdigest() for r in recs}
    assert all_held | all_trained <= photos and len(all_trained) > 0.5 * len(photos)


def test_interleaved_images_by_path(assets, tmp_path):
    """image_info.path: relative to the Parquet file's folder, or an fsspec URL; a missing file is counted."""
    tok = load_tok(assets)
    recs = assets["records"][:6]
    rows = interleaved_rows(recs, per_doc=3)
    (tmp_path / "imgs").mkdir()
    for d, row in enumerate(rows):
        for j, info in enumerate(row["image_info"]):
            if info:
                name = f"imgs/{d}-{j}.jpg"
                (tmp_path / name).write_bytes(info["bytes"])
                path = name if d == 0 else f"file://{tmp_path / name}"
                row["image_info"][j] = {**info, "bytes": None, "sha256": None, "path": path}
    rows[1]["image_info"][3]["path"] = "imgs/nope.jpg"
    path = write_parquet(tmp_path / "docs.parquet", rows, "interleaved")
    by_path = next(_loader(path, tok, kind="interleaved", batch=2, buffer=1))
    by_bytes = next(_loader(write_parquet(tmp_path / "b" / "docs.parquet", interleaved_rows(recs, 3), "interleaved"),
                            tok, kind="interleaved", batch=2, buffer=1))
    assert by_path["keys"] == by_bytes["keys"] == ["doc-0", "doc-3"]
    assert torch.equal(by_path["images"][0], by_bytes["images"][0])  # relative paths: all 3 images
    assert by_path["image_mask"].sum(1).tolist() == [3, 2]  # doc-3: one file missing
    assert torch.equal(by_path["images"][1, 0], by_bytes["images"][1, 0])  # URL path
    loader = _loader(path, tok, kind="interleaved", batch=2, buffer=1)
    next(loader)
    assert loader.skipped() == {"image_missing_image_file": 1}


def test_jpeg_decoded_at_reduced_scale_not_below_target(assets):
    from PIL import Image

    data = assets["records"][0]["bytes"]
    full = Image.open(io.BytesIO(data))
    small = D.decode_image(data, 64)
    assert min(small.size) >= 64 and small.size[0] < full.size[0]  # JPEG draft: 1/2, 1/4 or 1/8 scale
    pixels = D.image_transform(64)(small)
    assert pixels.shape == (3, 64, 64) and pixels.dtype == torch.uint8  # the model normalises


def test_image_cache_written_once_by_sha256_and_read_back(assets, pair_files, tmp_path):
    tok = load_tok(assets)
    spec = D.DatasetSpec("d", str(pair_files), "pair", batch_size=19, holdout=0.0)

    def epoch(transform):
        loader = D.DatasetLoader(spec, tok, transform, seed=3, shuffle_buffer=16)
        batches = [next(loader) for _ in range(3)]  # one epoch: the 57 good rows
        return {k: img[0] for b in batches for k, img in zip(b["keys"], b["images"])}

    plain = epoch(D.image_transform(64))
    cache = tmp_path / "cache"
    first = epoch(D.image_transform(64, cache=str(cache)))
    files = {p.stem: p for p in cache.glob("64px-*/*/*.u8")}
    assert set(files) == set(plain) and len(files) == 57  # every decoded image once, none of the bad rows
    assert all(torch.equal(first[k], plain[k]) for k in plain)
    painted, torn = sorted(files)[:2]
    files[painted].write_bytes(bytes(3 * 64 * 64))  # a stored copy is what later epochs see ...
    files[torn].write_bytes(b"\x00" * 10)  # ... unless it is not a whole image: then the JPEG is decoded again
    again = epoch(D.image_transform(64, cache=str(cache)))
    assert int(again[painted].sum()) == 0 and torch.equal(again[torn], plain[torn])
    assert all(torch.equal(again[k], plain[k]) for k in plain if k != painted)


def test_loss_weights_by_mode(assets, pair_files):
    datasets = [{"name": "a", "path": str(pair_files), "kind": "pair", "weight": 3.0},
                {"name": "b", "path": str(pair_files), "kind": "pair", "weight": 1.0}]
    flamingo = D.MixtureSpec.from_dict({"mode": "flamingo", "datasets": datasets})
    assert flamingo.loss_weights() == {"a": 0.75, "b": 0.25}
    for mode in ("weighted", "round_robin"):  # one dataset a step: lambda acts through the draw only
        assert D.MixtureSpec.from_dict({"mode": mode, "datasets": datasets}).loss_weights() == {"a": 1.0, "b": 1.0}
    assert D.MixtureSpec.from_dict({"datasets": datasets}).workers() >= 1  # "auto" by default
    with pytest.raises(D.DataError, match="num_workers"):
        D.MixtureSpec.from_dict({"num_workers": -1, "datasets": datasets})
    with pytest.raises(D.DataError, match="weight > 0"):
        D.MixtureSpec.from_dict({"mode": "weighted", "datasets": [{**d, "weight": 0} for d in datasets]})
