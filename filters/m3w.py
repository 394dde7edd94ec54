"""Render an interleaved document as M3W text (Flamingo): `<image>` where an image sits, `<|endofchunk|>` after
the text that follows each image (the chunk an image conditions), text chunks joined with newlines."""

from __future__ import annotations

IMAGE = "<image>"
END_OF_CHUNK = "<|endofchunk|>"


def render_m3w(texts: list, images: list) -> str:
    """texts/images of equal length, one non-null per position -> one M3W string."""
    parts: list[str] = []
    open_chunk = False
    for text, image in zip(texts, images):
        if image is not None:
            if open_chunk:
                parts.append(END_OF_CHUNK)
            parts.append(IMAGE)
            open_chunk = True
        elif text:
            parts.append(text.strip() + "\n")
    if open_chunk:
        parts.append(END_OF_CHUNK)
    return "".join(parts).strip()
