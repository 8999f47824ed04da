"""Where a job's or server's model comes from (the embedded models' names -> their directories) and
which class holds it (named, so that only the actors and replicas that run it import it).

No torch here (the tiny checkpoint's writer loads it only when the tiny model is first written): a
job's driver resolves the model to read its config files, and must start without the model's stack.
"""

from __future__ import annotations

import importlib
import os
from importlib import resources
from pathlib import Path

TINY = "tiny"  # random weights, written on first use: the plumbing is real, the outputs are noise
SHAPES = "shapes"  # trained on drawn shapes, shipped in the package: outputs can be judged

#: the model actor classes of the jobs and of Serve's model deployments
SYNTHESIZER = "pipeline.actors.synthesizer:Synthesizer"
CAPTIONER = "pipeline.actors.captioner:Captioner"


def load_class(spec: type | str) -> type:
    """A class, or one named ``package.module:Class`` (such as the two above), imported here."""
    if isinstance(spec, str):
        module, _, name = spec.partition(":")
        spec = getattr(importlib.import_module(module), name)
    return spec


def resolve_model_ref(path: str, cache_dir: str | None = None) -> str:
    """The embedded models' names -> their directories; anything else is returned as is."""
    if path == SHAPES:
        return str(resources.files("janus.shapes") / "checkpoint")
    if path != TINY:
        return path
    from janus.models.hub import default_cache_dir
    from janus.testing import write_tiny_checkpoint

    target = Path(cache_dir or default_cache_dir()) / "tiny-janus-v1"
    if not (target / "config.json").exists():
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        write_tiny_checkpoint(tmp, seed=0)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; theirs is identical
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
