"""CLIP image-text similarity for pairs with open_clip, in batches, on GPU when there is one.

`ClipScorer` loads the model once (trainer.weights.load_open_clip: real weights by tag or path; random only
when allowed, seeded so every worker builds the same random model). `score(images, captions, keys)` returns,
per row, either (clip_score, float16 image embedding bytes) or a Reject (image_decode_failed). Each distinct
image (by key: the captions of one photo share it) is decoded and embedded once; the score is the cosine of
the L2-normalised embeddings (no logit scale).

Two decoders, chosen by `ClipConfig.decode` ("auto": device decode on CUDA, PIL on CPU):
- "pil": PIL decode + open_clip's own preprocess, in a thread pool (PIL releases the GIL while decoding).
- "device": the JPEGs of a chunk are decoded together with one `torchvision.io.decode_jpeg(list, device=...)`
  call (nvJPEG's batched decoder on CUDA), EXIF orientation applied on the device (nvJPEG ignores it),
  then resized (bicubic, antialiased; one interpolate per group of equal sizes), centre-cropped and
  normalised there. CMYK/other JPEGs, non-JPEG formats and JPEGs the batch decoder refuses go through PIL.
  On device="cpu" the same code runs with libjpeg (tests exercise it there).
Images are embedded in chunks of `batch_size`; a prefetch thread decodes chunk i+1 (on its own CUDA stream)
while the model runs on chunk i. Precision: `ClipConfig.precision` auto (fp16 on CUDA, fp32 on CPU), fp32,
fp16 or bf16. A CUDA out-of-memory anywhere in decode, resize or the model halves the chunk and retries (the
smaller size stays for later batches); at 1 it is raised.
`ScoreBatches` is the Beam DoFn (setup loads the model; input: lists of pair rows).
"""

from __future__ import annotations

import io
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import apache_beam as beam
import numpy as np

from mmcorpus.filters.reasons import Reject
from mmcorpus.pipelines.runtime.stage import COUNTS, KEPT, REJECTS, reject_output

STAGE_CLIP = "clip_score"
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
DECODERS = ("auto", "pil", "device")


@dataclass(frozen=True)
class ClipConfig:
    model: str = "ViT-B-32"  # open_clip name or a model-config .json path
    pretrained: str | None = None  # open_clip tag or checkpoint path
    allow_random: bool = False
    seed: int = 0  # random init seed (same model in every worker)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    batch_size: int = 64
    decode_threads: int = 0  # 0: os.cpu_count()
    precision: str = "auto"  # auto (fp16 on CUDA, fp32 on CPU) | fp32 | fp16 | bf16
    decode: str = "auto"  # auto (device on CUDA, pil on CPU) | pil | device


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_model(cfg: ClipConfig, device: str = "cpu"):
    """trainer.weights.Loaded for cfg; the random init is seeded so every worker builds the same model."""
    from mmcorpus.trainer.weights import load_open_clip, seeded

    with seeded(cfg.seed):
        return load_open_clip(cfg.model, cfg.pretrained, allow_random=cfg.allow_random, device=device)


def _preprocess_params(preprocess):
    """(size, mean, std) read from open_clip's torchvision Compose."""
    import torchvision.transforms as T

    size, mean, std = 224, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    for t in getattr(preprocess, "transforms", []):
        if isinstance(t, T.Resize):
            size = t.size if isinstance(t.size, int) else t.size[0]
        elif isinstance(t, T.Normalize):
            mean, std = tuple(t.mean), tuple(t.std)
    return size, mean, std


