"""Loading checkpoints: every on-disk form and source, and clear errors for broken ones."""

from __future__ import annotations

import json
import shutil
import uuid

import fsspec
import pytest
import torch
from transformers import AutoModelForCausalLM

from janus.checkpoints import write_tiny_checkpoint
from janus.models import MultiModalityCausalLM, VLChatProcessor
from janus.models.hub import ModelNotFoundError, resolve_model_path
from janus.models.loading import CheckpointError


def small_checkpoint(path, **kw):
    # small VQ (2 levels) keeps these tests fast; the loader does not care about sizes
    return write_tiny_checkpoint(path, vq_ch_mult=(1, 2), **kw)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k].float(), sb[k].float(), rtol=0, atol=0, msg=k)


@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    return small_checkpoint(tmp_path_factory.mktemp("ref") / "ckpt", seed=3)


@pytest.fixture(scope="module")
def reference_model(reference_dir):
    return MultiModalityCausalLM.from_pretrained(reference_dir, dtype=torch.float32)


@pytest.mark.parametrize("fmt,shards", [("bin", 1), ("bin", 3), ("safetensors", 1), ("safetensors", 2)])
def test_formats_load_the_same_weights(tmp_path, reference_model, fmt, shards):
    path = small_checkpoint(tmp_path / "c", seed=3, weights_format=fmt, shards=shards)
    index = {"bin": "pytorch_model.bin.index.json", "safetensors": "model.safetensors.index.json"}[fmt]
    assert (path / index).exists() == (shards > 1)
    model = MultiModalityCausalLM.from_pretrained(path, dtype=torch.float32)
    assert_same_weights(model, reference_model)
    assert not model.training


