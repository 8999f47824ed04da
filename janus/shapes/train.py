"""Train the shapes Janus from scratch on this machine: ``python -m janus.shapes.train``.

Two stages, both seeded, both resumable (state is saved under ``--work`` every few hundred steps):
1. the VQ tokenizer (Janus' VQ-16 architecture, shrunk: 96 px images <-> a 24 x 24 code grid, or 12 x 12
   with ``--grid 12``: a quarter of the codes for the LLM to write) learns to reconstruct drawn scenes;
2. the whole multimodal model minus the (frozen) VQ learns both directions at once: text -> image codes
   (Janus' generation path, with 10% of prompts dropped to the pad-token prompt so that classifier-free
   guidance has an unconditional branch to push away from), and image -> text (captions, and yes/no
   answers to "does this image show ...?", the self-verification question). The shipped model has
   a phase in which most understanding examples are that question, asked in pairs about one image (its
   own scene: yes; another scene or one attribute changed: no; ``--yes-no``, ``--easy-negatives``):
   asked singly, half the time each, the 4-layer LLM learnt captions and answered the question 50/50.
   Three more kinds of understanding example, for teaching the question to read shape and position
   (benchmarks/README.md, "Quality columns": fine-tuning the shipped model with them did not): one
   attribute asked alone (``--attribute-questions``), the quoted prompt read back
   (``--prompt-readout``), and pairs about shorter prompts (``--partial-prompts``); which attributes a
   one-change negative may change: ``--negative-attributes``; ``--pairs-from``: the step at which the pairs
   start (from step 3000 they taught shape and position but not colour, and all four once colour was
   in 40% of the one-change negatives; from step 0, colour and background only). The shipped weights:
   pairs from step 3000 with colour weighted up, then two short tails from those weights
   (``--init-from``/``--init-step``) with fewer pairs and more captions (README.md has the commands).
The result is written in the official on-disk format (config.json, safetensors, tokenizer, processor
configs) and loaded like any Janus-Pro checkpoint. Held-out combinations (purple triangles, orange
circles) are never drawn, encoded or mentioned in any training example.

Never imported at run time: only this command and the tests of the shipped checkpoint use it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from janus.engine import CaptionEngine, SynthesisEngine
from janus.engine.prompts import (
    DEFAULT_QUESTION,
    RATING_LEVELS,
    SCORE_ANSWERS,
    SCORE_QUESTION,
    chat_prompt,
    question_turns,
    t2i_prompt_ids,
    unconditional_ids,
)
from janus.engine.quality import Reader
from janus.models.processing_vlm import DEFAULT_SYSTEM_PROMPT
from janus.shapes.data import (
    ATTRIBUTES,
    COLORS,
    IMAGE_SIZE,
    PALETTE,
    Scene,
    all_scenes,
    caption,
    draw,
    one_changed,
    parse_caption,
    place,
    random_scene,
)
from janus.shapes.judge import auroc, correct, judge
from janus.utils.cli import OneLineParser

logger = logging.getLogger("janus.shapes.train")

#: the model's size: Janus-Pro's architecture, every width and depth shrunk
LLM = {"hidden": 256, "llm_layers": 4, "llm_heads": 4, "intermediate": 768, "max_position_embeddings": 2048}
VISION = {"image_size": IMAGE_SIZE, "width": 128, "layers": 2, "heads": 4, "patch_size": 16}
VQ = {"ch": 32, "z_channels": 32, "num_res_blocks": 1, "image_token_size": 512}
GRID = 24  # codes along a generated image's side, as in Janus (``--grid``: 12 is 8 px per code)


def vq_params(grid: int = GRID) -> dict:
    """The VQ's config params for a ``grid`` x ``grid`` code grid of a 96 px image: one 2x downsampling
    level per halving (24: 4 px per code, three levels; 12: 8 px, four levels, as shipped)."""
    per_code = IMAGE_SIZE // grid if grid > 0 and IMAGE_SIZE % grid == 0 else 0
    if per_code < 2 or per_code & (per_code - 1):
        raise ValueError(f"--grid {grid} must be {IMAGE_SIZE} px divided by a power of two (48, 24, 12, 6)")
    params = dict(VQ, ch_mult=[1] + [2] * (per_code.bit_length() - 1))
    if grid != GRID:  # Janus' 24 x 24 grid needs no image size in the config (written as before)
        params["image_size"] = IMAGE_SIZE
    return params


NUM_IMAGE_TOKENS = (IMAGE_SIZE // VISION["patch_size"]) ** 2
BPE_VOCAB = 512
CAPTION_QUESTIONS = (DEFAULT_QUESTION, "Describe this image.", "What is in this image?")
#: one attribute asked alone (``--attribute-questions``): its answer is read out at the answer position,
#: the position the yes/no score is read from
ATTRIBUTE_QUESTIONS = {
    "color": "What colour is the shape?",
    "shape": "What shape is it?",
    "position": "Where is the shape?",
    "background": "What colour is the background?",
}
CFG_DROPOUT = 0.1


def tokenizer_corpus() -> tuple[str, ...]:
    """What the BPE merges are learnt from: the grammar, the questions, the system prompt."""
    texts = [caption(s) for s in all_scenes(held_out=False)]
    texts += list(CAPTION_QUESTIONS) + [DEFAULT_SYSTEM_PROMPT]
    texts += [SCORE_QUESTION.format(prompt=caption(s)) for s in all_scenes(held_out=False)[::7]]
    texts += [" ".join(SCORE_ANSWERS), "How would you rate the aesthetics of this image?", " ".join(RATING_LEVELS)]
    return tuple(texts)


def official_shapes_config(vocab_size: int, grid: int = GRID) -> dict:
    from janus.checkpoints import official_config

    return official_config(
        vocab_size=vocab_size,
        hidden=LLM["hidden"],
        llm_layers=LLM["llm_layers"],
        llm_heads=LLM["llm_heads"],
        intermediate=LLM["intermediate"],
        vision={k: v for k, v in VISION.items()},
        vq=vq_params(grid),
        dtype="bfloat16",
        max_position_embeddings=LLM["max_position_embeddings"],
    )


def write_skeleton(out: Path, grid: int = GRID) -> dict:
    """Tokenizer, processor configs and config.json of the shapes checkpoint (everything but weights)."""
    from janus.checkpoints import write_processor_configs, write_tiny_tokenizer

    out.mkdir(parents=True, exist_ok=True)
    n_tokens = write_tiny_tokenizer(out, corpus=tokenizer_corpus(), vocab_size=BPE_VOCAB)
    write_processor_configs(out, image_size=IMAGE_SIZE, num_image_tokens=NUM_IMAGE_TOKENS)
    cfg = official_shapes_config(-(-n_tokens // 64) * 64, grid)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg


def _build_model(cfg: dict):
    from janus.models.configuration import MultiModalityConfig
    from janus.models.modeling_vlm import MultiModalityCausalLM

    model = MultiModalityCausalLM(MultiModalityConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif p.dim() == 1:
            torch.nn.init.ones_(p)
        else:
            torch.nn.init.normal_(p, std=0.02)
    return model.float()


def _images(scenes: list[Scene], rng: np.random.Generator | None) -> np.ndarray:
    """The scenes drawn; ``rng``: with small position/size jitter, None: exactly (one image per scene)."""
    return np.stack([draw(s, IMAGE_SIZE, rng) for s in scenes])


def _to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1] (the VQ's pixel range)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


# -- stage 1: the VQ tokenizer --------------------------------------------------------------------


def _vq_losses(vq, x: torch.Tensor, uniform: bool = False):
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


_PALETTE_UNIT = torch.tensor([PALETTE[c] for c in COLORS], dtype=torch.float32) / 127.5 - 1.0  # [8, 3]


def uniform_cells(x: torch.Tensor, cell: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """For each ``cell`` x ``cell`` patch of ``x`` ([B, 3, H, W] in [-1, 1]), in the order of the VQ's
    code grid (batch, row, column): whether it is one flat colour, and the nearest palette colour's index."""
    b, _, h, w = x.shape
    cells = x.reshape(b, 3, h // cell, cell, w // cell, cell)
    flat = (cells.amax(dim=(3, 5)) - cells.amin(dim=(3, 5))).abs().amax(1) < 1e-3  # [B, h, w]
    mean = cells.mean(dim=(3, 5)).permute(0, 2, 3, 1)  # [B, h, w, 3]
    colour = ((mean[..., None, :] - _PALETTE_UNIT.to(x.device)) ** 2).sum(-1).argmin(-1)
    return flat.flatten(), colour.flatten()


def uniform_code_loss(x: torch.Tensor, z: torch.Tensor, codebook: torch.Tensor, cell: int = 4) -> torch.Tensor:
    """Pull the encoder output ``z`` ([N, D], normalised, code-grid order) of every flat cell of colour k
    to code k (normalised ``codebook`` [V, D]), wherever the cell is: a plain patch of a colour is then
    always one code, not one of the 9-26 per colour that its distance to the shape picked. Fixed,
    distinct codes per colour: pulling each colour to its own commonest code let every colour share one
    and collapsed the codebook to a single code."""
    flat, colour = uniform_cells(x, cell)
    if not bool(flat.any()):
        return z.new_zeros(())
    return F.mse_loss(z[flat], codebook[colour[flat]])


def _resume(path: Path, model, opt, stage: str) -> tuple[int, int]:
    """Load a stage's saved state, if any; returns the step to continue from and the step the optimizer's
    moments start at (0, or the step a run started from a checkpoint's weights alone: see ``init_from``)."""
    if not path.exists():
        return 0, 0
    state = torch.load(path, weights_only=True)
    model.load_state_dict(state["model"])
    if state["opt"] is not None:
        opt.load_state_dict(state["opt"])
    logger.info("%s: resuming at step %d", stage, state["step"])
    return int(state["step"]), int(state.get("fresh_optimizer_at", 0))


def init_from(model, checkpoint: Path, work: Path, vq_steps: int, llm_step: int) -> None:
    """Start from a shipped checkpoint's weights instead of a ``--work`` folder: writes stage states that
    say the VQ is trained and the LLM is at ``llm_step``, with fresh optimizer moments (a checkpoint holds
    no optimizer state; the LR warms up again from there). Does nothing once the LLM state exists, so the
    same command resumes an interrupted run."""
    from safetensors.torch import load_file

    llm_state = work / "llm_state.pt"
    if llm_state.exists():
        return
    state = {k: v.float() for k, v in load_file(str(checkpoint / "model.safetensors")).items()}
    model.load_state_dict(state, strict=True)
    work.mkdir(parents=True, exist_ok=True)
    vq = model.gen_vision_model
    torch.save({"model": vq.state_dict(), "opt": None, "step": vq_steps}, work / "vq_state.pt")
    torch.save({"model": model.state_dict(), "opt": None, "step": llm_step, "fresh_optimizer_at": llm_step}, llm_state)
    logger.info("initialised from %s at LLM step %d (fresh optimizer)", checkpoint, llm_step)


def _lr(peak: float, step: int, steps: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    return peak * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


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
    start, _ = _resume(state_path, vq, opt, "VQ")
    size = vq.quantize.embedding.weight.shape[0]
    used = torch.zeros(size)
    t_end = time.time() + minutes * 60
    cell = vq.config.downsample  # crops keep to code cells
    vq.train()
    for step in range(start, steps):
        rng = np.random.default_rng([seed, 1, step])
        x = _to_unit(_images([random_scene(rng) for _ in range(batch)], rng if jitter else None))
        if crop and step < 0.9 * steps:
            # convolutions learn as well from crops, 4x cheaper; the last 10% of steps see whole images,
            # so the bottleneck's attention block gets used to the whole code grid
            y0, x0 = (int(v) * cell for v in rng.integers(0, (IMAGE_SIZE - crop) // cell + 1, size=2))
            x = x[:, :, y0 : y0 + crop, x0 : x0 + crop]
        lr = _lr(1e-3, step, steps, warmup=100)
        for group in opt.param_groups:
            group["lr"] = lr
        losses, ids, flat = _vq_losses(vq, x, uniform=bool(uniform_weight))
        loss = losses["rec"] + losses["codebook"] + 0.25 * losses["commit"]
        if uniform_weight:
            loss = loss + uniform_weight * losses["uniform"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        used += torch.bincount(ids, minlength=size).float()
        if (step + 1) % 100 == 0:
            # dead codes restart at encoder outputs of this batch, so the codebook keeps being used
            dead = (used == 0).nonzero().flatten()
            if restarts and len(dead) and step + 1 < steps * 0.8:
                gen = torch.Generator().manual_seed(seed * 1000 + step)
                pick = torch.randint(0, flat.shape[0], (len(dead),), generator=gen)
                with torch.no_grad():
                    vq.quantize.embedding.weight[dead] = flat.detach()[pick]
            logger.info(
                "VQ step %d/%d: rec %.5f commit %.4f, %d codes used (%d restarted)",
                step + 1, steps, losses["rec"].item(), losses["commit"].item(), int((used > 0).sum()), len(dead),
            )
            used.zero_()
        if (step + 1) % 250 == 0 or step + 1 == steps or time.time() > t_end:
            torch.save({"model": vq.state_dict(), "opt": opt.state_dict(), "step": step + 1}, state_path)
            if time.time() > t_end and step + 1 < steps:
                raise TimeoutError(f"VQ stage stopped at step {step + 1} after {minutes} min; rerun to resume")
    vq.eval()
    return steps - start


@torch.no_grad()
def vq_codes(vq, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(images), batch):
        _, _, (_, _, ids) = vq.encode(_to_unit(images[i : i + batch]))
        out.append(ids.view(len(images[i : i + batch]), -1))
    return torch.cat(out)


@torch.no_grad()
def vq_roundtrip_accuracy(vq, n: int, seed: int, jitter: bool = True) -> float:
    """How often the judge reads a drawn scene correctly after encode + decode through the VQ."""
    rng = np.random.default_rng([seed, 2])
    scenes = [random_scene(rng) for _ in range(n)]
    images = _images(scenes, rng if jitter else None)
    codes = vq_codes(vq, images)
    grid = vq.config.grid
    pixels = vq.decode_code(codes, shape=[n, vq.config.codebook_embed_dim, grid, grid])
    arr = np.clip((pixels.permute(0, 2, 3, 1).numpy() + 1) / 2 * 255, 0, 255).astype(np.uint8)
    return float(np.mean([correct(judge(a), s.attributes())["all"] for a, s in zip(arr, scenes, strict=True)]))


# -- stage 2: both directions -----------------------------------------------------------------------


class Pool:
    """Drawn training scenes, their pixels and their VQ codes, made once (the codes cached in ``work``:
    encoding 16k images takes minutes, drawing them again does not). The pixels (understanding's input)
    are drawn with jitter; the codes (generation's targets) too, or with ``exact`` from the scenes drawn
    exactly: one right image per prompt, its colours, shape and position, nothing else to model."""

    def __init__(self, vq, n: int, seed: int, work: Path | None = None, exact: bool = False):
        rng = np.random.default_rng([seed, 3])
        self.scenes = [random_scene(rng) for _ in range(n)]
        self.images = _images(self.scenes, rng)
        name = f"pool_codes_{seed}_{n}{'_exact' if exact else ''}.pt"
        cache = work / name if work is not None else None
        if cache is not None and cache.exists():
            self.codes = torch.load(cache, weights_only=True)
        else:
            self.codes = vq_codes(vq, _images(self.scenes, None) if exact else self.images)
            if cache is not None:
                torch.save(self.codes, cache)


#: the score question's own words with another ending: name what the quoted prompt asks for
#: (``--prompt-readout``); the answer is in the prompt's words, whatever the image shows
READOUT_QUESTIONS = {
    field: SCORE_QUESTION.split("?")[0] + f"? Please name the {what} it asks for."
    for field, what in (("color", "colour"), ("shape", "shape"), ("position", "place"), ("background", "background"))
}


def attribute_answer(scene: Scene, field: str) -> str:
    """The answer to ``ATTRIBUTE_QUESTIONS[field]``, in the caption's words."""
    return place(scene) if field == "position" else getattr(scene, field)


def partial_caption(scene: Scene, keep: set[str]) -> str:
    """The caption with only the attributes in ``keep`` (the shape always: it is the noun), in the
    caption's order and words: e.g. "a triangle on the left" or "a red triangle, blue background"."""
    if keep >= set(ATTRIBUTES):
        return caption(scene)
    text = "a" + (f" {scene.color}" if "color" in keep else "") + f" {scene.shape}"
    text += f" {place(scene)}" if "position" in keep else ""
    return text + (f", {scene.background} background" if "background" in keep else "")


def _perturbed(scene: Scene, rng: random.Random, fields: tuple[str, ...] = ATTRIBUTES) -> Scene:
    """The scene with exactly one of ``fields`` changed (never into a held-out combination)."""
    return one_changed(scene, rng, fields=fields, held_out_ok=False)


class Batches:
    """Training batches in exactly the token layout the engines use at run time."""

    def __init__(
        self,
        processor,
        pool: Pool,
        cfg_dropout: float = CFG_DROPOUT,
        yes_no: float | None = None,
        easy: float = 0.0,
        negative_fields: tuple[str, ...] = ATTRIBUTES,
        attribute_questions: float = 0.0,
        partial_prompts: float = 0.0,
        prompt_readout: float = 0.0,
        pairs_from: int = 0,
    ):
        self.processor = processor
        self.pairs_from = pairs_from
        self.prompt_readout = prompt_readout
        self.partial_prompts = partial_prompts
        self.attribute_questions = attribute_questions
        self.easy = easy
        self.negative_fields = negative_fields
        self.cfg_dropout = cfg_dropout
        self.yes_no = yes_no
        self.tok = processor.tokenizer
        self.pool = pool
        self.pad = processor.pad_id
        self.eos = self.tok.eos_token_id

    def generation(self, idx: list[int], rng: random.Random):
        prompts = []
        for i in idx:
            ids = t2i_prompt_ids(self.processor, caption(self.pool.scenes[i]))
            prompts.append(unconditional_ids(ids, self.pad) if rng.random() < self.cfg_dropout else ids)
        return *self._left_padded(prompts), self.pool.codes[idx]

    def generation_pairs(self, idx: list[int]):
        """Each scene twice, with its prompt and with the unconditional (pad) prompt, in that order
        (rows i and len(idx) + i): the two branches CFG combines, for ``guided_generation_loss``."""
        cond = [t2i_prompt_ids(self.processor, caption(self.pool.scenes[i])) for i in idx]
        ids, mask = self._left_padded(cond + [unconditional_ids(c, self.pad) for c in cond])
        return ids, mask, self.pool.codes[idx + idx]

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) with left padding, as the engine batches prompts."""
        length = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), length), self.pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), length), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, length - len(p) :] = torch.tensor(p)
            mask[row, length - len(p) :] = 1
        return ids, mask

    def understanding_ids(self, question: str, answer: str) -> tuple[list[int], list[int]]:
        """(prompt ids with the image tokens expanded, answer ids + EOS) for one image and question."""
        prompt = chat_prompt(self.processor, question_turns(question, 1, self.processor.image_tag))
        ids = torch.tensor(self.tok.encode(prompt), dtype=torch.long)
        ids, _ = self.processor.add_image_token((ids == self.processor.image_id).nonzero().flatten(), ids)
        return ids.tolist(), self.tok.encode(" " + answer, add_special_tokens=False) + [self.eos]

    def understanding(self, idx: list[int], rng: random.Random, step: int | None = None):
        """Captions, and yes/no questions in pairs: the same image asked about its own scene and about
        another (a random scene with probability ``easy``, else one attribute changed), so the only
        thing that tells the two answers apart is the question (without pairing, a small model settles
        at answering 50/50). ``yes_no=None``, or a training ``step`` before ``pairs_from``: phases 1-2's
        layout, single questions, kept bit for bit."""
        rows, images = [], []
        yes_no = None if step is not None and step < self.pairs_from else self.yes_no
        for i in idx:
            scene = self.pool.scenes[i]
            if yes_no is None:  # phases 1 and 2 of the shipped model: half captions, single questions
                if rng.random() < 0.5:
                    question, answer = rng.choice(CAPTION_QUESTIONS), caption(scene)
                else:
                    asked = scene if rng.random() < 0.5 else _perturbed(scene, rng)
                    question = SCORE_QUESTION.format(prompt=caption(asked))
                    answer = SCORE_ANSWERS[0] if asked == scene else SCORE_ANSWERS[1]
                rows.append(self.understanding_ids(question, answer))
                images.append(i)
                continue
            if self.prompt_readout and rng.random() < self.prompt_readout:
                asked = scene if rng.random() < 0.5 else _perturbed(scene, rng, self.negative_fields)
                field = rng.choice(self.negative_fields)
                question = READOUT_QUESTIONS[field].format(prompt=caption(asked))
                rows.append(self.understanding_ids(question, attribute_answer(asked, field)))
                images.append(i)
                continue
            if self.attribute_questions and rng.random() < self.attribute_questions:
                field = rng.choice(ATTRIBUTES)
                rows.append(self.understanding_ids(ATTRIBUTE_QUESTIONS[field], attribute_answer(scene, field)))
                images.append(i)
                continue
            if rng.random() >= yes_no:
                rows.append(self.understanding_ids(rng.choice(CAPTION_QUESTIONS), caption(scene)))
                images.append(i)
                continue
            if rng.random() < self.easy:  # another scene: it differs in most attributes, easy to tell
                other = self.pool.scenes[rng.randrange(len(self.pool.scenes))]
                other = other if other != scene else _perturbed(scene, rng)
            else:  # exactly one attribute changed: what the score must rank
                other = _perturbed(scene, rng, self.negative_fields)
            keep = set(ATTRIBUTES)
            if self.partial_prompts and rng.random() < self.partial_prompts:
                # a shorter prompt: the shape, the attribute that differs, each other one by a coin toss
                differs = {k for k, v in scene.attributes().items() if other.attributes()[k] != v}
                keep = {"shape"} | differs | {k for k in ATTRIBUTES if rng.random() < 0.5}
            for asked, answer in ((scene, SCORE_ANSWERS[0]), (other, SCORE_ANSWERS[1])):
                prompt = partial_caption(asked, keep)
                rows.append(self.understanding_ids(SCORE_QUESTION.format(prompt=prompt), answer))
                images.append(i)
        idx = images
        length = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(idx), length), self.pad, dtype=torch.long)
        labels = torch.full((len(idx), length), -100, dtype=torch.long)
        mask = torch.zeros((len(idx), length), dtype=torch.long)
        for row, (p, a) in enumerate(rows):  # right padding: training only
            ids[row, : len(p) + len(a)] = torch.tensor(p + a)
            labels[row, len(p) : len(p) + len(a)] = torch.tensor(a)
            mask[row, : len(p) + len(a)] = 1
        pixels = self.processor.image_processor(list(self.pool.images[idx]), return_tensors="pt").pixel_values
        return ids, mask, labels, pixels, ids == self.processor.image_id


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _generation_logits(model, ids, mask, codes) -> torch.Tensor:
    """Teacher-forced image-code logits [B, codes, V]: prompt + codes[:-1] in (through gen_head)."""
    lm = model.language_model
    embeds = torch.cat([lm.get_input_embeddings()(ids), model.prepare_gen_img_embeds(codes[:, :-1])], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(codes[:, :-1])], dim=1)
    hidden = lm.model(inputs_embeds=embeds, attention_mask=full_mask, position_ids=_positions(full_mask)).last_hidden_state
    return model.gen_head(hidden[:, ids.shape[1] - 1 :]).float()


def code_weights(codes: torch.Tensor, shape_weight: float) -> torch.Tensor:
    """Per-code loss weights [B, codes]: 1 for an image's background code (its most frequent one),
    ``shape_weight`` for every other code: the shape, its edges, and the first code of the shape, where
    the image's position is decided. The background is ~88% of the codes and the easiest to predict;
    colour, shape and position live in the rest."""
    background = codes.mode(dim=1).values[:, None]
    return torch.where(codes == background, 1.0, shape_weight)


def _code_loss(logits: torch.Tensor, codes: torch.Tensor, shape_weight: float = 1.0) -> torch.Tensor:
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), codes.reshape(-1), reduction="none")
    if shape_weight == 1.0:
        return flat.mean()
    weights = code_weights(codes, shape_weight).reshape(-1)
    return (flat * weights).sum() / weights.sum()


def generation_loss(model, ids, mask, codes, shape_weight: float = 1.0) -> torch.Tensor:
    """Teacher-forced next-code prediction: prompt + codes[:-1] in, codes out."""
    return _code_loss(_generation_logits(model, ids, mask, codes), codes, shape_weight)


def guided_generation_loss(
    model, ids, mask, codes, scale: float, shape_weight: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """On ``Batches.generation_pairs``: (next-code loss of both branches, next-code loss of the logits
    CFG samples from at ``scale``: uncond + scale * (cond - uncond), DeepSeek's formula on raw logits).

    Why: with raw-logit CFG a code that both branches rate very low but the unconditional one lower
    still gets its gap multiplied by ``scale`` and can win; the 4-layer model, trained on each branch
    alone, drew worse the stronger the guidance (all-correct 0.14 at cfg 1, 0.0 at cfg 5). Training
    the guided logits themselves teaches both branches to keep CFG's extrapolation on the right code.
    Sampling is unchanged: the engines apply the same formula to the same two branches."""
    logits = _generation_logits(model, ids, mask, codes)
    n = ids.shape[0] // 2
    guided = logits[n:] + scale * (logits[:n] - logits[n:])
    return _code_loss(logits, codes, shape_weight), _code_loss(guided, codes[:n], shape_weight)


def understanding_loss(model, ids, mask, labels, pixels, image_pos) -> torch.Tensor:
    lm = model.language_model
    embeds = lm.get_input_embeddings()(ids)
    feats = model.aligner(model.vision_model(pixels))  # [B, 36, D]
    embeds = embeds.clone()
    embeds[image_pos] = feats.reshape(-1, feats.shape[-1]).to(embeds.dtype)
    hidden = lm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    logits = lm.lm_head(hidden[:, :-1]).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)


def yes_no_auroc(reader: Reader, images: np.ndarray, scenes: list[Scene], rng: random.Random) -> float:
    """How well the self-verification score tells each image's own scene from that scene with one
    attribute changed: P(a right pair outscores a wrong one)."""
    features = reader.features(list(images))
    own = reader.scores(features, [caption(s) for s in scenes])
    other = reader.scores(features, [caption(_perturbed(s, rng)) for s in scenes])
    return auroc(own, other)


@torch.no_grad()
def evaluate(model, processor, n: int, seed: int, cfg_weight: float = 5.0) -> dict[str, float]:
    """Generate ``n`` in-distribution prompts and caption ``n`` drawn scenes; judge both with numpy."""
    model.eval()
    rng = np.random.default_rng([seed, 4])
    scenes = [random_scene(rng) for _ in range(n)]
    synth = SynthesisEngine(model, processor, max_batch_size=n)
    results = synth.generate(
        [{"prompt": caption(s), "seed": i, "cfg_weight": cfg_weight, "temperature": 1.0} for i, s in enumerate(scenes)]
    )
    marks = [correct(judge(r.image), s.attributes()) for r, s in zip(results, scenes, strict=True)]
    out = {f"gen_{k}": float(np.mean([m[k] for m in marks])) for k in marks[0]}
    plain = synth.generate(
        [{"prompt": caption(s), "seed": i, "cfg_weight": 1.0, "temperature": 1.0} for i, s in enumerate(scenes)]
    )
    out["gen_all_cfg1"] = float(np.mean([correct(judge(r.image), s.attributes())["all"] for r, s in zip(plain, scenes, strict=True)]))
    captioner = CaptionEngine(model, processor, max_batch_size=n)
    images = _images(scenes, rng)
    texts = captioner.generate([{"image": im, "max_new_tokens": 24} for im in images])
    parsed = [parse_caption(t.text) for t in texts]
    out["caption_all"] = float(np.mean([p == s for p, s in zip(parsed, scenes, strict=True)]))
    out["yes_no_auroc"] = yes_no_auroc(Reader(captioner), images, scenes, random.Random(seed))
    model.train()
    return out


def train_llm(model, processor, pool: Pool, args, work: Path) -> None:
    state_path = work / "llm_state.pt"
    trainable = [p for n, p in model.named_parameters() if not n.startswith("gen_vision_model.")]
    for p in model.gen_vision_model.parameters():
        p.requires_grad_(False)
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    start, fresh_at = _resume(state_path, model, opt, "LLM")
    batches = Batches(
        processor,
        pool,
        args.cfg_dropout,
        args.yes_no,
        args.easy_negatives,
        negative_fields=tuple(args.negative_attributes),
        attribute_questions=args.attribute_questions,
        partial_prompts=args.partial_prompts,
        prompt_readout=args.prompt_readout,
        pairs_from=args.pairs_from,
    )
    t_end = time.time() + args.minutes * 60
    steps = args.llm_steps
    model.train()
    t0 = time.time()
    stop = min(steps, args.stop_at or steps)  # the schedule is over ``steps``; training may end before
    for step in range(start, stop):
        rng = random.Random(args.seed * 1_000_003 + step)
        lr = _lr(args.lr, step, steps, warmup=200)
        if fresh_at:  # Adam's moments start empty there: warm up again over 100 steps
            lr *= min(1.0, (step - fresh_at + 1) / 100)
        for group in opt.param_groups:
            group["lr"] = lr
        gen_idx = [rng.randrange(len(pool.scenes)) for _ in range(args.gen_batch)]
        und_idx = [rng.randrange(len(pool.scenes)) for _ in range(args.und_batch)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            if args.guided_loss:
                loss_gen, loss_guided = guided_generation_loss(
                    model, *batches.generation_pairs(gen_idx), args.guided_cfg, args.shape_weight
                )
                loss_gen = loss_gen + args.guided_loss * loss_guided
            else:
                loss_gen = generation_loss(model, *batches.generation(gen_idx, rng), args.shape_weight)
            loss_und = understanding_loss(model, *batches.understanding(und_idx, rng, step))
        loss = loss_gen + loss_und
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if (step + 1) % 25 == 0:
            logger.info(
                "LLM step %d/%d: gen %.4f und %.4f lr %.2e (%.2f s/step)",
                step + 1, steps, loss_gen.item(), loss_und.item(), lr, (time.time() - t0) / (step + 1 - start),
            )
        last = step + 1 == stop
        if (step + 1) % 200 == 0 or last or time.time() > t_end:
            torch.save(
                {"model": model.state_dict(), "opt": opt.state_dict(), "step": step + 1, "fresh_optimizer_at": fresh_at},
                state_path,
            )
        if args.eval_every and ((step + 1) % args.eval_every == 0 or last):
            logger.info("eval at step %d: %s", step + 1, evaluate(model, processor, args.eval_n, args.seed))
        if time.time() > t_end and not last:
            raise TimeoutError(f"LLM stage stopped at step {step + 1} after {args.minutes} min; rerun to resume")


def export(model, cfg: dict, skeleton: Path, out: Path) -> None:
    """The trained weights in the official layout (bf16 safetensors, as Janus-Pro ships bf16)."""
    from janus.checkpoints import save_state_dict

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(skeleton, tmp)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    state["gen_vision_model.quantize.codebook_used"] = state["gen_vision_model.quantize.codebook_used"].float()
    save_state_dict(state, tmp, weights_format="safetensors")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m janus.shapes.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="janus/shapes/checkpoint", help="where the checkpoint is written")
    parser.add_argument("--work", default="out/shapes-train", help="resumable training state")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vq-steps", type=int, default=1500)
    parser.add_argument("--vq-batch", type=int, default=16)
    parser.add_argument("--vq-crop", type=int, default=48, help="train the VQ on crops this size (0: whole)")
    parser.add_argument(
        "--grid", type=int, default=GRID, help="codes along a generated image's side (24: 4 px per code; 12: 8 px)"
    )
    parser.add_argument(
        "--vq-no-restarts", action="store_true", help="codes no batch picks die instead of restarting"
    )
    parser.add_argument(
        "--vq-uniform-weight",
        type=float,
        default=0.0,
        help="pull each plain cell of colour k to code k (benchmarks/README.md: 39 codes, 4.4 bits, not 511, 7.4)",
    )
    parser.add_argument(
        "--exact-shapes",
        action="store_true",
        help="the VQ and the generation targets see scenes drawn without jitter (understanding keeps it)",
    )
    parser.add_argument("--pool", type=int, default=16384, help="drawn scenes the LLM trains on")
    parser.add_argument("--llm-steps", type=int, default=3000)
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--und-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--stop-at", type=int, help="end (and export) at this LLM step, the schedule unchanged")
    parser.add_argument("--cfg-dropout", type=float, default=CFG_DROPOUT, help="prompts dropped to the pad prompt")
    parser.add_argument(
        "--yes-no",
        type=float,
        default=None,
        help="understanding rows that are yes/no pairs (default: phases 1-2's layout, half single questions)",
    )
    parser.add_argument(
        "--pairs-from",
        type=int,
        default=0,
        help="the LLM step at which --yes-no's pairs (and the other score examples) start; before it, phases "
        "1-2's layout: captions, and single yes/no questions a small model answers 50/50, which leaves its "
        "attention free to learn shape and position once the pairs start (pairs from step 0 locked it onto "
        "colour and background)",
    )
    parser.add_argument(
        "--easy-negatives", type=float, default=0.0, help="yes/no negatives that are another scene, not one change"
    )
    parser.add_argument(
        "--negative-attributes",
        nargs="+",
        choices=ATTRIBUTES,
        default=list(ATTRIBUTES),
        help="the attributes a one-change yes/no negative may change (default: any of the four)",
    )
    parser.add_argument(
        "--attribute-questions",
        type=float,
        default=0.0,
        help="understanding rows that ask one attribute alone (e.g. 'What shape is it?'), before --yes-no "
        "splits the rest",
    )
    parser.add_argument(
        "--partial-prompts",
        type=float,
        default=0.0,
        help="yes/no pairs asked about a shorter prompt (the shape, the attribute that differs, the others "
        "by a coin toss), so the answer must come from the words wherever they stand",
    )
    parser.add_argument(
        "--prompt-readout",
        type=float,
        default=0.0,
        help="understanding rows that quote a prompt as the score question does and ask for one of its "
        "--negative-attributes back (the prompt's word, not the image's): it teaches the answer position "
        "to read the quoted words",
    )
    parser.add_argument(
        "--guided-loss",
        type=float,
        default=0.0,
        help="weight of the loss on CFG's guided logits (each generation example then runs with its prompt "
        "and with the pad prompt; --cfg-dropout is not used); 0: phases 1-3's plain loss",
    )
    parser.add_argument("--guided-cfg", type=float, default=5.0, help="the CFG weight that loss trains")
    parser.add_argument(
        "--shape-weight",
        type=float,
        default=1.0,
        help="loss weight of the image codes that are not the image's background code (the shape, where "
        "colour, shape and position are decided) relative to the background's; 1: plain mean",
    )
    parser.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="start from this checkpoint's weights (e.g. janus/shapes/checkpoint) at LLM step --init-step, "
        "when its --work folder is gone; the VQ is kept as it is",
    )
    parser.add_argument("--init-step", type=int, default=0, help="the LLM step the --init-from weights are at")
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-n", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=150, help="stop (resumably) after this long")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    skeleton = work / "skeleton"
    cfg = write_skeleton(skeleton, args.grid)
    from janus.models import VLChatProcessor

    processor = VLChatProcessor.from_pretrained(skeleton)
    model = _build_model(cfg)
    vq = model.gen_vision_model
    if args.init_from:
        init_from(model, Path(args.init_from), work, args.vq_steps, args.init_step)
    t0 = time.time()
    if train_vq(
        vq,
        args.vq_steps,
        args.vq_batch,
        args.seed,
        work,
        args.minutes,
        crop=args.vq_crop,
        restarts=not args.vq_no_restarts,
        uniform_weight=args.vq_uniform_weight,
        jitter=not args.exact_shapes,
    ):
        accuracy = vq_roundtrip_accuracy(vq, 256, args.seed, jitter=not args.exact_shapes)
        logger.info("VQ round trip, judged: %.3f all-correct", accuracy)
    with torch.no_grad():  # image-token embeddings start as the (normalised) codebook
        model.gen_embed.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=1))
    pool = Pool(vq, args.pool, args.seed, work, exact=args.exact_shapes)
    logger.info("pool of %d scenes encoded in %.0fs", len(pool.scenes), time.time() - t0)
    args.minutes -= (time.time() - t0) / 60
    train_llm(model, processor, pool, args, work)
    export(model, cfg, skeleton, Path(args.out))
    logger.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
