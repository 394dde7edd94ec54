"""Compact Flamingo: untrained model == its LM, image masking, only the new parts train."""

from __future__ import annotations

import pytest
import torch

from tests.test_trainer_data import assets, load_tok, one_torch_thread, pair_rows, write_parquet  # noqa: F401
from mmcorpus.trainer import data as D
from mmcorpus.trainer.model import build, make_optimizer


def _model(assets, lm="lm", **kw):
    tok = load_tok(assets)
    model, sources = build({"vision": assets["clip"], "lm": assets[lm], "num_latents": 8, "resampler_depth": 1,
                            "dim_head": 16, **kw}, tok, allow_random=True)
    return model, tok, sources


def _images(assets, idx):
    tf = D.image_transform(64)
    return torch.stack([tf(D.decode_image(assets["records"][i]["bytes"])) for i in idx])


def _sequence(tok, parts):
    """ids for a list of strings / "<image>" markers, as the loader builds them."""
    ids = []
    for p in parts:
        ids += [tok.convert_tokens_to_ids(p)] if p in (D.IMAGE_TOKEN, D.EOC_TOKEN) else tok(p, add_special_tokens=False)["input_ids"]
    return torch.tensor([ids])


@pytest.mark.parametrize("lm", ["lm", "llama"])
def test_gates_at_zero_equal_the_bare_lm(assets, lm):
    model, tok, sources = _model(assets, lm)
    assert sources["vision"] == "random" and sources["lm"].startswith("pretrained:")
    model.eval()
    ids = _sequence(tok, ["a photo of", D.IMAGE_TOKEN, "two dogs on grass", D.EOC_TOKEN, D.IMAGE_TOKEN, "a cake"])
    images = _images(assets, [0, 1])[None]
    with torch.no_grad():
        ours = model(ids, images=images)["logits"][..., : model.vocab]
        bare = model.lm(inputs_embeds=model.embed(ids)).logits
        assert torch.allclose(ours, bare, atol=1e-5)
        text = _sequence(tok, ["a man riding a wave on a surfboard"])
        assert torch.allclose(model(text, images=images)["logits"][..., : model.vocab], model.lm(input_ids=text).logits,
                              atol=1e-5)


def _open_gates(model):
    with torch.no_grad():
        for block in model.xattn:
            block.attn_gate.fill_(1.0)
            block.ff_gate.fill_(1.0)


def test_each_token_sees_only_the_last_image_before_it(assets):
    model, tok, _ = _model(assets)
    _open_gates(model)
    model.eval()
    ids = _sequence(tok, ["a table with", D.IMAGE_TOKEN, "a red bus", D.EOC_TOKEN, D.IMAGE_TOKEN, "a dog", D.EOC_TOKEN])
    pos = (ids[0] == model.image_token_id).nonzero().flatten().tolist()  # the two <image> tokens
    before, first, second = slice(0, pos[0]), slice(pos[0], pos[1]), slice(pos[1], ids.shape[1])
    captured = []
    model.xattn[0].register_forward_hook(lambda m, i, o: captured.append(o - i[0]))  # what block 0 adds

    def run(a, b):
        captured.clear()
        with torch.no_grad():
            logits = model(ids, images=_images(assets, [a, b])[None])["logits"]
        return logits, captured[0]

    base_logits, base_x = run(0, 1)
    new1_logits, new1_x = run(2, 1)  # change the first image
    new2_logits, new2_x = run(0, 3)  # change the second image
    # cross-attention itself: a token attends only to the last image at or before it
    assert torch.equal(new1_x[0, before], base_x[0, before]) and torch.equal(new2_x[0, before], base_x[0, before])
    assert not torch.allclose(new1_x[0, first], base_x[0, first])
    assert torch.equal(new1_x[0, second], base_x[0, second])  # an earlier image is not attended
    assert torch.equal(new2_x[0, first], base_x[0, first])  # nor a later one
    assert not torch.allclose(new2_x[0, second], base_x[0, second])
    # whole model: text before any image and text before a changed image are unaffected (causal LM)
    assert torch.allclose(new1_logits[0, before], base_logits[0, before], atol=1e-6)
    assert torch.allclose(new2_logits[0, : pos[1]], base_logits[0, : pos[1]], atol=1e-6)
    assert not torch.allclose(new2_logits[0, second], base_logits[0, second])


