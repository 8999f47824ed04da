"""Stage 2's loop: the whole model minus the frozen VQ learns both directions at once, resumably."""

from __future__ import annotations

import argparse
import logging
import random
import time
from pathlib import Path

import torch

from .batches import Batches, Pool
from .evaluate import evaluate
from .losses import code_weights, generation_loss, guided_generation_loss, understanding_loss
from .state import lr_at, resume

logger = logging.getLogger("training.shapes")


def _optimizer(model, lr: float) -> tuple[torch.optim.Optimizer, list[torch.nn.Parameter]]:
    """AdamW over everything but the VQ (frozen), weight decay on matrices only."""
    trainable = [p for n, p in model.named_parameters() if not n.startswith("gen_vision_model.")]
    for p in model.gen_vision_model.parameters():
        p.requires_grad_(False)
    decay = [p for p in trainable if p.dim() >= 2]
    no_decay = [p for p in trainable if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95)), trainable


def _batches(processor, pool: Pool, args: argparse.Namespace) -> Batches:
    return Batches(
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
        text_first=args.text_first,
        vq_pixels=args.vq_pixels,
    )


def _losses(
    model, batches: Batches, args: argparse.Namespace, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(generation loss, understanding loss) of one step's batches, drawn from the step's own seed."""
    rng = random.Random(args.seed * 1_000_003 + step)
    gen_idx = [rng.randrange(len(batches.pool.scenes)) for _ in range(args.gen_batch)]
    und_idx = [rng.randrange(len(batches.pool.scenes)) for _ in range(args.und_batch)]
    pool = batches.pool
    telling = pool.shape_telling()[gen_idx] if args.telling_weight != 1.0 else None
    weights = code_weights(pool.codes[gen_idx], args.shape_weight, telling, args.telling_weight)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if args.guided_loss:
            loss_gen, loss_guided = guided_generation_loss(
                model, *batches.generation_pairs(gen_idx), args.guided_cfg, weights
            )
            loss_gen = loss_gen + args.guided_loss * loss_guided
        else:
            loss_gen = generation_loss(model, *batches.generation(gen_idx, rng), weights)
        loss_und = understanding_loss(model, *batches.understanding(und_idx, rng, step))
    return loss_gen, loss_und


def train_llm(model, processor, pool: Pool, args: argparse.Namespace, work: Path) -> None:
    """Train (or finish training) the LLM to ``--llm-steps`` (or ``--stop-at``), saving its state every
    200 steps and when ``--minutes`` run out (then it raises: rerun the command to resume)."""
    state_path = work / "llm_state.pt"
    opt, trainable = _optimizer(model, args.lr)
    start, fresh_at = resume(state_path, model, opt, "LLM")
    batches = _batches(processor, pool, args)
    t_end = time.time() + args.minutes * 60
    steps = args.llm_steps
    model.train()
    t0 = time.time()
    stop = min(steps, args.stop_at or steps)  # the schedule is over ``steps``; training may end before
    for step in range(start, stop):
        lr = lr_at(args.lr, step, steps, warmup=200)
        if fresh_at:  # Adam's moments start empty there: warm up again over 100 steps
            lr *= min(1.0, (step - fresh_at + 1) / 100)
        for group in opt.param_groups:
            group["lr"] = lr
        loss_gen, loss_und = _losses(model, batches, args, step)
        opt.zero_grad(set_to_none=True)
        (loss_gen + loss_und).backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        if (step + 1) % 25 == 0:
            logger.info(
                "LLM step %d/%d: gen %.4f und %.4f lr %.2e (%.2f s/step)",
                step + 1,
                steps,
                loss_gen.item(),
                loss_und.item(),
                lr,
                (time.time() - t0) / (step + 1 - start),
            )
        last = step + 1 == stop
        if (step + 1) % 200 == 0 or last or time.time() > t_end:
            state = {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "step": step + 1,
                "fresh_optimizer_at": fresh_at,
            }
            torch.save(state, state_path)
        if args.eval_every and ((step + 1) % args.eval_every == 0 or last):
            logger.info("eval at step %d: %s", step + 1, evaluate(model, processor, args.eval_n, args.seed))
        if time.time() > t_end and not last:
            raise TimeoutError(
                f"LLM stage stopped at step {step + 1} after {args.minutes} min; rerun to resume"
            )
