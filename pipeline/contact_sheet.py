"""A quick-look PNG of the first N images of a synthesis output: the samples of one prompt side by side
in a row (different seeds of the same prompt), each with its prompt and seed under it.

The sheet records in a PNG text chunk what it was drawn from (N and the shards it read; a shard's name
is a hash of its rows' keys), so a rerun that changed none of them (a finished job's "nothing to run")
keeps it instead of reading the images again."""

from __future__ import annotations

import io
import json
import math
import tarfile
import textwrap
from typing import Any

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont
import PIL.PngImagePlugin

from .output import OutputDir
from .sinks import shard_files
from .storage import atomic_write

THUMB = 160
CAPTION_LINES = 3  # the prompt on two, the seed on the third
LINE = 12  # pixels per caption line (PIL's default bitmap font)

#: the PNG text chunk that says what a sheet was drawn from
SOURCE_KEY = "janus-contact-sheet"

Thumb = tuple[PIL.Image.Image, dict[str, Any]]  # (image, its tar member's JSON: prompt, seed, sample, ...)


def _thumbnails(out: OutputDir, n: int) -> tuple[list[Thumb], list[str]]:
    """(image, metadata) of the first ``n`` samples of the committed shards' tars, and the shards read."""
    found: list[Thumb] = []
    read: list[str] = []
    for shard in out.committed_shards:
        if len(found) >= n:
            break
        read.append(shard)
        name = shard_files(shard)["tar"]
        if name not in out.names:
            continue
        with tarfile.open(fileobj=io.BytesIO(out.fs.cat_file(out.path(name)))) as tar:
            members = {m.name: m for m in tar if m.isfile()}
            for member_name in sorted(members):
                if not member_name.endswith(".png") or len(found) >= n:
                    continue
                image = PIL.Image.open(tar.extractfile(members[member_name])).convert("RGB")
                meta = members.get(member_name[: -len(".png")] + ".json")
                found.append(
                    (
                        image.resize((THUMB, THUMB), PIL.Image.Resampling.NEAREST),
                        json.loads(tar.extractfile(meta).read()) if meta else {},
                    )
                )
    return found, read


def _is_current(out: OutputDir, n: int, name: str) -> bool:
    """Whether the sheet ``name`` holds what drawing it now would: the same ``n``, and the shards it read
    are still the first committed ones (all of them, when it found fewer than ``n`` images)."""
    if name not in out.names:
        return False
    try:
        with PIL.Image.open(io.BytesIO(out.fs.cat_file(out.path(name)))) as sheet:
            source = json.loads(sheet.info[SOURCE_KEY])
        shards, images = list(source["shards"]), int(source["images"])
    except (OSError, KeyError, TypeError, ValueError):  # not ours, an older layout, unreadable: redraw
        return False
    if source.get("n") != n:
        return False
    committed = out.committed_shards
    return committed[: len(shards)] == shards if images >= n else committed == shards


def layout(thumbs: list[Thumb]) -> list[list[Thumb]]:
    """Rows of the sheet: one per prompt (in order of first appearance) holding its samples in sample
    order, when some prompt has several; else the images tiled in a square."""
    by_prompt: dict[str, list[Thumb]] = {}
    for thumb in thumbs:
        by_prompt.setdefault(thumb[1].get("prompt") or "", []).append(thumb)
    rows = [sorted(g, key=lambda t: (t[1].get("sample", 0), t[1].get("seed", 0))) for g in by_prompt.values()]
    if max(len(r) for r in rows) > 1:
        return rows
    cols = math.ceil(math.sqrt(len(thumbs)))
    return [thumbs[i : i + cols] for i in range(0, len(thumbs), cols)]


def _label(meta: dict[str, Any]) -> list[str]:
    lines = textwrap.wrap(meta.get("prompt") or "", width=THUMB // 6)[: CAPTION_LINES - 1]
    return lines + ([f"seed {meta['seed']}"] if meta.get("seed") is not None else [])


def write_contact_sheet(out: OutputDir, n: int, name: str = "contact_sheet.png") -> str | None:
    """Tile the first ``n`` images with their prompts and seeds; returns the sheet's URL (None if no images).
    A sheet that is current (``_is_current``) is kept as it is."""
    url = out.url.rstrip("/") + "/" + name
    if _is_current(out, n, name):
        return url
    thumbs, read = _thumbnails(out, n)
    if not thumbs:
        return None
    rows = layout(thumbs)
    cols = max(len(r) for r in rows)
    cell_h = THUMB + CAPTION_LINES * LINE + 6
    sheet = PIL.Image.new("RGB", (cols * THUMB, len(rows) * cell_h), (255, 255, 255))
    pen = PIL.ImageDraw.Draw(sheet)
    font = PIL.ImageFont.load_default()
    for r, row in enumerate(rows):
        for c, (thumb, meta) in enumerate(row):
            x, y = c * THUMB, r * cell_h
            sheet.paste(thumb, (x, y))
            for j, line in enumerate(_label(meta)):
                pen.text((x + 3, y + THUMB + 2 + j * LINE), line, fill=(0, 0, 0), font=font)
    source = PIL.PngImagePlugin.PngInfo()
    source.add_text(SOURCE_KEY, json.dumps({"n": n, "images": len(thumbs), "shards": read}))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG", pnginfo=source)
    atomic_write(out.fs, out.path(name), buf.getvalue())
    return url
