"""Dataset cards generated from what a run measured: `OUT/README.md` with Hugging Face YAML front matter and
PNG plots beside it.

Everything in the card comes from `OUT/stats.json` (the run manifest and its counters) and from streaming the
Parquet files with column projection (`iter_batches`; image bytes are never read: their presence comes from
the Parquet column statistics). Before writing, the counts in stats.json are checked against the rows in the
files, per stage and reject reason, so a card never describes files that changed after the run.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import yaml

from mmcorpus import schemas
from mmcorpus.schemas import storage
from mmcorpus.pipelines.outputs import plots
from mmcorpus.pipelines.errors import UserError

CARD = "README.md"
DATA_GLOB = "data/part-*.parquet"
REJECTS_GLOB = "rejects/part-*.parquet"
SAMPLE_CAP = 500_000  # values kept per distribution (every k-th beyond that); counts stay exact
LANGID_SAMPLE = 2000  # captions language-identified for pair datasets
HIDDEN_COUNTERS = ("score_bin_", "hist_")  # histogram bins kept in stats.json, drawn as plots instead

TASKS = {"interleaved": ["image-text-to-text", "visual-question-answering"],
         "pair": ["image-to-text", "text-to-image", "zero-shot-image-classification"]}
SIZES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
         (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"),
         (10_000_000_000, "1B<n<10B")]
FIELD_DOCS = {
    "interleaved": {
        "doc_id": "stable document id", "url": "page URL", "warc_record_id": "WARC-Record-ID of the source record",
        "crawl_date": "crawl date (ISO 8601)", "language": "ISO 639-1 language code",
        "language_score": "language-ID probability", "texts": "text at each position (null where an image sits)",
        "images": "image URL at each position (null where a text sits)",
        "image_info": "per position: url, sha256, width, height, phash, bytes, path, alt, nsfw_score (null at text positions)",
        "source": "input file and offset, or URL", "metadata": "JSON object with extra fields"},
    "pair": {
        "image_id": "stable image id", "url": "image URL", "image_bytes": "encoded image (when embedded)",
        "image_path": "image file path (when not embedded)", "caption": "the caption",
        "caption_source": "web (alt text, human caption) or synthetic (captioner)",
        "clip_score": "CLIP cosine similarity of image and caption", "itm_score": "BLIP ITM match probability",
        "nsfw_score": "NSFW head probability over the CLIP image embedding (null: not run)",
        "width": "image width (px)", "height": "image height (px)", "sha256": "sha256 of the image bytes",
        "phash": "64-bit perceptual hash (16 hex digits)", "source_dataset": "input dataset name",
        "clip_embedding": "float16 image embedding (optional)", "metadata": "JSON object with extra fields"},
}


# ---- Hugging Face front matter -----------------------------------------------------------------------------

_DTYPES = {pa.string(): "string", pa.large_string(): "large_string", pa.binary(): "binary",
           pa.large_binary(): "large_binary", pa.bool_(): "bool", pa.float16(): "float16", pa.float32(): "float32",
           pa.float64(): "float64", pa.int8(): "int8", pa.int16(): "int16", pa.int32(): "int32", pa.int64(): "int64",
           pa.uint8(): "uint8", pa.uint16(): "uint16", pa.uint32(): "uint32", pa.uint64(): "uint64"}


def _field(dtype: pa.DataType) -> dict:
    """One Arrow type in the YAML form `datasets` writes for `Features`: `dtype: x`, `list: x` (a list of a
    plain type), `list: [fields]` (a list of structs) or `struct: [fields]`."""
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        inner = _field(dtype.value_type)
        return {"list": inner["dtype"] if "dtype" in inner else inner.get("struct", inner)}
    if pa.types.is_struct(dtype):
        return {"struct": [{"name": f.name, **_field(f.type)} for f in dtype]}
    if dtype not in _DTYPES:
        raise UserError(f"no Hugging Face feature for Arrow type {dtype}")
    return {"dtype": _DTYPES[dtype]}


def hf_features(schema: pa.Schema) -> list[dict]:
    return [{"name": f.name, **_field(f.type)} for f in schema]


def size_category(n: int) -> str:
    for limit, label in SIZES:
        if n < limit:
            return label
    return "n>10B"


# ---- streaming profile of the kept rows ---------------------------------------------------------------------

class Sample:
    """Numbers of one distribution: exact count/sum/min/max, values kept up to SAMPLE_CAP (every k-th beyond)."""

    def __init__(self, cap: int = SAMPLE_CAP):
        self.cap, self.stride, self.seen, self.n, self.total = cap, 1, 0, 0, 0.0
        self.lo, self.hi = float("inf"), float("-inf")
        self.parts: list[np.ndarray] = []
        self.kept = 0

    def add(self, values) -> None:
        v = np.asarray(values, dtype=float)
        v = v[np.isfinite(v)]
        if v.size == 0:
            return
        self.n += v.size
        self.total += float(v.sum())
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        take = v[(np.arange(self.seen, self.seen + v.size) % self.stride) == 0]
        self.seen += v.size
        self.parts.append(take)
        self.kept += take.size
        if self.kept > self.cap:
            merged = np.concatenate(self.parts)[::2]
            self.parts, self.kept, self.stride = [merged], merged.size, self.stride * 2

    def values(self) -> np.ndarray:
        return np.concatenate(self.parts) if self.parts else np.zeros(0)

    def describe(self) -> dict:
        if not self.n:
            return {"n": 0}
        v = self.values()
        q = np.percentile(v, [5, 50, 95])
        return {"n": self.n, "mean": self.total / self.n, "min": self.lo, "p5": float(q[0]), "median": float(q[1]),
                "p95": float(q[2]), "max": self.hi}


@dataclass
class Profile:
    rows: int = 0
    counters: dict = field(default_factory=lambda: collections.defaultdict(collections.Counter))
    samples: dict = field(default_factory=lambda: collections.defaultdict(Sample))
    image_hashes: list = field(default_factory=list)
    languages_detected: int = 0
    bytes_rows: int = 0  # rows / images whose bytes are embedded (from Parquet statistics)


def data_files(out_dir: str, folder: str = "data") -> list[str]:
    d = storage.join(out_dir, folder)
    return [storage.join(d, f) for f in storage.listdir(d) if f.startswith("part-") and f.endswith(".parquet")]


def _host(url):
    try:
        return urlsplit(url).hostname or "(none)"
    except ValueError:
        return "(bad url)"


def _hash64(hexes) -> np.ndarray:
    return np.array([int(h[:16], 16) for h in hexes if h], dtype=np.uint64)


def _non_null_in_column(files: list[str], path: str) -> int:
    """Non-null values of a leaf column from the Parquet metadata alone (never reads the values)."""
    total = 0
    for f in files:
        md = schemas.open_parquet(f).metadata
        for rg in range(md.num_row_groups):
            group = md.row_group(rg)
            for c in range(group.num_columns):
                col = group.column(c)
                if col.path_in_schema == path and col.statistics is not None and col.statistics.has_null_count:
                    total += col.statistics.num_values
    return total


def profile_interleaved(files: list[str]) -> Profile:
    p = Profile()
    cols = ["url", "language", "texts", "images", "image_info.list.element.width",
            "image_info.list.element.height", "image_info.list.element.sha256"]
    for f in files:
        for batch in schemas.iter_batches(f, batch_size=1024, columns=cols):
            for row in batch.to_pylist():
                p.rows += 1
                p.counters["language"][row["language"] or "(unknown)"] += 1
                p.counters["domain"][_host(row["url"])] += 1
                texts = [t for t in row["texts"] if t is not None]
                n_img = sum(i is not None for i in row["images"])
                p.samples["images_per_doc"].add([n_img])
                p.samples["words_per_doc"].add([sum(len(t.split()) for t in texts)])
                p.samples["text_blocks_per_doc"].add([len(texts)])
                infos = [i for i in row["image_info"] or [] if i is not None]
                p.samples["width"].add([i["width"] for i in infos if i["width"]])
                p.samples["height"].add([i["height"] for i in infos if i["height"]])
                p.image_hashes.append(_hash64(i["sha256"] for i in infos))
                p.counters["images"]["with size"] += sum(1 for i in infos if i["width"])
                p.counters["images"]["total"] += n_img
    p.bytes_rows = _non_null_in_column(files, "image_info.list.element.bytes")
    return p


def profile_pairs(files: list[str]) -> Profile:
    from mmcorpus.filters.language import detect

    p = Profile()
    cols = ["url", "caption", "caption_source", "clip_score", "itm_score", "width", "height", "sha256",
            "source_dataset"]
    for f in files:
        for batch in schemas.iter_batches(f, batch_size=4096, columns=cols):
            d = batch.to_pydict()
            p.rows += batch.num_rows
            p.counters["caption_source"].update(d["caption_source"])
            p.counters["source_dataset"].update(d["source_dataset"])
            p.counters["domain"].update(_host(u) if u else "(none)" for u in d["url"])
            p.samples["caption_words"].add([len(c.split()) for c in d["caption"]])
            p.samples["clip_score"].add([v for v in d["clip_score"] if v is not None])
            for src, itm in zip(d["caption_source"], d["itm_score"]):
                if itm is not None:
                    p.samples[f"itm_{src}"].add([itm])
            p.samples["width"].add([v for v in d["width"] if v])
            p.samples["height"].add([v for v in d["height"] if v])
            p.image_hashes.append(_hash64(d["sha256"]))
            for caption in d["caption"]:
                if p.languages_detected >= LANGID_SAMPLE:
                    break
                lang, _ = detect(caption)
                p.counters["language"][lang or "(unknown)"] += 1
                p.languages_detected += 1
    p.bytes_rows = _non_null_in_column(files, "image_bytes")
    return p


def duplicate_images(p: Profile) -> tuple[int, int]:
    """(images with a sha256, of which repeat an earlier image) in the kept rows."""
    hashes = np.concatenate(p.image_hashes) if p.image_hashes else np.zeros(0, dtype=np.uint64)
    return int(hashes.size), int(hashes.size - np.unique(hashes).size)


# ---- reading and checking a run -----------------------------------------------------------------------------

@dataclass
class Run:
    out_dir: str
    stats: dict
    schema_name: str
    files: list[str]
    reject_files: list[str]
    rejects_by: dict  # (stage, reason) -> rows in rejects/


def load_run(out_dir: str) -> Run:
    try:
        if not storage.isdir(out_dir):
            raise UserError(f"{out_dir!r} is not a folder")
        stats_path = storage.join(out_dir, "stats.json")
        finished = storage.exists(storage.join(out_dir, "_SUCCESS")) and storage.exists(stats_path)
    except OSError as exc:  # an object store: denied access, bad endpoint
        raise UserError(f"{out_dir!r} cannot be read: {exc}") from None
    if not finished:
        raise UserError(f"{out_dir!r} holds no finished run (no _SUCCESS or stats.json); run or resume the pipeline")
    try:
        with storage.open(stats_path, "rb") as f:
            stats = schemas.validate_stats(json.load(f), stats_path)
    except (OSError, ValueError) as exc:  # SchemaError and JSONDecodeError are ValueErrors
        raise UserError(f"{stats_path!r} cannot be used: {exc}") from None
    files = data_files(out_dir)
    if not files:
        raise UserError(f"{out_dir!r}: no data/part-*.parquet files")
    names = {schemas.read_schema_name(f)[0] for f in files}
    if len(names) != 1:
        raise UserError(f"{out_dir!r}: data files hold several schemas {sorted(names)}")
    reject_files = data_files(out_dir, "rejects")
    by: collections.Counter = collections.Counter()
    for f in reject_files:
        for batch in schemas.iter_batches(f, columns=["stage", "reason"]):
            d = batch.to_pydict()
            by.update(zip(d["stage"], d["reason"]))
    return Run(out_dir, stats, names.pop(), files, reject_files, dict(by))


def rows_in(files: list[str]) -> int:
    return sum(schemas.open_parquet(f).metadata.num_rows for f in files)


def check_counts(run: Run) -> dict:
    """Compare stats.json with the files; raise UserError when they disagree. Returns the checked figures."""
    t = run.stats.get("totals", {})
    data_rows, reject_rows = rows_in(run.files), rows_in(run.reject_files)
    problems = []
    if t.get("written") != data_rows:
        problems.append(f"stats.json says {t.get('written')} rows written, data/ holds {data_rows}")
    if t.get("reject_rows", reject_rows) != reject_rows:
        problems.append(f"stats.json says {t.get('reject_rows')} reject rows, rejects/ holds {reject_rows}")
    counted = {(s["stage"], r): n for s in run.stats.get("stages", []) for r, n in s["reasons"].items()}
    for key in sorted(set(counted) | set(run.rejects_by)):
        if counted.get(key, 0) != run.rejects_by.get(key, 0):
            problems.append(f"stage {key[0]} reason {key[1]}: stats.json counts {counted.get(key, 0)}, "
                            f"rejects/ holds {run.rejects_by.get(key, 0)}")
    if problems:
        raise UserError(f"{run.out_dir!r}: the files no longer match stats.json ({'; '.join(problems[:3])}); "
                        "rerun the pipeline with --overwrite")
    return {"data_rows": data_rows, "reject_rows": reject_rows}


def find_train_report(out_dir: str, name: str) -> str | None:
    """report.json in OUT, or in a sibling folder whose report has a dataset called `name`."""
    own = storage.join(out_dir, "report.json")
    if storage.exists(own):
        return own
    if storage.is_url(out_dir):  # siblings on an object store are not searched: pass --train-report
        return None
    parent = os.path.dirname(os.path.abspath(out_dir))
    for sib in sorted(os.listdir(parent)):
        path = os.path.join(parent, sib, "report.json")
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    if name in (json.load(f).get("datasets") or {}):
                        return path
            except (OSError, ValueError):
                continue
    return None


# ---- the card -----------------------------------------------------------------------------------------------

def front_matter(run: Run, profile: Profile, name: str, license_id: str) -> dict:
    """Hugging Face card metadata; license_link only when OUT has a LICENSE file to point at."""
    langs = profile.counters["language"]
    total = sum(langs.values())
    codes = [k for k, n in langs.most_common() if k != "(unknown)" and total and n / total >= 0.01][:20]
    fm = {"pretty_name": name, "license": license_id}
    if license_id == "other":
        fm["license_name"] = "mixed-web-content"
        if storage.isfile(storage.join(run.out_dir, "LICENSE")):
            fm["license_link"] = "LICENSE"
    if codes:
        fm["language"] = codes
        fm["multilinguality"] = "monolingual" if len(codes) == 1 else "multilingual"
    fm["size_categories"] = [size_category(profile.rows)]
    fm["task_categories"] = TASKS.get(run.schema_name, [])
    fm["tags"] = list(dict.fromkeys(t for t in ("mmcorpus", run.schema_name, run.stats.get("command")) if t))
    fm["configs"] = [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_GLOB}], "default": True}]
    infos = [_info("default", schemas.schema(run.schema_name), run.files)]
    if run.reject_files:
        fm["configs"].append({"config_name": "rejects", "data_files": [{"split": "train", "path": REJECTS_GLOB}]})
        infos.append(_info("rejects", schemas.schema("reject"), run.reject_files))
    fm["dataset_info"] = infos
    return fm


def _info(config: str, schema: pa.Schema, files: list[str]) -> dict:
    rows = rows_in(files)
    metas = [schemas.open_parquet(f).metadata for f in files]
    mem = sum(md.row_group(i).total_byte_size for md in metas for i in range(md.num_row_groups))
    disk = sum(storage.info(f)["bytes"] for f in files)
    return {"config_name": config, "features": hf_features(schema),
            "splits": [{"name": "train", "num_bytes": int(mem), "num_examples": int(rows)}],
            "download_size": int(disk), "dataset_size": int(mem)}


def _table(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table; columns holding only numbers are right-aligned, the others left-aligned."""
    numeric = [all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) or r[i] == "" for r in rows)
               and any(isinstance(r[i], (int, float)) for r in rows) for i in range(len(header))]
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if n else "---" for n in numeric) + "|"]
    out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in rows]
    return out