def test_dtype_selection(reference_dir):
    bf16 = MultiModalityCausalLM.from_pretrained(reference_dir, torch_dtype="bf16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    assert bf16.language_model.model.rotary_emb.inv_freq.dtype == torch.float32
    fp16 = MultiModalityCausalLM.from_pretrained(reference_dir, dtype=torch.float16)
    assert {p.dtype for p in fp16.parameters()} == {torch.float16}
    with pytest.raises(ValueError, match="unsupported dtype"):
        MultiModalityCausalLM.from_pretrained(reference_dir, dtype="int8")


def test_checkpoint_dtype_is_the_default(tmp_path):
    path = small_checkpoint(tmp_path / "c", dtype="bfloat16")
    model = MultiModalityCausalLM.from_pretrained(path)
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16


def test_cuda_request_falls_back_to_cpu_without_cuda(reference_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA; the fallback is for machines without")
    model = MultiModalityCausalLM.from_pretrained(reference_dir, device="cuda")
    assert model.device.type == "cpu"


def test_auto_model_for_causal_lm_as_deepseek_calls_it(reference_dir, reference_model):
    model = AutoModelForCausalLM.from_pretrained(
        str(reference_dir), trust_remote_code=True, dtype=torch.float32
    )
    assert isinstance(model, MultiModalityCausalLM)
    assert_same_weights(model, reference_model)


def test_s3_checkpoint_is_downloaded_once_and_cached(tmp_path, reference_dir, reference_model, s3_options):
    bucket = f"models-{uuid.uuid4().hex[:8]}"
    fs = fsspec.filesystem("s3", **s3_options)
    fs.mkdir(bucket)
    fs.put(str(reference_dir) + "/", f"{bucket}/janus-tiny/", recursive=True)
    url = f"s3://{bucket}/janus-tiny"
    cache = tmp_path / "cache"

    model = MultiModalityCausalLM.from_pretrained(
        url, storage_options=s3_options, cache_dir=cache, dtype="float32"
    )
    assert_same_weights(model, reference_model)
    processor = VLChatProcessor.from_pretrained(url, storage_options=s3_options, cache_dir=cache)
    assert processor.image_id is not None

    # the second load is served from the cache: it works with the bucket gone
    fs.rm(bucket, recursive=True)
    again = MultiModalityCausalLM.from_pretrained(
        url, storage_options=s3_options, cache_dir=cache, dtype="float32"
    )
    assert_same_weights(again, reference_model)


def test_s3_prefix_without_checkpoint_is_a_clear_error(tmp_path, s3_options):
    bucket = f"empty-{uuid.uuid4().hex[:8]}"
    fsspec.filesystem("s3", **s3_options).mkdir(bucket)
    with pytest.raises(ModelNotFoundError, match="no checkpoint files"):
        resolve_model_path(f"s3://{bucket}/nothing", storage_options=s3_options, cache_dir=tmp_path)


def test_hub_id_resolves_to_the_local_hub_snapshot(tmp_path, monkeypatch, reference_dir, reference_model):
    # The real hub code path (huggingface_hub.snapshot_download), served from a populated hub cache.
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--deepseek-ai--Janus-Pro-1B"
    shutil.copytree(reference_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = MultiModalityCausalLM.from_pretrained(
        "deepseek-ai/Janus-Pro-1B", cache_dir=tmp_path / "hub", dtype="fp32"
    )
    assert_same_weights(model, reference_model)


def test_hub_id_not_cached_offline_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="huggingface-cli download deepseek-ai/Janus-Pro-7B"):
        MultiModalityCausalLM.from_pretrained("deepseek-ai/Janus-Pro-7B", cache_dir=tmp_path)


def test_bad_path_is_a_clear_error(tmp_path):
    with pytest.raises(ModelNotFoundError, match="neither an existing directory"):
        resolve_model_path(str(tmp_path / "does" / "not" / "exist"))


def test_truncated_weight_file_names_the_file(tmp_path):
    path = small_checkpoint(tmp_path / "c")
    weights = path / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*corrupted or truncated"):
        MultiModalityCausalLM.from_pretrained(path)


def test_corrupted_safetensors_names_the_file(tmp_path):
    path = small_checkpoint(tmp_path / "c", weights_format="safetensors")
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[:8] = (2**40).to_bytes(8, "little")  # header length pointing past the end
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        MultiModalityCausalLM.from_pretrained(path)


def test_pickle_with_code_is_refused(tmp_path):
    path = small_checkpoint(tmp_path / "c")
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    state["evil"] = shutil.rmtree  # an arbitrary object: weights_only must refuse to unpickle it
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        MultiModalityCausalLM.from_pretrained(path)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    path = small_checkpoint(tmp_path / "c")
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    del state["gen_head.vision_head.weight"]
    state["gen_head.extra.weight"] = torch.zeros(2)
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as info:
        MultiModalityCausalLM.from_pretrained(path)
    msg = str(info.value)
    assert "missing keys (1)" in msg and "gen_head.vision_head.weight" in msg
    assert "unexpected keys (1)" in msg and "gen_head.extra.weight (in pytorch_model.bin)" in msg


def test_shape_mismatch_is_listed(tmp_path):
    path = small_checkpoint(tmp_path / "c")
    state = torch.load(path / "pytorch_model.bin", weights_only=True)
    state["gen_embed.weight"] = torch.zeros(3, 8)
    torch.save(state, path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"gen_embed.weight: checkpoint \(3, 8\)"):
        MultiModalityCausalLM.from_pretrained(path)


def test_unknown_cls_is_a_clear_error(tmp_path):
    path = small_checkpoint(tmp_path / "c")
    cfg = json.loads((path / "config.json").read_text())
    cfg["gen_vision_config"]["cls"] = "VQ-32"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"gen_vision_config.cls = 'VQ-32' is not supported"):
        MultiModalityCausalLM.from_pretrained(path)


def test_missing_weights_and_shards_are_clear_errors(tmp_path):
    path = small_checkpoint(tmp_path / "c", shards=2)
    (path / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(CheckpointError, match="shard files that do not exist"):
        MultiModalityCausalLM.from_pretrained(path)
    for f in path.glob("pytorch_model*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no weights in"):
        MultiModalityCausalLM.from_pretrained(path)


PEAK_SCRIPT = r"""
import sys, torch
from janus.models import MultiModalityCausalLM

def anon_kib():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

before = anon_kib()
model = MultiModalityCausalLM.from_pretrained(sys.argv[1], dtype=sys.argv[2])
print(anon_kib() - before)
"""


@pytest.mark.slow
@pytest.mark.parametrize("dtype,max_copies", [("bfloat16", 0.1), ("float32", 1.1)])
def test_loading_holds_no_second_copy_of_the_weights(tmp_path, dtype, max_copies):
    # A ~110 MB bf16 checkpoint: in its own dtype the tensors stay memory-mapped (almost no anonymous
    # memory); cast to fp32 they are materialised once (2x the file), never file + model copies.
    import subprocess
    import sys

    path = write_tiny_checkpoint(
        tmp_path / "c",
        dtype="bfloat16",
        hidden=512,
        vocab_size=32768,
        intermediate=1024,
        llm_layers=4,
        llm_heads=8,
        vq_ch_mult=(1, 2),
    )
    size = (path / "pytorch_model.bin").stat().st_size
    grown_kib = int(
        subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, str(path), dtype], check=True, capture_output=True, text=True
        ).stdout.split()[-1]
    )
    model_bytes = size * (2 if dtype == "float32" else 1)
    assert grown_kib * 1024 < max_copies * model_bytes + 16 * 2**20, (grown_kib, size)


def test_the_python_api_takes_the_embedded_models_names_as_the_configs_do(tmp_path):
    """``model.path: shapes`` in a config and ``from_pretrained("shapes")`` in Python are one name."""
    from janus.embedded import embedded_path
    from janus.engine import CaptionEngine, SynthesisEngine
    from pipeline.model_ref import resolve_model_ref
    from tests.support.shapes import shapes_vq

    synth = SynthesisEngine.from_pretrained("shapes", dtype="float32")
    result = synth.generate([{"prompt": "a red circle on the left, blue background", "seed": 1}])[0]
    side = shapes_vq().image_size
    assert result.ok and result.image.shape == (side, side, 3)
    assert CaptionEngine.from_pretrained("shapes").generate([{"image": result.image}])[0].ok
    assert resolve_model_ref("shapes") == embedded_path("shapes")
    assert embedded_path("deepseek-ai/Janus-Pro-7B") is None
    assert (tmp_path / "tiny-janus-v1" / "config.json").exists() is False
    tiny = embedded_path("tiny", tmp_path)  # written on first use, into the cache given
    assert (tmp_path / "tiny-janus-v1" / "config.json").exists() and tiny.endswith("tiny-janus-v1")
