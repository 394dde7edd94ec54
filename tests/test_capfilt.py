"""BLIP CapFilt: tiny random BLIP models built here, real coco-mini photos."""

import json
import os
import re

import pyarrow.parquet as pq
import pytest
import torch

from mmcorpus import schemas
from mmcorpus.pipelines.capfilt import stages as capfilt
from mmcorpus.pipelines.models.blip import CaptionConfig, Captioner, Matcher
from mmcorpus.pipelines.cli import main as cli_main

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]  # BLIP: [DEC] is the decoder's bos


def coco_records(coco, n=None):
    with open(coco / "captions.jsonl") as f:
        recs = [json.loads(line) for line in f]
    return recs[:n] if n else recs


def build_tokenizer(coco):
    from transformers import BertTokenizerFast

    words = set("a picture of".split())
    for rec in coco_records(coco):
        for c in rec["captions"]:
            words.update(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", c.lower()))
    vocab = SPECIALS + sorted(words)
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, bos_token="[DEC]")


def tiny_blip(tok):
    """(BlipConfig, BlipProcessor) of a tiny BLIP over tokenizer `tok`."""
    from transformers import BlipConfig, BlipImageProcessor, BlipProcessor

    ids = tok.convert_tokens_to_ids
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    config = BlipConfig(
        text_config=dict(vocab_size=len(tok), max_position_embeddings=64, bos_token_id=ids("[DEC]"),
                         sep_token_id=ids("[SEP]"), eos_token_id=ids("[SEP]"), pad_token_id=ids("[PAD]"), **small),
        vision_config=dict(image_size=32, patch_size=8, **small), projection_dim=32, image_text_hidden_size=32)
    processor = BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer=tok)
    return config, processor


@pytest.fixture(scope="module")
def models(tmp_path_factory, coco):
    """Captioner and ITM folders (tiny random BLIP + BlipProcessor), and a config-only folder."""
    from transformers import BlipForConditionalGeneration, BlipForImageTextRetrieval

    config, processor = tiny_blip(build_tokenizer(coco))
    root = tmp_path_factory.mktemp("blip")
    torch.manual_seed(0)
    paths = {}
    for name, cls in (("captioner", BlipForConditionalGeneration), ("itm", BlipForImageTextRetrieval)):
        paths[name] = str(root / name)
        cls(config).save_pretrained(paths[name])
        processor.save_pretrained(paths[name])
    paths["config_only"] = str(root / "config_only")
    config.save_pretrained(paths["config_only"])
    processor.save_pretrained(paths["config_only"])
    return paths


def pair_rows(coco, n):
    rows = []
    for rec in coco_records(coco, n):
        data = (coco / "images" / rec["file_name"]).read_bytes()
        rows.append({"image_id": str(rec["image_id"]), "url": rec["flickr_url"], "image_bytes": data,
                     "caption": rec["captions"][0], "caption_source": "web", "source_dataset": "coco-mini",
                     "clip_score": 0.3})
    return rows


def write_pairs(path, rows):
    os.makedirs(path / "data", exist_ok=True)
    pq.write_table(schemas.to_table(rows, "pair"), path / "data" / "part-00000-of-00001.parquet")
    return path


def images_of(coco, n):
    from PIL import Image

    return [Image.open(coco / "images" / rec["file_name"]).convert("RGB") for rec in coco_records(coco, n)]


def test_sampled_ids_match_transformers_greedy_and_prompt_is_stripped(models, coco):
    cap = Captioner.load(models["captioner"], device="cpu")
    px = cap.pixel_values(images_of(coco, 3))
    greedy = CaptionConfig(num_captions=1, top_p=1e-9, repetition_penalty=1.0, max_new_tokens=8)
    ours = cap.generate_ids(px, torch.arange(3), greedy)
    prompt = cap.prompt_ids(greedy.prompt)
    ref = cap.model.generate(pixel_values=px, input_ids=torch.tensor([prompt + [cap.sep]] * 3), do_sample=False,
                             max_new_tokens=8)
    assert len(prompt) == 4 and prompt[0] == cap.bos  # [DEC] a picture of
    for row, ref_row in zip(ours, ref.tolist()):
        ref_new = ref_row[len(prompt):]
        ref_new = ref_new[:ref_new.index(cap.sep)] if cap.sep in ref_new else ref_new
        assert row == ref_new
    # a decoder that echoes the prompt gets it stripped
    echo = cap.processor.tokenizer("a picture of a dog", add_special_tokens=False)["input_ids"]
    assert cap.decode(echo, "a picture of ") == "a dog"


