"""Stage 1: the VQ tokenizer (Janus' VQ-16, shrunk) learns to reconstruct drawn scenes; its code grid is
what the LLM learns to write."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from janus.shapes.data import COLORS, PALETTE, random_scene
from janus.shapes.judge import correct, judge

from .model import drawn, to_unit
from .state import lr_at, resume

logger = logging.getLogger("training.shapes")
_PALETTE_UNIT = torch.tensor([PALETTE[c] for c in COLORS], dtype=torch.float32) / 127.5 - 1.0  # [8, 3]


def vq_losses(vq, x: torch.Tensor, uniform: bool = False):
    """LlamaGen's VQ objective with L2-normalised codes: reconstruction + codebook + 0.25 * commitment;
    with ``uniform`` also ``uniform_code_loss`` (one code per plain colour)."""
    z = F.normalize(vq.quant_conv(vq.encoder(x)), dim=1)
    codebook = F.normalize(vq.quantize.embedding.weight, dim=1)
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
    ids = (flat @ codebook.t()).argmax(1)
    q = codebook[ids].view(z.shape[0], z.shape[2], z.shape[3], -1).permute(0, 3, 1, 2)
    rec = vq.decode(z + (q - z).detach())
    losses = {
        "rec": F.mse_loss(rec, x),
        "codebook": F.mse_loss(q, z.detach()),
        "commit": F.mse_loss(z, q.detach()),
    }
    if uniform:
        losses["uniform"] = uniform_code_loss(x, flat, codebook, vq.config.downsample)
    return losses, ids, flat


def uniform_cells(x: torch.Tensor, cell: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """For each ``cell`` x ``cell`` patch of ``x`` ([B, 3, H, W] in [-1, 1]), in the order of the VQ's
    code grid (batch, row, column): whether it is one flat colour, and the nearest palette colour's index."""
    b, _, h, w = x.shape
    cells = x.reshape(b, 3, h // cell, cell, w // cell, cell)
    flat = (cells.amax(dim=(3, 5)) - cells.amin(dim=(3, 5))).abs().amax(1) < 1e-3  # [B, h, w]
    mean = cells.mean(dim=(3, 5)).permute(0, 2, 3, 1)  # [B, h, w, 3]
    colour = ((mean[..., None, :] - _PALETTE_UNIT.to(x.device)) ** 2).sum(-1).argmin(-1)
    return flat.flatten(), colour.flatten()


def uniform_code_loss(
    x: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor, cell: int = 4
) -> torch.Tensor:
    """Pull the encoder output ``z`` ([N, D], normalised, code-grid order) of every flat cell of colour k
    to code k (normalised ``codebook`` [V, D]), wherever the cell is: a plain patch of a colour is then
    always one code, not one of the 9-26 per colour that its distance to the shape picked. Fixed,
    distinct codes per colour: pulling each colour to its own commonest code let every colour share one
    and collapsed the codebook to a single code."""
    flat, colour = uniform_cells(x, cell)
    if not bool(flat.any()):
        return z.new_zeros(())
    return F.mse_loss(z[flat], codebook[colour[flat]])


def image_size(vq) -> int:
    """The side in pixels of the images the VQ encodes and decodes."""
    return vq.config.grid * vq.config.downsample


def _vq_batch(step: int, steps: int, batch: int, seed: int, crop: int, vq, jitter: bool) -> torch.Tensor:
    """The step's drawn scenes in [-1, 1]; with ``crop``, a crop of them on code-cell boundaries."""
    rng = np.random.default_rng([seed, 1, step])
    size, cell = image_size(vq), vq.config.downsample
    x = to_unit(drawn([random_scene(rng) for _ in range(batch)], rng if jitter else None, size))
    if crop and step < 0.9 * steps:
        # convolutions learn as well from crops, 4x cheaper; the last 10% of steps see whole images,
        # so the bottleneck's attention block gets used to the whole code grid
        y0, x0 = (int(v) * cell for v in rng.integers(0, (size - crop) // cell + 1, size=2))
        x = x[:, :, y0 : y0 + crop, x0 : x0 + crop]
    return x


def _restart_dead(vq, used: torch.Tensor, flat: torch.Tensor, generator_seed: int) -> int:
    """Codes no batch picked restart at encoder outputs of this batch, so the codebook keeps being used."""
    dead = (used == 0).nonzero().flatten()
    if len(dead):
        pick = torch.randint(
            0, flat.shape[0], (len(dead),), generator=torch.Generator().manual_seed(generator_seed)
        )
        with torch.no_grad():
            vq.quantize.embedding.weight[dead] = flat.detach()[pick]
    return len(dead)


def train_vq(
    vq,
    steps: int,
    batch: int,
    seed: int,
    work: Path,
    minutes: float,
    crop: int = 0,
    restarts: bool = True,
    uniform_weight: float = 0.0,
    jitter: bool = True,
) -> int:
    """Train (or finish training) the VQ; returns how many steps this call ran. ``restarts``: codes no
    batch picked restart at encoder outputs (all codes stay in use); ``uniform_weight``: weight of
    ``uniform_code_loss`` (one code per plain colour); ``jitter``: on scenes drawn with jitter (else
    exactly, the images the LLM learns to write with ``--exact-shapes``)."""
    state_path = work / "vq_state.pt"
    opt = torch.optim.AdamW(vq.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    start, _ = resume(state_path, vq, opt, "VQ")
    size = vq.quantize.embedding.weight.shape[0]
    used = torch.zeros(size)
    t_end = time.time() + minutes * 60
    vq.train()
    for step in range(start, steps):
        x = _vq_batch(step, steps, batch, seed, crop, vq, jitter)
        for group in opt.param_groups:
            group["lr"] = lr_at(1e-3, step, steps, warmup=100)
        losses, ids, flat = vq_losses(vq, x, uniform=bool(uniform_weight))
        loss = losses["rec"] + losses["codebook"] + 0.25 * losses["commit"]
        if uniform_weight:
            loss = loss + uniform_weight * losses["uniform"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        used += torch.bincount(ids, minlength=size).float()
        if (step + 1) % 100 == 0:
            restarted = (
                _restart_dead(vq, used, flat, seed * 1000 + step)
                if restarts and step + 1 < steps * 0.8
                else 0
            )
            logger.info(
                "VQ step %d/%d: rec %.5f commit %.4f, %d codes used (%d restarted)",
                step + 1,
                steps,
                losses["rec"].item(),
                losses["commit"].item(),
                int((used > 0).sum()),
                restarted,
            )
            used.zero_()
        if (step + 1) % 250 == 0 or step + 1 == steps or time.time() > t_end:
            torch.save({"model": vq.state_dict(), "opt": opt.state_dict(), "step": step + 1}, state_path)
            if time.time() > t_end and step + 1 < steps:
                raise TimeoutError(
                    f"VQ stage stopped at step {step + 1} after {minutes} min; rerun to resume"
                )
    vq.eval()
    return steps - start


@torch.no_grad()
def vq_codes(vq, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """The code grid of each image, flattened: long [N, grid * grid]."""
    out = []
    for i in range(0, len(images), batch):
        _, _, (_, _, ids) = vq.encode(to_unit(images[i : i + batch]))
        out.append(ids.view(len(images[i : i + batch]), -1))
    return torch.cat(out)


@torch.no_grad()
def vq_pixels(vq, codes: torch.Tensor, batch: int = 64) -> np.ndarray:
    """The images the VQ decodes from code grids [N, grid * grid]: uint8 [N, H, W, 3]."""
    grid, out = vq.config.grid, []
    for i in range(0, len(codes), batch):
        chunk = codes[i : i + batch]
        pixels = vq.decode_code(chunk, shape=[len(chunk), vq.config.codebook_embed_dim, grid, grid])
        out.append(np.clip((pixels.permute(0, 2, 3, 1).numpy() + 1) / 2 * 255, 0, 255).astype(np.uint8))
    return np.concatenate(out)


@torch.no_grad()
def vq_roundtrip_accuracy(vq, n: int, seed: int, jitter: bool = True) -> float:
    """How often the judge reads a drawn scene correctly after encode + decode through the VQ."""
    rng = np.random.default_rng([seed, 2])
    scenes = [random_scene(rng) for _ in range(n)]
    images = drawn(scenes, rng if jitter else None, image_size(vq))
    decoded = vq_pixels(vq, vq_codes(vq, images))
    return float(
        np.mean([correct(judge(a), s.attributes())["all"] for a, s in zip(decoded, scenes, strict=True)])
    )
