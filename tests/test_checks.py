"""Each request field has one rule (``janus.engine.checks``), and every way in applies it: the engines,
the job config, a prompt file's own row settings and Serve's request bodies accept and refuse the same
values."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from janus.engine.checks import RULES, check
from pipeline.config import ConfigError, load_config
from pipeline.serve.schemas import ChatCompletionRequest, ImageGenerationRequest
from pipeline.sources.prompt_files import read_prompts

#: field -> (values the rule accepts, values it refuses)
CASES = {
    "cfg_weight": ([1, 1.0, 5.5], [0.5, 0, -1, float("inf")]),
    "temperature": ([0, 0.7, 3], [-0.1, float("nan")]),
    "seed": ([0, 7, 2**63 - 1], [-1, 2**63]),
    "top_k": ([0, 1, 40], [-1, -3]),
    "top_p": ([0.1, 1], [0, 1.5]),
    "max_new_tokens": ([1, 64], [0, -5]),
    "best_of": ([1, 16], [0, 17]),
}


def accepted(fn) -> bool:
    try:
        fn()
    except (ValueError, ConfigError, ValidationError):
        return False
    return True


def engine_accepts(field: str, value) -> bool:
    from janus.engine.captioning import CaptionRequest
    from janus.engine.common import RequestError, check_sampling
    from janus.engine.synthesis import SynthesisRequest

    if field == "best_of":
        from janus.engine.quality import QualityOptions

        return accepted(lambda: QualityOptions(best_of=value))
    request = CaptionRequest() if field == "max_new_tokens" else SynthesisRequest(prompt="x")
    setattr(request, field, value)
    extra = ("cfg_weight",) if field == "cfg_weight" else ("max_new_tokens",) if field == "max_new_tokens" else ()
    try:
        check_sampling(request, *extra)
    except RequestError:
        return False
    return True


CONFIG_KEYS = {
    "cfg_weight": "synthesis.cfg_weight",
    "temperature": "synthesis.temperature",
    "seed": "synthesis.seed",
    "top_k": "synthesis.top_k",
    "top_p": "synthesis.top_p",
    "max_new_tokens": "caption.max_new_tokens",
    "best_of": "quality.best_of",
}


def config_accepts(field: str, value) -> bool:
    key = CONFIG_KEYS[field]
    job = "caption" if key.startswith("caption.") else "synthesize"  # the other job's keys are errors
    return accepted(lambda: load_config(None, [f"{key}={json.dumps(value)}"], job=job))


def prompt_file_accepts(field: str, value, tmp_path) -> bool | None:
    if field not in ("cfg_weight", "temperature", "seed"):
        return None  # not a per-row setting of prompt files
    path = tmp_path / f"{field}.jsonl"
    path.write_text(json.dumps({"prompt": "x", field: value}) + "\n")
    (row,) = read_prompts(str(path))
    return row["status"] == "ok"


def serve_accepts(field: str, value) -> bool | None:
    if field in ("cfg_weight", "temperature", "seed", "best_of"):
        return accepted(lambda: ImageGenerationRequest(prompt="x", **{field: value}))
    if field in ("top_p", "max_new_tokens"):
        name = "max_tokens" if field == "max_new_tokens" else field
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], name: value}
        return accepted(lambda: ChatCompletionRequest(**body))
    return None


@pytest.mark.parametrize("field", sorted(CASES))
def test_every_way_in_applies_the_one_rule(field, tmp_path):
    good, bad = CASES[field]
    for value, want in [(v, True) for v in good] + [(v, False) for v in bad]:
        assert accepted(lambda: check(field, value)) is want, (field, value)  # noqa: B023
        verdicts = {
            "engine": engine_accepts(field, value),
            "config": config_accepts(field, value),
            "prompt file": prompt_file_accepts(field, value, tmp_path),
            "serve": serve_accepts(field, value),
        }
        wrong = {entry: got for entry, got in verdicts.items() if got is not None and got is not want}
        assert not wrong, f"{field}={value!r}: the rule says {want}, but {wrong}"


def test_messages_state_the_rule():
    assert RULES["cfg_weight"].describe() == ">= 1.0"
    assert RULES["top_p"].describe() == "in (0.0, 1.0]"
    assert RULES["seed"].describe() == f"in [0, {2**63 - 1}]"
    with pytest.raises(ValueError, match=r"^cfg_weight must be >= 1.0, got 0.5$"):
        check("cfg_weight", "0.5")  # text, as a CSV cell holds it, is parsed first
    with pytest.raises(ValueError, match="seed must be an integer, got 1.5"):
        check("seed", 1.5)
    with pytest.raises(ValueError, match="temperature must be a number, got True"):
        check("temperature", True)
