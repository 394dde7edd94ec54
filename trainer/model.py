"""A compact Flamingo: frozen open_clip vision tower -> Perceiver Resampler -> frozen HF causal LM with gated
cross-attention dense blocks in front of every k-th decoder layer.

- Vision: patch tokens of the open_clip visual transformer (`output_tokens`), frozen, run without grad.
- Resampler: `num_latents` learned latents; each layer attends with queries = latents and keys/values =
  concat(media tokens, latents), then a feed-forward; a learned time embedding tells the images apart.
- Cross-attention: forward pre-hooks on the LM's decoder layers add
  `x + tanh(g_attn) * xattn(x, image latents)` and `x + tanh(g_ff) * ffw(x)`. Gates start at 0, so the
  untrained model equals the LM. A text token attends only to the latents of the last `<image>` at or
  before it (text before any image attends to none): text_time = cumsum(is_image_token).
- `<image>` and `<|endofchunk|>` get new trainable input embeddings and output rows; the LM's own
  embedding matrix stays frozen. Trainable: resampler, cross-attention blocks, the new rows. Nothing else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's defaults; build() takes the tower's own
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value inputs and an optional boolean mask."""

    def __init__(self, q_dim: int, kv_dim: int, heads: int, dim_head: int):
        super().__init__()
        self.heads, inner = heads, heads * dim_head
        self.to_q = nn.Linear(q_dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, q_dim, bias=False)

    def forward(self, x, kv, mask=None):  # x [B, S, q_dim], kv [B, M, kv_dim], mask [B, S, M] True = may attend
        b, s, _ = x.shape
        q = self.to_q(x).view(b, s, self.heads, -1).transpose(1, 2)
        k, v = self.to_kv(kv).view(b, kv.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        if mask is not None:
            mask = mask[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(b, s, -1))


class PerceiverResampler(nn.Module):
    def __init__(self, dim: int, depth: int = 2, num_latents: int = 64, heads: int = 4, dim_head: int = 32,
                 max_images: int = 8):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(num_latents, dim) * 0.02)
        self.time = nn.Parameter(torch.zeros(max_images, 1, dim))
        self.layers = nn.ModuleList(nn.ModuleList([nn.LayerNorm(dim), nn.LayerNorm(dim),
                                                   Attention(dim, dim, heads, dim_head), feed_forward(dim, 2)])
                                    for _ in range(depth))
        self.norm = nn.LayerNorm(dim)

    def forward(self, media):  # [B, T, N, D] -> [B, T, num_latents, D]
        b, t, n, d = media.shape
        if t > self.time.shape[0]:
            raise ValueError(f"{t} images in a sample; the resampler was built for at most {self.time.shape[0]}")
        x = (media + self.time[:t]).reshape(b * t, n, d)
        lat = self.latents.expand(b * t, -1, -1)
        for norm_media, norm_lat, attn, ff in self.layers:
            q = norm_lat(lat)
            lat = lat + attn(q, torch.cat([norm_media(x), q], dim=1))
            lat = lat + ff(lat)
        return self.norm(lat).view(b, t, -1, d)