def _cell(v) -> str:
    if isinstance(v, bool) or v is None:
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v.is_integer() or abs(v) >= 100:
            return f"{v:,.0f}"
        return f"{v:.4g}"
    return str(v).replace("|", "\\|").replace("\n", " ")


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return f"list<{_type_name(t.value_type)}>"
    if pa.types.is_struct(t):
        return "struct"
    return _DTYPES.get(t, str(t))


def _stage_times(stats: dict) -> list[str]:
    """'Time per stage' section: CPU seconds of each timed stage, its share, and milliseconds per element."""
    timed = [s for s in stats.get("stages", []) if s.get("cpu_seconds") is not None]
    if not timed:
        return []
    total = sum(s["cpu_seconds"] for s in timed)
    rows = [[f"`{s['stage']}`", s["in"], f"{s['cpu_seconds']:,.2f}", _pct(s["cpu_seconds"], total),
             f"{1000 * s['cpu_seconds'] / s['in']:.2f}" if s["in"] else ""] for s in timed]
    wall = stats.get("wall_seconds")
    lines = ["### Time per stage", "", f"CPU seconds each stage's function took, summed over the workers "
             f"({total:,.1f} s in all" + (f"; the run took {wall:,.1f} s wall-clock" if wall else "")
             + "; reading, shuffles and the sink are not in a stage):", ""]
    return lines + _table(["stage", "in", "cpu seconds", "share", "ms per element"], rows) + [""]


