"""DeepSeek's own example programs, read from the seed document, run unchanged against our package.

The seed write-up (in the project's shared folder beside the repository; without it these tests
skip) shows the two programs users already run (multimodal understanding and text-to-image). Each
is cut out of the seed file at test time and executed with only these edits:
the hub id becomes a tiny local checkpoint, ``.cuda()`` is dropped (CPU CI), and the understanding
example gets the ``question`` it leaves undefined plus the ``images/equation.png`` it opens.
Everything else -- ``AutoModelForCausalLM(..., trust_remote_code=True)``, ``.to(torch.bfloat16)``,
the 576-step CFG loop with 16 images -- runs as written.
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

SEED_FILE = Path("seed") / "000_460774fca0d825a8.txt"  # in the shared folder
MODEL_ID = '"deepseek-ai/Janus-Pro-7B"'

UNDERSTANDING = ("多模态理解示例", "文生图示例")
TEXT_TO_IMAGE = ("文生图示例", "模型代码")


@pytest.fixture(scope="module")
def seed_text(shared_dir) -> str:
    path = shared_dir / SEED_FILE
    if not path.is_file():
        pytest.skip(f"needs the seed document, not found at {path}")
    return path.read_text(encoding="utf-8")


def extract_example(seed_text: str, start: str, end: str) -> str:
    """The Python source between the heading line ``start`` and the heading line ``end``.

    Lines that are a lone ``-`` are the write-up's section separators, not code.
    """
    lines = seed_text.splitlines()
    heads = [i for i, line in enumerate(lines) if line.strip() == start]
    if len(heads) != 1:
        raise AssertionError(f"expected one heading {start!r} in the seed document, found {len(heads)}")
    begin = heads[0] + 1
    stop = next((i for i in range(begin, len(lines)) if lines[i].strip() == end), None)
    if stop is None:
        raise AssertionError(f"no heading {end!r} after {start!r} in the seed document")
    body = [line for line in lines[begin:stop] if line.strip() != "-"]
    return "\n".join(body).strip() + "\n"


def adapt(source: str, model_dir: Path) -> str:
    """The only edits: local checkpoint instead of the hub id, no ``.cuda()``."""
    assert source.count(MODEL_ID) == 1, "the example should name the 7B hub checkpoint exactly once"
    assert ".cuda()" in source
    source = source.replace(f"model_path = {MODEL_ID}", f"model_path = {str(model_dir)!r}")
    return source.replace(".cuda()", "")


@pytest.fixture(scope="module")
def seed_checkpoint(tmp_path_factory) -> Path:
    """Tiny weights, small vision tower, all five VQ levels (real 384 px output) at minimal width."""
    from janus.checkpoints import write_tiny_checkpoint

    return write_tiny_checkpoint(
        tmp_path_factory.mktemp("seed") / "janus-tiny",
        seed=0,
        hidden=64,
        llm_layers=2,
        llm_heads=4,
        intermediate=128,
        vision_width=64,
        vision_layers=1,
        vision_heads=4,
        vq_ch=32,
        vq_z_channels=32,
    )


def run_example(source: str, namespace: dict) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(source, "<seed example>", "exec"), namespace)
    return out.getvalue()


def test_extraction_finds_both_programs(seed_text):
    und = extract_example(seed_text, *UNDERSTANDING)
    t2i = extract_example(seed_text, *TEXT_TO_IMAGE)
    for src in (und, t2i):
        compile(src, "<seed example>", "exec")  # valid Python as cut out
    assert "vl_gpt.language_model.generate(" in und
    assert "def generate(" in t2i and "decode_code" in t2i


def test_understanding_example_runs_unchanged(seed_text, seed_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    PIL.Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)).save(
        tmp_path / "images" / "equation.png"
    )
    source = adapt(extract_example(seed_text, *UNDERSTANDING), seed_checkpoint)
    question = "Convert the formula into latex code."
    ns: dict = {"__name__": "__seed_example__", "question": question}
    printed = run_example(source, ns)

    answer = ns["answer"]
    assert isinstance(answer, str)
    inputs = ns["prepare_inputs"]
    n_tok = 576
    assert inputs.pixel_values.shape == (1, 1, 3, 384, 384)
    assert inputs.input_ids.shape == inputs.attention_mask.shape == inputs.images_seq_mask.shape
    assert inputs.input_ids.shape[0] == 1
    assert int(inputs.images_seq_mask.sum()) == n_tok
    assert inputs.images_emb_mask.shape == (1, 1, n_tok)
    assert bool(inputs.attention_mask.all())
    assert question in inputs["sft_format"][0]
    assert ns["inputs_embeds"].shape == (*inputs.input_ids.shape, 64)
    assert ns["inputs_embeds"].dtype == torch.bfloat16  # the example's .to(torch.bfloat16) took effect
    out = ns["outputs"]
    assert out.ndim == 2 and out.shape[0] == 1 and 1 <= out.shape[1] <= 512
    assert inputs["sft_format"][0] in printed


@pytest.mark.slow
def test_text_to_image_example_runs_unchanged(seed_text, seed_checkpoint, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = adapt(extract_example(seed_text, *TEXT_TO_IMAGE), seed_checkpoint)
    ns: dict = {"__name__": "__seed_example__"}
    torch.manual_seed(0)
    run_example(source, ns)

    assert ns["vl_gpt"].gen_head.vision_head.weight.dtype == torch.bfloat16
    files = sorted(os.listdir(tmp_path / "generated_samples"))
    assert files == sorted(f"img_{i}.jpg" for i in range(16))
    arrays = []
    for name in files:
        with PIL.Image.open(tmp_path / "generated_samples" / name) as im:
            assert im.format == "JPEG"
            assert im.size == (384, 384)
            assert im.mode == "RGB"
            arrays.append(np.asarray(im))
    # 16 independently sampled images: not all identical, not blank
    assert any(not np.array_equal(arrays[0], a) for a in arrays[1:])
    assert all(a.std() > 0 for a in arrays)
