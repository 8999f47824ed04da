"""C1: the full-size 1B and 7B configs build exactly the official tensor names and shapes."""

from __future__ import annotations

import json

import pytest
import torch

from janus.checkpoints import official_config, save_state_dict
from janus.models import MultiModalityCausalLM, MultiModalityConfig
from tests.support.data import DATA, official_tensors

OFFICIAL = {
    # language_config as the official files hold it: only the keys that differ from LlamaConfig.
    "1b": dict(
        hidden=2048,
        language={
            "hidden_size": 2048,
            "intermediate_size": 5632,
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "num_key_value_heads": 16,
        },
    ),
    "7b": dict(hidden=4096, language={"num_hidden_layers": 30}),
}


def full_config(size: str) -> dict:
    spec = OFFICIAL[size]
    cfg = official_config(
        vocab_size=102400, hidden=spec["hidden"], llm_layers=1, llm_heads=1, intermediate=1, dtype="bfloat16"
    )
    cfg["language_config"] = {
        "max_position_embeddings": 16384,
        "torch_dtype": "bfloat16",
        "vocab_size": 102400,
        **spec["language"],
    }
    return cfg


@pytest.mark.parametrize("size", ["1b", "7b"])
def test_repository_copy_of_the_manifest_is_the_shared_one(shared_dir, size):
    """tests/data holds the project's reference manifests unchanged (the tests run without shared/)."""
    name = f"janus-pro-{size}-tensors.json"
    assert (DATA / name).read_bytes() == (shared_dir / "reference" / name).read_bytes()


@pytest.mark.parametrize("size,count", [("1b", 882), ("7b", 936)])
def test_full_size_names_and_shapes(size, count):
    cfg = MultiModalityConfig(**{k: v for k, v in full_config(size).items() if k != "model_type"})
    with torch.device("meta"):
        model = MultiModalityCausalLM(cfg)
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    ref = official_tensors(size)
    assert len(ref) == count
    assert ours == ref
    # LlamaConfig defaults filled in for the 7B's sparse language_config
    if size == "7b":
        assert (cfg.language_config.hidden_size, cfg.language_config.intermediate_size) == (4096, 11008)
        assert cfg.language_config.num_attention_heads == 32


@pytest.mark.parametrize("size", ["1b", "7b"])
def test_checkpoint_with_official_keys_loads_strictly(tmp_path, size):
    # Each tensor is a stride-0 view of one element: torch.save keeps the view, so the file holds the
    # official names and shapes in a few KiB, and loading it takes the same strict path as real weights.
    ref = official_tensors(size)
    one = torch.zeros(1, dtype=torch.bfloat16)
    state = {
        name: one.expand(shape) if name.endswith("codebook_used") is False else torch.zeros(shape)
        for name, shape in ref.items()
    }
    (tmp_path / "config.json").write_text(json.dumps(full_config(size)))
    save_state_dict(state, tmp_path, shards=2)
    assert (tmp_path / "pytorch_model.bin.index.json").exists()
    model = MultiModalityCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    loaded = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert loaded == ref
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16
    # rotary buffers were rebuilt, nothing is left on the meta device
    assert not any(t.is_meta for t in model.state_dict().values())
    assert model.language_model.model.rotary_emb.inv_freq.device.type == "cpu"
