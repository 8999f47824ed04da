"""Load test of the online API: requests/s and latency percentiles under a fixed concurrency.

    python -m benchmarks.load_serve [--config configs/serve_tiny.yaml] [--route chat|images]
                                    [--requests 256] [--concurrency 32] [--max-seconds 120]
                                    [--url http://127.0.0.1:8000] [--out benchmarks/results/x.json]

Without ``--url`` it starts its own local Ray and Serve (the config's first application) on a free
127.0.0.1 port and also reports the models' batching (requests per model call). With ``--url`` it
loads a server that is already running, on loopback only. The run is bounded twice: at most
``--requests`` requests, and no new request after ``--max-seconds``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import socket
import sys
import time
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import PIL.Image

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def _png_data_url(side: int = 256) -> str:
    arr = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def request_body(route: str, model: str, i: int, max_tokens: int) -> tuple[str, dict[str, Any]]:
    if route == "chat":
        image = {"type": "image_url", "image_url": {"url": _png_data_url()}}
        text = {"type": "text", "text": f"Describe this image. ({i})"}
        body = {
            "model": model,
            "messages": [{"role": "user", "content": [image, text]}],
            "max_tokens": max_tokens,
        }
        return "/v1/chat/completions", body
    return "/v1/images/generations", {
        "model": model,
        "prompt": f"a lighthouse at dusk, variant {i}",
        "seed": i,
    }


async def _load(url: str, route: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    sem = asyncio.Semaphore(args.concurrency)
    limits = httpx.Limits(max_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        start = time.perf_counter()
        deadline = start + args.max_seconds

        async def one(i: int) -> None:
            async with sem:
                if time.perf_counter() > deadline:
                    return
                path, body = request_body(route, model, i, args.max_tokens)
                t0 = time.perf_counter()
                try:
                    status = (await client.post(path, json=body)).status_code
                except httpx.HTTPError:
                    status = 0
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(one(i) for i in range(args.requests)))
        wall = time.perf_counter() - start
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    return {
        "route": route,
        "requests": sum(statuses.values()),
        "ok": len(latencies),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "concurrency": args.concurrency,
        "wall_s": round(wall, 3),
        "requests_per_s": round(len(latencies) / wall, 2),
        "latency_s": {
            "p50": round(float(np.percentile(lat, 50)), 4),
            "p95": round(float(np.percentile(lat, 95)), 4),
            "p99": round(float(np.percentile(lat, 99)), 4),
            "mean": round(float(lat.mean()), 4),
        },
    }


async def _warmup(url: str, route: str, model: str, args: argparse.Namespace) -> None:
    """The first calls pay for lazy initialisation; they are not timed."""
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout) as client:
        for i in range(args.warmup):
            path, body = request_body(route, model, args.requests + i, args.max_tokens)
            (await client.post(path, json=body)).raise_for_status()


def _start_server(config: str) -> tuple[str, str, str]:
    """Local Ray + Serve on a free loopback port; returns (url, app name, served model name)."""
    import ray
    from ray import serve

    from pipeline.serve.app import build_app
    from pipeline.serve.config import check_serve_config

    [(name, cfg), *_] = check_serve_config(config)
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(cfg), name=name, route_prefix="/", blocking=False)
    model = (cfg.caption or cfg.synthesis).model.served_name
    return f"http://127.0.0.1:{port}", name, model


def _batching(app: str, deployment: str) -> dict[str, int]:
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=app).stats.remote().result()


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="configs/serve_tiny.yaml")
    parser.add_argument("--url", help="load a running server instead (loopback only)")
    parser.add_argument("--model", help="model name to request (default: the config's)")
    parser.add_argument("--route", choices=("chat", "images"), default="chat")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", help="also write the result JSON here")
    args = parser.parse_args(argv)
    if not (1 <= args.requests <= 10_000 and 1 <= args.concurrency <= 1024 and 0 < args.max_seconds <= 3600):
        parser.error("bounds: 1 <= requests <= 10000, 1 <= concurrency <= 1024, 0 < max-seconds <= 3600")

    deployment = "Captioner" if args.route == "chat" else "Synthesizer"
    app = None
    if args.url:
        if urlparse(args.url).hostname not in LOOPBACK:
            parser.error("--url must be a loopback address (127.0.0.1, localhost, ::1)")
        url, model = args.url, args.model
        if model is None:
            model = httpx.get(f"{url}/v1/models", timeout=30).json()["data"][0]["id"]
    else:
        url, app, model = _start_server(args.config)
        model = args.model or model
    asyncio.run(_warmup(url, args.route, model, args))
    before = _batching(app, deployment) if app else None
    result = asyncio.run(_load(url, args.route, model, args))
    if app:
        after = _batching(app, deployment)
        requests = after["requests"] - before["requests"]
        calls = max(after["model_calls"] - before["model_calls"], 1)
        result["batching"] = {
            "requests": requests,
            "model_calls": calls,
            "mean_batch": round(requests / calls, 2),
        }
        from ray import serve

        serve.shutdown()
    result.update(device=_device(), config=None if args.url else args.config, model=model)
    text = json.dumps(result, indent=2)
    print(text)
    lat = result["latency_s"]
    print(
        f"| load_serve {args.route} | {result['concurrency']} | {result['requests_per_s']} req/s | "
        f"p50 {lat['p50']}s / p95 {lat['p95']}s / p99 {lat['p99']}s | {result['device']} |",
        file=sys.stderr,
    )
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0 if result["ok"] == result["requests"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
