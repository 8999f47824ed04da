"""The synthesis job's contact sheet: the samples of one prompt side by side, prompt and seed under each."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import PIL.Image

from pipeline.contact_sheet import CAPTION_LINES, LINE, THUMB, write_contact_sheet
from pipeline.output import OutputDir


def _shard(root: Path, name: str, samples: list[tuple[str, int, int]]) -> None:
    """A committed shard whose tar holds one plain image per (prompt, sample, seed), coloured by them."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for prompt, sample, seed in samples:
            key = f"k{seed:04d}"
            png = io.BytesIO()
            PIL.Image.new("RGB", (8, 8), colour(prompt, sample)).save(png, format="PNG")
            meta = json.dumps({"key": key, "prompt": prompt, "sample": sample, "seed": seed}).encode()
            for member, data in ((f"{key}.png", png.getvalue()), (f"{key}.json", meta)):
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    (root / f"{name}.tar").write_bytes(buf.getvalue())
    (root / f"{name}.parquet").write_bytes(b"")  # committed: the Parquet file exists


def colour(prompt: str, sample: int) -> tuple[int, int, int]:
    return (40 * int(prompt[-1]), 60 * sample, 200)


def cell(sheet: np.ndarray, row: int, col: int) -> tuple[int, ...]:
    return tuple(sheet[row * (THUMB + CAPTION_LINES * LINE + 6) + THUMB // 2, col * THUMB + THUMB // 2])


def test_samples_of_one_prompt_sit_side_by_side_in_sample_order(tmp_path):
    # keys sort the tar members by seed, which interleaves the prompts and puts sample 1 first
    _shard(tmp_path, "shard-a", [("prompt 1", 1, 3), ("prompt 2", 0, 4), ("prompt 1", 0, 5)])
    _shard(tmp_path, "shard-b", [("prompt 2", 1, 1), ("prompt 3", 0, 2), ("prompt 3", 1, 6)])
    url = write_contact_sheet(OutputDir(str(tmp_path)), 6)
    sheet = np.asarray(PIL.Image.open(url))
    assert sheet.shape[:2] == (3 * (THUMB + CAPTION_LINES * LINE + 6), 2 * THUMB)  # a row per prompt
    for row, prompt in enumerate(("prompt 1", "prompt 2", "prompt 3")):
        for sample in (0, 1):
            assert cell(sheet, row, sample) == colour(prompt, sample), (row, sample)
    # the label (prompt and seed) is drawn under each picture: dark pixels below the image
    assert (sheet[THUMB : THUMB + CAPTION_LINES * LINE, :THUMB] < 100).any()


def test_one_sample_per_prompt_tiles_a_square(tmp_path):
    _shard(tmp_path, "shard-a", [(f"prompt {i}", 0, i) for i in range(1, 5)])
    sheet = np.asarray(PIL.Image.open(write_contact_sheet(OutputDir(str(tmp_path)), 4)))
    assert sheet.shape[:2] == (2 * (THUMB + CAPTION_LINES * LINE + 6), 2 * THUMB)
    assert write_contact_sheet(OutputDir(str(tmp_path / "empty")), 4) is None