def _pct(a: int, b: int) -> str:
    return f"{100 * a / b:.1f}%" if b else "n/a"


def _flatten(config, prefix="") -> list[tuple[str, object]]:
    out = []
    for k, v in (config or {}).items():
        if isinstance(v, dict) and v:
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _chain(stats: dict) -> list[dict]:
    """The stages of the main unit (documents, pairs) in order: as the run recorded them, else (older stats) the
    stages that chain in == previous out."""
    stages = stats.get("stages", [])
    if stats.get("main_stages"):
        by_name = {s["stage"]: s for s in stages}
        return [by_name[name] for name in stats["main_stages"] if name in by_name]
    chain = [stages[0]] if stages else []
    for s in stages[1:]:
        if s["in"] == chain[-1]["out"] and s["in"]:
            chain.append(s)
    return chain


def _fidelity_section(stats: dict, profile: Profile) -> list[str]:
    """What the paragraph rules took from the extracted articles, and images per document (interleaved runs
    whose paragraphs stage counted words; nothing for older stats)."""
    stage = next((s for s in stats.get("stages", []) if s["stage"] == "paragraphs"), None)
    counters = (stage or {}).get("counters", {})
    if "words_extracted" not in counters:
        return []
    words, removed = counters["words_extracted"], counters.get("words_removed", 0)
    gutted = stage["reasons"].get("gutted_by_paragraph_rules", 0)
    limit = (stats.get("config") or {}).get("documents", {}).get("paragraphs", {}).get("max_removed_share")
    images, added = counters.get("images_extracted", 0), counters.get("article_images_added", 0)
    rows = profile.rows
    return ["## Document fidelity", "",
            "How much of each extracted article the paragraph rules (lists, tables, code and headings judged as "
            "units) removed, and the images documents hold before the rules and once published.", ""] + _table(
        ["", ""],
        [["words extracted (documents reaching the paragraph rules)", words],
         ["words removed by the paragraph rules", f"{removed:,} ({_pct(removed, words)})"],
         [f"documents rejected as gutted (more than {limit} of their words removed)",
          f"{gutted:,} ({_pct(gutted, stage['in'])} of {stage['in']:,})"],
         ["images per document at extraction", f"{images / stage['in']:.2f}" if stage["in"] else ""],
         ["article images put back where trafilatura left them out", added],
         ["images per published document", f"{profile.counters['images']['total'] / rows:.2f}" if rows else ""]]
    ) + [""]


