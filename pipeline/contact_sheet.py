"""A quick-look PNG of the first N images of a synthesis output (``contact_sheet.png``)."""

from __future__ import annotations

import io
import math
import tarfile

import PIL.Image

from .resume import committed_shards
from .sinks import shard_files
from .storage import atomic_write, open_fs

THUMB = 128


def write_contact_sheet(
    output_url: str, storage_options: dict | None, n: int, name: str = "contact_sheet.png"
) -> str | None:
    """Tile the first ``n`` images of the committed shards; returns the sheet's URL (None if no images)."""
    fs, root = open_fs(output_url, storage_options)
    thumbs: list[PIL.Image.Image] = []
    for shard in committed_shards(output_url, storage_options):
        if len(thumbs) >= n:
            break
        path = f"{root.rstrip('/')}/{shard_files(shard)['tar']}"
        if not fs.exists(path):
            continue
        with tarfile.open(fileobj=io.BytesIO(fs.cat_file(path))) as tar:
            for member in tar:
                if member.name.endswith(".png") and len(thumbs) < n:
                    img = PIL.Image.open(tar.extractfile(member)).convert("RGB")
                    thumbs.append(img.resize((THUMB, THUMB), PIL.Image.Resampling.BICUBIC))
    if not thumbs:
        return None
    cols = math.ceil(math.sqrt(len(thumbs)))
    rows = math.ceil(len(thumbs) / cols)
    sheet = PIL.Image.new("RGB", (cols * THUMB, rows * THUMB), (255, 255, 255))
    for i, thumb in enumerate(thumbs):
        sheet.paste(thumb, ((i % cols) * THUMB, (i // cols) * THUMB))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    target = f"{root.rstrip('/')}/{name}"
    atomic_write(fs, target, buf.getvalue())
    return output_url.rstrip("/") + "/" + name