def test_nucleus_sampling_fast_and_full_paths_agree_and_stay_in_the_nucleus():
    from mmcorpus.pipelines.models.blip import sample_top_p, top_p_filter

    g = torch.Generator().manual_seed(0)
    logprobs = (torch.randn(400, 50, generator=g) * 3).log_softmax(-1)  # peaked rows: nucleus of a few tokens
    seeds = torch.arange(400, dtype=torch.int64) * 7919
    nucleus = top_p_filter(logprobs, 0.9) > float("-inf")
    for step in range(3):
        fast = sample_top_p(logprobs, 0.9, seeds, step, k=20)
        full = sample_top_p(logprobs, 0.9, seeds, step, k=50)
        assert torch.equal(fast, full)
        assert nucleus.gather(1, fast[:, None]).all()
    # over many seeds the draws follow the renormalised nucleus distribution
    row = logprobs[:1].expand(4000, -1)
    draws = sample_top_p(row, 0.9, torch.arange(4000, dtype=torch.int64), 0)
    p = top_p_filter(logprobs[:1], 0.9).softmax(-1)[0]
    freq = torch.bincount(draws, minlength=50).float() / 4000
    assert (freq - p).abs().max() < 0.03


def test_captions_are_seeded_per_image_regardless_of_batch(models, coco):
    cap = Captioner.load(models["captioner"], device="cpu")
    ims = images_of(coco, 4)
    keys = [f"img{i}" for i in range(4)]
    cfg = CaptionConfig(num_captions=3, seed=7)
    together = cap.captions(ims, keys, cfg)
    assert len(together) == 4 and all(len(c) == 3 for c in together)
    alone = [cap.captions([im], [k], cfg)[0] for im, k in zip(ims[::-1], keys[::-1])][::-1]
    assert together == alone
    assert cap.captions(ims, keys, cfg) == together
    other = cap.captions(ims, keys, CaptionConfig(num_captions=3, seed=8))
    assert other != together
    assert len({c for caps in together for c in caps}) > 6  # sampling, not greedy: captions differ
    assert all(not c.startswith("a picture of") for caps in together for c in caps)


def test_itm_scores_match_the_transformers_forward(models, coco):
    itm = Matcher.load(models["itm"], device="cpu", batch_size=3)
    ims = images_of(coco, 2)
    caps = [["a cake on a table", "a dog", "two plates of food with burgers"], ["a burger"]]
    scores = itm.score(ims, caps)
    for im, cs, ss in zip(ims, caps, scores):
        for c, s in zip(cs, ss):
            t = itm.processor(images=im, text=c, return_tensors="pt")
            with torch.no_grad():
                ref = itm.model(**t).itm_score.softmax(-1)[0, 1].item()
            assert s == pytest.approx(ref, abs=1e-5)


def read_out(out):
    data = pq.read_table(out / "data").to_pylist()
    rejects = pq.read_table(out / "rejects").to_pylist()
    stats = json.loads((out / "stats.json").read_text())
    return data, rejects, stats


def direct_itm(models, coco, rows_by_id, data_rows):
    """Recompute every ITM score with the plain transformers forward."""
    itm = Matcher.load(models["itm"], device="cpu")
    out = {}
    for image_id, row in rows_by_id.items():
        from PIL import Image
        import io

        im = Image.open(io.BytesIO(row["image_bytes"])).convert("RGB")
        for cap in data_rows.get(image_id, []):
            t = itm.processor(images=im, text=cap, return_tensors="pt")
            with torch.no_grad():
                out[(image_id, cap)] = itm.model(**t).itm_score.softmax(-1)[0, 1].item()
    return out


