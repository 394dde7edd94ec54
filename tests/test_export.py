"""`mmcorpus export` on real pipeline outputs (coco-mini pairs from tests/test_card.py's run, photo stories crawled
from demo/photo_pages.py's site on 127.0.0.1), read back with the `webdataset` library, Hugging Face `datasets`,
an OpenFlamingo-style MMC4 reading and the trainer's `format: webdataset` reader."""

from __future__ import annotations

import base64
import collections
import glob
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading

import pyarrow.parquet as pq
import pytest
import yaml

from mmcorpus import schemas
from mmcorpus.pipelines.cli import main
from mmcorpus.trainer import data as D
from tests.test_card import real_run
from tests.test_trainer_data import assets, coco_records, load_tok  # noqa: F401  (fixture and helpers)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def export(source, out, fmt, *extra):
    return main(["export", str(source), "--format", fmt, "-o", str(out), "--workers", "1", *extra])


def source_rows(folder) -> list[dict]:
    return pq.read_table(os.path.join(folder, "data")).to_pylist()


def stats(out) -> dict:
    return json.loads((out / "stats.json").read_text())


@pytest.fixture(scope="module")
def pairs_run(tmp_path_factory, shared_data):
    return real_run("pairs", tmp_path_factory, shared_data)


@pytest.fixture(scope="module")
def stories_run(tmp_path_factory, shared_data):
    """A real `mmcorpus interleaved` crawl of 2 photo-story pages (8 coco-mini photos) served on 127.0.0.1."""
    base = tmp_path_factory.mktemp("stories")
    coco = base / "coco8"
    (coco / "images").mkdir(parents=True)
    lines = (shared_data / "coco-mini" / "captions.jsonl").read_text().splitlines()[:8]
    (coco / "captions.jsonl").write_text("\n".join(lines) + "\n")
    for line in lines:
        name = json.loads(line)["file_name"]
        os.symlink(shared_data / "coco-mini" / "images" / name, coco / "images" / name)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    subprocess.run([sys.executable, os.path.join(REPO, "demo", "photo_pages.py"), str(coco), str(base / "site"),
                    str(base / "urls.txt"), f"http://127.0.0.1:{port}"], check=True, capture_output=True)
    handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(base / "site"), **kw)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.RequestHandlerClass.log_message = lambda *a: None
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        code = main(["interleaved", str(base / "urls.txt"), "--allow-private-network", "--config",
                     os.path.join(REPO, "demo", "stories.yaml"), "--workers", "1", "--num-shards", "1",
                     "--output", str(base / "stories")])
    finally:
        server.shutdown()
    assert code == 0
    return base / "stories"


def tar_urls(out) -> list[str]:
    return sorted(glob.glob(str(out / "data" / "*.tar")))


