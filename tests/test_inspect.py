"""`mmcorpus inspect` on real runs: M3W text with <image> markers where the images sit, pairs with captions and
scores, and rejects grouped by reason with examples."""

import collections
import re

import pyarrow.parquet as pq
import pytest

from mmcorpus.filters.m3w import END_OF_CHUNK, IMAGE
from mmcorpus.pipelines.cli import main
from tests.test_card import real_run


@pytest.fixture(scope="module")
def docs(tmp_path_factory, shared_data):
    return real_run("interleaved", tmp_path_factory, shared_data)


@pytest.fixture(scope="module")
def pairs(tmp_path_factory, shared_data):
    return real_run("pairs", tmp_path_factory, shared_data)


def first_rows(folder, n, columns):
    out = []
    for f in sorted(folder.iterdir()):
        out += pq.read_table(f, columns=columns).to_pylist()
    return out[:n]


def printed_documents(text: str) -> list[str]:
    """The M3W bodies of the printed documents (header and image list lines dropped)."""
    docs, current = [], None
    for line in text.splitlines():
        if line.startswith("--- "):
            current = []
            docs.append(current)
        elif line.startswith("== "):
            current = None
        elif current is not None and not line.startswith(f"  {IMAGE} "):
            current.append(line)
    return ["\n".join(d).strip() for d in docs]


def test_documents_show_image_markers_where_the_images_sit(docs, capsys):
    assert main(["inspect", str(docs), "-n", "4", "--max-chars", "1000000"]) == 0
    out = capsys.readouterr().out
    rows = first_rows(docs / "data", 4, ["doc_id", "texts", "images"])
    bodies = printed_documents(out)
    assert len(bodies) == 4
    for row, body in zip(rows, bodies):
        assert row["doc_id"] in out
        # walk the positions: every text appears in order, and between two texts exactly as many markers as
        # the document has images between them
        cursor = 0
        pending_images = 0
        for text, image in zip(row["texts"], row["images"]):
            if image is not None:
                pending_images += 1
                continue
            if not text.strip():
                continue
            at = body.index(text.strip(), cursor)
            assert body[cursor:at].count(IMAGE) == pending_images
            cursor, pending_images = at + len(text.strip()), 0
        assert body[cursor:].count(IMAGE) == pending_images
        assert body.count(IMAGE) == sum(i is not None for i in row["images"])
        assert body.count(END_OF_CHUNK) == body.count(IMAGE)
        for url in (i for i in row["images"] if i is not None):
            assert url in out


def test_rejects_by_reason_with_examples(docs, capsys):
    assert main(["inspect", str(docs), "-n", "0"]) == 0
    out = capsys.readouterr().out
    table = pq.read_table(docs / "rejects").to_pylist()
    counts = collections.Counter((r["stage"], r["reason"]) for r in table)
    assert f"== {len(table):,} rejects" in out
    for (stage, reason), n in counts.items():
        assert f"{reason}  (stage {stage}): {n:,}" in out
    first = next(r for r in table if r["reason"] == "no_images")
    assert "kept documents" not in out  # -n 0 prints no documents

    assert main(["inspect", str(docs), "--reason", "no_images"]) == 0
    only = capsys.readouterr().out
    assert set(re.findall(r"^(\w+)  \(stage", only, re.M)) == {"no_images"}
    examples = [r["source"] for r in table if r["reason"] == "no_images"]
    shown = [line.strip() for line in only.splitlines() if line.startswith("    ") and not line.startswith("        ")]
    per_stage = collections.Counter(r["stage"] for r in table if r["reason"] == "no_images")  # 10 examples each
    assert len(shown) == sum(min(10, n) for n in per_stage.values()) and set(shown) <= set(examples)
    assert first["source"]
    assert "0 images < min 1" in only


def test_pairs_show_caption_and_scores(pairs, capsys):
    assert main(["inspect", str(pairs), "-n", "3"]) == 0
    out = capsys.readouterr().out
    for row in first_rows(pairs / "data", 3, ["image_id", "caption", "clip_score", "width", "height"]):
        assert f"--- {row['image_id']}" in out
        assert f"caption: {row['caption']}" in out
        assert f"clip_score {row['clip_score']:.3f}" in out and f"{row['width']}x{row['height']}" in out
    assert "clip_score_low  (stage clip_filter)" in out


def test_not_an_output_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no data/ or rejects/" in capsys.readouterr().err
