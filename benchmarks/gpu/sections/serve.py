"""serve: the product's online entry point on the GPU. ``python -m jobs.cli serve`` (what
``janus-pipeline serve`` runs) on configs/serve_tiny.yaml with both models on one GPU, the synthesis
engine compiled as configs/serve_prod.yaml has it; one request per route, checked."""

from __future__ import annotations

import base64
import contextlib
import io
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu.device import free_memory
from benchmarks.gpu.models import write_checkpoint
from benchmarks.gpu.plan import Plan
from benchmarks.gpu.processes import (
    RAY_START_TRIES,
    ROOT,
    free_port,
    log_tail,
    ray_start_timed_out,
    start_process,
    stop_process,
)
from benchmarks.gpu.record import Recorder
from benchmarks.gpu.section import Section

SERVE_MODEL = "janus-gpu-suite"


def serve_config(plan: Plan, checkpoint: Path, port: int) -> dict[str, Any]:
    """configs/serve_tiny.yaml on this checkpoint and port; on a GPU both models share it (0.5 each)
    and the synthesis engine is compiled, as configs/serve_prod.yaml has it."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "serve_tiny.yaml").read_text())
    cfg["http_options"].update(host="127.0.0.1", port=port)
    args = cfg["applications"][0]["args"]
    gpu = {"num_gpus": 0.5} if plan.device == "cuda" else {}
    for name in ("synthesis", "caption"):
        args[name]["model"] = {"path": str(checkpoint), "name": SERVE_MODEL, "dtype": plan.dtype}
        args[name]["deployment"]["ray_actor_options"] = {"num_cpus": 0.5, **gpu}
    args["synthesis"]["engine"]["compile"] = plan.gpu  # the dry run checks the code, not a compile
    return cfg


def section_serve(rec: Recorder, plan: Plan, work: Path) -> None:
    import httpx
    import PIL.Image
    import torch
    import yaml

    from benchmarks.load_serve import request_body

    device = torch.device(plan.device)
    shape = plan.pick(gpu="tiny", dry="tiny48")
    checkpoint = work / f"checkpoint-{shape}-{plan.dtype}"
    if (
        rec.item(f"{shape} checkpoint", lambda: write_checkpoint(checkpoint, shape, plan.dtype, device), 5)
        is None
    ):
        return
    free_memory()
    port = free_port()
    config = work / "serve.yaml"
    config.write_text(yaml.safe_dump(serve_config(plan, checkpoint, port)))
    url = f"http://127.0.0.1:{port}"
    log = work / "serve.log"
    cmd = [sys.executable, "-m", "jobs.cli", "serve", "--config", str(config)]
    rec.set("command", " ".join(cmd))
    rec.set("config", yaml.safe_load(config.read_text()))
    proc = start_process(cmd, log)
    try:
        with httpx.Client(base_url=url, timeout=rec.timeout()) as client:

            def healthy() -> dict[str, Any]:
                nonlocal proc
                t0 = time.perf_counter()
                limit = rec.timeout() - 15  # time left for the requests after it
                starts = 1
                while time.perf_counter() - t0 < limit:
                    if proc.poll() is not None:
                        if starts < RAY_START_TRIES and ray_start_timed_out(log):
                            starts += 1  # its local Ray did not start in time: start the server again
                            log.rename(log.with_suffix(f".start{starts - 1}.log"))
                            proc = start_process(cmd, log)
                            continue
                        raise RuntimeError(f"the server exited with {proc.returncode}:\n{log_tail(log)}")
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get("/health", timeout=5).status_code == 200:
                            return {"seconds_to_healthy": time.perf_counter() - t0, "server_starts": starts}
                    time.sleep(1.0)
                raise TimeoutError(f"/health never answered 200; the server's log ends:\n{log_tail(log)}")

            def call(method: str, path: str, body: dict | None = None, check=None) -> dict[str, Any]:
                t0 = time.perf_counter()
                r = client.request(method, path, json=body)
                out = {"status_code": r.status_code, "latency_s": time.perf_counter() - t0}
                if r.status_code != 200:
                    raise RuntimeError(f"{method} {path}: HTTP {r.status_code}: {r.text[:2000]}")
                return {**out, **(check(r.json()) if check else {"body": r.json()})}

            def image_check(body: dict) -> dict[str, Any]:
                png = base64.b64decode(body["data"][0]["b64_json"])
                return {
                    "image_size": list(PIL.Image.open(io.BytesIO(png)).size),
                    "seed": body["data"][0]["seed"],
                }

            def chat_check(body: dict) -> dict[str, Any]:
                choice = body["choices"][0]
                return {"finish_reason": choice["finish_reason"], "usage": body["usage"]}

            if rec.item("server up: GET /health answers 200", healthy, 20) is None:
                return
            rec.item("GET /health", lambda: call("GET", "/health"))
            rec.item("GET /v1/models", lambda: call("GET", "/v1/models"))
            chat = request_body("chat", SERVE_MODEL, 1, 16)[1]
            rec.item(
                "POST /v1/chat/completions", lambda: call("POST", "/v1/chat/completions", chat, chat_check), 5
            )
            images = request_body("images", SERVE_MODEL, 7, 16)[1]  # last: on a GPU its first call compiles
            rec.item(
                "POST /v1/images/generations",
                lambda: call("POST", "/v1/images/generations", images, image_check),
                5,
            )
    finally:
        code = stop_process(proc)
        rec.set("server_exit_code", code)
        rec.set("server_log_tail", log_tail(log, 4000))


SECTIONS = (
    Section(
        "serve",
        order=70,
        budget_s=55,
        about="`python -m jobs.cli serve` on a GPU replica: one request per route",
        run=section_serve,
    ),
)
