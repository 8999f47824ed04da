"""Every code block of README.md runs as written, so the README cannot drift from the product.

The blocks are found by their fences and run in README order in a folder that holds what a clone
holds (``tests/support/readme.py``): the first runs ``make demo``, the later ones run on its output.
The skip-lists below are short and say why; a block in a language the runner does not know fails
the test (listings are labelled ``text``). The same run checks what a user reads: each demo job's
log fits on one screen, without Ray's notes to itself, and Ctrl-C stops the server without a
failure line.
"""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from pipeline.console import SERVE_SHUTDOWN_NOISE
from tests.support.readme import PYTHON, SHELL, SQL, TEXT, YAML, Block, Runner, logical_lines, readme_blocks

#: blocks that cannot run here, by a phrase each contains: why
SKIP_BLOCKS = {
    "deepseek-ai/Janus-Pro-7B": "Janus-Pro-7B from the Hugging Face hub: tests have no hub (and no GPU)",
    "ray job submit": "needs a cluster's Jobs API; tests/test_cluster_entry.py submits the demo job to a local head",
    "kubectl": "needs a Kubernetes cluster with KubeRay; tests/test_kuberay.py validates the manifests",
    "docker build": "builds and pushes an image: needs Docker and a registry",
    "training.shapes": "retrains the shapes model: ~115 min of 2 CPU cores",
}
#: shell commands that cannot run here, the rest of their block runs: why
SKIP_LINES = {"make test": "runs this test suite"}
#: a job's log on one screen
SCREEN_LINES = 40
#: what a user of a job that succeeded must not read
NOT_FOR_USERS = ("Token authentication", "will hang unless more CPUs", "Execution plan of Dataset", "Traceback")


def skip_reason(block: Block) -> str | None:
    return next((why for phrase, why in SKIP_BLOCKS.items() if phrase in block.code), None)


def runnable_shell(block: Block) -> str:
    """The block without the commands of ``SKIP_LINES``."""
    kept = [line for line in logical_lines(block.code) if shlex.split(line, comments=True) not in SKIP_COMMANDS]
    return "\n".join(kept)


SKIP_COMMANDS = [shlex.split(command) for command in SKIP_LINES]


def run_sql(runner: Runner, block: Block, monkeypatch) -> None:
    import duckdb

    monkeypatch.chdir(runner.folder)
    code = "\n".join(line for line in block.code.splitlines() if not line.lstrip().startswith("--"))
    statements = [s for s in code.split(";") if s.strip()]
    assert statements, block.where()
    for statement in statements:
        duckdb.connect().sql(statement).fetchall()


def check_yaml(runner: Runner, block: Block, log) -> None:
    """A Serve config, a Serve application's ``args`` (or part of them), a Serve key file, or a job's
    config: validated by the product's own checks, as ``serve`` and the jobs read them."""
    from pipeline.config import load_config
    from pipeline.serve.config import APISection, ServeArgs, check_serve_config, load_keys, parse_args

    data = yaml.safe_load(block.code)
    path = log.with_suffix(".yaml")
    path.write_text(block.code)
    if isinstance(data, list):  # api.keys.file
        assert load_keys(APISection.model_validate({"keys": {"file": str(path)}}), environ={}), block.where()
    elif "applications" in data:
        check_serve_config(path)
    elif set(data) <= set(ServeArgs.model_fields):
        parse_args(data)
    else:
        load_config(path, job=data.get("job", "synthesize"))


def test_every_block_runs_or_says_why_not():
    blocks = readme_blocks()
    assert len(blocks) >= 10, "the README's fences were not found"
    known = (*SHELL, *PYTHON, *SQL, *YAML, *TEXT)
    unlabelled = [b.where() for b in blocks if b.lang not in known]
    assert not unlabelled, f"blocks in no known language (label listings ```text): {unlabelled}"
    for phrase in [*SKIP_BLOCKS, *SKIP_LINES]:  # an entry that matches nothing is stale
        assert any(phrase in b.code for b in blocks), f"skip-list entry {phrase!r} matches no README block"


def on_screen(lines: list[str]) -> list[str]:
    """A job's log as the one-screen rule counts it: each dataset's first progress report, not the ones
    Ray Data repeats every ``pipeline.console.PROGRESS_EVERY_S`` while it runs (a busier machine logs
    more of them)."""
    kept: list[str] = []
    seen: set[str] = set()
    repeat = False
    for line in lines:
        header = re.search(r"logging_progress\.py.*Running Dataset: (\S+)", line)
        if header:
            repeat = header.group(1) in seen
            seen.add(header.group(1))
        elif "logging_progress.py" not in line:
            repeat = False
        if not repeat:
            kept.append(line)
    return kept


def job_logs(make_output: str) -> list[list[str]]:
    """``make demo``'s output cut at the commands make echoes: one list of lines per job."""
    logs: list[list[str]] = []
    for line in make_output.splitlines():
        if re.search(r"-m jobs\.cli (synthesize|caption)", line) and not line.startswith("20"):
            logs.append([])
        elif logs:
            logs[-1].append(line)
    return logs


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_every_readme_block_runs_as_written(tmp_path, monkeypatch):
    runner = Runner.in_clone(tmp_path / "clone")
    ran = []
    try:
        for i, block in enumerate(readme_blocks()):
            if block.lang in TEXT or skip_reason(block):
                continue
            log = tmp_path / f"block{i:02d}.log"
            if block.lang in SHELL:
                runner.run_shell_block(Block(block.lang, runnable_shell(block), block.line), log)
            elif block.lang in PYTHON:
                runner.run_python(block, log)
            elif block.lang in SQL:
                run_sql(runner, block, monkeypatch)
            else:
                check_yaml(runner, block, log)
            ran.append((block, log))
    finally:
        stopped = runner.stop_servers()

    kinds = {b.lang for b, _ in ran}
    assert {"bash", "python", "sql"} <= kinds, kinds
    demo = next(log for b, log in ran if "make demo" in b.code).read_text()
    logs = job_logs(demo)
    assert len(logs) == 2, demo  # make demo: a synthesis and a caption job
    for lines in logs:
        assert len(on_screen(lines)) <= SCREEN_LINES, "\n".join(lines)
        assert not [line for line in lines if any(n in line for n in NOT_FOR_USERS)], "\n".join(lines)
    # the quick start's first command after make demo: that job finished, so it ends at once
    [quick] = [log for b, log in ran if b.lang in SHELL and "demo_prompts.txt -> out/synthesis" in b.code]
    assert "nothing to run" in quick.read_text() and "pipeline.connect" not in quick.read_text()
    assert stopped, "no README block started the server"
    for server in stopped:
        said = server.log.read_text()
        assert server.process.returncode == 0, said[-3000:]
        assert not any(noise in said for noise in (*SERVE_SHUTDOWN_NOISE, "Token authentication")), said[-3000:]
