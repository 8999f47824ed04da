"""Load the images a chat refers to, as DeepSeek's ``janus.utils.io.load_pil_images`` does.

Messages carry an ``images`` list of file paths or ``data:image/...;base64,`` URLs. Unlike DeepSeek's
version, EXIF orientation is applied (phone photos otherwise arrive sideways) and malformed data URLs
fail with a message instead of decoding garbage.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import PIL.Image
import PIL.ImageOps


def load_pil_images(conversations: Sequence[Mapping[str, Any]]) -> list[PIL.Image.Image]:
    """Every image of every message, in order, as an RGB PIL image."""
    images = []
    for message in conversations:
        for ref in message.get("images") or ():
            images.append(load_image(ref))
    return images


def load_image(ref: str | os.PathLike) -> PIL.Image.Image:
    """Open one image from a path or a base64 ``data:`` URL; upright (EXIF applied) and RGB."""
    if isinstance(ref, str) and ref.startswith("data:"):
        source: str | os.PathLike | io.BytesIO = io.BytesIO(_decode_data_url(ref))
    else:
        source = ref
    try:
        with PIL.Image.open(source) as image:
            return PIL.ImageOps.exif_transpose(image).convert("RGB")
    except PIL.UnidentifiedImageError as exc:
        what = "data URL" if isinstance(source, io.BytesIO) else repr(os.fspath(ref))
        raise ValueError(f"{what} does not hold an image format Pillow can read") from exc


def _decode_data_url(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.startswith("data:image/") or not header.endswith(";base64"):
        raise ValueError(
            f"unsupported data URL {url[:40]!r}...: expected 'data:image/<type>;base64,<payload>'"
        )
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"data URL {header!r} has an invalid base64 payload: {exc}") from exc
