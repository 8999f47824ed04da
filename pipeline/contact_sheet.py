"""A quick-look PNG of the first N images of a synthesis output, each with its prompt under it."""

from __future__ import annotations

import io
import json
import math
import tarfile
import textwrap

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from .output import OutputDir
from .sinks import shard_files
from .storage import atomic_write

THUMB = 160
CAPTION_LINES = 3
LINE = 12  # pixels per caption line (PIL's default bitmap font)


def _thumbnails(out: OutputDir, n: int) -> list[tuple[PIL.Image.Image, str]]:
    """(image, prompt) of the first ``n`` samples of the committed shards' tars."""
    found: list[tuple[PIL.Image.Image, str]] = []
    for shard in out.committed_shards:
        if len(found) >= n:
            break
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
                prompt = json.loads(tar.extractfile(meta).read()).get("prompt", "") if meta else ""
                found.append((image.resize((THUMB, THUMB), PIL.Image.Resampling.NEAREST), prompt or ""))
    return found


def write_contact_sheet(out: OutputDir, n: int, name: str = "contact_sheet.png") -> str | None:
    """Tile the first ``n`` images with their prompts; returns the sheet's URL (None if no images)."""
    thumbs = _thumbnails(out, n)
    if not thumbs:
        return None
    cols = math.ceil(math.sqrt(len(thumbs)))
    rows = math.ceil(len(thumbs) / cols)
    cell_h = THUMB + CAPTION_LINES * LINE + 6
    sheet = PIL.Image.new("RGB", (cols * THUMB, rows * cell_h), (255, 255, 255))
    pen = PIL.ImageDraw.Draw(sheet)
    font = PIL.ImageFont.load_default()
    for i, (thumb, prompt) in enumerate(thumbs):
        x, y = (i % cols) * THUMB, (i // cols) * cell_h
        sheet.paste(thumb, (x, y))
        lines = textwrap.wrap(prompt, width=THUMB // 6)[:CAPTION_LINES]
        for j, line in enumerate(lines):
            pen.text((x + 3, y + THUMB + 2 + j * LINE), line, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write(out.fs, out.path(name), buf.getvalue())
    return out.url.rstrip("/") + "/" + name