def _describe_row(label: str, s: Sample) -> list:
    d = s.describe()
    if not d["n"]:
        return [label, 0, "", "", "", "", ""]
    return [label, d["n"], d["mean"], d["min"], d["median"], d["p95"], d["max"]]


def render(run: Run, profile: Profile, checked: dict, name: str, license_id: str, description: str,
           train: tuple[str, dict] | None, plot_dir: str | None = None) -> tuple[str, list[str]]:
    """Markdown text of the card and the PNG files written beside it (in `plot_dir`, default OUT)."""
    out, stats, kind = plot_dir or run.out_dir, run.stats, run.schema_name
    pngs: list[str] = []
    unit = "documents" if kind == "interleaved" else "image-text pairs"
    t = stats.get("totals", {})
    fm = front_matter(run, profile, name, license_id)
    lines = ["---", yaml.safe_dump(fm, sort_keys=False, allow_unicode=True).rstrip(), "---", "", f"# {name}", ""]

    # summary
    summary = description or (f"{profile.rows:,} {unit} built by `mmcorpus {stats.get('command')}` from "
                              f"{len(stats.get('inputs', []))} input file(s).")
    lines += [summary, ""]
    facts = [["rows", profile.rows], ["read by the first stage", t.get("read", 0)],
             ["kept", f"{t.get('written', 0):,} ({_pct(t.get('written', 0), t.get('read', 0))})"],
             [f"rejected {unit}", t.get("rejected", 0)],
             ["reject rows (including sub-items such as images)", checked["reject_rows"]],
             ["Parquet files", f"{len(run.files)} in `data/`, {len(run.reject_files)} in `rejects/`"],
             ["schema", f"`{kind}` v{stats.get('schema_version', schemas.SCHEMA_VERSION)}"],
             ["built", f"{stats.get('started', '?')} to {stats.get('finished', '?')} "
                       f"({stats.get('wall_seconds', 0):,.1f} s)"]]
    if kind == "interleaved":
        facts.insert(1, ["images", profile.counters["images"]["total"]])
        facts.insert(2, ["images with embedded bytes", profile.bytes_rows])
    else:
        facts.insert(1, ["rows with embedded image bytes", profile.bytes_rows])
    lines += _table(["", ""], facts) + [""]
    warnings = _random_weight_warnings(stats)
    if warnings:
        lines += [f"> **Warning:** {w}" for w in warnings] + [""]
    lines += ["Load it with 🤗 datasets (`datasets.load_dataset(\"parquet\", data_files=...)` or from the hub by "
              "name), DuckDB or pyarrow:", "", "```python", "from datasets import load_dataset",
              f'ds = load_dataset("parquet", data_files="{DATA_GLOB}", split="train")',
              f'rejects = load_dataset("parquet", data_files="{REJECTS_GLOB}", split="train")', "```", "",
              "```sql", f"SELECT * FROM read_parquet('{DATA_GLOB}') LIMIT 5;", "```", ""]

    # structure
    lines += ["## Dataset structure", ""]
    if kind == "interleaved":
        lines += ["One row per document. `texts` and `images` have equal length; at every position exactly one of "
                  "the two is set, in reading order (the OBELICS layout). `image_info` is aligned with the "
                  "positions.", ""]
    else:
        lines += ["One row per image-caption pair.", ""]
    schema = schemas.schema(kind)
    lines += _table(["field", "type", "description"],
                    [[f"`{f.name}`", f"`{_type_name(f.type)}`", FIELD_DOCS.get(kind, {}).get(f.name, "")] for f in schema]) + [""]

    # how it was built
    lines += ["## How it was built", "", f"Command: `{' '.join(_argv(stats))}`", ""]
    runner = stats.get("runner", {})
    detail = ", ".join(f"{k} {v}" for k, v in runner.items() if k != "runner")
    lines += [f"Runner: {runner.get('runner', '?')}" + (f" ({detail})" if detail else "") + ". Run fingerprint "
              f"`{stats.get('fingerprint', '?')}`" + (" (resumed after an interruption)" if stats.get("resumed") else "")
              + ".", ""]
    inputs = stats.get("inputs", [])
    if inputs:
        total = sum(i.get("bytes", 0) for i in inputs)
        lines += [f"### Sources", "", f"{len(inputs):,} input(s), {total / 1e6:,.1f} MB in all"
                  + (" (first 10 listed)" if len(inputs) > 10 else "") + ":", ""]
        lines += _table(["input", "bytes", "sha256"],
                        [[f"`{os.path.basename(i['path'])}`", i.get("bytes", ""), (i.get("sha256") or "")[:16]]
                         for i in inputs[:10]]) + [""]
    lines += ["### Stages", "", "Every stage counts the rows it read, passed on and rejected (with a reason); "
              "sub-item stages (images of a document, captions of an image) count items, not rows.", ""]
    rows = []
    for s in stats.get("stages", []):
        counters = ", ".join(f"{k} {v:,}" for k, v in sorted(s.get("counters", {}).items())
                             if not k.startswith(HIDDEN_COUNTERS))
        rows.append([f"`{s['stage']}`", s["in"], s["out"], s["rejected"], counters])
    if any(r[-1] for r in rows):
        lines += _table(["stage", "in", "out", "rejected", "other counters"], rows) + [""]
    else:
        lines += _table(["stage", "in", "out", "rejected"], [r[:-1] for r in rows]) + [""]
    lines += _stage_times(stats)
    params = _flatten(stats.get("config"))
    if params:
        lines += ["### Parameters", "", f"The configuration the run recorded ({len(params)} thresholds, models and "
                  "options; `stats.json` has it as JSON):", "", "<details>", "<summary>all parameters</summary>", ""]
        lines += _table(["parameter", "value"],
                        [[f"`{k}`", f"`{json.dumps(v, default=str)}`" if not isinstance(v, str) else f"`{v}`"]
                         for k, v in params]) + ["", "</details>", ""]
    extra = {k: stats[k] for k in ("clip_weights", "models", "itm_threshold") if k in stats}
    if extra:
        lines += [f"Models: `{json.dumps(extra, default=str)}`", ""]
    versions = stats.get("versions", {})
    if versions:
        lines += ["### Software", "", ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", ""]

    # funnel
    lines += ["## Filtering funnel", ""]
    chain = _chain(stats)
    name_f = plots.funnel(out, chain)
    if name_f:
        pngs.append(name_f)
        lines += [f"![Filtering funnel]({name_f})", ""]
    lines += _table(["stage", "in", "out", "rejected", "kept of in"],
                    [[f"`{s['stage']}`", s["in"], s["out"], s["rejected"], _pct(s["out"], s["in"])] for s in chain])
    lines += ["", f"The files hold {checked['data_rows']:,} rows in `data/` (= the last stage's output) and "
              f"{checked['reject_rows']:,} rows in `rejects/` (= all rejected rows, per stage and reason; checked "
              "when this card was written).", ""]
    by_reason: collections.Counter = collections.Counter()
    reason_rows = []
    for s in stats.get("stages", []):
        for r, n in sorted(s["reasons"].items(), key=lambda kv: -kv[1]):
            by_reason[r] += n
            reason_rows.append([f"`{s['stage']}`", f"`{r}`", n, _pct(n, s["in"])])
    if reason_rows:
        chain_names = {c["stage"] for c in chain}
        labelled = {(r if st in chain_names else f"{r} ({st})"): n for st, r, n in
                    ((s["stage"], r, n) for s in stats.get("stages", []) for r, n in s["reasons"].items())}
        name_r = plots.reasons(out, labelled)
        if name_r:
            pngs.append(name_r)
            lines += [f"![Rejects by reason]({name_r})", ""]
        lines += _table(["stage", "reason", "rows", "of the stage's input"], reason_rows) + [""]
        lines += ["Every rejected row is in `rejects/` with its stage, reason, source and detail "
                  "(`mmcorpus inspect . --reason REASON` shows examples).", ""]

    # distributions
    lines += ["## Distributions", ""]
    lines += _distributions(out, kind, profile, stats, pngs)

    if kind == "interleaved":
        lines += _fidelity_section(stats, profile)

    # dedup
    lines += ["## Deduplication", ""]
    dedup = [s for s in stats.get("stages", []) if "dup" in s["stage"] or "decontam" in s["stage"]]
    if dedup:
        lines += _table(["stage", "in", "removed", "share", "by reason"],
                        [[f"`{s['stage']}`", s["in"], s["rejected"], _pct(s["rejected"], s["in"]),
                          ", ".join(f"{r} {n:,}" for r, n in s["reasons"].items())] for s in dedup]) + [""]
    else:
        lines += ["The run had no deduplication stage.", ""]
    n_hashed, dups = duplicate_images(profile)
    if n_hashed:
        what = "rows" if kind == "pair" else "images"
        lines += [f"Distinct images in the kept data (by sha256): {n_hashed - dups:,} of {n_hashed:,} {what}; "
                  f"{dups:,} ({_pct(dups, n_hashed)}) repeat an earlier image"
                  + (" (several captions of one image count here)." if kind == "pair" else "."), ""]

    # trainer verdict
    lines += ["## Data validation (small Flamingo run)", ""]
    lines += _train_section(out, name, train, pngs)

    from mmcorpus.pipelines.outputs.safety_card import safety_section  # issue 17

    lines += safety_section(stats, _table)
    lines += ["## Limitations and licensing", "",
              "The rows come from web pages and images whose licenses vary; check them before redistributing. "
              "Filters are heuristics (thresholds above) and let some low-quality content through while "
              "rejecting some good content; the rejects are published beside the data so you can check both.", "",
              "## Reproduce", "", "```", " ".join(_argv(stats)), "```", "",
              f"Inputs are listed with size, mtime and sha256 in `stats.json`; the run fingerprint "
              f"`{stats.get('fingerprint', '?')}` covers command, configuration and inputs.", "",
              f"_Card generated by `mmcorpus card` on {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC from "
              f"`stats.json` and the Parquet files._", ""]
    return "\n".join(lines), pngs


def _argv(stats: dict) -> list[str]:
    argv = list(stats.get("argv") or [])
    if argv and argv[0].endswith(("cli.py", "mmcorpus", "__main__.py")):
        argv[0] = "mmcorpus"
    return argv or [f"mmcorpus {stats.get('command', '?')}"]


def _random_weight_warnings(stats: dict) -> list[str]:
    out = []
    if stats.get("clip_weights") == "random" or (stats.get("config") or {}).get("clip_weights") == "random":
        out.append("CLIP had RANDOM weights (`--allow-random-weights`): `clip_score` carries no meaning.")
    models = stats.get("models") or {}
    if isinstance(models, dict) and "random" in models.values():
        out.append(f"CapFilt models with RANDOM weights ({', '.join(k for k, v in models.items() if v == 'random')}): "
                   "synthetic captions and `itm_score` carry no meaning.")
    return out


def _distributions(out: str, kind: str, p: Profile, stats: dict, pngs: list[str]) -> list[str]:
    lines: list[str] = []
    s = p.samples

    def add(png: str | None, alt: str):
        if png:
            pngs.append(png)
            lines.extend([f"![{alt}]({png})", ""])

    rows = []
    if kind == "interleaved":
        for key, label in (("words_per_doc", "words per document"), ("images_per_doc", "images per document"),
                           ("text_blocks_per_doc", "text blocks per document")):
            rows.append(_describe_row(label, s[key]))
    else:
        rows.append(_describe_row("words per caption", s["caption_words"]))
        for key, label in (("clip_score", "CLIP score"), ("itm_web", "ITM score, web captions"),
                           ("itm_synthetic", "ITM score, synthetic captions")):
            if s[key].n:
                rows.append(_describe_row(label, s[key]))
    for key, label in (("width", "image width (px)"), ("height", "image height (px)")):
        if s[key].n:
            rows.append(_describe_row(label, s[key]))
    lines += _table(["measure", "n", "mean", "min", "median", "p95", "max"], rows) + [""]
    if not s["width"].n:
        lines += ["No image sizes were recorded (images were not fetched, or their size is unknown).", ""]

    langs = p.counters["language"]
    if langs:
        note = "" if kind == "interleaved" else f" (identified on {p.languages_detected:,} captions)"
        lines += [f"Languages{note}: " + ", ".join(f"{k} {_pct(n, sum(langs.values()))}" for k, n in
                                                   langs.most_common(8)) + ".", ""]
        if len(langs) > 1:
            add(plots.bars(out, "languages.png", dict(langs), "Documents per language" if kind == "interleaved"
                           else "Captions per language", xlabel="documents" if kind == "interleaved" else "captions"),
                "Languages")
    if kind == "interleaved":
        add(plots.histogram(out, "images_per_document.png", s["images_per_doc"].values(), "Images per document",
                            "images", integer=True), "Images per document")
        add(plots.histogram(out, "words_per_document.png", s["words_per_doc"].values(), "Words per document",
                            "words (log scale)", log_x=True), "Words per document")
    else:
        add(plots.histogram(out, "caption_words.png", s["caption_words"].values(), "Words per caption", "words",
                            integer=True), "Words per caption")
        src = p.counters["caption_source"]
        lines += ["Caption source: " + ", ".join(f"{k} {n:,} ({_pct(n, p.rows)})" for k, n in src.most_common())
                  + ".", ""]
        if len(p.counters["source_dataset"]) > 1:
            lines += ["Source datasets: " + ", ".join(f"{k} {n:,}" for k, n in p.counters["source_dataset"].most_common())
                      + ".", ""]
        hist = stats.get("clip_score_histogram")
        thr = (stats.get("config") or {}).get("min_clip_score")
        if hist and sum(hist.get("scored", [])):
            add(plots.binned(out, "clip_score.png", hist["bin_edges"],
                             {"scored": hist["scored"], "kept": hist["kept"]}, "CLIP score",
                             "cosine similarity", threshold=thr, threshold_label=f"min_clip_score {thr}",
                             mode="overlay"), "CLIP score")
        elif s["clip_score"].n:
            add(plots.histogram(out, "clip_score.png", s["clip_score"].values(), "CLIP score (kept rows)",
                                "cosine similarity", threshold=thr), "CLIP score")
        itm = stats.get("itm_histograms")
        itm_thr = stats.get("itm_threshold")
        if itm and any(sum(v["counts"]) for v in itm.values()):
            edges = next(iter(itm.values()))["edges"]
            add(plots.binned(out, "itm_score.png", edges, {k: v["counts"] for k, v in itm.items()},
                             "ITM match probability, all captions scored", "P(match)", threshold=itm_thr,
                             threshold_label=f"ITM threshold {itm_thr}" if itm_thr is not None else ""), "ITM score")
        elif s["itm_web"].n or s["itm_synthetic"].n:
            add(plots.binned(out, "itm_score.png", list(np.linspace(0, 1, 21)),
                             {k: list(np.histogram(s[f"itm_{k}"].values(), bins=20, range=(0, 1))[0])
                              for k in ("web", "synthetic")}, "ITM match probability (kept rows)", "P(match)"),
                "ITM score")
    add(plots.image_sizes(out, s["width"].values(), s["height"].values()), "Image sizes")
    domains = p.counters["domain"]
    if domains and set(domains) != {"(none)"}:
        lines += [f"{len(domains):,} distinct hosts; most frequent: "
                  + ", ".join(f"{k} {n:,}" for k, n in domains.most_common(5)) + ".", ""]
    return lines


def _train_section(out: str, name: str, train: tuple[str, dict] | None, pngs: list[str]) -> list[str]:
    if not train:
        return ["No training report was found. `mmcorpus train` on this data writes `report.json`; pass it with "
                "`--train-report` to add the verdict here.", ""]
    path, report = train
    lines = [f"From `{path if storage.is_url(path) else os.path.relpath(path, out)}`: a compact Flamingo was trained on a mixture including this data; "
             "the held-out loss with the real images is compared with the same text given shuffled images "
             "(`gap_shuffled`) and blank images (`gap_blank`), in nats per token with bootstrap 95% intervals. "
             "A positive gap means the model uses the images.", ""]
    rows = []
    for ds, r in (report.get("datasets") or {}).items():
        gs, gb = r.get("gap_shuffled", {}), r.get("gap_blank", {})
        rows.append([f"**{ds}**" if ds == name else ds, f"**{r.get('verdict')}**" if ds == name else r.get("verdict"),
                     _gap(gs), _gap(gb), r.get("method", ""), r.get("n_eval", ""),
                     ", ".join(f"{k} {v}" for k, v in (r.get("skipped") or {}).items()) or "none"])
    lines += _table(["dataset", "verdict", "gap shuffled", "gap blank", "method", "held-out samples", "skipped rows"],
                    rows) + [""]
    notes = []
    for ds, r in (report.get("datasets") or {}).items():
        if r.get("verdict_note"):
            notes.append(f"{ds}: {r['verdict_note']}" + _needed(r))
        if r.get("seed_gaps"):
            notes.append(f"{ds}: gap over {len(r['seed_gaps'])} k-fold repeats "
                         + ", ".join(f"{g:+.4f}" for g in r["seed_gaps"]) + f" (sd {r['seed_sd']:.4f})")
    lines += [f"Note: {n}" for n in notes] + ([""] if notes else [])
    if report.get("verdict_rule"):
        lines += [f"Verdict rule: {report['verdict_rule']}", ""]
    src = report.get("sources") or {}
    if src:
        weights = {k: src[k] for k in ("vision", "lm") if k in src}
        lines += ["Model weights: " + ", ".join(f"{k} {v}" for k, v in weights.items()) + "."
                  + (" Random encoders give small gaps; see the trainer's report." if "random" in str(src) else ""), ""]
    png = os.path.join(os.path.dirname(path), "image_informativeness.png")
    if os.path.isfile(png):
        shutil.copyfile(png, os.path.join(out, "train_image_informativeness.png"))
        pngs.append("train_image_informativeness.png")
        lines += ["![Image informativeness](train_image_informativeness.png)", ""]
    return lines


def _needed(r: dict) -> str:
    n, have = r.get("n_needed"), r.get("n_eval") or 0
    if not n:
        return ""
    if n > have:
        return f" (about {n:,} held-out samples needed at this spread)"
    return f" ({have:,} held-out samples already give a narrow enough interval: more samples alone will not settle it)"


def _gap(g: dict) -> str:
    if not g or g.get("mean") is None:
        return "n/a"
    lo, hi = (g.get("ci95") or [None, None])[:2]
    return f"{g['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]" if lo is not None and hi is not None else f"{g['mean']:+.4f}"


def write_card(out_dir: str, name: str | None = None, license_id: str = "other", description: str = "",
               train_report: str | None = None) -> dict:
    """Write OUT/README.md and its plots; returns {"card", "plots", "rows", "train_report"}."""
    run = load_run(out_dir)
    checked = check_counts(run)
    name = name or storage.basename(storage.abspath(out_dir))
    profile = profile_interleaved(run.files) if run.schema_name == "interleaved" else profile_pairs(run.files)
    if profile.rows != checked["data_rows"]:
        raise UserError(f"{out_dir!r}: streamed {profile.rows} rows but the Parquet metadata says {checked['data_rows']}")
    train = None
    path = train_report or find_train_report(out_dir, name)
    if path:
        try:
            with storage.open(path, "rb") as f:
                train = (storage.abspath(path), json.load(f))
        except (OSError, ValueError) as exc:
            raise UserError(f"training report {path!r} cannot be read: {exc}") from None
    target = storage.join(out_dir, CARD)
    old_pngs = _card_plots(target)
    if storage.is_url(out_dir):  # plots drawn in a local folder, uploaded before the card that links them
        import tempfile

        with tempfile.TemporaryDirectory(prefix="mmcorpus-card-") as stage:
            text, pngs = render(run, profile, checked, name, license_id, description, train, plot_dir=stage)
            for png in pngs:
                storage.write_bytes(storage.join(out_dir, png), storage.read_bytes(os.path.join(stage, png)))
    else:
        text, pngs = render(run, profile, checked, name, license_id, description, train)
    storage.write_bytes(target, text.encode())
    for stale in old_pngs - set(pngs):  # plots of an earlier card that this one no longer has
        with contextlib.suppress(OSError):
            storage.remove(storage.join(out_dir, stale))
    return {"card": target, "plots": pngs, "rows": profile.rows, "train_report": train[0] if train else None}


def _card_plots(path: str) -> set[str]:
    """The PNG files beside the card that an existing card at `path` links to."""
    try:
        text = storage.read_bytes(path).decode("utf-8", "replace")
    except OSError:
        return set()
    return set(re.findall(r"!\[[^\]]*\]\(([^)/\\]+\.png)\)", text))


def parse_card(path: str) -> tuple[dict, str]:
    """(YAML front matter, markdown body) of a card."""
    with open(path) as f:
        text = f.read()
    if not text.startswith("---\n"):
        raise ValueError(f"{path}: no YAML front matter")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end]), text[end + 5:]

