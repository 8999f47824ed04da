"""No setting is accepted and ignored: every key of the config models is read by some code path.

The test walks the pydantic models (the batch jobs' ``JobConfig`` and Serve's ``ServeArgs``) to their
leaves and looks for each key's name among what the product's code reads: attributes, names as
strings (``["key"]``, ``.get("key")``, ``getattr(x, "key")``, tables of keys), and parameter names
(a section passed on as keyword arguments). The config
modules' own validators do not count: checking a value is not using it. A key that only one job reads
is an error in the other job's config (``pipeline.config.JOB_ONLY``, tested in test_config.py).
"""

from __future__ import annotations

import ast
import types
import typing
from pathlib import Path

from pydantic import BaseModel

from pipeline.config import JOB_ONLY, JobConfig
from pipeline.serve.config import ServeArgs
from tests.support import REPO

PRODUCT = ("janus", "pipeline", "jobs")
VALIDATORS = {"field_validator", "model_validator"}


def sections(annotation: object) -> list[type[BaseModel]]:
    """The config models inside a field's annotation (``Section``, ``Section | None``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in sections(arg)]
    return []


def leaf_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    keys = []
    for name, field in model.model_fields.items():
        inner = sections(field.annotation)
        if inner:
            keys += [k for m in inner for k in leaf_keys(m, f"{prefix}{name}.")]
        else:
            keys.append(prefix + name)
    return keys


class Reads(ast.NodeVisitor):
    """Names the code reads, outside the config models' validators."""

    def __init__(self) -> None:
        self.names: set[str] = set()

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        decorators = {getattr(d.func if isinstance(d, ast.Call) else d, "id", None) for d in node.decorator_list}
        if decorators & VALIDATORS:
            return
        args = node.args
        self.names |= {a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)}
        self.generic_visit(node)

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.ctx, ast.Load):
            self.names.add(node.attr)
        self.generic_visit(node)

    def visit_Constant(self, node: ast.Constant) -> None:
        """A name as a string: ``["key"]``, ``.get("key")``, ``getattr(x, "key")``, a table of keys."""
        if isinstance(node.value, str) and node.value.isidentifier():
            self.names.add(node.value)

    def visit_JoinedStr(self, node: ast.JoinedStr) -> None:
        """Text in f-strings is a message, not a read; what they format is visited."""
        for value in node.values:
            if isinstance(value, ast.FormattedValue):
                self.visit(value)


def read_names() -> set[str]:
    reads = Reads()
    for package in PRODUCT:
        for path in sorted(Path(REPO, package).rglob("*.py")):
            reads.visit(ast.parse(path.read_text(), filename=str(path)))
    return reads.names


def test_the_walk_finds_every_section_and_the_reader_ignores_validators():
    keys = leaf_keys(JobConfig)
    assert {"job", "compute.start_failures", "quality.ratings", "ray.num_gpus", "max_failed_fraction"} <= set(keys)
    assert {"synthesis.model.path", "caption.batching.max_batch_size", "api.max_n"} <= set(leaf_keys(ServeArgs))
    code = """
class S:
    @field_validator("x")
    def _x(cls, v):
        return v.validated_only

    def use(self, options):
        return self.read_here + options["by_key"] + options.get("by_get") + getattr(self, "by_getattr")

    def fail(self, value):
        raise ValueError(f"in_a_message {value.formatted}")

def build(passed_on=1):
    pass
"""
    reads = Reads()
    reads.visit(ast.parse(code))
    assert {"read_here", "by_key", "by_get", "by_getattr", "passed_on", "formatted"} <= reads.names
    assert not {"validated_only", "in_a_message"} & reads.names


def test_every_config_key_is_read_by_some_code_path():
    names = read_names()
    keys = sorted({*leaf_keys(JobConfig), *(f"serve:{k}" for k in leaf_keys(ServeArgs))})
    unread = [k for k in keys if k.rsplit(".", 1)[-1].removeprefix("serve:") not in names]
    assert not unread, f"config keys that no code reads (accepted and ignored): {unread}"


def test_job_only_keys_name_real_keys():
    keys = set(leaf_keys(JobConfig))
    for key in JOB_ONLY:
        assert key in keys or any(k.startswith(key + ".") for k in keys), key
