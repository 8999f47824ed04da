"""Train the shapes Janus from scratch on this machine: ``python -m training.shapes`` from the repository
root (docs/shapes_model.md has the recipe and what each choice measured).

Two stages, both seeded, both resumable (state is saved under ``--work`` every few hundred steps):
1. ``vq``: the VQ tokenizer (Janus' VQ-16 architecture, shrunk: 96 px images <-> a code grid, ``--grid``)
   learns to reconstruct drawn scenes;
2. ``llm``: the whole multimodal model minus the (frozen) VQ learns both directions at once on the
   ``batches`` it is given: text -> image codes (Janus' generation path, with the unconditional branch
   CFG pushes away from: prompts dropped to the pad prompt, or both branches with ``--guided-loss``),
   and image -> text (captions, and yes/no answers to "does this image show ...?", the
   self-verification question); ``losses`` are the two next-token losses.
``export`` writes the official on-disk format (config.json, safetensors, tokenizer, processor configs),
loaded like any Janus-Pro checkpoint. Held-out combinations (purple triangles, orange circles) are never
drawn, encoded or mentioned in any training example. Nothing under ``janus``, ``pipeline`` or ``jobs``
imports this package.
"""
