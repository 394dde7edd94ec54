"""A controlled check of the trainer's verdict that needs no pretrained weights, through the commands only:
rendered shapes whose colour and shape the caption names (the image decides two caption words), and the same
images with the captions shuffled across them. `mmcorpus pairs` builds both datasets, `mmcorpus train` (tiny
random models, k-fold over images) judges them: the first must be informative, the twin never."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from mmcorpus.pipelines.cli import main
from tests.test_trainer_data import one_torch_thread, tiny_clip_json, tiny_lm, word_tokenizer  # noqa: F401

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("circle", "square", "triangle")
N_IMAGES = 48


def render(rng: random.Random, colour: str, shape: str):
    """A 96 px image: a noisy grey background and one filled shape at a random place and size."""
    from PIL import Image, ImageDraw

    noise = bytes(min(255, max(0, round(rng.gauss(128, 40)))) for _ in range(96 * 96))  # seeded, unlike effect_noise
    img = Image.frombytes("L", (96, 96), noise).convert("RGB")
    draw = ImageDraw.Draw(img)
    r = rng.randint(18, 32)
    x, y = rng.randint(r, 96 - r), rng.randint(r, 96 - r)
    fill = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[colour])
    if shape == "circle":
        draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
    elif shape == "square":
        draw.rectangle((x - r, y - r, x + r, y + r), fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return img


def write_coco_folder(folder, images, captions):
    (folder / "images").mkdir(parents=True)
    with open(folder / "captions.jsonl", "w") as f:
        for i, (img, caps) in enumerate(zip(images, captions)):
            name = f"{i:05d}.jpg"
            img.save(folder / "images" / name, quality=92)
            f.write(json.dumps({"file_name": name, "image_id": i, "width": 96, "height": 96, "captions": caps}) + "\n")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """Both datasets built by `mmcorpus pairs` (tiny random CLIP), plus a tokenizer and tiny LM for `train`."""
    root = tmp_path_factory.mktemp("shapes")
    rng = random.Random(0)
    images, captions = [], []
    for i in range(N_IMAGES):
        colour, shape = list(COLOURS)[i % 4], SHAPES[(i // 4) % 3]
        images.append(render(rng, colour, shape))
        captions.append([f"a {colour} {shape} on grey noise", f"there is one {colour} {shape} here"])
    order = list(range(N_IMAGES))
    rng.shuffle(order)
    shuffled = [captions[order[(order.index(i) + 1) % N_IMAGES]] for i in range(N_IMAGES)]  # a derangement
    clip = tiny_clip_json(root)
    outs = {}
    for name, caps in (("true", captions), ("shuffled", shuffled)):  # --min-clip-score -1: random CLIP, keep all
        write_coco_folder(root / f"src-{name}", images, caps)
        outs[name] = root / name
        assert main(["pairs", str(root / f"src-{name}"), "--output", str(outs[name]), "--allow-random-weights",
                     "--clip-model", clip, "--workers", "1", "--num-shards", "1", "--min-clip-score", "-1",
                     "--dedup", "none"]) == 0  # every photo is distinct; no near-duplicate may thin the held-out set
    tok = word_tokenizer([{"captions": c} for c in captions], root / "tok")
    from mmcorpus.trainer.weights import load_tokenizer

    return {"root": root, "clip": clip, "tok": tok, "vocab": len(load_tokenizer(tok)), "data": outs}


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cli_verdicts_on_rendered_shapes_and_shuffled_twin(shapes, tmp_path, capsys, seed):
    lm = tiny_lm(tmp_path / "lm", shapes["vocab"], init_range=0.2, seed=seed)
    datasets = [{"name": name, "path": str(path), "kind": "pair", "batch_size": 16, "max_seq_len": 12,
                 "holdout": 0.2} for name, path in shapes["data"].items()]
    cfg = {"seed": seed,
           "model": {"vision": shapes["clip"], "lm": lm, "tokenizer": shapes["tok"], "num_latents": 8,
                     "resampler_depth": 1, "dim_head": 16},
           "data": {"mode": "round_robin", "num_workers": 0, "datasets": datasets},
           "train": {"steps": 4, "lr": 3e-3, "gate_lr_mult": 30, "warmup_steps": 1, "log_every": 4,
                     "eval_every": 4, "checkpoint_every": 4},
           "eval": {"max_samples": 64, "bootstrap": 500, "shuffles": 2, "kfold": 3, "kfold_epochs": 6,
                    "kfold_patience": 1}}
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "train.yaml"), "--output", str(out),
                 "--allow-random-weights"]) == 0
    report = json.loads((out / "report.json").read_text())
    true, twin = report["datasets"]["true"], report["datasets"]["shuffled"]
    print(seed, {n: (d["verdict"], d["gap_shuffled"]) for n, d in report["datasets"].items()})
    assert true["n_eval"] == twin["n_eval"] == 2 * N_IMAGES  # every caption of every photo, each held out once
    assert true["verdict"] == "informative"
    assert twin["verdict"] in ("not_informative", "inconclusive")
    assert twin["gap_shuffled"]["ci95"][0] <= 0 < true["gap_shuffled"]["ci95"][0]
    assert "verdict_rule" in report and "measured" in report and "true: informative" in capsys.readouterr().out