def test_pairs_webdataset_read_back_with_webdataset(pairs_run, tmp_path):
    import webdataset as wds

    out = tmp_path / "wds"
    assert export(pairs_run, out, "webdataset", "--samples-per-shard", "50") == 0
    src = source_rows(pairs_run)
    by_id = {r["image_id"]: r for r in src}
    urls = tar_urls(out)
    assert [os.path.basename(u) for u in urls] == [f"part-{i:05d}-of-{len(urls):05d}.tar" for i in range(len(urls))]
    assert len(urls) == -(-len(src) // 50)
    seen = []
    for sample in wds.WebDataset(urls, shardshuffle=False):
        meta = json.loads(sample["json"])
        row = by_id[meta["image_id"]]
        image = sample.get("jpg") or sample.get("png") or sample.get("webp")
        assert image == row["image_bytes"]  # written as stored
        assert sample["txt"].decode() == row["caption"] == meta["caption"]
        assert meta["key"] == sample["__key__"]
        for field in ("url", "sha256", "width", "height", "caption_source", "source_dataset"):
            assert meta[field] == row[field], field
        for field in ("clip_score", "itm_score"):
            assert meta[field] == pytest.approx(row[field]) if row[field] is not None else meta[field] is None
        seen.append(sample["__key__"])
    assert len(seen) == len(set(seen)) == len(src) == stats(out)["totals"]["written"]
    # img2dataset's per-shard index and _stats.json beside each tar
    for i, url in enumerate(urls):
        index = schemas.read_table(url[:-4] + ".parquet", "export_index").to_pylist()
        keys = [k for k in seen if int(k) // 50 == i]
        assert [r["key"] for r in index] == keys and all(r["status"] == "success" for r in index)
        shard = json.loads(open(url[:-4] + "_stats.json").read())
        assert shard["successes"] == len(keys) and shard["count"] == min(50, len(src) - 50 * i)

    # resume: a run killed after some shards rewrites only the missing ones, byte for byte the same
    kept = {u: open(u, "rb").read() for u in urls}
    mtime = os.stat(urls[0]).st_mtime_ns
    os.remove(urls[-1])
    for name in ("_SUCCESS", "stats.json"):
        os.remove(out / name)
    assert export(pairs_run, out, "webdataset", "--samples-per-shard", "50") == 0
    assert {u: open(u, "rb").read() for u in tar_urls(out)} == kept and os.stat(urls[0]).st_mtime_ns == mtime
    assert stats(out)["resumed"] is True


def test_pairs_hf_folder_loads_with_datasets(pairs_run, tmp_path):
    import datasets
    from PIL import Image

    out = tmp_path / "hf"
    assert export(pairs_run, out, "hf", "--samples-per-shard", "80") == 0
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "hf-cache"))
    src = {r["image_id"]: r for r in source_rows(pairs_run)}
    assert len(ds) == len(src) and isinstance(ds.features["image"], datasets.Image)
    raw = ds.cast_column("image", datasets.Image(decode=False))
    for row, undecoded in zip(ds.select(range(10)), raw.select(range(10))):
        assert isinstance(row["image"], Image.Image) and row["image"].size == (row["width"], row["height"])
        assert undecoded["image"]["bytes"] == src[row["image_id"]]["image_bytes"]
        assert row["caption"] == src[row["image_id"]]["caption"]
    front = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert front["configs"][0]["data_files"] == [{"split": "train", "path": "data/part-*.parquet"}]
    assert [f["name"] for f in front["dataset_info"]["features"]] == list(ds.features)
    assert front["dataset_info"]["splits"][0]["num_examples"] == len(ds)


