"""Input data the pipeline tests feed in: prompts, encoded images and tars, made in memory."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import PIL.Image

PROMPTS = ["a red apple on a table", "Ünïcödé: 一只猫", "two people, walking; at sunset"]


def image(mode: str = "RGB", size=(24, 16), color=(200, 30, 60)) -> PIL.Image.Image:
    return PIL.Image.new(mode, size, color)


def encode(img: PIL.Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png_bytes(arr: np.ndarray) -> bytes:
    return encode(PIL.Image.fromarray(arr), "PNG")


def tar_bytes(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()