def test_only_resampler_xattn_and_new_embeddings_train(assets):
    """Real training steps (make_optimizer with weight decay, clipping, schedule, train_step over a flamingo
    mixture) leave every frozen weight bit-identical, to the copy taken before and to the LM file on disk."""
    from transformers import AutoModelForCausalLM

    from mmcorpus.trainer import train as T

    model, tok, _ = _model(assets)
    trainable = set(model.trainable_named())
    assert trainable and all(n.startswith(("resampler.", "xattn.", "new_embed", "new_out")) for n in trainable)
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train_before = model.trainable_state()
    path = write_parquet(assets["root"] / "model_pairs" / "p.parquet", pair_rows(assets["records"][:16]), "pair")
    mixture = D.MixtureSpec.from_dict({"num_workers": 0, "shuffle_buffer": 16, "datasets": [
        {"name": "p", "path": str(path), "kind": "pair", "batch_size": 8, "holdout": 0, "weight": 2.0},
        {"name": "q", "path": str(path), "kind": "pair", "batch_size": 4, "holdout": 0, "weight": 1.0}]})
    loader = D.MixtureLoader(mixture, tok, D.image_transform(model.image_size))
    opt = make_optimizer(model, 1e-2, weight_decay=0.5, gate_lr_mult=10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: T.lr_factor(s, 1, 3))
    model.train()
    for step in range(3):
        res = T.train_step(model, loader.step(step), opt, sched, mixture.loss_weights(), 1.0, torch.device("cpu"))
        assert set(res["losses"]) == {"p", "q"}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen_before[n]), n
    on_disk = AutoModelForCausalLM.from_pretrained(assets["lm"]).state_dict()
    assert all(torch.equal(v, on_disk[k]) for k, v in model.lm.state_dict().items())
    changed = [n for n, t in model.trainable_state().items() if not torch.equal(t, train_before[n])]
    assert any("attn_gate" in n for n in changed) and any(n.startswith("resampler.") for n in changed)
    assert "new_embed" in changed and "new_out" in changed
    assert len(changed) == len(train_before)  # every trainable tensor moved
    assert any(abs(g) > 0 for g in model.gates()["attn"])


@pytest.mark.parametrize("lm", ["lm", "llama"])
def test_flops_accounting_matches_a_counted_step(assets, lm):
    """model.train_flops against torch's FlopCounterMode over one real forward + backward (tied GPT-2 and
    untied Llama with grouped k/v). SDPA runs its math kernel and MHA its slow path so every product is seen."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model, tok, _ = _model(assets, lm, resampler_depth=2)
    model.train()
    batch, seq, slots = 2, 24, 2
    ids = _sequence(tok, [D.IMAGE_TOKEN, "a man riding a wave on a surfboard in the ocean", D.EOC_TOKEN,
                          D.IMAGE_TOKEN, "two dogs playing with a frisbee on the green grass of a park"])
    ids = ids[:, :seq].expand(batch, -1).clone()
    assert ids.shape == (batch, seq) and int((ids == model.image_token_id).sum()) == batch * slots
    images = _images(assets, [0, 1, 2, 3]).view(batch, slots, 3, 64, 64)
    labels = ids.masked_fill(ids == model.image_token_id, -100)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(ids, torch.ones_like(ids), images, labels=labels)["loss"].backward()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    counted = counter.get_total_flops()
    ours = model.train_flops(batch * seq, seq, batch * slots, slots * model.resampler.latents.shape[0])
    assert abs(ours / counted - 1) < 0.01, (ours, counted)


def test_resampler_output_and_cross_attention_every_k(assets):
    model, tok, _ = _model(assets, cross_attn_every=2, num_latents=5)
    assert model.xattn_layers == [0]  # 2-layer LM, every 2nd layer
    feats = model.encode_images(_images(assets, [0, 1, 2]).view(1, 3, 3, 64, 64))
    assert feats.shape[:2] == (1, 3) and model.resampler(feats).shape == (1, 3, 5, model.media_dim)


def test_config_only_lm_needs_allow_random(tmp_path):
    """A folder with only config.json: a clear WeightsMissing naming it, or a random model when allowed."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from mmcorpus.trainer.weights import WeightsMissing, load_hf

    GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=32).save_pretrained(tmp_path / "lm")
    with pytest.raises(WeightsMissing, match=str(tmp_path / "lm")):
        load_hf(AutoModelForCausalLM, str(tmp_path / "lm"))
    loaded = load_hf(AutoModelForCausalLM, str(tmp_path / "lm"), allow_random=True)
    assert loaded.source == "random" and loaded.model.config.n_embd == 16
    again = load_hf(AutoModelForCausalLM, str(tmp_path / "lm"), allow_random=True).model.state_dict()
    assert all(torch.equal(v, again[k]) for k, v in loaded.model.state_dict().items())  # same in every worker
    with pytest.raises(WeightsMissing, match="needs at least a model config"):
        load_hf(AutoModelForCausalLM, str(tmp_path / "nothing"), allow_random=True)