def test_pipeline_keeps_exactly_the_captions_at_or_above_threshold(models, coco, tmp_path):
    rows = pair_rows(coco, 10)
    rows.append({**rows[0], "image_id": "second-web-caption", "caption": coco_records(coco, 1)[0]["captions"][1]})
    bad = [{**rows[1], "image_id": "corrupt", "image_bytes": rows[1]["image_bytes"][:300], "sha256": None},
           {**rows[2], "image_id": "truncated-header", "image_bytes": b"\xff\xd8\xff"},
           {**rows[4], "image_id": "zero-bytes", "image_bytes": b""},
           {**rows[3], "image_id": "no-image", "image_bytes": None}]
    inp = write_pairs(tmp_path / "in", rows + bad)
    # first pass with threshold 0 keeps everything and gives every candidate's score
    base = ["capfilt", str(inp), "--captioner", models["captioner"], "--itm", models["itm"], "--num-captions", "2",
            "--seed", "3", "--runner", "direct", "--workers", "1", "--batch-size", "4"]
    assert cli_main(base + ["--output", str(tmp_path / "all"), "--itm-threshold", "0"]) == 0
    everything, _, _ = read_out(tmp_path / "all")
    scores = sorted(r["itm_score"] for r in everything)
    threshold = scores[len(scores) // 2]  # the median: some kept, some dropped, of both sources
    assert cli_main(base + ["--output", str(tmp_path / "out"), "--itm-threshold", str(threshold)]) == 0
    data, rejects, stats = read_out(tmp_path / "out")

    # image_id is unique per row: synthetic rows get "<web image_id>#synthetic-<j>", their web row's id in metadata
    assert len({r["image_id"] for r in everything}) == len(everything)
    for r in everything:
        if r["caption_source"] == "synthetic":
            web_id = json.loads(r["metadata"])["capfilt"]["image_id"]
            assert re.fullmatch(re.escape(web_id) + r"#synthetic-[01]", r["image_id"])

    def web_id(r):
        return json.loads(r["metadata"])["capfilt"]["image_id"] if r["caption_source"] == "synthetic" else r["image_id"]

    # the scores written are what the model gives for that (image, caption), recomputed directly
    by_image = {}
    for r in everything:
        by_image.setdefault(web_id(r), []).append(r["caption"])
    rows_by_id = {r["image_id"]: r for r in rows}
    direct = direct_itm(models, coco, rows_by_id, by_image)
    for r in everything:
        assert r["itm_score"] == pytest.approx(direct[(web_id(r), r["caption"])], abs=1e-4)
    expect_kept = {(r["image_id"], r["caption_source"], r["caption"]) for r in everything
                   if direct[(web_id(r), r["caption"])] >= threshold}
    assert {(r["image_id"], r["caption_source"], r["caption"]) for r in data} == expect_kept
    dropped = [r for r in rejects if r["stage"] == "itm_filter"]
    assert len(dropped) == len(everything) - len(data) and all(r["reason"] == "itm_low" for r in dropped)

    # web vs synthetic add up: 11 web rows on 10 decodable images, 2 synthetic captions per image
    ctr = next(s for s in stats["stages"] if s["stage"] == "itm_filter")["counters"]
    n_web, n_syn = 11, 10 * 2
    assert ctr.get("web_kept", 0) + ctr.get("web_dropped", 0) == n_web
    assert ctr.get("synthetic_kept", 0) + ctr.get("synthetic_dropped", 0) == n_syn
    assert ctr.get("web_kept", 0) == sum(r["caption_source"] == "web" for r in data)
    assert 0 < ctr.get("synthetic_kept", 0) < n_syn
    hist = stats["itm_histograms"]
    assert sum(hist["web"]["counts"]) == n_web and sum(hist["synthetic"]["counts"]) == n_syn
    assert stats["models"] == {"captioner": f"pretrained:{models['captioner']}", "itm": f"pretrained:{models['itm']}"}

    # images: bad bytes and missing images are rejects; images without a kept caption too
    by_stage = {s["stage"]: s for s in stats["stages"]}
    images = by_stage["capfilt_images"]
    assert images["in"] == 10 + 4 and images["in"] == images["out"] + images["rejected"]
    assert images["reasons"]["image_decode_failed"] == 3 and images["reasons"]["missing_image"] == 1
    same_image = {"second-web-caption": rows[0]["image_id"]}  # same bytes as rows[0]: one image, two web captions
    kept_images = {same_image.get(web_id(r), web_id(r)) for r in data}
    assert images["out"] == len(kept_images)
    assert images["reasons"].get("no_caption_kept", 0) == 10 - images["out"]
    cand = by_stage["candidates"]
    assert cand["in"] == n_web + 4 + n_syn and cand["counters"]["web"] == n_web + 4
    assert stats["totals"]["read"] == stats["totals"]["written"] + stats["totals"]["rejected"]
    reject_ids = {r["source"] for r in rejects if r["stage"] == "capfilt_images"}
    assert {"corrupt", "truncated-header", "zero-bytes", "no-image"} <= reject_ids
    syn = [r for r in data if r["caption_source"] == "synthetic"]
    assert all(r["image_bytes"] and r["width"] and json.loads(r["metadata"])["capfilt"]["seed"] == 3 for r in syn)


def test_images_from_paths_and_bad_paths(coco, tmp_path):
    rec = coco_records(coco, 1)[0]
    image, problem = capfilt.load_image({"image_path": str(coco / "images" / rec["file_name"])})
    assert problem is None and (image.width, image.height) == (rec["width"], rec["height"]) and image.mode == "RGB"
    _, problem = capfilt.load_image({"image_path": str(tmp_path / "nope.jpg")})
    assert problem.reason == "missing_image" and "nope.jpg" in problem.detail
    (tmp_path / "text.jpg").write_text("not an image")
    _, problem = capfilt.load_image({"image_path": str(tmp_path / "text.jpg")})
    assert problem.reason == "image_decode_failed"


def test_missing_weights_is_a_clear_error_unless_random_allowed(models, coco, tmp_path, capsys):
    inp = write_pairs(tmp_path / "in", pair_rows(coco, 3))
    args = ["capfilt", str(inp), "--captioner", models["config_only"], "--itm", models["itm"], "--num-captions", "1",
            "--runner", "direct", "--workers", "1"]
    assert cli_main(args + ["--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "could not load BlipForConditionalGeneration weights" in err and "--allow-random-weights" in err
    assert not (tmp_path / "a" / "_SUCCESS").exists()
    assert cli_main(args + ["--output", str(tmp_path / "b"), "--allow-random-weights", "--itm-threshold", "0"]) == 0
    out = capsys.readouterr().out
    assert "RANDOM" in out
    stats = json.loads((tmp_path / "b" / "stats.json").read_text())
    assert stats["models"]["captioner"] == "random"


def test_cli_on_coco_mini_under_dask(models, coco, tmp_path):
    inp = write_pairs(tmp_path / "in", pair_rows(coco, None))
    out = tmp_path / "out"
    code = cli_main(["capfilt", str(inp), "--output", str(out), "--captioner", models["captioner"], "--itm",
                     models["itm"], "--num-captions", "1", "--itm-threshold", "0.43", "--runner", "dask",
                     "--workers", "2", "--batch-size", "32", "--num-shards", "2"])
    assert code == 0 and (out / "_SUCCESS").exists()
    data, rejects, stats = read_out(out)
    images = next(s for s in stats["stages"] if s["stage"] == "capfilt_images")
    assert images["in"] == 165 == images["out"] + images["rejected"]
    assert stats["totals"]["read"] == 165 * 2 == stats["totals"]["written"] + stats["totals"]["rejected"]
    assert len(data) == stats["totals"]["written"]
    assert len(rejects) == stats["totals"]["reject_rows"]


def test_first_decodable_row_rows_without_identity_and_pixel_limit(models, coco, tmp_path):
    """An image whose first row has a broken path but a sibling (same sha256) has bytes is decoded from the
    sibling; rows with no sha256/bytes/path/image_id are separate images (each a missing_image reject);
    decompression bombs and images over --max-pixels are image_too_large."""
    import hashlib
    import io

    import pyarrow as pa
    from PIL import Image

    from tests.test_pairs import png_bomb

    rows = pair_rows(coco, 3)
    sha = hashlib.sha256(rows[0]["image_bytes"]).hexdigest()
    big = io.BytesIO()
    Image.open(io.BytesIO(rows[2]["image_bytes"])).resize((1000, 1000)).save(big, "JPEG")
    inp = [{**rows[0], "image_id": "a-broken-path", "image_bytes": None, "image_path": str(tmp_path / "gone.jpg"),
            "sha256": sha},
           {**rows[0], "image_id": "b-bytes", "sha256": sha, "caption": coco_records(coco, 1)[0]["captions"][1]},
           {**rows[1], "image_id": None, "image_bytes": None, "url": None, "caption": "no image at all, one"},
           {**rows[1], "image_id": None, "image_bytes": None, "url": None, "caption": "no image at all, two"},
           {**rows[2], "image_id": "bomb", "image_bytes": png_bomb()},
           {**rows[2], "image_id": "too-big", "image_bytes": big.getvalue()}]
    os.makedirs(tmp_path / "in" / "data")  # written as another tool might: image_id null in two rows
    pq.write_table(pa.Table.from_pylist(inp, schema=schemas.with_metadata("pair", "")),
                   tmp_path / "in" / "data" / "part-00000-of-00001.parquet")
    out = tmp_path / "out"
    assert cli_main(["capfilt", str(tmp_path / "in"), "--output", str(out), "--captioner", models["captioner"],
                     "--itm", models["itm"], "--num-captions", "1", "--itm-threshold", "0", "--max-pixels", "400000",
                     "--runner", "direct", "--workers", "1"]) == 0
    data, rejects, stats = read_out(out)
    images = next(s for s in stats["stages"] if s["stage"] == "capfilt_images")
    assert images["in"] == 5 and images["out"] == 1
    assert images["reasons"] == {"missing_image": 2, "image_too_large": 2}
    too_large = {r["source"]: r["detail"] for r in rejects if r["stage"] == "capfilt_images"
                 and r["reason"] == "image_too_large"}
    assert set(too_large) == {"bomb", "too-big"} and "1000x1000 = 1000000 pixels > 400000" in too_large["too-big"]
    assert sorted((r["image_id"], r["caption_source"]) for r in data) == [
        ("a-broken-path", "web"), ("b-bytes", "web"), ("b-bytes#synthetic-0", "synthetic")]
    assert all(r["image_bytes"] == rows[0]["image_bytes"] for r in data)  # the decodable sibling's bytes
    assert stats["totals"]["read"] == stats["totals"]["written"] + stats["totals"]["rejected"]


def test_synthetic_captions_are_checked_for_flagged_words_and_pii(models, coco, tmp_path):
    """A tiny captioner whose output layer favours two number tokens (five of them make a phone number) and
    a flagged word: each synthetic caption is rejected (flagged word) or kept with the number masked."""
    from transformers import BertTokenizerFast, BlipForConditionalGeneration

    from mmcorpus.filters.pii import mask_pii

    words = SPECIALS + ["a", "picture", "of", "porn", "18", "25"]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True, bos_token="[DEC]")
    config, processor = tiny_blip(tok)
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():  # logits 20 for "18" and "25", 18.6 for "porn": about 1 token in 9 is the flagged word
        bias = torch.zeros(len(words))
        bias[words.index("18")] = bias[words.index("25")] = 20.0
        bias[words.index("porn")] = 18.6
        model.text_decoder.cls.predictions.bias.copy_(bias)
        model.text_decoder.cls.predictions.decoder.bias.copy_(bias)
    model.save_pretrained(tmp_path / "captioner")
    processor.save_pretrained(tmp_path / "captioner")
    rows = pair_rows(coco, 6)
    inp = write_pairs(tmp_path / "in", rows)
    out = tmp_path / "out"
    assert cli_main(["capfilt", str(inp), "--captioner", str(tmp_path / "captioner"), "--itm", models["itm"],
                     "--num-captions", "2", "--repetition-penalty", "1.0", "--max-new-tokens", "5", "--seed", "1",
                     "--itm-threshold", "0", "--runner", "direct", "--workers", "1", "--output", str(out)]) == 0
    data, rejects, stats = read_out(out)
    cfg = capfilt.CapFiltConfig(captioner="", itm="", num_captions=2, repetition_penalty=1.0, max_new_tokens=5, seed=1)
    raw = Captioner.load(str(tmp_path / "captioner"), device="cpu").captions(
        images_of(coco, 6), [capfilt.image_key(r) for r in rows], cfg.caption_config())
    raw = [c for caps in raw for c in caps]
    flagged = [c for c in raw if "porn" in c.split()]
    masked = [mask_pii(c) for c in raw if c not in flagged]
    assert flagged and masked and all(counts == {"phone": 1} for _, counts in masked)  # both kinds happen
    assert sorted(r["caption"] for r in data if r["caption_source"] == "synthetic") == sorted(m for m, _ in masked)
    assert all(r["caption"] == "[PHONE]" for r in data if r["caption_source"] == "synthetic")
    safety = [r for r in rejects if r["reason"] == "flagged_image_words"]
    assert len(safety) == len(flagged) and all(r["stage"] == "candidates" for r in safety)
    assert all(r["detail"] == "flagged word 'porn' in the synthetic caption" for r in safety)
    by_stage = {s["stage"]: s for s in stats["stages"]}
    assert by_stage["candidates"]["reasons"]["flagged_image_words"] == len(flagged)
    assert by_stage["safety"]["counters"] == {"documents_pii_masked": len(masked), "pii_masked_phone": len(masked)}
    assert stats["totals"]["read"] == stats["totals"]["written"] + stats["totals"]["rejected"] == 6 + len(raw)
    assert stats["safety"]["pii"] == "mask" and stats["safety"]["applies_to"] == "the synthetic captions CapFilt adds"
    from mmcorpus.pipelines.outputs.card import _table
    from mmcorpus.pipelines.outputs.safety_card import safety_section

    section = "\n".join(safety_section(stats, _table))  # the card's section
    assert "checks applied to the synthetic captions CapFilt adds only" in section
    assert f"| `candidates` | `flagged_image_words` | {len(flagged)} |" in section
    assert f"pii_masked_phone (masked, kept) | {len(masked)}" in section
