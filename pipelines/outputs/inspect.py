"""`mmcorpus inspect OUT`: a few kept rows as text and the rejects grouped by reason, with examples."""

from __future__ import annotations

import collections
import os
import textwrap

HELP = "print a few kept documents or pairs and the rejects by reason, with examples"
DESCRIPTION = (
    "Print the first N kept rows of OUT/data: interleaved documents as M3W text with <image> markers where the "
    "images sit (with each image's size and URL), pairs as image (URL, size) + caption + scores. Then the "
    "rejects in OUT/rejects grouped by stage and reason, most frequent first, with example sources and details. "
    "Reads only the columns it prints; image bytes are never loaded."
)


def add_arguments(parser) -> None:
    parser.add_argument("out", metavar="OUT", help="output folder of an mmcorpus run")
    parser.add_argument("-n", type=int, default=3, help="kept rows to print (0: none)")
    parser.add_argument("--reason", default=None, help="show only rejects with this reason (and more examples)")
    parser.add_argument("--examples", type=int, default=None,
                        help="examples per reject reason (default: 2, or 10 with --reason)")
    parser.add_argument("--max-chars", type=int, default=1200, help="cut each printed document after this many characters")


def run(args) -> int:
    from mmcorpus.pipelines.outputs.card import data_files
    from mmcorpus.pipelines.errors import UserError

    from mmcorpus.schemas import storage

    try:
        if not storage.isdir(args.out):
            raise UserError(f"{args.out!r} is not a folder")
        files, rejects = data_files(args.out), data_files(args.out, "rejects")
        finished = storage.exists(storage.join(args.out, "_SUCCESS"))
    except OSError as exc:  # an object store: denied access, bad endpoint
        raise UserError(f"{args.out!r} cannot be read: {exc}") from None
    if not files and not rejects:
        raise UserError(f"{args.out!r} holds no data/ or rejects/ Parquet files; is it an mmcorpus output folder?")
    if not finished:
        print(f"note: {args.out} has no _SUCCESS: the run is unfinished, showing what is there\n")
    if args.n > 0 and args.reason is None:
        print(kept_rows(files, args.n, args.max_chars))
    examples = args.examples if args.examples is not None else (2 if args.reason is None else 10)
    print(reject_report(rejects, args.reason, examples))
    return 0


def _schema(files):
    from mmcorpus import schemas

    return schemas.read_schema_name(files[0])[0] if files else None


def kept_rows(files: list[str], n: int, max_chars: int) -> str:
    from mmcorpus import schemas

    kind = _schema(files)
    if kind is None:
        return "no kept rows\n"
    if kind == "interleaved":
        cols = ["doc_id", "url", "language", "texts", "images", "image_info.list.element.width",
                "image_info.list.element.height"]
    else:
        cols = ["image_id", "url", "image_path", "caption", "caption_source", "clip_score", "itm_score", "width",
                "height", "source_dataset"]
    total = sum(schemas.open_parquet(f).metadata.num_rows for f in files)
    out = [f"== {min(n, total)} of {total:,} kept {'documents' if kind == 'interleaved' else 'pairs'} ==", ""]
    shown = 0
    for f in files:
        for batch in schemas.iter_batches(f, batch_size=max(n, 1), columns=cols):
            for row in batch.to_pylist():
                if shown >= n:
                    return "\n".join(out)
                out += document(row, max_chars) if kind == "interleaved" else pair(row)
                shown += 1
    return "\n".join(out)


def document(row: dict, max_chars: int) -> list[str]:
    from mmcorpus.filters.m3w import render_m3w

    infos = [i for i in row["image_info"] or [] if i is not None]
    n_img = sum(i is not None for i in row["images"])
    head = f"--- {row['doc_id']}  {row['url'] or ''}  [{row['language'] or '?'}, {n_img} image(s)]"
    text = render_m3w(row["texts"], row["images"])
    if len(text) > max_chars:
        text = text[:max_chars].rstrip() + f" [... {len(text) - max_chars:,} more characters]"
    lines = [head, text]
    urls = [u for u in row["images"] if u is not None]
    for k, url in enumerate(urls):
        info = infos[k] if k < len(infos) else {}
        size = f"{info.get('width')}x{info.get('height')}" if info and info.get("width") else "size unknown"
        lines.append(f"  <image> {k + 1}: {size}  {url}")
    return lines + [""]


def pair(row: dict) -> list[str]:
    scores = ", ".join(f"{k} {row[k]:.3f}" for k in ("clip_score", "itm_score") if row[k] is not None)
    size = f"{row['width']}x{row['height']}" if row["width"] else "size unknown"
    where = row["url"] or row["image_path"] or ""
    return [f"--- {row['image_id']}  [{row['source_dataset']}, {row['caption_source']} caption]",
            f"  image:   {size}  {where}",
            f"  caption: {row['caption']}",
            f"  scores:  {scores or 'none'}", ""]


def reject_report(files: list[str], reason: str | None, examples: int) -> str:
    from mmcorpus import schemas

    counts: collections.Counter = collections.Counter()
    samples: dict = collections.defaultdict(list)
    for f in files:
        for batch in schemas.iter_batches(f, columns=["stage", "reason", "source", "detail"]):
            d = batch.to_pydict()
            for stage, r, source, detail in zip(d["stage"], d["reason"], d["source"], d["detail"]):
                if reason is not None and r != reason:
                    continue
                counts[(stage, r)] += 1
                if len(samples[(stage, r)]) < examples:
                    samples[(stage, r)].append((source, detail))
    total = sum(counts.values())
    if not total:
        return f"no rejects{'' if reason is None else f' with reason {reason!r}'}\n"
    out = [f"== {total:,} rejects{'' if reason is None else f' with reason {reason!r}'}, by stage and reason =="]
    for (stage, r), n in counts.most_common():
        out.append(f"{r}  (stage {stage}): {n:,}")
        for source, detail in samples[(stage, r)]:
            out.append(f"    {_short(source, 100)}")
            if detail:
                out.append(textwrap.indent(textwrap.fill(_short(detail, 300), 96), "        "))
    return "\n".join(out) + "\n"


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"
