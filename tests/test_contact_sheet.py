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


def test_a_sheet_is_redrawn_only_when_what_it_shows_changed(tmp_path):
    """A rerun that committed nothing (a finished job's "nothing to run") keeps the sheet; another N or
    a new first shard redraws it, and so does a new shard when the sheet had room for more images."""
    _shard(tmp_path, "shard-b", [("prompt 1", 0, 1), ("prompt 2", 0, 2)])
    sheet = tmp_path / "contact_sheet.png"

    def draw(n: int) -> tuple[int, int]:
        """Draws (or keeps) a sheet of ``n``; its file's identity (a kept file is the same file)."""
        assert write_contact_sheet(OutputDir(str(tmp_path)), n) == f"{tmp_path}/contact_sheet.png"
        return sheet.stat().st_ino, sheet.stat().st_mtime_ns

    first = draw(2)
    assert draw(2) == first  # nothing changed: kept
    assert draw(1) != first  # another N
    one = draw(1)
    _shard(tmp_path, "shard-c", [("prompt 3", 0, 3)])  # after the shard the sheet of 1 came from
    assert draw(1) == one
    _shard(tmp_path, "shard-a", [("prompt 4", 0, 4)])  # a new first shard
    assert draw(1) != one
    three = draw(3)  # from shards a and b
    _shard(tmp_path, "shard-d", [("prompt 5", 0, 5)])
    assert draw(3) == three  # the first three images are still those of shards a and b
    all_five = draw(8)  # 5 images in all, fewer than 8: every shard read
    assert draw(8) == all_five
    _shard(tmp_path, "shard-e", [("prompt 6", 0, 6)])  # one more image to show
    assert draw(8) != all_five
    assert len(PIL.Image.open(sheet).getcolors(1 << 20)) > 2  # a real picture, not a stub
