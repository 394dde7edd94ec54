"""Write the model configs the offline demo needs, and its training config.

No model hub is reachable here, so the demo runs every model from a config with random weights
(`--allow-random-weights`; stats.json, cards and report.json say "random"). This script writes, under DIR:
  tokenizer/     word-level tokenizer trained on the coco-mini captions (trainer LM)
  lm/            tiny GPT-2 config (no weights)
  clip-tiny.json tiny open_clip model config (no weights)
  blip/          tiny BLIP config + BlipProcessor (captioner and ITM filter; no weights)
  train.yaml     training mixture over the demo's photo stories (interleaved), pairs and CapFilt outputs

With real weights, pass hub ids or local folders instead (see README "Models without a hub").

Usage: python demo/tiny_models.py DIR COCO_DIR STORIES_OUT PAIRS_OUT CAPFILT_OUT
"""

from __future__ import annotations

import json
import pathlib
import re
import sys

import yaml

TINY_CLIP = {"embed_dim": 64, "vision_cfg": {"image_size": 64, "layers": 2, "width": 64, "patch_size": 16,
                                             "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}
BLIP_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]  # [DEC] starts BLIP's decoder


def captions(coco: pathlib.Path) -> list[str]:
    with open(coco / "captions.jsonl") as f:
        return [c for line in f for c in json.loads(line)["captions"]]


def word_tokenizer(texts: list[str], out: pathlib.Path) -> None:
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "[EOS]"]))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                            eos_token="[EOS]").save_pretrained(out)


def tiny_lm(tokenizer, out: pathlib.Path) -> None:
    from transformers import GPT2Config

    eos = tokenizer.eos_token_id
    GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=256, bos_token_id=eos,
               eos_token_id=eos).save_pretrained(out)


def tiny_blip(texts: list[str], out: pathlib.Path) -> None:
    from transformers import BertTokenizerFast, BlipConfig, BlipImageProcessor, BlipProcessor

    words = {"a", "picture", "of"}
    for text in texts:
        words.update(re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower()))
    vocab = BLIP_SPECIALS + sorted(words)
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, bos_token="[DEC]")
    ids = tok.convert_tokens_to_ids
    small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    config = BlipConfig(
        text_config=dict(vocab_size=len(tok), max_position_embeddings=64, bos_token_id=ids("[DEC]"),
                         sep_token_id=ids("[SEP]"), eos_token_id=ids("[SEP]"), pad_token_id=ids("[PAD]"), **small),
        vision_config=dict(image_size=64, patch_size=16, **small), projection_dim=64, image_text_hidden_size=64)
    config.save_pretrained(out)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 64, "width": 64}),
                  tokenizer=tok).save_pretrained(out)


def train_config(root: pathlib.Path, stories: str, pairs: str, capfilt: str) -> dict:
    """Flamingo's mixture weights: M3W 1.0, ALIGN 0.2, LTIP 0.2 (here: stories, pairs, CapFilt)."""
    return {"seed": 0,
            "model": {"vision": str(root / "clip-tiny.json"), "lm": str(root / "lm"),
                      "tokenizer": str(root / "tokenizer"), "allow_random_weights": True,
                      "num_latents": 16, "resampler_depth": 1, "dim_head": 32},
            "data": {"mode": "flamingo", "shuffle_buffer": 64, "datasets": [
                {"name": "photo-stories", "path": stories, "kind": "interleaved", "weight": 1.0, "batch_size": 4,
                 "max_seq_len": 256, "max_images": 5, "holdout": 0.2},
                {"name": "coco-pairs", "path": pairs, "kind": "pair", "weight": 0.2, "batch_size": 16,
                 "holdout": 0.2},
                {"name": "capfilt", "path": capfilt, "kind": "pair", "weight": 0.2, "batch_size": 16,
                 "holdout": 0.2}]},
            "train": {"steps": 60, "lr": 1e-3, "warmup_steps": 5, "log_every": 10, "eval_every": 30,
                      "checkpoint_every": 30},
            "eval": {"max_samples": 128, "batch_size": 32, "bootstrap": 500, "shuffles": 2}}


def main(argv: list[str]) -> int:
    if len(argv) != 5:
        print(__doc__, file=sys.stderr)
        return 2
    root, coco = pathlib.Path(argv[0]), pathlib.Path(argv[1])
    root.mkdir(parents=True, exist_ok=True)
    texts = captions(coco)
    word_tokenizer(texts, root / "tokenizer")
    from transformers import AutoTokenizer

    tiny_lm(AutoTokenizer.from_pretrained(root / "tokenizer"), root / "lm")
    (root / "clip-tiny.json").write_text(json.dumps(TINY_CLIP))
    tiny_blip(texts, root / "blip")
    (root / "train.yaml").write_text(yaml.safe_dump(train_config(root, *argv[2:5]), sort_keys=False))
    print(f"demo model configs and train.yaml written to {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
