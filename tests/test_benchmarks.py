"""The benchmark scripts run to their results file: a script that fails after its minutes of measuring
loses them, so each writes its JSON here on the tiny config in seconds."""

from __future__ import annotations

import json

import torch


def test_bench_engines_writes_its_results_with_the_machine_and_git_state(tmp_path):
    from benchmarks.bench_engines import main

    out = tmp_path / "engines.json"
    threads = torch.get_num_threads()
    try:
        main(
            ["--config", "tiny", "--batch", "1", "--repeats", "1", "--threads", "1", "--tasks", "caption",
             "--contenders", "engine,ref_per_image", "--max-new-tokens", "2", "--out", str(out)]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    data = json.loads(out.read_text())
    assert {r["contender"] for r in data["rows"]} == {"engine", "ref_per_image"}
    assert all(r["images_per_s"] > 0 for r in data["rows"])
    meta = data["meta"]
    assert "cores" in meta["machine"] and meta["git"] and meta["command"].startswith("python -m benchmarks.bench_engines")
