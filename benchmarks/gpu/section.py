"""What a section of the suite is: its name, order, budget and the function that measures it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.gpu.plan import Plan
from benchmarks.gpu.record import Recorder


@dataclass(frozen=True)
class Section:
    """One part of the suite: ``run`` measures and records into the section's ``Recorder``.

    A module of ``benchmarks.gpu.sections`` declares its sections in ``SECTIONS``; the runner finds
    them there and runs them by ``order``."""

    name: str  # also its JSON's name, ``<out>/<name>.json``
    order: int  # sections run in ascending order
    budget_s: float  # seconds on the GPU: its process's whole life, imports included
    about: str  # one line for ``--help``
    run: Callable[[Recorder, Plan, Path], None]
    #: the goals read off this section's finished record (``goal``, ``measured``, ``met`` each)
    goals: Callable[[dict[str, Any]], list[dict[str, Any]]] | None = None
