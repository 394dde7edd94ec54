"""BLIP captioner and ITM filter for CapFilt, through Hugging Face transformers' BLIP classes.

Captioning: the captioner's vision tower and the prompt step (every layer's cross-attention K/V over the
image tokens) run once per image, their caches are repeated for the N captions, and
a cached decode loop (self- and cross-attention K/V kept in an `EncoderDecoderCache`) samples tokens with
repetition penalty and nucleus (top-p) filtering. Sampling uses the Gumbel-max trick with noise from a
counter-based hash of (row seed, step, token id), so every caption depends only on the seed, the image id
and its index, never on which other images share the batch (up to floating-point batch effects).
ITM: the filter's vision tower runs once per image; the (image, caption) pairs are sorted by token length and
scored in batches against the cached image embeddings; the score is softmax(itm_head)[match].
On CUDA out-of-memory a batch is split in halves and retried, and the batch size stays halved.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch

from mmcorpus.trainer.weights import HUB_HINT, WeightsMissing, load_hf

log = logging.getLogger("mmcorpus.capfilt")

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


_C1, _C2, _GOLDEN = _signed(0xBF58476D1CE4E5B9), _signed(0x94D049BB133111EB), _signed(0x9E3779B97F4A7C15)


def row_seed(seed: int, image_key: str, index: int) -> int:
    """The sampling seed of caption `index` of one image: a function of (seed, image, index) only."""
    digest = hashlib.blake2b(f"{seed}\x00{image_key}\x00{index}".encode(), digest_size=8).digest()
    return _signed(int.from_bytes(digest, "big"))


def _mix64(x: torch.Tensor) -> torch.Tensor:
    """splitmix64 finaliser on int64 tensors (multiplication wraps; shifts made logical by masking)."""
    x = x ^ ((x >> 30) & ((1 << 34) - 1))
    x = x * _C1
    x = x ^ ((x >> 27) & ((1 << 37) - 1))
    x = x * _C2
    return x ^ ((x >> 31) & ((1 << 33) - 1))


def gumbel_noise(seeds: torch.Tensor, step: int, tokens: torch.Tensor) -> torch.Tensor:
    """Float32 Gumbel noise shaped like `tokens` (rows, k): a pure function of (row seed, step, token id)."""
    x = _mix64(seeds[:, None] + _signed((step + 1) * _GOLDEN)) + tokens.to(torch.int64) * _C1
    bits = (_mix64(x) >> 40) & ((1 << 24) - 1)  # 24 uniform bits
    u = (bits.to(torch.float32) + 0.5) / float(1 << 24)
    return -torch.log(-torch.log(u))


def sample_top_p(logprobs: torch.Tensor, top_p: float, seeds: torch.Tensor, step: int, k: int = 256) -> torch.Tensor:
    """One token per row from the nucleus (smallest set of tokens with mass >= top_p) by Gumbel-max.

    Fast path: when the top-k tokens already hold top_p of the mass in every row (a trained captioner almost
    always), only those k are filtered and get noise; otherwise the whole vocabulary is sorted. Both paths
    draw the same token, since the noise depends on the token id only."""
    vocab = logprobs.shape[-1]
    if top_p < 1.0 and k < vocab:
        vals, idx = torch.topk(logprobs, k, dim=-1)
        if bool((vals.exp().sum(dim=-1) >= top_p).all()):
            vals = _nucleus(vals, top_p)
            return idx.gather(1, (vals + gumbel_noise(seeds, step, idx)).argmax(dim=-1, keepdim=True))[:, 0]
    filtered = top_p_filter(logprobs, top_p)
    tokens = torch.arange(vocab, device=logprobs.device).expand(logprobs.shape[0], vocab)
    return (filtered + gumbel_noise(seeds, step, tokens)).argmax(dim=-1)


def _nucleus(sorted_logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """-inf outside the nucleus, for log-probabilities sorted in descending order."""
    probs = sorted_logprobs.exp()
    before = probs.cumsum(dim=-1) - probs  # mass of strictly more likely tokens
    drop = before >= top_p
    drop[:, 0] = False
    return sorted_logprobs.masked_fill(drop, float("-inf"))


def repetition_penalty_(logits: torch.Tensor, ids: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty on every token already in `ids` (as transformers' RepetitionPenaltyLogitsProcessor)."""
    if penalty == 1.0:
        return logits
    seen = torch.gather(logits, 1, ids)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter_(1, ids, seen)


