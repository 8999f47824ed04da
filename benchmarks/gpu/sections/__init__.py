"""The GPU suite's sections, one module each.

A module declares its sections in ``SECTIONS`` (``benchmarks.gpu.plan.Section``: name, order, budget,
what it measures, the function that measures it, optionally its goals); ``discover`` finds them, so
adding a section is adding a module. A module imports only light modules at its top: the runner lists
the sections in a process that never loads a model, and each section imports torch and the rest inside
the function that measures.
"""

from __future__ import annotations

import importlib
import pkgutil

from benchmarks.gpu.section import Section


def discover() -> dict[str, Section]:
    """Every module's sections by name, in running order."""
    found: list[Section] = []
    for info in pkgutil.iter_modules(__path__):
        module = importlib.import_module(f"{__name__}.{info.name}")
        found.extend(getattr(module, "SECTIONS", ()))
    names = [s.name for s in found]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two GPU suite sections share a name: {twice}")
    return {s.name: s for s in sorted(found, key=lambda s: (s.order, s.name))}
