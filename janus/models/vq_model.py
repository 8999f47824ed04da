"""VQ-16: the LlamaGen-style image tokenizer Janus generates with (16384 codes of dim 8, 16x down).

Only inference is implemented: ``encode`` (image -> codes) and ``decode_code`` (codes -> pixels).
Module and parameter names equal the official checkpoint's ``gen_vision_model.*`` keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vq_config import VQConfig


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX), as oneDNN reports it."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


_NATIVE_BF16 = cpu_has_bf16()


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that, in bf16 on a CPU without bf16 arithmetic (AVX2), convolves the inputs widened
    to fp32 and rounds the result back to bf16. Widening bf16 is exact, so this computes the products
    and fp32 sums a bf16 kernel computes, rounded once, like it: only the summation order differs. It
    exists because PyTorch emulates a bf16 convolution there about 60x slower than an fp32 one, which
    made a bf16 decode of 16 images at 384 px take minutes on such a CPU. Same parameters, same names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and x.device.type == "cpu" and not _NATIVE_BF16:
            bias = None if self.bias is None else self.bias.float()
            return self._conv_forward(x.float(), self.weight.float(), bias).to(torch.bfloat16)
        return super().forward(x)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x), the reference's nonlinearity, as one fused kernel (SiLU): one pass over the
    activations instead of two, which at 384 px is ~15% of a bf16 CPU decode. Same function; fp32
    results move by at most an ulp."""
    return F.silu(x)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(_swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention over all h*w positions."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = _norm(channels)
        self.q = Conv2d(channels, channels, 1)
        self.k = Conv2d(channels, channels, 1)
        self.v = Conv2d(channels, channels, 1)
        self.proj_out = Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = (m(y).reshape(b, 1, c, h * w).transpose(-1, -2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(c), as the reference
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as the reference


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(res: list[nn.Module], attn: list[nn.Module]) -> nn.Module:
    block = nn.Module()
    block.res = nn.ModuleList(res)
    block.attn = nn.ModuleList(attn)
    return block


def _run_level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A level's resnet blocks, each followed by its attention block where the level has them."""
    for i, res in enumerate(level.res):
        h = res(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def _mid(channels: int) -> nn.ModuleList:
    return nn.ModuleList(
        [ResnetBlock(channels, channels), AttnBlock(channels), ResnetBlock(channels, channels)]
    )


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig, in_channels: int = 3):
        super().__init__()
        mult = cfg.ch_mult
        self.conv_in = Conv2d(in_channels, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        block_in = cfg.ch
        last = len(mult) - 1
        for i, m in enumerate(mult):
            block_out = cfg.ch * m
            res, attn = [], []
            for _ in range(cfg.num_res_blocks):
                res.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if i == last:
                    attn.append(AttnBlock(block_in))
            level = _level(res, attn)
            if i != last:
                level.downsample = Downsample(block_in)
            self.conv_blocks.append(level)
        self.mid = _mid(block_in)
        self.norm_out = _norm(block_in)
        self.conv_out = Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(_swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig, out_channels: int = 3):
        super().__init__()
        mult = cfg.ch_mult
        block_in = cfg.ch * mult[-1]
        self.conv_in = Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mult))):
            block_out = cfg.ch * mult[i]
            res, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                res.append(ResnetBlock(block_in, block_out))
                block_in = block_out
                if i == len(mult) - 1:
                    attn.append(AttnBlock(block_in))
            level = _level(res, attn)
            if i != 0:
                level.upsample = Upsample(block_in)
            self.conv_blocks.append(level)
        self.norm_out = _norm(block_in)
        self.conv_out = Conv2d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.codebook_l2_norm
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        if cfg.codebook_show_usage:
            # Training-time statistics only; kept so official checkpoints load with strict keys.
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest code for each position of ``z`` [b, c, h, w]; returns (z_q [b,c,h,w], ids [b*h*w])."""
        zf = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        emb = self.codebook()
        if self.l2_norm:
            zf = F.normalize(zf, p=2, dim=-1)
        dist = zf.pow(2).sum(1, keepdim=True) + emb.pow(2).sum(1) - 2 * zf @ emb.t()
        ids = dist.argmin(dim=1)
        z_q = emb[ids].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2).contiguous()
        return z_q, ids

    def get_codebook_entry(
        self, indices: torch.Tensor, shape=None, channel_first: bool = True
    ) -> torch.Tensor:
        z_q = self.codebook()[indices.long()]
        if shape is None:
            return z_q
        if channel_first:  # shape = (b, c, h, w)
            return z_q.reshape(shape[0], shape[2], shape[3], shape[1]).permute(0, 3, 1, 2).contiguous()
        return z_q.reshape(shape)


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig | None = None):
        super().__init__()
        cfg = cfg or VQConfig()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        self.quant_conv = Conv2d(cfg.z_channels, cfg.codebook_embed_dim, 1)
        self.post_quant_conv = Conv2d(cfg.codebook_embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor):
        """Image in [-1, 1] -> (quant, None, (None, None, ids)) as DeepSeek's ``encode`` returns."""
        quant, ids = self.quantize(self.quant_conv(self.encoder(x)))
        return quant, None, (None, None, ids)

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, code_b: torch.Tensor, shape=None, channel_first: bool = True) -> torch.Tensor:
        """Codes -> pixels in about [-1, 1]; ``shape`` is [N, 8, 24, 24] for 384 px images."""
        quant = self.quantize.get_codebook_entry(code_b, shape, channel_first)
        return self.decode(quant.to(self.post_quant_conv.weight.dtype))


def VQ_16(**params) -> VQModel:  # noqa: N802 - the official ``cls`` name
    return VQModel(VQConfig.from_params(params))