def top_p_filter(logprobs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches top_p (at least one); others -inf."""
    if top_p >= 1.0:
        return logprobs
    sorted_lp, order = torch.sort(logprobs, descending=True, dim=-1)
    return torch.full_like(logprobs, float("-inf")).scatter_(1, order, _nucleus(sorted_lp, top_p))


@dataclass
class CaptionConfig:
    num_captions: int = 3
    top_p: float = 0.9
    repetition_penalty: float = 1.1
    max_new_tokens: int = 20
    min_new_tokens: int = 0  # the benchmark forces full-length captions with this
    prompt: str = "a picture of "
    seed: int = 0


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def pick_dtype(precision: str, auto: torch.dtype) -> torch.dtype:
    """The dtype of a precision name (fp32, fp16, bf16); `auto` is the caller's choice for "auto".
    Shared with models/clip.py."""
    if precision == "auto":
        return auto
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def auto_dtype(device: torch.device) -> torch.dtype:
    """BLIP's "auto" precision: bf16 on CUDA (fp16 where the GPU lacks bf16), fp32 elsewhere."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_processor(name_or_path: str):
    """BlipProcessor (image processor + tokenizer) saved beside the model."""
    from transformers import BlipProcessor

    try:
        return BlipProcessor.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise WeightsMissing(f"could not load a BLIP processor (image processor + tokenizer) from {name_or_path!r}: "
                             f"{exc}. {HUB_HINT}") from exc


class _Backoff:
    """Run `fn(items)` in chunks of at most `size`; on CUDA OOM halve the chunk and retry (size stays halved)."""

    def __init__(self, size: int):
        self.size = max(1, size)

    def map(self, fn, items: list) -> list:
        out: list = []
        i = 0
        while i < len(items):
            chunk = items[i:i + self.size]
            try:
                out.extend(fn(chunk))
            except torch.cuda.OutOfMemoryError:
                if self.size == 1:
                    raise
                self.size = max(1, len(chunk) // 2)
                log.warning("CUDA out of memory: batch size halved to %d", self.size)
                torch.cuda.empty_cache()
                continue
            i += len(chunk)
        return out


class Captioner:
    """BlipForConditionalGeneration sampling N captions per image."""

    def __init__(self, model, processor, source: str, device: str = "auto", precision: str = "auto",
                 batch_size: int = 32):
        self.device = pick_device(device)
        self.dtype = pick_dtype(precision, auto_dtype(self.device))
        self.processor = processor
        self.source = source
        self.model = model.to(self.device, self.dtype).eval()
        text = self.model.config.text_config
        self.bos, self.sep, self.pad = text.bos_token_id, text.sep_token_id, text.pad_token_id
        if self.bos is None or self.sep is None:
            raise WeightsMissing(f"BLIP text config of {source!r} lacks bos_token_id/sep_token_id")
        self.backoff = _Backoff(batch_size)

    @classmethod
    def load(cls, name_or_path: str, allow_random: bool = False, device: str = "auto", precision: str = "auto",
             batch_size: int = 32) -> "Captioner":
        from transformers import BlipForConditionalGeneration

        processor = load_processor(name_or_path)
        loaded = load_hf(BlipForConditionalGeneration, name_or_path, allow_random)
        return cls(loaded.model, processor, loaded.source, device, precision, batch_size)

    def pixel_values(self, images) -> torch.Tensor:
        px = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return px.to(self.device, self.dtype)

    def prompt_ids(self, prompt: str) -> list[int]:
        return [self.bos] + self.processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def generate_ids(self, pixel_values: torch.Tensor, seeds: torch.Tensor, cfg: CaptionConfig) -> list[list[int]]:
        """Sampled token ids after the prompt (up to, excluding, the first [SEP]) for every (image, index) row:
        `seeds` is (images * num_captions,) int64, rows ordered image-major.

        The vision tower and the prompt step (which computes every layer's cross-attention keys/values from
        the image tokens) run once per image; their caches are then repeated for the N captions, so N > 1
        costs N decode loops, not N image encodings."""
        from transformers.cache_utils import DynamicCache, EncoderDecoderCache

        n = cfg.num_captions
        image_embeds = self.model.vision_model(pixel_values=pixel_values).last_hidden_state
        images = image_embeds.shape[0]
        enc_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        prompt = torch.tensor(self.prompt_ids(cfg.prompt), device=image_embeds.device).repeat(images, 1)
        cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
        decoder = self.model.text_decoder
        out = decoder(input_ids=prompt, encoder_hidden_states=image_embeds, encoder_attention_mask=enc_mask,
                      cache=cache, use_cache=True, logits_to_keep=1, return_dict=True)
        logits = out.logits[:, -1, :]
        enc = image_embeds
        if n > 1:  # one prompt step per image, its caches shared by the image's N captions
            cache.batch_repeat_interleave(n)
            logits = logits.repeat_interleave(n, dim=0)
            enc = image_embeds.repeat_interleave(n, dim=0)
            enc_mask = enc_mask.repeat_interleave(n, dim=0)
            prompt = prompt.repeat_interleave(n, dim=0)
        rows = enc.shape[0]
        ids = prompt
        seeds = seeds.to(enc.device)
        done = torch.zeros(rows, dtype=torch.bool, device=enc.device)
        for step in range(cfg.max_new_tokens):
            if step:
                out = decoder(input_ids=ids[:, -1:], encoder_hidden_states=enc, encoder_attention_mask=enc_mask,
                              cache=cache, use_cache=True, logits_to_keep=1, return_dict=True)
                logits = out.logits[:, -1, :]
            logits = repetition_penalty_(logits.float(), ids, cfg.repetition_penalty)
            if step < cfg.min_new_tokens:
                logits[:, self.sep] = float("-inf")
            nxt = sample_top_p(logits.log_softmax(dim=-1), cfg.top_p, seeds, step)
            nxt = torch.where(done, torch.full_like(nxt, self.pad), nxt)
            done = done | (nxt == self.sep)
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            if bool(done.all()):
                break
        out_ids = []
        for row in ids[:, prompt.shape[1]:].tolist():
            out_ids.append(row[:row.index(self.sep)] if self.sep in row else row)
        return out_ids

    def decode(self, token_ids: list[int], prompt: str) -> str:
        text = self.processor.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
        p = prompt.strip().lower()
        if p and text.lower().startswith(p):  # a decoder that repeats its prompt
            text = text[len(p):].strip()
        return text

    def captions(self, images: list, keys: list[str], cfg: CaptionConfig) -> list[list[str]]:
        """`cfg.num_captions` captions per image; `keys` (stable image ids) seed the sampling."""
        items = list(zip(images, keys))

        def run(chunk):
            px = self.pixel_values([im for im, _ in chunk])
            seeds = torch.tensor([row_seed(cfg.seed, k, j) for _, k in chunk for j in range(cfg.num_captions)],
                                 dtype=torch.int64)
            ids = self.generate_ids(px, seeds, cfg)
            texts = [self.decode(t, cfg.prompt) for t in ids]
            n = cfg.num_captions
            return [texts[i * n:(i + 1) * n] for i in range(len(chunk))]

        return self.backoff.map(run, items) if cfg.num_captions > 0 else [[] for _ in items]


class Matcher:
    """BlipForImageTextRetrieval ITM head: probability that a caption matches an image."""

    def __init__(self, model, processor, source: str, device: str = "auto", precision: str = "auto",
                 batch_size: int = 128, max_text_tokens: int = 64):
        self.device = pick_device(device)
        self.dtype = pick_dtype(precision, auto_dtype(self.device))
        self.processor = processor
        self.source = source
        self.model = model.to(self.device, self.dtype).eval()
        self.max_text_tokens = max_text_tokens
        self.image_backoff = _Backoff(max(1, batch_size // 4))
        self.pair_backoff = _Backoff(batch_size)

    @classmethod
    def load(cls, name_or_path: str, allow_random: bool = False, device: str = "auto", precision: str = "auto",
             batch_size: int = 128) -> "Matcher":
        from transformers import BlipForImageTextRetrieval

        processor = load_processor(name_or_path)
        loaded = load_hf(BlipForImageTextRetrieval, name_or_path, allow_random)
        return cls(loaded.model, processor, loaded.source, device, precision, batch_size)

    @torch.inference_mode()
    def image_embeds(self, images: list) -> list[torch.Tensor]:
        def run(chunk):
            px = self.processor.image_processor(images=chunk, return_tensors="pt")["pixel_values"]
            emb = self.model.vision_model(pixel_values=px.to(self.device, self.dtype)).last_hidden_state
            return list(emb)

        return self.image_backoff.map(run, images)

    @torch.inference_mode()
    def score_embedded(self, embeds: list[torch.Tensor], pairs: list[tuple[int, str]]) -> list[float]:
        """ITM match probability of (image index into `embeds`, caption) pairs, in input order."""
        tok = self.processor.tokenizer
        lengths = [len(tok(c, truncation=True, max_length=self.max_text_tokens)["input_ids"]) for _, c in pairs]
        order = sorted(range(len(pairs)), key=lambda i: lengths[i])  # little padding per batch

        def run(chunk):
            texts = tok([pairs[i][1] for i in chunk], padding=True, truncation=True, max_length=self.max_text_tokens,
                        return_tensors="pt").to(self.device)
            enc = torch.stack([embeds[pairs[i][0]] for i in chunk])
            enc_mask = torch.ones(enc.shape[:2], dtype=torch.long, device=enc.device)
            hidden = self.model.text_encoder(input_ids=texts["input_ids"], attention_mask=texts["attention_mask"],
                                             encoder_hidden_states=enc, encoder_attention_mask=enc_mask,
                                             return_dict=True).last_hidden_state
            logits = self.model.itm_head(hidden[:, 0, :]).float()
            return logits.softmax(dim=-1)[:, 1].tolist()

        scores = self.pair_backoff.map(run, order)
        out = [0.0] * len(pairs)
        for i, s in zip(order, scores):
            out[i] = float(s)
        return out

    def score(self, images: list, captions_per_image: list[list[str]]) -> list[list[float]]:
        embeds = self.image_embeds(images)
        pairs = [(i, c) for i, caps in enumerate(captions_per_image) for c in caps]
        flat = self.score_embedded(embeds, pairs)
        out, k = [], 0
        for caps in captions_per_image:
            out.append(flat[k:k + len(caps)])
            k += len(caps)
        return out
