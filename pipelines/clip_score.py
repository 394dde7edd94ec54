"""CLIP image-text similarity for pairs with open_clip, in batches, on GPU when there is one.

`ClipScorer` loads the model once (trainer.weights.load_open_clip: real weights by tag or path; random only
when allowed, seeded so every worker builds the same random model). `score(rows)` returns, per row, either
(clip_score, float16 image embedding bytes) or a Reject (image_decode_failed). Each distinct image of a
batch (by sha256: the captions of one photo) is decoded and embedded once; the score is the cosine of the
L2-normalised embeddings (no logit scale).

CPU path: PIL decode + open_clip's own preprocess, in a thread pool (PIL releases the GIL while decoding).
GPU path: JPEGs decoded on the device with torchvision.io.decode_jpeg (nvJPEG, EXIF orientation applied),
resized (bicubic, antialiased), centre-cropped and normalised there; other formats go through PIL. Model in
fp16 on CUDA. A CUDA out-of-memory halves the batch and retries; at batch 1 it is raised.
`ScoreBatches` is the Beam DoFn (setup loads the model; input: lists from beam.BatchElements).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import apache_beam as beam
import numpy as np

from filters.reasons import Reject
from pipelines.stage import COUNTS, KEPT, REJECTS, reject_output

STAGE_CLIP = "clip_score"


@dataclass(frozen=True)
class ClipConfig:
    model: str = "ViT-B-32"  # open_clip name or a model-config .json path
    pretrained: str | None = None  # open_clip tag or checkpoint path
    allow_random: bool = False
    seed: int = 0  # random init seed (same model in every worker)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 64
    decode_threads: int = 0  # 0: os.cpu_count()


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(cfg: ClipConfig, device: str = "cpu"):
    """trainer.weights.Loaded for cfg; the random init is seeded so every worker builds the same model."""
    from trainer.weights import load_open_clip, seeded

    with seeded(cfg.seed):
        return load_open_clip(cfg.model, cfg.pretrained, allow_random=cfg.allow_random, device=device)


def _preprocess_params(preprocess):
    """(size, mean, std, interpolation) read from open_clip's torchvision Compose."""
    import torchvision.transforms as T

    size, mean, std = 224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, T.Resize):
            size = t.size if isinstance(t.size, int) else t.size[0]
        elif isinstance(t, T.Normalize):
            mean, std = tuple(t.mean), tuple(t.std)
    return size, mean, std


