"""Processes that never run the model never load its stack: torch, transformers and timm cost ~9 s
of CPU per process on a 2-core machine, and a job starts many such processes (its driver, Ray Data's
read and write tasks, Serve's HTTP ingress). A regression here shows up only as slowness, so it is
checked directly: each module is imported in a fresh interpreter and the heavy packages must be absent.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.support import REPO

HEAVY = ("torch", "transformers", "timm")

LIGHT = [
    "jobs.cli",
    "pipeline.config",
    "pipeline.job",  # the driver: config, listing, schema, the Ray Data graph
    "pipeline.crash_guard",  # the pool's wrapper, pickled by the driver: it imports the actor class lazily
    "pipeline.sources.datasource",  # read tasks
    "pipeline.sinks",  # write tasks
    "pipeline.dedup",  # `janus-pipeline dedup`: Parquet and numpy only
    "janus.models.fingerprint",  # the driver hashes the weights before Ray starts
    "pipeline.contact_sheet",
    "pipeline.images",  # the caption job's CPU decode and resize tasks, with the next one
    "janus.models.image_processing_vlm",
    "pipeline.serve.app",  # the HTTP ingress replica (the model deployments import the actors)
    "janus.engine.prompts",
    "janus.engine.checks",  # request field rules: the config, read tasks and Serve's bodies use them
    "janus.engine.status",
    "janus.engine.health",  # the crash guard asks it whether an actor's device broke
    "janus.engine.detokenize",  # streaming text, beside the tokenizer: torch-free
    "janus.engine.stats",
    "janus.models.hub",
]


@pytest.mark.timeout(120)
def test_modules_that_never_run_the_model_never_import_its_stack():
    code = (
        "import importlib, json, sys\n"
        "out = {}\n"
        f"for m in {LIGHT!r}:\n"
        f"    before = {{h for h in {HEAVY!r} if h in sys.modules}}\n"
        "    importlib.import_module(m)\n"
        f"    out[m] = sorted(h for h in {HEAVY!r} if h in sys.modules and h not in before)\n"
        "print(json.dumps(out))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    loaded = {m: heavy for m, heavy in json.loads(proc.stdout).items() if heavy}
    assert not loaded, f"imported with the model's stack: {loaded}"


@pytest.mark.timeout(120)
def test_the_public_names_still_load_on_demand():
    """The lazy packages give the same objects as their submodules, and the seed's import line still
    registers the model with transformers' Auto classes."""
    code = (
        "from janus.models import MultiModalityCausalLM, VLChatProcessor\n"
        "from janus.engine import OK, SynthesisEngine, CaptionEngine, load_model_and_processor\n"
        "import janus.engine.synthesis as s, janus.engine.status as st, janus.models.modeling_vlm as m\n"
        "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
        "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING\n"
        "from janus.models import MultiModalityConfig\n"
        "assert SynthesisEngine is s.SynthesisEngine and OK is st.OK and MultiModalityCausalLM is m.MultiModalityCausalLM\n"
        "assert CONFIG_MAPPING['multi_modality'] is MultiModalityConfig\n"
        "assert MODEL_FOR_CAUSAL_LM_MAPPING[MultiModalityConfig] is MultiModalityCausalLM\n"
        "import janus.engine\n"
        "try:\n"
        "    janus.engine.NoSuchName\n"
        "except AttributeError as e:\n"
        "    print('ok', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("ok") and "NoSuchName" in proc.stdout
