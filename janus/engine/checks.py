"""One rule per request field, for every way a request comes in: the engines, the batch jobs' config and
prompt files, and Serve's request bodies. Without torch: the job's driver, its read tasks and Serve's
HTTP ingress check fields without loading the model's stack.

A pydantic model takes a rule's bounds as ``Field(default, **RULES[name].bounds())`` (pydantic's own
messages); plain values (a request dict, a CSV cell) go through ``check(name, value)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SEED_LIMIT = 2**63  # seeds are in [0, SEED_LIMIT): non-negative int64
MAX_BEST_OF = 16  # best-of-k candidates per image


@dataclass(frozen=True)
class Rule:
    """A number's type and bounds (``None``: unbounded on that side)."""

    kind: type  # int or float
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def bounds(self) -> dict[str, Any]:
        """pydantic ``Field`` keyword arguments for this rule (floats must also be finite)."""
        out: dict[str, Any] = {k: v for k, v in vars(self).items() if k != "kind" and v is not None}
        if self.kind is float:
            out["allow_inf_nan"] = False
        return out

    def describe(self) -> str:
        """``>= 1.0``, ``in (0.0, 1.0]``, ``in [1, 10000]``: how messages state the rule."""
        low, high = (self.ge, "[") if self.ge is not None else (self.gt, "(")
        top, close = (self.le, "]") if self.le is not None else (self.lt, ")")
        if self.kind is int and top is not None and close == ")":
            top, close = int(top) - 1, "]"  # integers: the largest allowed value, not the limit
        cast = self.kind
        if top is None:
            return f"{'>=' if high == '[' else '>'} {cast(low)}"
        if low is None:
            return f"{'<=' if close == ']' else '<'} {cast(top)}"
        return f"in {high}{cast(low)}, {cast(top)}{close}"

    def holds(self, value: float) -> bool:
        return not (
            (self.ge is not None and value < self.ge)
            or (self.gt is not None and value <= self.gt)
            or (self.le is not None and value > self.le)
            or (self.lt is not None and value >= self.lt)
        )

    def check(self, name: str, value: Any) -> Any:
        """``value`` as this rule's type (numbers given as text are parsed), or ``ValueError``."""
        value = _number(name, value, self.kind)
        if not self.holds(value):
            raise ValueError(f"{name} must be {self.describe()}, got {value}")
        return self.kind(value)


def _number(name: str, value: Any, kind: type) -> Any:
    word = "an integer" if kind is int else "a number"
    if isinstance(value, str):
        try:
            value = kind(value.strip())
        except ValueError:
            raise ValueError(f"{name} must be {word}, got {value!r}") from None
    if hasattr(value, "item") and not isinstance(value, (list, tuple)):  # numpy scalars from batches
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be {word}, got {value!r}")
    if kind is int and isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{name} must be {word}, got {value!r}")
        value = int(value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


RULES: dict[str, Rule] = {
    "seed": Rule(int, ge=0, lt=SEED_LIMIT),
    "cfg_weight": Rule(float, ge=1),  # 1 = no guidance; DeepSeek uses 5
    "temperature": Rule(float, ge=0),  # 0 = greedy
    "top_k": Rule(int, ge=0),  # 0 or None = off (as in transformers)
    "top_p": Rule(float, gt=0, le=1),  # None = off
    "max_new_tokens": Rule(int, ge=1),
    "best_of": Rule(int, ge=1, le=MAX_BEST_OF),
}


def check(name: str, value: Any) -> Any:
    """``value`` checked against the rule for the field ``name`` (``ValueError`` says why not)."""
    return RULES[name].check(name, value)


def check_fields(request: Any, names: tuple[str, ...]) -> None:
    """Check and coerce, in place, the fields ``names`` of a request dataclass that are set (not None)."""
    for name in names:
        value = getattr(request, name, None)
        if value is not None:
            setattr(request, name, check(name, value))
