"""Session fixtures: one tiny checkpoint in the official format, loaded once through the real loader."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from janus.testing import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "janus-tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from janus.models import MultiModalityCausalLM

    return MultiModalityCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_processor(tiny_dir):
    from janus.models import VLChatProcessor

    return VLChatProcessor.from_pretrained(tiny_dir)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "reference").is_dir():
        raise RuntimeError(f"the project's shared/ folder is expected beside the repository at {SHARED}")
    return SHARED
