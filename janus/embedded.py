"""The models that ship with the package, by name: what ``model.path: shapes`` means everywhere.

``shapes``: a small Janus trained on drawn shapes (``janus/shapes/checkpoint``), whose outputs can be
judged; ``tiny``: random weights in the official layout, written to the cache on first use (the plumbing
is real, the outputs are noise). The configs, the jobs, Serve and the engines' ``from_pretrained``
(``SynthesisEngine.from_pretrained("shapes")``) resolve names here; it sits above ``janus.models``
because writing ``tiny`` needs the model. No torch at import: a job's driver resolves the model to read
its config files.
"""

from __future__ import annotations

import os
import shutil
from importlib import resources
from pathlib import Path

SHAPES = "shapes"
TINY = "tiny"
NAMES = (SHAPES, TINY)


def embedded_path(name: str, cache_dir: str | os.PathLike | None = None) -> str | None:
    """The directory of the embedded model ``name``, or None if ``name`` is not one of ``NAMES``."""
    if name == SHAPES:
        return str(resources.files("janus.shapes") / "checkpoint")
    if name != TINY:
        return None
    from janus.checkpoints import write_tiny_checkpoint
    from janus.models.hub import default_cache_dir

    target = Path(cache_dir or default_cache_dir()) / "tiny-janus-v1"
    if not (target / "config.json").exists():
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        write_tiny_checkpoint(tmp, seed=0)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
