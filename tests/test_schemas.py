"""Schemas round-trip through pyarrow, DuckDB and Hugging Face datasets; validate names the bad column/row."""

import hashlib
import io
import json

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mmcorpus import schemas


def coco_pairs(coco, n=6):
    rows = []
    with open(coco / "captions.jsonl") as f:
        for line in list(f)[:n]:
            rec = json.loads(line)
            data = (coco / "images" / rec["file_name"]).read_bytes()
            rows.append({
                "image_id": str(rec["image_id"]), "url": rec["flickr_url"], "image_bytes": data,
                "image_path": None, "caption": rec["captions"][0], "caption_source": "web", "clip_score": None,
                "width": rec["width"], "height": rec["height"], "sha256": hashlib.sha256(data).hexdigest(),
                "source_dataset": "coco-mini", "metadata": schemas.metadata_json({"license": rec["license"]}),
            })
    return rows


def interleaved_doc(coco):
    pairs = coco_pairs(coco, 2)
    infos = [{"url": p["url"], "sha256": p["sha256"], "width": p["width"], "height": p["height"],
              "phash": None, "bytes": p["image_bytes"], "path": None, "alt": p["caption"]} for p in pairs]
    return {
        "doc_id": "d1", "url": "https://example.org/a", "warc_record_id": None, "crawl_date": "2024-01-01T00:00:00Z",
        "language": "en", "language_score": 0.99, "source": "test",
        "texts": ["An introduction.", None, pairs[0]["caption"], None],
        "images": [None, pairs[0]["url"], None, pairs[1]["url"]],
        "image_info": [None, infos[0], None, infos[1]],
        "metadata": schemas.metadata_json({"title": "t"}),
    }


def write(tmp_path, rows, name):
    path = tmp_path / f"{name}.parquet"
    pq.write_table(schemas.to_table(rows, name, "fp1"), path)
    return path


def test_pair_round_trip_pyarrow_duckdb_datasets(tmp_path, coco):
    rows = coco_pairs(coco)
    path = write(tmp_path, rows, "pair")
    assert schemas.read_schema_name(str(path)) == ("pair", schemas.SCHEMA_VERSION)
    back = schemas.read_table(str(path), "pair").to_pylist()
    assert back == [{**{f: None for f in schemas.PAIR.names}, **r} for r in rows]
    con = duckdb.connect()
    got = con.execute(f"select image_id, width, octet_length(image_bytes) from read_parquet('{path}') order by image_id").fetchall()
    assert got == sorted((r["image_id"], r["width"], len(r["image_bytes"])) for r in rows)
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    assert ds.num_rows == len(rows)
    image = Image.open(io.BytesIO(ds[0]["image_bytes"]))
    assert image.size == (rows[0]["width"], rows[0]["height"])


def test_interleaved_round_trip_pyarrow_duckdb_datasets(tmp_path, coco):
    doc = interleaved_doc(coco)
    path = write(tmp_path, [doc], "interleaved")
    assert schemas.read_table(str(path), "interleaved").to_pylist()[0]["images"] == doc["images"]
    con = duckdb.connect()
    n_images, first_width = con.execute(
        f"select len(list_filter(images, lambda x: x is not null)), image_info[2].width from read_parquet('{path}')").fetchone()
    assert (n_images, first_width) == (2, doc["image_info"][1]["width"])
    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(path), split="train")
    row = ds[0]
    assert row["texts"] == doc["texts"] and row["images"] == doc["images"]
    assert row["image_info"][0] is None and row["image_info"][1]["bytes"] == doc["image_info"][1]["bytes"]


def test_validate_catches_misaligned_texts_and_images(coco):
    doc = interleaved_doc(coco)
    bad = dict(doc, images=doc["images"][:-1])
    with pytest.raises(schemas.SchemaError, match=r"column 'images', row 0: 3 images for 4 texts"):
        schemas.to_table([doc, bad][::-1], "interleaved")
    both = dict(doc, texts=["x", "y", "z", "w"])
    with pytest.raises(schemas.SchemaError, match=r"row 1: position 1 has both"):
        schemas.to_table([doc, both], "interleaved")
    neither = dict(doc, texts=[None, None, "z", None])
    with pytest.raises(schemas.SchemaError, match=r"position 0 has neither"):
        schemas.to_table([neither], "interleaved")
    info_off = dict(doc, image_info=[doc["image_info"][1], None, None, doc["image_info"][3]])
    with pytest.raises(schemas.SchemaError, match=r"column 'image_info', row 0"):
        schemas.to_table([info_off], "interleaved")


