"""VQ encode (image -> codes) against an independent nearest-codebook search.

``VQModel.encode`` finds each position's code with the expanded distance ``|z|^2 + |e|^2 - 2 z.e``
over L2-normalised vectors, as DeepSeek's (LlamaGen's) quantizer does. The oracle here searches the
same encoder features (read with a hook) with plain torch in float64: normalise, ``torch.cdist``,
argmin. A codebook read without its normalisation or a transposed grid gives other ids (both
checked); normalising the features alone cannot change the argmin against unit-length codes.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


def test_encode_ids_equal_an_independent_nearest_code_search(tiny_model):
    vq = tiny_model.gen_vision_model
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 384, 384, generator=gen) * 2 - 1
    seen: list[torch.Tensor] = []
    hook = vq.quant_conv.register_forward_hook(lambda _m, _i, out: seen.append(out))
    try:
        with torch.inference_mode():
            quant, _, (_, _, ids) = vq.encode(images)
    finally:
        hook.remove()
    features = seen[0].double()  # the encoder features the quantizer searched: [b, 8, h, w]
    b, c, h, w = features.shape
    vectors = F.normalize(features.permute(0, 2, 3, 1).reshape(-1, c), dim=-1)  # row order b, h, w
    codebook = F.normalize(vq.quantize.embedding.weight.detach().double(), dim=-1)
    distances = torch.cdist(vectors, codebook)
    expected = distances.argmin(dim=-1)

    assert ids.shape == (b * h * w,) and (h, w) == (24, 24)
    assert torch.equal(ids, expected)
    assert len(set(expected.tolist())) > h * w  # many codes in use: a constant id would not pass
    # the quantized map holds the chosen codes, channel-first on the same grid, and decodes as its ids do
    torch.testing.assert_close(quant, codebook[expected].float().view(b, h, w, c).permute(0, 3, 1, 2))
    with torch.inference_mode():
        torch.testing.assert_close(vq.decode_code(ids.view(b, h * w), shape=[b, c, h, w]), vq.decode(quant))


def test_the_code_grid_is_24_by_24_unless_the_config_sets_an_image_size():
    from janus.models.vq_model import VQConfig

    official = VQConfig.from_params({"image_token_size": 16384, "n_embed": 8})
    assert (official.downsample, official.grid, official.image_tokens) == (16, 24, 576)
    shrunk = VQConfig.from_params({"ch_mult": [1, 2, 2, 2], "image_size": 96})
    assert (shrunk.downsample, shrunk.grid, shrunk.image_tokens) == (8, 12, 144)
    with pytest.raises(ValueError, match="multiple of the VQ's downsampling"):
        VQConfig.from_params({"ch_mult": [1, 2, 2, 2], "image_size": 100})


def test_bf16_convolution_without_bf16_units_matches_pytorchs_bf16_kernel(tiny_model, monkeypatch):
    """On a CPU without bf16 arithmetic the VQ's convolutions widen to fp32 and round back (PyTorch's
    emulated bf16 kernel is ~60x slower there). Forced on here, whatever this CPU has, and compared
    with PyTorch's own bf16 convolution: at most one bf16 ulp apart, on very few elements, and whole
    decodes agree to bf16 rounding."""
    import copy

    from janus.models import vq_model
    from tests.support.bf16 import bf16_ulp

    gen = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        conv = vq_model.Conv2d(32, 16, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(2, 32, 20, 20, generator=gen).to(torch.bfloat16)
    with torch.inference_mode():
        monkeypatch.setattr(vq_model, "_NATIVE_BF16", False)
        widened = conv(x)
        monkeypatch.setattr(vq_model, "_NATIVE_BF16", True)
        kernel = conv(x)  # nn.Conv2d.forward: PyTorch's bf16 convolution, native or emulated
    assert widened.dtype == kernel.dtype == torch.bfloat16
    gap = (widened.float() - kernel.float()).abs()
    # one ulp, plus fp32 summation noise where 288 products of about one cancel to nearly zero
    assert bool((gap <= bf16_ulp(kernel.float()) + 1e-5).all()), gap.max()
    assert float((gap > 0).float().mean()) < 0.01

    # whole decodes: the widened path is as close to the fp32 decode as PyTorch's bf16 kernel is
    vq = tiny_model.gen_vision_model
    codes = torch.randint(0, vq.config.codebook_size, (2 * 3 * 3,), generator=gen)
    with torch.inference_mode():
        exact = vq.decode_code(codes, shape=[2, 8, 3, 3])
        vq16 = copy.deepcopy(vq).to(torch.bfloat16)
        errors = {}
        for native in (False, True):
            monkeypatch.setattr(vq_model, "_NATIVE_BF16", native)
            errors[native] = (vq16.decode_code(codes, shape=[2, 8, 3, 3]).float() - exact).abs()
    assert exact.shape == (2, 3, 48, 48) and float(exact.std()) > 0.1
    assert float(errors[False].mean()) <= 1.2 * float(errors[True].mean())
    assert float(errors[False].max()) <= 1.5 * float(errors[True].max())
