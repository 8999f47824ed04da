"""The command line: ``python -m training.shapes`` (from the repository root) trains the shapes Janus
from scratch, resumably, and writes it in the official on-disk format."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from janus.shapes.data import ATTRIBUTES, IMAGE_SIZE
from janus.utils.cli import OneLineParser

from .batches import CFG_DROPOUT, Pool
from .export import export
from .llm import train_llm
from .model import GRID, build_model, write_skeleton
from .state import init_from
from .vq import train_vq, vq_roundtrip_accuracy

logger = logging.getLogger("training.shapes")


def _run_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="janus/shapes/checkpoint", help="where the checkpoint is written")
    parser.add_argument("--work", default="out/shapes-train", help="resumable training state")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--init-from",
        metavar="CHECKPOINT",
        help="start from this checkpoint's weights (e.g. janus/shapes/checkpoint) at LLM step --init-step, "
        "when its --work folder is gone; the VQ is kept as it is",
    )
    parser.add_argument(
        "--init-step", type=int, default=0, help="the LLM step the --init-from weights are at"
    )
    parser.add_argument("--eval-every", type=int, default=500)
    parser.add_argument("--eval-n", type=int, default=32)
    parser.add_argument("--minutes", type=float, default=150, help="stop (resumably) after this long")


def _vq_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--vq-steps", type=int, default=1500)
    parser.add_argument("--vq-batch", type=int, default=16)
    parser.add_argument("--vq-crop", type=int, default=48, help="train the VQ on crops this size (0: whole)")
    parser.add_argument(
        "--grid",
        type=int,
        default=GRID,
        help="codes along a generated image's side (24: 4 px per code; 12: 8 px)",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=IMAGE_SIZE,
        help="the side of the images the model generates (it reads 96 px ones); with --grid, the pixels per code",
    )
    parser.add_argument(
        "--vq-no-restarts", action="store_true", help="codes no batch picks die instead of restarting"
    )
    parser.add_argument(
        "--vq-uniform-weight",
        type=float,
        default=0.0,
        help="pull each plain cell of colour k to code k (docs/shapes_model.md: 39 codes, 4.4 bits, not 511, 7.4)",
    )
    parser.add_argument(
        "--exact-shapes",
        action="store_true",
        help="the VQ and the generation targets see scenes drawn without jitter (understanding keeps it)",
    )


def _generation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pool", type=int, default=16384, help="drawn scenes the LLM trains on")
    parser.add_argument("--llm-steps", type=int, default=3000)
    parser.add_argument("--gen-batch", type=int, default=16)
    parser.add_argument("--und-batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--stop-at", type=int, help="end (and export) at this LLM step, the schedule unchanged"
    )
    parser.add_argument(
        "--cfg-dropout", type=float, default=CFG_DROPOUT, help="prompts dropped to the pad prompt"
    )
    parser.add_argument(
        "--guided-loss",
        type=float,
        default=0.0,
        help="weight of the loss on CFG's guided logits (each generation example then runs with its prompt "
        "and with the pad prompt; --cfg-dropout is not used); 0: the plain loss",
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
        "--telling-weight",
        type=float,
        default=1.0,
        help="loss weight of the shape-telling codes (the cells that would change were the scene's shape "
        "another: where the shape word shows), in place of --shape-weight's; 1: --shape-weight's (an "
        "ablation that drew no better: docs/shapes_model.md)",
    )


def _understanding_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--yes-no",
        type=float,
        default=None,
        help="understanding rows that are yes/no pairs (default: half captions, half single questions)",
    )
    parser.add_argument(
        "--pairs-from",
        type=int,
        default=0,
        help="the LLM step at which --yes-no's pairs (and the other score examples) start; before it, "
        "captions and single yes/no questions, which a small model answers 50/50, leaving its attention "
        "free to learn shape and position once the pairs start (pairs from step 0 lock it onto colour "
        "and background)",
    )
    parser.add_argument(
        "--easy-negatives",
        type=float,
        default=0.0,
        help="yes/no negatives that are another scene, not one change",
    )
    parser.add_argument(
        "--negative-attributes",
        nargs="+",
        choices=ATTRIBUTES,
        default=list(ATTRIBUTES),
        help="the attributes a one-change yes/no negative may change (default: any of the four)",
    )
    parser.add_argument(
        "--text-first",
        type=float,
        default=0.0,
        help="caption and one-attribute rows whose question comes before the image (as a chat whose text "
        "part comes first renders); the score's questions keep the image first",
    )
    parser.add_argument(
        "--vq-pixels",
        type=float,
        default=0.0,
        help="understanding rows that see the image the VQ decodes from the scene's codes (what generated "
        "images look like) instead of the drawn one",
    )
    _score_ablations(parser)


def _score_ablations(parser: argparse.ArgumentParser) -> None:
    """Three ways to teach the yes/no question shape and position that did not (docs/shapes_model.md)."""
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
        "--negative-attributes back (the prompt's word, not the image's)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="python -m training.shapes", description=__doc__.split("\n")[0])
    for options in (_run_options, _vq_options, _generation_options, _understanding_options):
        options(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    work = Path(args.work)
    skeleton = work / "skeleton"
    cfg = write_skeleton(skeleton, args.grid, args.image_size)
    from janus.models import VLChatProcessor

    processor = VLChatProcessor.from_pretrained(skeleton)
    model = build_model(cfg)
    vq = model.gen_vision_model
    if args.init_from:
        init_from(model, Path(args.init_from), work, args.vq_steps, args.init_step)
    t0 = time.time()
    jitter = not args.exact_shapes
    vq_options = dict(
        crop=args.vq_crop, restarts=not args.vq_no_restarts, uniform_weight=args.vq_uniform_weight
    )
    if train_vq(vq, args.vq_steps, args.vq_batch, args.seed, work, args.minutes, jitter=jitter, **vq_options):
        logger.info(
            "VQ round trip, judged: %.3f all-correct",
            vq_roundtrip_accuracy(vq, 256, args.seed, jitter=jitter),
        )
    with torch.no_grad():  # image-token embeddings start as the (normalised) codebook
        model.gen_embed.weight.copy_(F.normalize(vq.quantize.embedding.weight, dim=1))
    pool = Pool(vq, args.pool, args.seed, work, exact=args.exact_shapes, decoded=args.vq_pixels > 0)
    logger.info("pool of %d scenes encoded in %.0fs", len(pool.scenes), time.time() - t0)
    args.minutes -= (time.time() - t0) / 60
    train_llm(model, processor, pool, args, work)
    export(model, skeleton, Path(args.out))
    logger.info("wrote %s", args.out)
    return 0
