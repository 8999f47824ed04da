"""One configuration system: every bad value is one clear line and exit code 2, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

from jobs.cli import main as cli_main
from pipeline.config import ENGINE_OPTIONS, ConfigError, JobConfig, load_config
from pipeline.connect import SUBMITTED_JOB_ENV, cluster_address
from pipeline.sections import engine_option_names

REPO = Path(__file__).resolve().parents[1]


def test_engine_options_are_exactly_the_engine_constructors():
    """Both jobs' (and Serve's) engine options are checked against the real constructor: none dropped."""
    for options in ENGINE_OPTIONS.values():
        assert sorted(options.model_fields) == sorted(engine_option_names(options))


def test_only_set_engine_options_are_passed_on():
    cfg = load_config(overrides=["engine.compile=true"], job="caption")
    assert cfg.engine == {"compile": True}  # the engine keeps its own defaults for the rest
    cfg = load_config(overrides=["engine.max_batch_size=3"], job="synthesize")
    assert cfg.engine == {"max_batch_size": 3}


def test_the_shipped_job_configs_are_valid():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        data = yaml.safe_load(path.read_text())
        if "applications" in data:  # Serve configs: tests/test_serve.py
            continue
        assert isinstance(load_config(path, job=data["job"]), JobConfig)


def test_defaults_live_in_one_place():
    from janus.engine import CaptionRequest, SynthesisRequest
    from janus.engine.prompts import DEFAULT_CFG_WEIGHT, DEFAULT_QUESTION, DEFAULT_TEMPERATURE
    from pipeline.images import DEFAULT_MAX_PIXELS
    from pipeline.serve.config import APISection
    from pipeline.serve.schemas import ImageGenerationRequest
    from pipeline.sources.prompt_files import PromptDefaults

    cfg = JobConfig()
    assert cfg.synthesis.cfg_weight == PromptDefaults().cfg_weight == DEFAULT_CFG_WEIGHT
    assert SynthesisRequest("x").cfg_weight == ImageGenerationRequest(prompt="x").cfg_weight == DEFAULT_CFG_WEIGHT
    assert cfg.synthesis.temperature == SynthesisRequest("x").temperature == DEFAULT_TEMPERATURE
    assert cfg.caption.question == CaptionRequest().question == DEFAULT_QUESTION
    assert cfg.input.max_pixels == APISection().max_pixels == DEFAULT_MAX_PIXELS


BAD = [
    # (YAML content or None, --set overrides, subcommand, text the one line must hold)
    (None, ["compute.max_actors=two"], "synthesize", "compute.max_actors: Input should be a valid integer"),
    (None, ["compute.min_actors=3", "compute.max_actors=2"], "synthesize", "max_actors (2) must be >= min_actors"),
    (None, ["input.format=xml"], "synthesize", "input.format: synthesize reads auto, txt, jsonl"),
    (None, ["input.format=txt"], "caption", "input.format: caption reads auto, images"),
    (None, ["engine.compile=yes please"], "caption", "engine.compile: Input should be a valid boolean"),
    (None, ["engine.vq_decode_batch_size=4"], "caption", "engine.vq_decode_batch_size: unknown key for CaptionEngine"),
    (None, ["engine.max_batch_size=0"], "synthesize", "engine.max_batch_size: Input should be greater than or equal to 1"),
    (None, ["synthesis.cfg_weight=0.5"], "synthesize", "synthesis.cfg_weight: Input should be greater than or equal to 1"),
    (None, ["synthesis.seed=-1"], "synthesize", "synthesis.seed"),
    (None, ["model.dtype=fp8"], "synthesize", "model.dtype: Input should be 'auto'"),
    (None, ["model.device=gpu0"], "synthesize", "model.device: device must be auto, cpu, cuda or cuda:N"),
    (None, ["outptu.url=x"], "synthesize", "outptu: unknown key"),
    (None, ["compute.actor_class=not a class"], "synthesize", "compute.actor_class: must look like"),
    (None, ["compute.actor_class=nosuch.module:Thing"], "synthesize", "compute.actor_class 'nosuch.module:Thing' cannot be imported"),
    (None, ["output.write_images=true"], "synthesize", "output.write_images applies to caption jobs only"),
    (None, ["model.path=/no/such/model"], "synthesize", "model.path: model path '/no/such/model' is neither"),
    (None, ["output"], "synthesize", "--set expects key=value"),
    (None, ["compute.max_restarts=3"], "synthesize", "max_restarts is no longer a setting"),
    (None, ["output.url.deeper=x"], "synthesize", "url is not a section"),
    ("job: synthesize\n", [], "caption", "the config says job: 'synthesize' but the command is 'caption'"),
    ("- a\n- list\n", [], "synthesize", "must hold a mapping of sections"),
    ("model: {path: [unclosed\n", [], "synthesize", "is not valid YAML"),
    (None, ["input.url=/nonexistent/prompts"], "synthesize", "input.url: no such file, directory or prefix"),
    (None, ["input.url={here}"], "caption", "input.url: no input files ending in"),
    # accepted and ignored would be silently wrong: the other job's keys are errors
    (None, ["caption.question=what is it?"], "synthesize", "caption applies to caption jobs only: remove it"),
    (None, ["synthesis.seed=3"], "caption", "synthesis applies to synthesize jobs only"),
    (None, ["output.contact_sheet=4"], "caption", "output.contact_sheet applies to synthesize jobs only"),
    (None, ["output.contact_sheet=0"], "caption", "output.contact_sheet applies to synthesize jobs only"),
    (None, ["quality.min_score=0.5"], "caption", "quality.min_score applies to synthesize jobs only"),
    (None, ["input.max_pixels=1000"], "synthesize", "input.max_pixels applies to caption jobs only"),
    (None, ["compute.preprocess_cpus=2"], "synthesize", "compute.preprocess_cpus applies to caption jobs only"),
    ("job: caption\noutput: {contact_sheet: 8}\n", [], "caption", "output.contact_sheet applies to synthesize"),
    (None, ["ray.address=ray://127.0.0.1:10001"], "synthesize", "ray:// (Ray Client) cannot run a job"),
    (None, ["job.max_failed_fraction=0.1"], "synthesize", "--set 'job.max_failed_fraction=0.1': job is not a section"),
    (None, ["max_failed_fraction=1.5"], "synthesize", "max_failed_fraction: Input should be less than or equal to 1"),
    (None, ["model.path=no/such-model"], "synthesize", "model.path: "),
    (None, ["input.url={here}/empty.txt"], "synthesize", "holds no prompts: its 1 file(s) are empty"),
]


@pytest.mark.parametrize("content, overrides, command, message", BAD)
def test_bad_configs_are_one_line_and_exit_code_2(tmp_path, capsys, content, overrides, command, message):
    args = [command, "--set", f"output.url={tmp_path / 'out'}", "--set", "ray.num_cpus=1"]
    args += [a for o in overrides for a in ("--set", o.replace("{here}", str(tmp_path)))]
    (tmp_path / "empty.txt").write_bytes(b"")
    if content is not None:
        path = tmp_path / "job.yaml"
        path.write_text(content)
        args += ["--config", str(path)]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("janus-pipeline: "), err
    assert message in err, err


def test_a_missing_config_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml", job="synthesize")


def test_cli_usage_mistakes_are_one_line_and_exit_code_2():
    for argv in (["synthesize", "--no-such-flag"], ["paint"], []):
        proc = subprocess.run(
            [sys.executable, "-m", "jobs.cli", *argv], capture_output=True, text=True, cwd=REPO, timeout=120
        )
        assert proc.returncode == 2, proc
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_dry_run_checks_what_a_run_checks_and_prints_the_jobs_own_sections(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    out = ["--set", f"output.url={tmp_path / 'out'}"]
    assert cli_main(["synthesize", "--config", "configs/demo_synthesize.yaml", *out, "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["job"] == "synthesize" and printed["synthesis"]["n_samples"] == 2
    assert "caption" not in printed and "image_column" not in printed["input"]
    # what a real run finds before Ray starts, --dry-run finds too: here, a caption input not there yet
    missing = ["--set", f"input.url={tmp_path / 'no-images'}"]
    assert cli_main(["caption", "--config", "configs/demo_caption.yaml", *out, *missing, "--dry-run"]) == 2
    assert "input.url: no such file" in capsys.readouterr().err
    with tarfile.open(tmp_path / "shard.tar", "w"):  # a file of the job's kind (its input.format)
        pass
    here = ["--set", f"input.url={tmp_path}"]
    assert cli_main(["caption", "--config", "configs/demo_caption.yaml", *out, *here, "--dry-run"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert "synthesis" not in printed and "contact_sheet" not in printed["output"]
    assert "min_score" not in printed["quality"] and printed["caption"]["max_new_tokens"] == 24


def test_ray_client_addresses_and_relative_outputs_of_submitted_jobs_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("RAY_ADDRESS", "ray://127.0.0.1:10001")
    assert cli_main(["synthesize", "--set", f"output.url={tmp_path}/out", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "RAY_ADDRESS: ray:// (Ray Client) cannot run a job" in err
    assert "ray job submit --address http://<head>:8265" in err
    monkeypatch.delenv("RAY_ADDRESS")
    # a job that `ray job submit` started (Ray's supervisor sets this variable) writes nothing relative
    monkeypatch.setenv(SUBMITTED_JOB_ENV, "{}")
    assert cli_main(["synthesize", "--set", "output.url=out/relative", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "output.url: 'out/relative' is relative" in err
    assert cli_main(["synthesize", "--set", f"output.url={tmp_path}/out", "--dry-run"]) == 0


def test_which_ray_a_job_runs_on(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert cluster_address(load_config()) is None  # a private local Ray
    assert cluster_address(load_config(overrides=["ray.address=auto"])) == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert cluster_address(load_config()) == "10.0.0.1:6379"
    assert cluster_address(load_config(overrides=["ray.address=local"])) is None  # Ray's word for "start one"
