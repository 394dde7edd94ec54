"""Write a small website of photo stories from the COCO photos and captions, for the offline demo.

The bundled web pages link images on hosts that are not reachable offline, so the demo serves these pages
and photos from 127.0.0.1 and runs `mmcorpus interleaved` over their URL list: real photos and human
captions, fetched over HTTP like any crawl, with each image's position in the text kept.

Writes SITE/page-NNN.html (a title, then per photo: the photo in a <figure> with a caption as alt text,
then a paragraph of two other captions: text about an image follows it, as Flamingo's masking expects),
SITE/img/*.jpg (links to the photos) and URLS (one page URL a line).

Usage: python demo/photo_pages.py COCO_DIR SITE URLS BASE_URL [PHOTOS_PER_PAGE]
"""

from __future__ import annotations

import html
import json
import os
import pathlib
import sys


def page(title: str, photos: list[dict]) -> str:
    parts = [f"<h1>{html.escape(title)}</h1>"]
    for photo in photos:
        caps = photo["captions"]
        prose = " ".join(c.strip().rstrip(".") + "." for c in caps[1:3])
        parts.append(f'<figure><img src="img/{photo["file_name"]}" alt="{html.escape(caps[0].strip())}">'
                     f"<figcaption>{html.escape(caps[0].strip())}</figcaption></figure>")
        parts.append(f"<p>{html.escape(prose)}</p>")
    return ("<!doctype html><html lang=en><head><meta charset=utf-8>"
            f"<title>{html.escape(title)}</title></head><body><article>{''.join(parts)}</article></body></html>")


def main(argv: list[str]) -> int:
    if len(argv) not in (4, 5):
        print(__doc__, file=sys.stderr)
        return 2
    coco, site, urls, base = pathlib.Path(argv[0]), pathlib.Path(argv[1]), pathlib.Path(argv[2]), argv[3]
    per_page = int(argv[4]) if len(argv) == 5 else 4
    with open(coco / "captions.jsonl") as f:
        photos = [json.loads(line) for line in f]
    (site / "img").mkdir(parents=True, exist_ok=True)
    for photo in photos:
        link = site / "img" / photo["file_name"]
        if not link.exists():
            os.symlink((coco / "images" / photo["file_name"]).resolve(), link)
    lines = []
    for n, start in enumerate(range(0, len(photos), per_page)):
        group = photos[start:start + per_page]
        title = group[0]["captions"][0].strip().rstrip(".").capitalize()
        name = f"page-{n:03d}.html"
        (site / name).write_text(page(title, group), encoding="utf-8")
        lines.append(f"{base.rstrip('/')}/{name}")
    urls.write_text("\n".join(lines) + "\n")
    print(f"{len(lines)} photo-story pages ({len(photos)} photos) in {site}, URL list {urls}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