class ClipScorer:
    def __init__(self, cfg: ClipConfig):
        import torch

        self.cfg = cfg
        self.device = pick_device(cfg.device)
        loaded = load_model(cfg, self.device)
        self.source = loaded.source
        self.model = loaded.model
        self.preprocess = loaded.extras["preprocess"]
        self.tokenizer = loaded.extras["tokenizer"]
        self.cuda = self.device.startswith("cuda")
        self.dtype = torch.float16 if self.cuda else torch.float32
        if self.cuda:
            self.model = self.model.to(self.device, dtype=self.dtype)
        self.size, mean, std = _preprocess_params(self.preprocess)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.pool = ThreadPoolExecutor(max(1, cfg.decode_threads or os.cpu_count() or 1))
        self.batch_size = cfg.batch_size

    # -- images -> tensors --------------------------------------------------------------------------------
    def _cpu_tensor(self, data: bytes):
        from filters.imageinfo import to_rgb

        try:
            return self.preprocess(to_rgb(data))
        except Exception as exc:  # noqa: BLE001 - any decode failure is a reject, the batch goes on
            return Reject("image_decode_failed", f"CLIP preprocess: {type(exc).__name__}: {exc}"[:300])

    def _gpu_tensor(self, data: bytes):
        import torch
        import torch.nn.functional as F
        from torchvision.io import ImageReadMode, decode_jpeg

        if data[:3] != b"\xff\xd8\xff":
            t = self._cpu_tensor(data)
            return t if isinstance(t, Reject) else t.to(self.device)
        try:
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            img = decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
        except Exception:  # noqa: BLE001 - CMYK/progressive oddities: PIL decides
            t = self._cpu_tensor(data)
            return t if isinstance(t, Reject) else t.to(self.device)
        x = img.unsqueeze(0).float() / 255.0
        h, w = x.shape[-2:]
        # the same output size and crop offsets as torchvision's Resize(size) + CenterCrop(size) (int(), round())
        if h <= w:
            nh, nw = self.size, max(self.size, int(self.size * w / h))
        else:
            nh, nw = max(self.size, int(self.size * h / w)), self.size
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
        top, left = int(round((nh - self.size) / 2.0)), int(round((nw - self.size) / 2.0))
        x = x[..., top:top + self.size, left:left + self.size]
        return ((x - self.mean) / self.std)[0]

    def tensors(self, images: list[bytes]) -> list:
        fn = self._gpu_tensor if self.cuda else self._cpu_tensor
        if self.cuda:  # nvJPEG calls stay on this thread; PIL fallbacks are few
            return [fn(d) for d in images]
        return list(self.pool.map(fn, images))

    # -- model ---------------------------------------------------------------------------------------------
    def encode_images(self, pixels):
        """L2-normalised image embeddings, float32 numpy."""
        import torch

        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.cuda):
            x = self.model.encode_image(pixels.to(self.device, dtype=self.dtype, non_blocking=True)).float()
        return torch.nn.functional.normalize(x, dim=-1).cpu().numpy()

    def encode_texts(self, captions: list[str]):
        """L2-normalised text embeddings, float32 numpy."""
        import torch

        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.cuda):
            x = self.model.encode_text(self.tokenizer(captions).to(self.device)).float()
        return torch.nn.functional.normalize(x, dim=-1).cpu().numpy()

    def embed(self, pixels, captions: list[str]):
        """(image embeddings, text embeddings) of one batch, L2-normalised, float32 numpy."""
        return self.encode_images(pixels), self.encode_texts(captions)

    def _oom_safe(self, fn, items):
        """fn over `items` (a tensor or list) in chunks of batch_size; a CUDA OOM halves the chunk and retries."""
        import torch

        n, start, out = len(items), 0, []
        step = max(1, min(n, self.batch_size))
        while start < n:
            try:
                out.append(fn(items[start:start + step]))
            except torch.cuda.OutOfMemoryError:
                if step == 1:
                    raise
                torch.cuda.empty_cache()
                step = max(1, step // 2)
                self.batch_size = step  # later batches start smaller
                continue
            start += step
        return np.concatenate(out)

    def score(self, images: list[bytes], captions: list[str], keys: list | None = None) -> list:
        """Per item: (score, float16 image embedding bytes) or Reject. Items with the same key (e.g. the
        image's sha256: the captions of one photo) share one decode and one image embedding."""
        import torch

        keys = list(range(len(images))) if keys is None else keys
        slot: dict = {}  # key -> index among the distinct images
        firsts = []
        for i, key in enumerate(keys):
            if key not in slot:
                slot[key] = len(firsts)
                firsts.append(i)
        tensors = self.tensors([images[i] for i in firsts])
        good = [u for u, t in enumerate(tensors) if not isinstance(t, Reject)]
        out: list = [tensors[slot[key]] for key in keys]  # Rejects stay; the rest is replaced below
        if not good:
            return out
        img = self._oom_safe(self.encode_images, torch.stack([tensors[u] for u in good]))
        row_of = {u: r for r, u in enumerate(good)}
        items = [i for i, key in enumerate(keys) if slot[key] in row_of]
        txt = self._oom_safe(self.encode_texts, [captions[i] for i in items])
        blobs = {}
        for t_row, i in enumerate(items):
            r = row_of[slot[keys[i]]]
            if r not in blobs:
                blobs[r] = img[r].astype("<f2").tobytes()
            out[i] = (float(np.dot(img[r], txt[t_row])), blobs[r])
        return out


class ScoreBatches(beam.DoFn):
    """Beam DoFn: a list of pair dicts in, tagged (kept/rejects/counts) out, kept pairs with clip_score and
    clip_embedding (float16 bytes) filled."""

    def __init__(self, cfg: ClipConfig):
        self.cfg = cfg

    def setup(self):
        self.scorer = ClipScorer(self.cfg)

    def process(self, batch):
        rows = list(batch)
        results = self.scorer.score([r["_data"] for r in rows], [r["caption"] for r in rows],
                                    [r["sha256"] for r in rows])
        for row, result in zip(rows, results):
            yield COUNTS, ((STAGE_CLIP, "in", ""), 1)
            if isinstance(result, Reject):
                yield REJECTS, reject_output(STAGE_CLIP, result, row["source"])
                yield COUNTS, ((STAGE_CLIP, "rejected", result.reason), 1)
            else:
                yield COUNTS, ((STAGE_CLIP, "out", ""), 1)
                yield KEPT, dict(row, clip_score=result[0], clip_embedding=result[1])


def embedding(blob: bytes) -> np.ndarray:
    """A stored float16 embedding as float32."""
    return np.frombuffer(blob, dtype="<f2").astype(np.float32)