def test_validate_names_type_missing_and_null_columns(coco):
    rows = coco_pairs(coco, 2)
    table = pa.Table.from_pylist(rows, schema=schemas.PAIR)
    with pytest.raises(schemas.SchemaError, match="column 'caption': missing"):
        schemas.validate(table.drop_columns(["caption"]), "pair")
    wrong = table.set_column(table.schema.get_field_index("width"), "width", pa.array([1.0, 2.0]))
    with pytest.raises(schemas.SchemaError, match="column 'width': type double is not int32"):
        schemas.validate(wrong, "pair")
    with pytest.raises(schemas.SchemaError, match="column 'caption', row 1: is null"):
        schemas.to_table([rows[0], dict(rows[1], caption=None)], "pair")
    with pytest.raises(schemas.SchemaError, match="caption_source.*row 0"):
        schemas.to_table([dict(rows[0], caption_source="ocr")], "pair")


def test_reader_refuses_files_of_another_schema(tmp_path, coco):
    path = write(tmp_path, coco_pairs(coco, 1), "pair")
    with pytest.raises(schemas.SchemaError, match="holds 'pair' rows, expected 'interleaved'"):
        schemas.read_table(str(path), "interleaved")
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"a": [1]}), plain)
    with pytest.raises(schemas.SchemaError, match="not an mmcorpus file"):
        schemas.read_table(str(plain), "pair")


def test_run_stats_validate_names_the_bad_key_or_stage(tmp_path, coco):
    from mmcorpus.pipelines.runtime.run import RunSpec, execute
    from tests.test_sink import build_for, caption_rows, run_args
    from mmcorpus.pipelines.runtime.sink import Kind

    spec = RunSpec(command="test-stats", out_dir=str(tmp_path), config={}, inputs=[],
                   kinds={"data": Kind("pair", "data", 1)}, stages=["read", "length"])
    stats = execute(spec, run_args(), build_for(caption_rows(coco)[:30]))
    on_disk = json.loads((tmp_path / "stats.json").read_text())
    assert schemas.validate_stats(on_disk) is on_disk
    assert on_disk["schema_version"] == schemas.SCHEMA_VERSION and on_disk["wall_seconds"] >= 0
    length = next(s for s in on_disk["stages"] if s["stage"] == "length")
    assert length["in"] == 30 == length["out"] + length["rejected"] and length["reasons"]
    assert stats["stages"] == on_disk["stages"]
    assert length["cpu_seconds"] is not None and length["cpu_seconds"] >= 0  # every Stage times its function

    def broken(**change):
        bad = json.loads(json.dumps(on_disk))
        for key, value in change.items():
            if value is None:
                del bad[key]
            else:
                bad[key] = value
        return bad

    with pytest.raises(schemas.SchemaError, match="key 'wall_seconds' is missing"):
        schemas.validate_stats(broken(wall_seconds=None))
    with pytest.raises(schemas.SchemaError, match="schema version 9.0"):
        schemas.validate_stats(broken(schema_version="9.0"))
    stages = json.loads(json.dumps(on_disk["stages"]))
    stages[1]["reasons"] = {r: n + 1 for r, n in stages[1]["reasons"].items()}
    with pytest.raises(schemas.SchemaError, match="stage 'length' \\(row 1\\): rejects by reason add up"):
        schemas.validate_stats(broken(stages=stages))
    stages[1]["in"] = None
    with pytest.raises(schemas.SchemaError, match="column 'in', row 1: is null"):
        schemas.validate_stats(broken(stages=stages))
    stages = json.loads(json.dumps(on_disk["stages"]))
    stages[1]["cpu_seconds"] = -1.0
    with pytest.raises(schemas.SchemaError, match="stage 'length' \\(row 1\\): cpu_seconds -1.0"):
        schemas.validate_stats(broken(stages=stages))
    stages[1]["cpu_seconds"] = "fast"
    with pytest.raises(schemas.SchemaError, match="run_stage schema"):
        schemas.validate_stats(broken(stages=stages))
    del stages[1]["cpu_seconds"]  # stats written before stages were timed stay valid
    assert schemas.validate_stats(broken(stages=stages))
