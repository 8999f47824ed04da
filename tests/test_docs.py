"""The docs say what is: the product first, no history, every cited result and link present.

Fast and model-free: these read the tree's text files only.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support import REPO

README = REPO / "README.md"
BENCHMARKS = REPO / "benchmarks" / "README.md"
RESULTS = REPO / "benchmarks" / "results"
DOCS = [README, REPO / "ARCHITECTURE.md", BENCHMARKS, *sorted((REPO / "docs").glob("*.md"))]
#: what the project's prose, code and configs are made of (results included: their commands are text)
SCANNED = [
    "README.md",
    "ARCHITECTURE.md",
    "Makefile",
    "pyproject.toml",
    "docs",
    "benchmarks",
    "janus",
    "pipeline",
    "jobs",
    "tests",
    "configs",
    "training",
    "deploy",
    "docker",
]
BINARY = {".png", ".safetensors", ".pt", ".pyc", ".tar", ".parquet", ".whl"}

#: a numbered past run or work period: "session 18", "sessions 7-14", "session-15", "s15" (a word or
#: a file-name part such as "_s4.json"); "s3" is storage, and upper-case S12 a numpy dtype
HISTORY = re.compile(
    r"(?i:\bsessions?[ -]\d+)"
    r"|(?<![\w/.-])s(?!3\b)\d{1,2}\b"
    r"|_s(?!3\b)\d{1,2}\b"
    r"|(?i:\b(?:run|wave|sprint|period) #?\d+\b(?![-.]\d))"
)


def text_files() -> list[Path]:
    files: list[Path] = []
    for name in SCANNED:
        path = REPO / name
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        files += [p for p in candidates if p.suffix not in BINARY and "__pycache__" not in p.parts]
    return [p for p in files if p != Path(__file__).resolve()]


@pytest.mark.parametrize(
    "line",
    [
        "trained in session 18",
        "sessions 7-14",
        "the session-15 checkpoint",
        "(s15)",
        "results/eval_quality_s15.json",
        "small_cpu_bfloat16_b8_t1_s4.json",
        "an extra run 3 showed",
    ],
)
def test_the_history_pattern_finds_numbered_runs(line):
    assert HISTORY.search(line)


@pytest.mark.parametrize(
    "line",
    [
        "s3://bucket/prefix",
        'fsspec.filesystem("s3")',
        "configs/prod_caption_1b_s3.yaml",
        "dtype S12",
        "the session's Ray",
        "scope='session'",
        "runs 2 workers",
        "shard-0.tar#000017",
    ],
)
def test_the_history_pattern_leaves_ordinary_text_alone(line):
    assert not HISTORY.search(line)


def test_readme_says_what_the_product_is_and_how_to_run_it_first():
    head = README.read_text().splitlines()[:12]
    text = "\n".join(head)
    assert "Janus-Pro" in text and "Ray" in text, text
    commands = [line.split("#")[0].strip() for line in head]
    assert "make demo" in commands and "make test" in commands, text


def test_no_file_names_a_numbered_past_run():
    hits = [
        f"{p.relative_to(REPO)}:{i}: {line.strip()[:120]}"
        for p in text_files()
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if HISTORY.search(line)
    ]
    named = [str(p.relative_to(REPO)) for p in text_files() if HISTORY.search(p.name)]
    assert not hits and not named, "\n".join(hits + named)


def test_no_file_keeps_a_merge_conflicts_markers():
    marker = re.compile(r"^(<{7} |={7}$|>{7} )")
    hits = [
        f"{p.relative_to(REPO)}:{i}"
        for p in text_files()
        for i, line in enumerate(p.read_text(errors="replace").splitlines(), 1)
        if marker.match(line)
    ]
    assert not hits, hits


def test_every_result_file_is_cited_and_every_cited_file_exists():
    cited = set(re.findall(r"results/([A-Za-z0-9_.-]+\.[a-z]+)\b", BENCHMARKS.read_text()))
    present = {p.name for p in RESULTS.iterdir() if p.is_file()}
    assert not cited - present, (
        f"cited in benchmarks/README.md, not in benchmarks/results/: {cited - present}"
    )
    assert not present - cited, (
        f"in benchmarks/results/, not cited by benchmarks/README.md: {present - cited}"
    )


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_docs_stand_alone_and_their_links_resolve(doc):
    text = doc.read_text()
    assert "../shared" not in text, f"{doc.name} points outside the repository"
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert (doc.parent / target).exists(), f"{doc.name} links to {target}, which does not exist"