def jpeg_orientation(data: bytes) -> int | None:
    """The EXIF orientation of a JPEG from its header (no pixel decoded), or None when it is not a JPEG the
    batched decoder should take (not JPEG, CMYK/YCCK, unreadable header)."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return None
        return int(img.getexif().get(0x0112, 1) or 1)
    except Exception:  # noqa: BLE001 - PIL decides later
        return None


def orient(x, orientation: int):
    """A (C, H, W) tensor turned as EXIF orientation 1-8 says (what PIL's ImageOps.exif_transpose does)."""
    import torch

    if orientation in (2, 4, 5, 7):
        x = torch.flip(x, dims=[-1])  # mirror first: 2 mirror, 4 = mirror + 180, 5/7 = mirror + 90/270
    turns = {3: 2, 4: 2, 5: 1, 6: 3, 7: 3, 8: 1}.get(orientation, 0)  # counter-clockwise quarter turns
    return torch.rot90(x, turns, dims=[-2, -1]) if turns else x


class ClipScorer:
    def __init__(self, cfg: ClipConfig):
        import torch

        from mmcorpus.pipelines.models.blip import pick_dtype

        if cfg.precision not in PRECISIONS or cfg.decode not in DECODERS:
            raise ValueError(f"precision must be one of {PRECISIONS} and decode one of {DECODERS}")
        self.cfg = cfg
        self.device = pick_device(cfg.device)
        loaded = load_model(cfg, self.device)
        self.source = loaded.source
        self.model = loaded.model
        self.preprocess = loaded.extras["preprocess"]
        self.tokenizer = loaded.extras["tokenizer"]
        self.cuda = self.device.startswith("cuda")
        self.dtype = pick_dtype(cfg.precision, torch.float16 if self.cuda else torch.float32)
        self.model = self.model.to(self.device, dtype=self.dtype)
        self.on_device = cfg.decode == "device" or (cfg.decode == "auto" and self.cuda)
        self.size, mean, std = _preprocess_params(self.preprocess)
        self.mean = torch.tensor(mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).view(1, 3, 1, 1)
        self.pool = ThreadPoolExecutor(max(1, cfg.decode_threads or os.cpu_count() or 1))
        self.prefetch = ThreadPoolExecutor(1)  # decodes the next chunk while the model runs
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self.batch_size = cfg.batch_size

    # -- images -> tensors --------------------------------------------------------------------------------
    def _cpu_tensor(self, data: bytes):
        from mmcorpus.filters.imageinfo import to_rgb

        try:
            return self.preprocess(to_rgb(data))
        except Exception as exc:  # noqa: BLE001 - any decode failure is a reject, the batch goes on
            return Reject("image_decode_failed", f"CLIP preprocess: {type(exc).__name__}: {exc}"[:300])

    def _decode_jpegs(self, blobs: list[bytes]) -> list:
        """uint8 (3, H, W) device tensors (None where the decoder refused one), one batched call when it can."""
        import torch
        from torchvision.io import ImageReadMode, decode_jpeg

        raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            return list(decode_jpeg(raw, mode=ImageReadMode.RGB, device=self.device))
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception:  # noqa: BLE001 - one bad image fails the whole call: isolate it
            out = []
            for r in raw:
                try:
                    out.append(decode_jpeg(r, mode=ImageReadMode.RGB, device=self.device))
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception:  # noqa: BLE001 - PIL decides (and rejects what is truly broken)
                    out.append(None)
            return out

    def _resize_crop(self, images: list) -> list:
        """Float (3, size, size) normalised tensors from uint8 (3, H, W) ones: the output size and crop offsets
        of torchvision's Resize(size) + CenterCrop(size); images of equal size are resized together."""
        import torch
        import torch.nn.functional as F

        out: list = [None] * len(images)
        by_shape: dict = {}
        for i, img in enumerate(images):
            by_shape.setdefault(tuple(img.shape[-2:]), []).append(i)
        for (h, w), idx in by_shape.items():
            x = torch.stack([images[i] for i in idx]).float().div_(255.0)
            if h <= w:
                nh, nw = self.size, max(self.size, int(self.size * w / h))
            else:
                nh, nw = max(self.size, int(self.size * h / w)), self.size
            x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False).clamp_(0, 1)
            top, left = int(round((nh - self.size) / 2.0)), int(round((nw - self.size) / 2.0))
            x = (x[..., top:top + self.size, left:left + self.size] - self.mean) / self.std
            for j, i in enumerate(idx):
                out[i] = x[j]
        return out

    def device_tensors(self, images: list[bytes]) -> list:
        """The "device" decoder over one chunk: batched JPEG decode, EXIF orientation, batched resize/crop,
        all on self.device; PIL for the rest. Per image a (3, size, size) tensor or a Reject."""
        turns = list(self.pool.map(jpeg_orientation, images))
        jpeg = [i for i, t in enumerate(turns) if t is not None]
        out: list = [None] * len(images)
        decoded = self._decode_jpegs([images[i] for i in jpeg]) if jpeg else []
        ok = [(i, orient(t, turns[i])) for i, t in zip(jpeg, decoded) if t is not None]
        for (i, _), t in zip(ok, self._resize_crop([t for _, t in ok])):
            out[i] = t
        rest = [i for i in range(len(images)) if out[i] is None]
        for i, t in zip(rest, self.pool.map(self._cpu_tensor, [images[i] for i in rest])):
            out[i] = t if isinstance(t, Reject) else t.to(self.device)
        return out

    def tensors(self, images: list[bytes]) -> list:
        if not images:
            return []
        if self.on_device:
            return self.device_tensors(images)
        return list(self.pool.map(self._cpu_tensor, images))

    def _decode_ahead(self, images: list[bytes]):
        """tensors(images) on the prefetch thread (on its own CUDA stream), with an event to wait on."""
        import torch

        if not self.cuda:
            return self.tensors(images), None
        with torch.cuda.stream(self.stream):
            out = self.tensors(images)
            done = torch.cuda.Event()
            done.record(self.stream)
        return out, done

    # -- model ---------------------------------------------------------------------------------------------
    def _autocast(self):
        import torch

        return torch.autocast(self.device.split(":")[0], dtype=self.dtype, enabled=self.dtype != torch.float32)

    def encode_images(self, pixels):
        """L2-normalised image embeddings, float32 numpy."""
        import torch

        with torch.inference_mode(), self._autocast():
            x = self.model.encode_image(pixels.to(self.device, dtype=self.dtype, non_blocking=True)).float()
        return torch.nn.functional.normalize(x, dim=-1).cpu().numpy()

    def encode_texts(self, captions: list[str]):
        """L2-normalised text embeddings, float32 numpy."""
        import torch

        with torch.inference_mode(), self._autocast():
            x = self.model.encode_text(self.tokenizer(captions).to(self.device)).float()
        return torch.nn.functional.normalize(x, dim=-1).cpu().numpy()

    def embed(self, pixels, captions: list[str]):
        """(image embeddings, text embeddings) of one batch, L2-normalised, float32 numpy."""
        return self.encode_images(pixels), self.encode_texts(captions)

    def _shrink(self, step: int) -> int:
        """The halved chunk size after a CUDA out-of-memory; called in the except block, so at 1 the bare
        raise re-raises that out-of-memory error."""
        import torch

        if step == 1:
            raise
        torch.cuda.empty_cache()
        self.batch_size = max(1, step // 2)  # later batches start smaller
        return self.batch_size

    def _oom_safe(self, fn, items):
        """fn over `items` (a tensor or list) in chunks of batch_size; a CUDA OOM halves the chunk and retries."""
        import torch

        n, start, out = len(items), 0, []
        step = max(1, min(n, self.batch_size))
        while start < n:
            try:
                out.append(fn(items[start:start + step]))
            except torch.cuda.OutOfMemoryError:
                step = self._shrink(step)
                continue
            start += step
        return np.concatenate(out)

    def embed_images(self, images: list[bytes]) -> list:
        """Per image: an L2-normalised float32 embedding or a Reject. Chunks of batch_size; the next chunk is
        decoded on the prefetch thread while the model embeds this one; a CUDA OOM in decode or model halves
        the chunk and retries from where it failed."""
        import torch

        n = len(images)
        out: list = [None] * n
        step = max(1, min(n, self.batch_size))

        def submit(start):
            stop = min(n, start + step)
            return start, stop, self.prefetch.submit(self._decode_ahead, images[start:stop])

        pending = submit(0) if n else None
        while pending is not None:
            start, stop, fut = pending
            try:
                tensors, done = fut.result()
            except torch.cuda.OutOfMemoryError:
                step = self._shrink(step)
                pending = submit(start)
                continue
            ahead = submit(stop) if stop < n else None  # decode the next chunk while the model runs
            if done is not None:  # decoded on the prefetch stream: order it before the model's use
                torch.cuda.current_stream().wait_event(done)
                for t in tensors:
                    if not isinstance(t, Reject):
                        t.record_stream(torch.cuda.current_stream())
            good = [j for j, t in enumerate(tensors) if not isinstance(t, Reject)]
            try:
                emb = self.encode_images(torch.stack([tensors[j] for j in good])) if good else []
            except torch.cuda.OutOfMemoryError:
                del tensors
                if ahead is not None:
                    ahead[2].exception()  # let it finish before retrying with smaller chunks
                step = self._shrink(step)
                pending = submit(start)
                continue
            for j, t in enumerate(tensors):
                if isinstance(t, Reject):
                    out[start + j] = t
            for r, j in enumerate(good):
                out[start + j] = emb[r]
            pending = ahead
        return out

    def score(self, images: list[bytes], captions: list[str], keys: list | None = None) -> list:
        """Per item: (score, float16 image embedding bytes) or Reject. Items with the same key (e.g. the
        image's sha256: the captions of one photo) share one decode and one image embedding."""
        keys = list(range(len(images))) if keys is None else keys
        slot: dict = {}  # key -> index among the distinct images
        firsts = []
        for i, key in enumerate(keys):
            if key not in slot:
                slot[key] = len(firsts)
                firsts.append(i)
        embedded = self.embed_images([images[i] for i in firsts])
        out: list = [embedded[slot[key]] for key in keys]  # Rejects stay; the rest is replaced below
        items = [i for i, key in enumerate(keys) if not isinstance(embedded[slot[key]], Reject)]
        if not items:
            return out
        txt = self._oom_safe(self.encode_texts, [captions[i] for i in items])
        blobs = {}
        for t_row, i in enumerate(items):
            u = slot[keys[i]]
            if u not in blobs:
                blobs[u] = embedded[u].astype("<f2").tobytes()
            out[i] = (float(np.dot(embedded[u], txt[t_row])), blobs[u])
        return out


class ScoreBatches(beam.DoFn):
    """Beam DoFn: a list of pair dicts in, tagged (kept/rejects/counts) out, kept pairs with clip_score and
    clip_embedding (float16 bytes) filled."""

    def __init__(self, cfg: ClipConfig):
        self.cfg = cfg

    def setup(self):
        self.scorer = shared_scorer(self.cfg)

    def process(self, batch):
        rows = list(batch)
        from mmcorpus.pipelines.pairs.command import image_data

        results = self.scorer.score([image_data(r) for r in rows], [r["caption"] for r in rows],
                                    [r["sha256"] for r in rows])
        for row, result in zip(rows, results):
            yield COUNTS, ((STAGE_CLIP, "in", ""), 1)
            if isinstance(result, Reject):
                yield REJECTS, reject_output(STAGE_CLIP, result, row["source"])
                yield COUNTS, ((STAGE_CLIP, "rejected", result.reason), 1)
            else:
                yield COUNTS, ((STAGE_CLIP, "out", ""), 1)
                yield KEPT, dict(row, clip_score=result[0], clip_embedding=result[1])


def shared_scorer(cfg: ClipConfig) -> ClipScorer:
    """The worker process's ClipScorer for `cfg` (loaded once, not once per bundle)."""
    from mmcorpus.pipelines.runtime.shared import file_stamp, per_process

    return per_process(("clip", cfg, file_stamp(cfg.model), file_stamp(cfg.pretrained)), lambda: ClipScorer(cfg))


def embedding(blob: bytes) -> np.ndarray:
    """A stored float16 embedding as float32."""
    return np.frombuffer(blob, dtype="<f2").astype(np.float32)