@pytest.mark.slow
def test_photo_stories_mmc4_obelics_and_hf(stories_run, tmp_path):
    import datasets
    import webdataset as wds

    docs = {r["doc_id"]: r for r in source_rows(stories_run)}
    assert docs and all(i and i["bytes"] for r in docs.values() for i in r["image_info"] if i is not None)
    out = tmp_path / "wds"
    assert export(stories_run, out, "webdataset") == 0
    n = 0
    for (raw,) in wds.WebDataset(tar_urls(out), shardshuffle=False).to_tuple("json"):
        info = json.loads(raw)  # what OpenFlamingo's preprocess_interleaved reads
        doc = docs[info["doc_id"]]
        assert info["texts"] == doc["texts"] and info["text_list"] == [t for t in doc["texts"] if t is not None]
        positions = [p for p, u in enumerate(doc["images"]) if u is not None]
        assert len(info["image_info"]) == len(positions) == len(info["similarity_matrix"])
        for image, pos, sims in zip(info["image_info"], positions, info["similarity_matrix"]):
            assert base64.b64decode(image["image_base64"]) == doc["image_info"][pos]["bytes"]
            assert image["raw_url"] == doc["images"][pos] and info["images"][pos] == image["image_name"]
            following = [t for t in doc["texts"][pos:] if t is not None]
            matched = info["text_list"][image["matched_text_index"]]
            assert matched == (following[0] if following else info["text_list"][-1])
            assert len(sims) == len(info["text_list"]) and sims[image["matched_text_index"]] == image["matched_sim"]
        n += 1
    assert n == len(docs)

    hf = tmp_path / "hf"
    assert export(stories_run, hf, "hf") == 0
    ds = datasets.load_dataset(str(hf), split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert len(ds) == len(docs)
    for row in ds:
        doc = docs[row["doc_id"]]
        assert row["texts"] == doc["texts"]
        assert [img is not None for img in row["images"]] == [u is not None for u in doc["images"]]
        assert all(img.size[0] > 0 for img in row["images"] if img is not None)


@pytest.mark.slow
def test_trainer_reads_the_webdataset_export(pairs_run, stories_run, assets, tmp_path):  # noqa: F811
    tok, tf = load_tok(assets), D.image_transform(64)
    for source, kind in ((pairs_run, "pair"), (stories_run, "interleaved")):
        out = tmp_path / kind
        assert export(source, out, "webdataset", "--samples-per-shard", "40") == 0
        parquet = D.DatasetSpec("p", str(source), kind, holdout=0.3)
        shipped = D.DatasetSpec("w", str(out), kind, holdout=0.3, format="webdataset")
        for split in ("eval", "train"):
            a, _ = D.split_samples(parquet, tok, tf, 10_000, split)
            b, _ = D.split_samples(shipped, tok, tf, 10_000, split)
            assert a, (kind, split)  # the same samples (a photo's captions share its key: compare whole samples)
            assert sorted((s.key, s.input_ids, s.image_keys) for s in a) == \
                   sorted((s.key, s.input_ids, s.image_keys) for s in b)
    mix = D.MixtureSpec.from_dict({"datasets": [{"path": str(tmp_path / "pair"), "kind": "pair",
                                                 "format": "webdataset", "batch_size": 4}]})
    batch = next(D.DatasetLoader(mix.datasets[0], tok, tf, num_workers=0))
    assert batch["images"].shape == (4, 1, 3, 64, 64)


def one_line_error(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


def test_bad_inputs_and_image_formats(pairs_run, tmp_path_factory, shared_data, tmp_path, capsys):
    import webdataset as wds
    from PIL import Image

    # not an mmcorpus output
    err = one_line_error(capsys, ["export", str(shared_data / "coco-mini"), "--format", "hf", "-o", str(tmp_path / "x")])
    assert "not an mmcorpus output" in err
    # an output that exists
    out = tmp_path / "done"
    assert export(pairs_run, out, "hf") == 0
    assert "already holds a finished run" in one_line_error(
        capsys, ["export", str(pairs_run), "--format", "hf", "-o", str(out)])
    assert "card the output it was exported from" in one_line_error(capsys, ["card", str(out)])
    # a truncated shard
    broken = tmp_path / "broken"
    shutil.copytree(pairs_run, broken)
    shard = sorted((broken / "data").glob("*.parquet"))[0]
    shard.write_bytes(shard.read_bytes()[:5000])
    err = one_line_error(capsys, ["export", str(broken), "--format", "webdataset", "-o", str(tmp_path / "y")])
    assert shard.name in err
    # an image whose bytes do not decode, and one truncated: reject rows, the rest exported
    bad = tmp_path / "bad"
    shutil.copytree(pairs_run, bad)
    shard = sorted((bad / "data").glob("*.parquet"))[0]
    rows = schemas.read_table(str(shard), "pair").to_pylist()
    rows[0]["image_bytes"] = b"\xff\xd8\xff\xe0 not a jpeg at all"
    rows[1]["image_bytes"] = rows[1]["image_bytes"][: len(rows[1]["image_bytes"]) // 2]
    png = io.BytesIO()  # and a PNG: written as stored, or re-encoded on request
    Image.open(io.BytesIO(rows[2]["image_bytes"])).save(png, format="PNG")
    rows[2]["image_bytes"] = png.getvalue()
    pq.write_table(schemas.to_table(rows, "pair"), shard)
    src = {r["image_id"]: r for r in source_rows(bad)}
    for image_format in ("keep", "jpg"):
        out = tmp_path / f"bad-out-{image_format}"
        assert export(bad, out, "webdataset", "--image-format", image_format) == 0
        st = stats(out)
        rejects = pq.read_table(out / "rejects").to_pylist()
        assert collections.Counter(r["reason"] for r in rejects) == {"image_decode_failed": 2}
        assert st["totals"]["read"] == st["totals"]["written"] + st["totals"]["rejected"] == len(src)
        for sample in wds.WebDataset(tar_urls(out), shardshuffle=False):
            meta = json.loads(sample["json"])
            if meta["image_id"] != rows[2]["image_id"]:
                assert sample["jpg"] == src[meta["image_id"]]["image_bytes"]
            elif image_format == "keep":
                assert "jpg" not in sample and sample["png"] == png.getvalue()
            else:
                assert "png" not in sample and Image.open(io.BytesIO(sample["jpg"])).format == "JPEG"
                assert (meta["width"], meta["height"]) == Image.open(io.BytesIO(png.getvalue())).size


def test_rows_without_image_bytes_are_rejects(tmp_path_factory, shared_data, tmp_path):
    run = real_run("interleaved", tmp_path_factory, shared_data)  # a --no-images run
    assert export(run, tmp_path / "out", "webdataset") == 0
    st = stats(tmp_path / "out")
    reasons = collections.Counter(r["reason"] for r in pq.read_table(tmp_path / "out" / "rejects").to_pylist())
    assert st["totals"]["written"] == 0 and st["totals"]["read"] == len(source_rows(run)) == sum(reasons.values())
    assert set(reasons) <= {"no_image_bytes", "no_images"} and reasons["no_image_bytes"] > 0


def test_tar_stream_is_tarfiles_layout_and_keys_are_counted_from_headers():
    import tarfile

    from mmcorpus.pipelines.export.writers import TarStream, tar_keys

    members = [("000000000.jpg", os.urandom(1000)), ("000000000.txt", b""), ("000000000.json", b"{}"),
               ("000000001.webp", os.urandom(512)), ("caf\u00e9-2.txt", b"non-ASCII name: tarfile's own header")]
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            tar.addfile(info, io.BytesIO(data))
    got = io.BytesIO()
    stream = TarStream(got)
    for name, data in members:
        stream.add(name, data)
    stream.close()
    assert got.getvalue() == expected.getvalue()
    assert tar_keys(io.BytesIO(got.getvalue())) == {"000000000", "000000001", "caf\u00e9-2"}
    for cut in (got.getvalue()[:1500], got.getvalue()[:512 * 3]):  # cut in a member's data, and after a header
        with pytest.raises(ValueError, match="cut off"):
            tar_keys(io.BytesIO(cut))
    damaged = bytearray(got.getvalue())
    damaged[5] ^= 1
    with pytest.raises(ValueError, match="checksum"):
        tar_keys(io.BytesIO(bytes(damaged)))


def test_export_from_and_to_s3(pairs_run, s3_endpoint):
    """SOURCE and OUT on moto's S3 (through schemas/storage.py): the tars, their index and stats land there whole
    (the Hugging Face shards are written through the same storage calls)."""
    import tarfile

    import boto3

    from mmcorpus.schemas import storage

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    client.create_bucket(Bucket="mm-export")
    for path in pairs_run.rglob("*"):
        rel = path.relative_to(pairs_run).as_posix()
        if path.is_file() and (rel.startswith("data/") or rel in ("stats.json", "_SUCCESS")):
            client.upload_file(str(path), "mm-export", f"src/{rel}")
    src = {r["image_id"]: r for r in source_rows(pairs_run)}
    out, per_shard = "s3://mm-export/wds", -(-len(src) // 2)
    assert main(["export", "s3://mm-export/src", "--format", "webdataset", "-o", out, "--samples-per-shard",
                 str(per_shard), "--workers", "1"]) == 0
    st = json.loads(storage.read_bytes(f"{out}/stats.json"))
    assert st["totals"]["written"] == len(src) and storage.exists(f"{out}/_SUCCESS")
    assert [storage.basename(p) for p in storage.glob(f"{out}/data/part-*")] == \
           [f"part-{i:05d}-of-00002{s}" for i in range(2) for s in (".parquet", ".tar", "_stats.json")]
    assert not storage.glob(f"{out}/_tmp/*")
    seen = 0
    for i in range(2):
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(f"{out}/data/part-{i:05d}-of-00002.tar"))) as tar:
            for member in tar:
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    assert tar.extractfile(f"{meta['key']}.jpg").read() == src[meta["image_id"]]["image_bytes"]
                    seen += 1
    assert seen == len(src)


def test_shards_span_source_files_and_row_groups(pairs_run, tmp_path):
    """Output shards cut across source files and row groups: keys are the global row numbers, in order, and each
    sample holds its source row's bytes."""
    import webdataset as wds

    rows = source_rows(pairs_run)
    src = tmp_path / "split"
    shutil.copytree(pairs_run, src, ignore=shutil.ignore_patterns("data"))
    (src / "data").mkdir()
    cuts = [0, len(rows) // 3, len(rows) // 3 + 5, len(rows)]  # three files, one of 5 rows
    for i, (a, b) in enumerate(zip(cuts, cuts[1:])):
        pq.write_table(schemas.to_table(rows[a:b], "pair"), src / "data" / f"part-{i:05d}-of-00003.parquet",
                       row_group_size=7)
    out = tmp_path / "wds"
    assert export(src, out, "webdataset", "--samples-per-shard", "11") == 0
    samples = list(wds.WebDataset(tar_urls(out), shardshuffle=False))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(len(rows))]
    for sample, row in zip(samples, rows):
        assert sample["jpg"] == row["image_bytes"] and json.loads(sample["json"])["image_id"] == row["image_id"]
