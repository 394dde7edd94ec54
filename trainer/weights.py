"""Load models by name or local path, never silently with random weights.

Shared by the pairs (CLIP), CapFilt (BLIP) and trainer (CLIP vision + causal LM) stages. Random weights only
when the caller passes `allow_random=True` (the `--allow-random-weights` flag); the returned `source` string
says which it was, and every run writes it into its stats.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

HUB_HINT = ("no model hub is reachable from here: pass a local path (a checkpoint file or a saved model folder), "
            "or --allow-random-weights for a test run")


class WeightsMissing(RuntimeError):
    """Requested weights are not available locally; the message says what was looked for and what to do."""


@dataclass
class Loaded:
    model: Any
    source: str  # "pretrained:<tag or path>" or "random"
    extras: dict


def _register_open_clip_config(name: str) -> str:
    """`name` may be a path to an open_clip model-config JSON; register it and return the model name."""
    import open_clip

    if name.endswith(".json") and os.path.isfile(name):
        open_clip.add_model_config(name)
        return os.path.splitext(os.path.basename(name))[0]
    if name not in open_clip.list_models():
        raise WeightsMissing(f"open_clip has no model named {name!r} (known e.g. ViT-B-32, ViT-L-14; "
                             f"or pass a model-config .json path)")
    return name


def load_open_clip(name: str, pretrained: str | None, allow_random: bool = False, device: str = "cpu") -> Loaded:
    """open_clip model + preprocess + tokenizer. `pretrained` is a tag open_clip knows or a checkpoint path."""
    import open_clip

    model_name = _register_open_clip_config(name)
    if not pretrained:
        if not allow_random:
            raise WeightsMissing(f"no pretrained weights given for open_clip model {model_name!r}: pass "
                                 f"--clip-pretrained TAG_OR_PATH ({HUB_HINT})")
        source = "random"
        pretrained_arg = None
    else:
        source = f"pretrained:{pretrained}"
        pretrained_arg = pretrained
        if not os.path.exists(pretrained) and pretrained not in open_clip.list_pretrained_tags_by_model(model_name):
            raise WeightsMissing(f"{pretrained!r} is neither a file nor a pretrained tag of open_clip model "
                                 f"{model_name!r} (tags: {open_clip.list_pretrained_tags_by_model(model_name)})")
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained_arg, device=device)
    except Exception as exc:  # hub download failures come as many exception types
        raise WeightsMissing(f"could not load open_clip {model_name!r} weights {pretrained!r}: "
                             f"{type(exc).__name__}: {exc}. {HUB_HINT}") from exc
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)
    return Loaded(model, source, {"preprocess": preprocess, "tokenizer": tokenizer, "model_name": model_name})


RANDOM_INIT_SEED = 0


@contextlib.contextmanager
def seeded(seed: int):
    """Run a random initialisation under `seed`, leaving the caller's torch RNG as it was: every worker that
    builds the same random model gets the same weights."""
    import torch

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def load_hf(model_cls, name_or_path: str, allow_random: bool = False, **kwargs) -> Loaded:
    """A transformers model from a local folder or cached id; random init from its config only if allowed."""
    from transformers import AutoConfig

    try:
        model = model_cls.from_pretrained(name_or_path, local_files_only=True, **kwargs)
        return Loaded(model.eval(), f"pretrained:{name_or_path}", {})
    except (OSError, ValueError) as exc:
        if not allow_random:
            raise WeightsMissing(f"could not load {model_cls.__name__} weights from {name_or_path!r}: {exc}. "
                                 f"{HUB_HINT}") from exc
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsMissing(f"--allow-random-weights needs at least a model config at {name_or_path!r}: {exc}") from exc
    # Auto* classes build from a config with from_config; concrete model classes with _from_config
    factory = getattr(model_cls, "from_config", None) or model_cls._from_config
    with seeded(RANDOM_INIT_SEED):
        model = factory(config)
    return Loaded(model.eval(), "random", {})


def load_tokenizer(name_or_path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name_or_path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise WeightsMissing(f"could not load a tokenizer from {name_or_path!r}: {exc}. {HUB_HINT}") from exc
