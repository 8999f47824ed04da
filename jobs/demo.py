"""End-to-end demo on an embedded tiny model: no weights download, CPU, a few seconds.

Writes a tiny Janus checkpoint in the official format, loads it through the real loader,
generates images from prompts (CFG synthesis engine) and captions them (captioning engine).
Output: ``{out}/images/*.png`` and ``{out}/results.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import PIL.Image

from janus.engine import CaptionEngine, SynthesisEngine
from janus.models import MultiModalityCausalLM, VLChatProcessor
from janus.testing import write_tiny_checkpoint

logger = logging.getLogger("janus.demo")

PROMPTS = [
    "A stunning princess from kabul in red, white traditional clothing, blue eyes, brown hair",
    "A photo of a red apple on a wooden table, soft light",
    "Two people walking along the beach at sunset",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out", help="output directory (default: ./out)")
    parser.add_argument("--model", default=None, help="checkpoint (dir, hub id, s3://...); default: a tiny one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    out = Path(args.out)
    model_path = args.model or str(write_tiny_checkpoint(out / "tiny-janus", seed=args.seed))
    logger.info("loading %s", model_path)
    model = MultiModalityCausalLM.from_pretrained(model_path)
    processor = VLChatProcessor.from_pretrained(model_path)

    t0 = time.perf_counter()
    synth = SynthesisEngine(model, processor, max_batch_size=len(PROMPTS))
    requests = [{"prompt": p, "seed": args.seed + i} for i, p in enumerate(PROMPTS)]
    images = synth.generate(requests)
    logger.info("generated %d images in %.1fs", sum(r.ok for r in images), time.perf_counter() - t0)

    (out / "images").mkdir(parents=True, exist_ok=True)
    captioner = CaptionEngine(model, processor)
    pil = [PIL.Image.fromarray(r.image) for r in images if r.ok]
    captions = captioner.generate([{"image": im, "max_new_tokens": 24} for im in pil])

    with open(out / "results.jsonl", "w", encoding="utf-8") as f:
        for i, (req, img, cap) in enumerate(zip(requests, images, captions, strict=True)):
            path = out / "images" / f"{i:05d}.png"
            PIL.Image.fromarray(img.image).save(path)
            row = {"key": f"{i:05d}", **req, "image": str(path), "caption": cap.text, "status": cap.status}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    logger.info("wrote %d images and %s (tiny random model: captions are noise)", len(pil), out / "results.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
