"""Self-checks of tests/support/hf_janus: transformers' Janus -> DeepSeek's official checkpoint layout.

(a) full-size 1B / 7B HF models (meta device) convert to exactly the official names and shapes;
(b) on a tiny model every HF tensor is used exactly once and copied unchanged;
(c) the converted weights compute what HF computes when run by independent DeepSeek-style code:
    vision qkv order (manual timm attention), the whole SigLIP tower (timm), aligners / gen head,
    the LLaMA (transformers' LlamaForCausalLM) and the VQ-16 (a LlamaGen reference written here).
"""

from __future__ import annotations

import collections
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import JanusForConditionalGeneration, LlamaConfig, LlamaForCausalLM

from tests.support import hf_janus as H
from tests.support.data import official_tensors

VT = "vision_model.vision_tower"


def _sub(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    config = H.tiny_hf_janus_config()
    model = JanusForConditionalGeneration(config).eval()
    H.randomize_(model, seed=1)
    official_config = H.official_config_from_hf(config)
    state = H.official_state_dict_from_hf(model, official_config, seed=2)
    return model, official_config, state


# ------------------------------------------------------------------------------------------------
# (a) full-size layout
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", ["1b", "7b"])
def test_full_size_conversion_matches_official_names_and_shapes(size):
    reference = official_tensors(size)
    config = H.full_hf_janus_config(size)
    with torch.device("meta"):
        model = JanusForConditionalGeneration(config)
    official_config = H.official_config_from_hf(config, torch_dtype="bfloat16")
    state = H.official_state_dict_from_hf(model, official_config)

    assert all(t.device.type == "meta" for t in state.values())
    got = {k: list(v.shape) for k, v in state.items()}
    assert sorted(got) == sorted(reference)
    assert got == reference
    # the config-only derivation agrees too
    assert {k: list(v) for k, v in H.official_tensor_shapes(official_config).items()} == reference


@pytest.mark.parametrize("size", ["1b", "7b"])
def test_full_size_official_config_has_no_extensions(size):
    official = H.official_config_from_hf(H.full_hf_janus_config(size), torch_dtype="bfloat16")
    d = 2048 if size == "1b" else 4096
    assert official["model_type"] == "multi_modality"
    assert official["vision_config"] == {
        "cls": "CLIPVisionTower",
        "model_type": "vision",
        "params": {
            "image_size": 384,
            "model_name": "siglip_large_patch16_384",
            "select_feature": "same",
            "select_layer": -1,
        },
    }
    assert official["gen_vision_config"]["params"] == {"image_token_size": 16384, "n_embed": 8}
    assert official["aligner_config"]["params"] == {
        "depth": 2,
        "input_dim": 1024,
        "n_embed": d,
        "projector_type": "mlp_gelu",
    }
    assert official["gen_aligner_config"]["params"]["input_dim"] == 8
    assert official["gen_head_config"]["params"] == {
        "image_token_embed": d,
        "image_token_size": 16384,
        "n_embed": d,
    }
    lang = official["language_config"]
    assert lang["hidden_size"] == d and lang["vocab_size"] == 102400
    assert lang["num_hidden_layers"] == (24 if size == "1b" else 30)
    assert lang["tie_word_embeddings"] is False


# ------------------------------------------------------------------------------------------------
# (b) tiny: every HF tensor used exactly once, values copied
# ------------------------------------------------------------------------------------------------


def test_tiny_config_and_extensions(tiny):
    model, official, _ = tiny
    cfg = model.config
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    assert cfg.vision_config.hidden_act == "gelu" and cfg.vision_config.layer_norm_eps == 1e-6
    assert cfg.vq_config.num_patches == 24 and cfg.vision_config.num_image_tokens == 576
    assert official["vision_config"]["params"] == {
        "image_size": 384,
        "model_name": "siglip_large_patch16_384",
        "select_feature": "same",
        "select_layer": -1,
        "width": 64,
        "layers": 2,
        "heads": 4,
    }
    assert official["gen_vision_config"]["params"] == {
        "image_token_size": 16384,
        "n_embed": 8,
        "ch": 32,
        "z_channels": 32,
    }
    # overrides reach the config
    other = H.tiny_hf_janus_config(vocab_size=2000, vq_num_res_blocks=1, vision_layers=3, image_token_id=1999)
    params = H.official_config_from_hf(other)
    assert params["language_config"]["vocab_size"] == 2000
    assert params["gen_vision_config"]["params"]["num_res_blocks"] == 1
    assert params["vision_config"]["params"]["layers"] == 3
    assert other.image_token_id == 1999
    with pytest.raises(ValueError, match="32"):
        H.tiny_hf_janus_config(vq_ch=48)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        H.tiny_hf_janus_config(tie_word_embeddings=True)


def test_tiny_every_hf_tensor_used_exactly_once(tiny):
    model, official_config, state = tiny
    hf_state = model.state_dict()
    plan = H.conversion_plan(hf_state.keys())

    uses = collections.Counter(src for sources in plan.values() for src in sources)
    assert set(uses) == set(hf_state), "some HF tensor is not used"
    assert all(n == 1 for n in uses.values()), [k for k, n in uses.items() if n != 1]

    synthetic = {k for k in state if k not in plan}
    assert synthetic == {k for k in state if k.startswith(f"{VT}.attn_pool.")} | {
        "gen_vision_model.quantize.codebook_used"
    }
    assert set(state) == set(H.official_tensor_shapes(official_config))

    for official, sources in plan.items():
        value = state[official]
        if len(sources) == 3:
            assert official.endswith(("attn.qkv.weight", "attn.qkv.bias"))
            assert [s.split(".")[-2] for s in sources] == ["q_proj", "k_proj", "v_proj"]
            for part, src in zip(value.chunk(3, dim=0), sources, strict=True):
                assert torch.equal(part, hf_state[src])
        elif official == f"{VT}.pos_embed":
            assert torch.equal(value[0], hf_state[sources[0]])
        else:
            assert torch.equal(value, hf_state[sources[0]]), official

    assert torch.count_nonzero(state["gen_vision_model.quantize.codebook_used"]) == 0
    assert state["gen_vision_model.quantize.codebook_used"].shape == (65536,)
    for k in synthetic - {"gen_vision_model.quantize.codebook_used"}:
        assert torch.isfinite(state[k]).all() and state[k].std() > 0, k


def test_conversion_rejects_bad_input(tiny):
    model, official_config, _ = tiny
    hf_state = dict(model.state_dict())
    extra = dict(hf_state, **{"model.something_new.weight": torch.zeros(1)})
    with pytest.raises(KeyError):
        H.official_state_dict_from_hf(extra, official_config)
    missing = {k: v for k, v in hf_state.items() if k != "lm_head.weight"}
    with pytest.raises(ValueError, match="missing"):
        H.official_state_dict_from_hf(missing, official_config)


# ------------------------------------------------------------------------------------------------
# (c) numerics against DeepSeek-style code
# ------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_vision_qkv_order_block0(tiny):
    model, _, state = tiny
    attn = model.model.vision_model.encoder.layers[0].self_attn
    heads, width = attn.num_heads, attn.embed_dim
    x = torch.randn(2, 50, width, generator=torch.Generator().manual_seed(3))
    expected, _ = attn(x)

    # timm Attention.forward, written out
    qkv = F.linear(x, state[f"{VT}.blocks.0.attn.qkv.weight"], state[f"{VT}.blocks.0.attn.qkv.bias"])
    b, n, _ = x.shape
    q, k, v = qkv.reshape(b, n, 3, heads, width // heads).permute(2, 0, 3, 1, 4).unbind(0)
    w = (q @ k.transpose(-2, -1)) * (width // heads) ** -0.5
    out = (w.softmax(-1) @ v).transpose(1, 2).reshape(b, n, width)
    out = F.linear(out, state[f"{VT}.blocks.0.attn.proj.weight"], state[f"{VT}.blocks.0.attn.proj.bias"])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_vision_tower_matches_timm(tiny):
    timm_vit = pytest.importorskip("timm.models.vision_transformer")
    model, official, state = tiny
    p = {**H.OFFICIAL_VISION_DEFAULTS, **official["vision_config"]["params"]}
    # DeepSeek's create_siglip_vit: timm VisionTransformer, no class token, MAP head, LayerNorm eps 1e-6, nn.GELU
    vit = timm_vit.VisionTransformer(
        img_size=p["image_size"],
        patch_size=p["patch_size"],
        embed_dim=p["width"],
        depth=p["layers"],
        num_heads=p["heads"],
        mlp_ratio=p["mlp_ratio"],
        class_token=False,
        global_pool="map",
        num_classes=0,
    ).eval()
    vit.load_state_dict(_sub(state, f"{VT}."), strict=True)
    pixels = torch.randn(2, 3, 384, 384, generator=torch.Generator().manual_seed(4))
    ours = vit.forward_features(pixels)
    theirs = model.model.vision_model(pixels).last_hidden_state
    assert ours.shape == (2, 576, p["width"])
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _mlp_gelu(state: dict[str, torch.Tensor], prefix: str) -> nn.Sequential:
    w0, w2 = state[f"{prefix}.layers.0.weight"], state[f"{prefix}.layers.2.weight"]
    seq = nn.Sequential(nn.Linear(w0.shape[1], w0.shape[0]), nn.GELU(), nn.Linear(w2.shape[1], w2.shape[0]))
    seq.load_state_dict(_sub(state, f"{prefix}.layers."), strict=True)
    return seq


@torch.no_grad()
def test_aligners_gen_head_gen_embed(tiny):
    model, _, state = tiny
    m = model.model
    gen = torch.Generator().manual_seed(5)

    x = torch.randn(3, 7, m.vision_model.config.hidden_size, generator=gen)
    torch.testing.assert_close(_mlp_gelu(state, "aligner")(x), m.aligner(x))

    ids = torch.randint(0, 16384, (2, 9), generator=gen)
    embed = nn.Embedding.from_pretrained(state["gen_embed.weight"])
    ours = _mlp_gelu(state, "gen_aligner")(embed(ids))
    torch.testing.assert_close(ours, model.prepare_embeddings_for_image_generation(ids))

    h = torch.randn(4, m.config.text_config.hidden_size, generator=gen)
    head = nn.Sequential(
        nn.Linear(*state["gen_head.output_mlp_projector.weight"].shape[::-1]),
        nn.GELU(),
        nn.Linear(*state["gen_head.vision_head.weight"].shape[::-1]),
    )
    head[0].weight.copy_(state["gen_head.output_mlp_projector.weight"])
    head[0].bias.copy_(state["gen_head.output_mlp_projector.bias"])
    head[2].weight.copy_(state["gen_head.vision_head.weight"])
    head[2].bias.copy_(state["gen_head.vision_head.bias"])
    torch.testing.assert_close(head(h), m.generation_head(h))


@torch.no_grad()
def test_language_model_matches_llama(tiny):
    model, official, state = tiny
    lm = LlamaForCausalLM(LlamaConfig(**official["language_config"])).eval()
    lm.load_state_dict(_sub(state, "language_model."), strict=True)
    ids = torch.randint(0, 1024, (2, 11), generator=torch.Generator().manual_seed(6))
    ours = lm(input_ids=ids).logits
    theirs = model(input_ids=ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# --- LlamaGen VQ-16 reference (DeepSeek's janus/models/vq_model.py structure and names) -----------


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


class _Res(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1, 1, 0)

    def forward(self, x):
        h = self.conv2(_swish(self.norm2(self.conv1(_swish(self.norm1(x))))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class _Attn(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        q, k, v = self.q(h), self.k(h), self.v(h)
        b, c, hh, ww = q.shape
        q = q.reshape(b, c, hh * ww).permute(0, 2, 1)
        w = torch.bmm(q, k.reshape(b, c, hh * ww)) * (int(c) ** (-0.5))
        w = F.softmax(w, dim=2)
        out = torch.bmm(v.reshape(b, c, hh * ww), w.permute(0, 2, 1)).reshape(b, c, hh, ww)
        return x + self.proj_out(out)


class _Down(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0))


class _Up(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Encoder(nn.Module):
    def __init__(self, ch, ch_mult, nrb, z):
        super().__init__()
        self.nrb, n = nrb, len(ch_mult)
        self.conv_in = nn.Conv2d(3, ch, 3, 1, 1)
        in_mult = (1, *ch_mult)
        self.conv_blocks = nn.ModuleList()
        for lev in range(n):
            blk = nn.Module()
            blk.res, blk.attn = nn.ModuleList(), nn.ModuleList()
            cin, cout = ch * in_mult[lev], ch * ch_mult[lev]
            for _ in range(nrb):
                blk.res.append(_Res(cin, cout))
                cin = cout
                if lev == n - 1:
                    blk.attn.append(_Attn(cin))
            if lev != n - 1:
                blk.downsample = _Down(cin)
            self.conv_blocks.append(blk)
        self.mid = nn.ModuleList([_Res(cin, cin), _Attn(cin), _Res(cin, cin)])
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, z, 3, 1, 1)

    def forward(self, x):
        h = self.conv_in(x)
        for lev, blk in enumerate(self.conv_blocks):
            for i in range(self.nrb):
                h = blk.res[i](h)
                if len(blk.attn) > 0:
                    h = blk.attn[i](h)
            if lev != len(self.conv_blocks) - 1:
                h = blk.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(_swish(self.norm_out(h)))


class _Decoder(nn.Module):
    def __init__(self, ch, ch_mult, nrb, z):
        super().__init__()
        self.nrb, n = nrb, len(ch_mult)
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z, cin, 3, 1, 1)
        self.mid = nn.ModuleList([_Res(cin, cin), _Attn(cin), _Res(cin, cin)])
        self.conv_blocks = nn.ModuleList()
        for lev in reversed(range(n)):
            blk = nn.Module()
            blk.res, blk.attn = nn.ModuleList(), nn.ModuleList()
            cout = ch * ch_mult[lev]
            for _ in range(nrb + 1):
                blk.res.append(_Res(cin, cout))
                cin = cout
                if lev == n - 1:
                    blk.attn.append(_Attn(cin))
            if lev != 0:
                blk.upsample = _Up(cin)
            self.conv_blocks.append(blk)
        self.norm_out, self.conv_out = _norm(cin), nn.Conv2d(cin, 3, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for lev, blk in enumerate(self.conv_blocks):
            for i in range(self.nrb + 1):
                h = blk.res[i](h)
                if len(blk.attn) > 0:
                    h = blk.attn[i](h)
            if lev != len(self.conv_blocks) - 1:
                h = blk.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class _Quantizer(nn.Module):
    def __init__(self, n_e, e_dim):
        super().__init__()
        self.embedding = nn.Embedding(n_e, e_dim)
        self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self):
        return F.normalize(self.embedding.weight, p=2, dim=-1)  # codebook_l2_norm=True

    def ids(self, z):  # nearest l2-normalised code (DeepSeek VQ-16 encode)
        z = F.normalize(torch.einsum("bchw->bhwc", z), p=2, dim=-1).reshape(-1, z.shape[1])
        e = self.codebook()
        d = (z**2).sum(1, keepdim=True) + (e**2).sum(1) - 2 * z @ e.t()
        return d.argmin(1)


class _VQ16(nn.Module):
    def __init__(self, p: dict):
        super().__init__()
        ch, mult, nrb, z = p["ch"], tuple(p["ch_mult"]), p["num_res_blocks"], p["z_channels"]
        self.encoder, self.decoder = _Encoder(ch, mult, nrb, z), _Decoder(ch, mult, nrb, z)
        self.quantize = _Quantizer(p["image_token_size"], p["n_embed"])
        self.quant_conv = nn.Conv2d(z, p["n_embed"], 1)
        self.post_quant_conv = nn.Conv2d(p["n_embed"], z, 1)

    def decode_code(self, ids, shape):  # shape = [B, C, H, W]
        q = self.quantize.codebook()[ids].reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(q.contiguous()))


@torch.no_grad()
def test_vq_matches_llamagen_reference(tiny):
    model, official, state = tiny
    p = {**H.OFFICIAL_VQ_DEFAULTS, **official["gen_vision_config"]["params"]}
    vq = _VQ16(p).eval()
    vq.load_state_dict(_sub(state, "gen_vision_model."), strict=True)
    hf_vq = model.model.vqmodel
    gen = torch.Generator().manual_seed(7)

    ids = torch.randint(0, p["image_token_size"], (1, 576), generator=gen)
    ours = vq.decode_code(ids, shape=[1, p["n_embed"], 24, 24])
    assert ours.shape == (1, 3, 384, 384)
    # HF's public path (decode_image_tokens = vqmodel.decode, channels-last)
    theirs = model.decode_image_tokens(ids)
    torch.testing.assert_close(ours.permute(0, 2, 3, 1), theirs, rtol=1e-4, atol=1e-4)

    pixels = torch.rand(1, 3, 384, 384, generator=gen) * 2 - 1
    h = vq.quant_conv(vq.encoder(pixels))
    out = hf_vq.encode(pixels)
    torch.testing.assert_close(h, hf_vq.quant_conv(out.last_hidden_state), rtol=1e-4, atol=1e-4)
    assert h.shape == (1, p["n_embed"], 24, 24)
    # Known difference (ARCHITECTURE_NOTES 1): HF's quantizer searches the raw codebook with raw latents,
    # DeepSeek's VQ-16 (codebook_l2_norm) searches l2-normalised ones, so image -> ids must not be compared.
    flat = h.permute(0, 2, 3, 1).reshape(-1, p["n_embed"])
    raw_ids = torch.cdist(flat, vq.quantize.embedding.weight).argmin(1)
    assert (out.image_tokens == raw_ids).float().mean() > 0.99  # (exact up to near-ties)
    assert vq.quantize.ids(h).shape == raw_ids.shape


def test_write_official_checkpoint(tiny, tmp_path):
    model, official, state = tiny
    config = H.write_official_checkpoint_from_hf(model, tmp_path, seed=2)
    assert config == official
    assert json.loads((tmp_path / "config.json").read_text()) == official
    loaded = torch.load(tmp_path / "pytorch_model.bin", weights_only=True, map_location="cpu")
    assert list(loaded) == list(state)
    for k, v in loaded.items():
        assert v.dtype == torch.float32 and v.is_contiguous()
        assert torch.equal(v, state[k]), k