class GatedCrossAttentionBlock(nn.Module):
    def __init__(self, dim: int, media_dim: int, heads: int = 4, dim_head: int = 32, ff_mult: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, media_dim, heads, dim_head)
        self.ff = feed_forward(dim, ff_mult)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, x, media, mask):  # media [B, M, media_dim]; mask [B, S, M]
        allowed = mask.any(-1, keepdim=True)  # rows with no image: attend to nothing (output 0)
        safe = mask | ~allowed  # SDPA needs one allowed key per row; those rows are zeroed below
        out = self.attn(self.norm(x), media.to(x.dtype), safe) * allowed
        x = x + torch.tanh(self.attn_gate).to(x.dtype) * out
        return x + torch.tanh(self.ff_gate).to(x.dtype) * self.ff(x)


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The decoder layer list of a HF causal LM: the ModuleList with config.num_hidden_layers entries."""
    n = getattr(lm.config, "num_hidden_layers", None) or getattr(lm.config, "n_layer", None)
    found = [m for m in lm.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not found:
        raise ValueError(f"cannot find the {n} decoder layers of {type(lm).__name__}")
    return found[0]


class Flamingo(nn.Module):
    def __init__(self, vision: nn.Module, lm: nn.Module, image_token_id: int, eoc_token_id: int,
                 cross_attn_every: int = 1, num_latents: int = 64, resampler_depth: int = 2, heads: int = 4,
                 dim_head: int = 32, max_images: int = 8):
        super().__init__()
        if not hasattr(vision, "output_tokens"):
            raise ValueError(f"{type(vision).__name__} does not give patch tokens; use an open_clip ViT model")
        self.vision, self.lm = vision, lm
        vision.output_tokens = True
        for p in list(vision.parameters()) + list(lm.parameters()):
            p.requires_grad_(False)
        self.image_size = _image_size(vision)
        self.register_buffer("pixel_mean", torch.tensor(CLIP_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(3, 1, 1), persistent=False)
        with torch.no_grad():
            _, tokens = vision(torch.zeros(1, 3, self.image_size, self.image_size))
        self.media_tokens, self.media_dim = tokens.shape[1:]
        emb = lm.get_input_embeddings()
        self.vocab, dim = emb.num_embeddings, emb.embedding_dim
        self.image_token_id, self.eoc_token_id = image_token_id, eoc_token_id
        self.resampler = PerceiverResampler(self.media_dim, resampler_depth, num_latents, heads, dim_head, max_images)
        layers = decoder_layers(lm)
        self.xattn_layers = list(range(0, len(layers), cross_attn_every))
        self.xattn = nn.ModuleList(GatedCrossAttentionBlock(dim, self.media_dim, heads, dim_head)
                                   for _ in self.xattn_layers)
        std = float(emb.weight.std())
        self.new_embed = nn.Parameter(torch.randn(2, dim) * std)  # rows for <image>, <|endofchunk|>
        self.new_out = nn.Parameter(torch.zeros(2, dim))
        self._cond = None
        self._hidden = None
        self._flops_cache = {}
        for block, i in zip(self.xattn, self.xattn_layers):
            layers[i].register_forward_pre_hook(self._make_hook(block), with_kwargs=True)
        lm.get_output_embeddings().register_forward_hook(self._keep_hidden)

    # ---- hooks
    def _make_hook(self, block):
        def hook(module, args, kwargs):
            if self._cond is None:
                return None
            media, mask = self._cond
            if args:
                return (block(args[0], media, mask),) + tuple(args[1:]), kwargs
            kwargs["hidden_states"] = block(kwargs["hidden_states"], media, mask)
            return args, kwargs
        return hook

    def _keep_hidden(self, module, args, output):
        self._hidden = args[0]

    # ---- pieces
    def train(self, mode: bool = True):
        super().train(mode)
        self.vision.eval()
        self.lm.eval()  # frozen parts never use dropout
        return self

    def trainable_named(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in self.trainable_named().items()}

    def load_trainable(self, state: dict[str, torch.Tensor]) -> None:
        params = self.trainable_named()
        if set(state) != set(params):
            raise ValueError(f"checkpoint trainables differ from the model: {sorted(set(state) ^ set(params))[:5]}")
        with torch.no_grad():
            for n, t in state.items():
                params[n].copy_(t)

    def gates(self) -> dict[str, list[float]]:
        return {"attn": [float(torch.tanh(b.attn_gate.detach())) for b in self.xattn],
                "ff": [float(torch.tanh(b.ff_gate.detach())) for b in self.xattn], "layers": self.xattn_layers}

    def set_pixel_stats(self, mean, std) -> None:
        """Per-channel normalisation of the vision tower, applied to uint8 images (the loader's)."""
        self.pixel_mean.copy_(torch.tensor(mean, dtype=torch.float32).view(3, 1, 1))
        self.pixel_std.copy_(torch.tensor(std, dtype=torch.float32).view(3, 1, 1))

    @torch.no_grad()
    def encode_images(self, images):  # [B, T, 3, H, W] -> patch tokens [B, T, N, media_dim]
        """uint8 pixels are scaled to [0, 1] and normalised here (on the model's device); float input is
        taken as already normalised."""
        b, t = images.shape[:2]
        images = images.flatten(0, 1)
        if images.dtype == torch.uint8:
            images = (images.float() / 255.0 - self.pixel_mean) / self.pixel_std
        _, tokens = self.vision(images)
        return tokens.reshape(b, t, *tokens.shape[1:])

    def embed(self, input_ids):
        new = torch.stack([input_ids == self.image_token_id, input_ids == self.eoc_token_id], -1)
        base = self.lm.get_input_embeddings()(input_ids.clamp(0, self.vocab - 1))
        extra = new.to(base.dtype) @ self.new_embed.to(base.dtype)
        return torch.where(new.any(-1, keepdim=True), extra, base)

    def target_ids(self, labels):
        out = labels.clone()
        out[labels == self.image_token_id] = self.vocab
        out[labels == self.eoc_token_id] = self.vocab + 1
        return out

    def forward(self, input_ids, attention_mask=None, images=None, image_mask=None, features=None, labels=None):
        """Logits over the LM vocabulary + the 2 new tokens; `loss` (token mean) and `sample_loss` [B] with labels.
        Pass `features` (from `encode_images`) instead of `images` to reuse encoded images."""
        if features is None and images is not None:
            features = self.encode_images(images)
        b, s = input_ids.shape
        if features is not None and features.shape[1]:
            latents = self.resampler(features)  # [B, T, L, D]
            t, l = latents.shape[1:3]
            if image_mask is None:
                image_mask = torch.ones(b, t, dtype=torch.bool, device=input_ids.device)
            slot = torch.arange(1, t + 1, device=input_ids.device).expand(b, t).masked_fill(~image_mask, -1)
            media_time = slot.repeat_interleave(l, dim=1)  # [B, T*L]
            text_time = (input_ids == self.image_token_id).cumsum(1)  # [B, S]
            self._cond = (latents.flatten(1, 2), text_time[:, :, None] == media_time[:, None, :])
        try:
            out = self.lm(inputs_embeds=self.embed(input_ids), attention_mask=attention_mask, use_cache=False)
        finally:
            self._cond = None
        hidden, self._hidden = self._hidden, None
        logits = torch.cat([out.logits.float(), (hidden @ self.new_out.to(hidden.dtype).T).float()], -1)
        result = {"logits": logits}
        if labels is not None:
            target = self.target_ids(labels)[:, 1:]
            tok = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, ignore_index=-100, reduction="none")
            valid = (target != -100).float()
            result["loss"] = (tok * valid).sum() / valid.sum().clamp(min=1)
            result["sample_loss"] = (tok * valid).sum(1) / valid.sum(1).clamp(min=1)
            result["tokens"] = valid.sum()
        return result

    def flops(self, seq_len: int, media_per_sample: int) -> dict[str, float]:
        """Model FLOPs of one training step, per text token and per image (for MFU; not a measurement).

        One multiply-add = 2 FLOPs; only matrix products count (norms, biases, softmax, the loss are left out,
        as in the PaLM appendix). For a weight matrix of n entries applied to one token:
        - frozen vision tower, run without grad: forward only, 2n;
        - frozen LM: forward 2n + the activation-gradient pass 2n = 4n (gradients must flow through it down to
          the earlier cross-attention blocks and the new token embeddings), no weight gradients;
        - trainable resampler, cross-attention blocks, new output rows: 6n (forward, input and weight grads).
        Input and position embeddings are lookups (0 FLOPs); the LM's output matrix counts once as a matmul,
        tied or not. Attention scores (QK^T and AV) over a context of c keys: forward 4*c*d_attn per query per
        layer, x3 with backward (the PaLM 12*L*H*Q*T term; frozen or not, q, k and v are activations);
        forward only (x1) in the vision tower. The context is `seq_len` for the LM (padded length, causal
        masking not subtracted), `media_per_sample` (image slots x latents) for cross-attention, patches +
        latents for the resampler, patch tokens for the vision tower. Cross-attention k/v projections run over
        the media tokens, so they are charged per image.
        """
        lm = self.lm
        emb = {id(m.weight) for m in lm.modules() if isinstance(m, nn.Embedding)}
        n_lm = sum(p.numel() for p in lm.parameters() if p.ndim >= 2 and id(p) not in emb)
        out = lm.get_output_embeddings().weight
        if id(out) in emb:  # tied: the lookup was left out above, the output product still costs
            n_lm += out.numel()
        cfg = lm.config
        heads = cfg.num_attention_heads
        d_attn = heads * (getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        n_layers = len(decoder_layers(lm))
        lat = self.resampler.latents.shape[0]
        per_token = 4 * n_lm + 12 * n_layers * d_attn * seq_len
        per_token += 4 * self.new_embed.numel() + 6 * self.new_out.numel()  # new rows: input mask, no grad
        per_image = 0.0
        for block in self.xattn:
            kv = block.attn.to_kv.weight.numel()
            dense = sum(p.numel() for p in block.parameters() if p.ndim >= 2) - kv
            per_token += 6 * dense + 12 * media_per_sample * block.attn.to_q.weight.shape[0]
            per_image += 6 * kv * lat
        n = self.media_tokens
        for _, _, attn, ff in self.resampler.layers:
            per_image += 6 * lat * (attn.to_q.weight.numel() + attn.to_out.weight.numel())
            per_image += 6 * (n + lat) * attn.to_kv.weight.numel()
            per_image += 6 * lat * sum(p.numel() for p in ff.parameters() if p.ndim >= 2)
            per_image += 12 * lat * (n + lat) * attn.to_q.weight.shape[0]
        return {"per_token": float(per_token), "per_image": float(per_image + _vision_forward_flops(self.vision))}

    def train_flops(self, tokens: int, seq_len: int, images: int, media_per_sample: int) -> float:
        """Model FLOPs of a training step over `tokens` real text tokens (sequences padded to `seq_len`) and
        `images` real images, with `media_per_sample` media tokens per sample (see `flops`)."""
        key = (seq_len, media_per_sample)
        if key not in self._flops_cache:  # shapes never change: count once per context size
            self._flops_cache[key] = self.flops(seq_len, media_per_sample)
        f = self._flops_cache[key]
        return tokens * f["per_token"] + images * f["per_image"]


def _vision_forward_flops(vision) -> float:
    """Forward FLOPs of one image through an open_clip ViT: patch projection, transformer matrices over
    patches + class token, attention scores, the pooled projection."""
    size, patch = _image_size(vision), _patch_size(vision)
    patches = (size // patch) ** 2
    tokens = patches + int(getattr(vision, "class_embedding", None) is not None)
    tower = getattr(vision, "transformer", None)
    if tower is None:  # not a plain ViT: every matrix over every token
        return 2.0 * tokens * sum(p.numel() for p in vision.parameters() if p.ndim >= 2)
    flops = 2 * tokens * sum(p.numel() for p in tower.parameters() if p.ndim >= 2)
    flops += 2 * patches * vision.conv1.weight.numel()
    flops += 4 * len(tower.resblocks) * tokens * tokens * tower.width
    proj = getattr(vision, "proj", None)
    if proj is not None:
        flops += 2 * proj.numel()
    return float(flops)


def _image_size(vision) -> int:
    size = getattr(vision, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def _patch_size(vision) -> int:
    size = getattr(vision, "patch_size", 16)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def build(model_cfg: dict, tokenizer, allow_random: bool = False) -> tuple[Flamingo, dict]:
    """Flamingo from a config dict: vision (open_clip name or config JSON), vision_pretrained, lm (HF id/path).
    Returns the model and the weight sources, which every run records."""
    from transformers import AutoModelForCausalLM

    from mmcorpus.trainer.data import EOC_TOKEN, IMAGE_TOKEN, ensure_special_tokens
    from mmcorpus.trainer.weights import load_hf, load_open_clip

    ensure_special_tokens(tokenizer)
    clip = load_open_clip(model_cfg["vision"], model_cfg.get("vision_pretrained"), allow_random)
    lm = load_hf(AutoModelForCausalLM, model_cfg["lm"], allow_random)
    model = Flamingo(clip.model.visual, lm.model, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                     tokenizer.convert_tokens_to_ids(EOC_TOKEN),
                     cross_attn_every=model_cfg.get("cross_attn_every", 1),
                     num_latents=model_cfg.get("num_latents", 64),
                     resampler_depth=model_cfg.get("resampler_depth", 2), heads=model_cfg.get("heads", 4),
                     dim_head=model_cfg.get("dim_head", 32), max_images=model_cfg.get("max_images", 8))
    preprocess = clip.extras["preprocess"]
    norm = [t for t in getattr(preprocess, "transforms", []) if type(t).__name__ == "Normalize"]
    stats = {"mean": tuple(norm[0].mean), "std": tuple(norm[0].std)} if norm else {}
    if stats:
        model.set_pixel_stats(stats["mean"], stats["std"])
    return model, {"vision": clip.source, "lm": lm.source, "image_size": model.image_size, **stats}


def make_optimizer(model, lr: float, weight_decay: float, gate_lr_mult: float = 1.0):
    """AdamW; no decay on gates, norms, biases and the new token rows; gates may learn faster (`gate_lr_mult`):
    they start at 0, and until they open the cross-attention weights behind them barely matter."""
    groups = {"decay": [], "no_decay": [], "gates": []}
    for name, p in model.trainable_named().items():
        if name.endswith("_gate"):
            groups["gates"].append(p)
        elif p.ndim >= 2 and not name.startswith("new_"):
            groups["decay"].append(p)
        else:
            groups["no_decay"].append(p)
    return torch.optim.AdamW([{"params": groups["decay"], "weight_decay": weight_decay},
                              {"params": groups["no_decay"], "weight_decay": 0.0},
                              {"params": groups["gates"], "weight_decay": 0.0, "lr": lr * gate_lr_mult}],
                             lr=lr, betas=(0.9, 0.95))
