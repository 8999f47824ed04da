"""Load test of the online API: requests/s and latency percentiles.

    python -m benchmarks.load_serve [--config configs/serve_tiny.yaml] [--route chat|images]
                                    [--requests 256] [--concurrency 32] [--max-seconds 120]
                                    [--url http://127.0.0.1:8000] [--out benchmarks/results/x.json]
    python -m benchmarks.load_serve --open-loop --route chat --modes batch scheduler [--loads 0.25 0.5 0.75]
    python -m benchmarks.load_serve --open-loop --route images --modes scheduler coupled --loads 0.1 0.5

Closed loop (default): a fixed concurrency. Without ``--url`` it starts its own local Ray and Serve (the
config's first application) on a free 127.0.0.1 port and also reports the models' batching. With
``--url`` it loads a server that is already running, on loopback only. The run is bounded twice: at
most ``--requests`` requests, and no new request after ``--max-seconds``.

Open loop (``--open-loop``): for each batching mode (``@serve.batch``, the scheduler, and for images the
scheduler with speculative decoding, ``jacobi`` / ``coupled``; same model, replicas and machine, one
after the other in one run), first the saturation throughput (closed loop at
``--concurrency``), then Poisson arrivals at ``--loads`` fractions of it: p50/p95/p99 end-to-end latency,
throughput, and for chat the time to first token (requests stream) with the replica's share in parts
and the same run's prefill + 2 decode steps. ``--alone N`` adds the floor: the first N requests one at
a time. Chat answers of different lengths: ``--max-tokens-range 8 128 --ignore-eos`` (the trained
model decodes on to each request's ``max_tokens``). Writes one JSON and a latency-vs-load plot (PNG)
next to it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import socket
import sys
import tempfile
import time
from typing import Any
from urllib.parse import urlparse

import httpx
import numpy as np
import PIL.Image

from benchmarks.machine import cpu
from janus.utils.cli import OneLineParser

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
SPECULATIVE = ("jacobi", "coupled")


def _png_data_url(side: int = 256) -> str:
    arr = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def answer_tokens(args: argparse.Namespace, i: int) -> int:
    """Request ``i``'s ``max_tokens``: ``--max-tokens``, or with ``--max-tokens-range LO HI`` drawn
    uniformly from [LO, HI], seeded by ``i`` (every mode and every rerun sends the same lengths)."""
    if not args.max_tokens_range:
        return args.max_tokens
    lo, hi = args.max_tokens_range
    return int(np.random.default_rng([7, i]).integers(lo, hi + 1))


def _prompt_list(path: str) -> list[str]:
    """The prompts of a prompt file (or folder) in any format the synthesis job reads, read by its reader."""
    from pipeline.sources.prompt_files import read_prompts

    prompts = [row["prompt"] for row in read_prompts(path) if row.get("prompt")]
    if not prompts:
        raise SystemExit(f"load_serve: no prompts in {path}")
    return prompts


def request_body(
    route: str, model: str, i: int, max_tokens: int, ignore_eos: bool = False, prompts: list[str] | None = None
) -> tuple[str, dict[str, Any]]:
    if route == "chat":
        image = {"type": "image_url", "image_url": {"url": _png_data_url()}}
        text = {"type": "text", "text": f"Describe this image. ({i})"}
        body = {
            "model": model,
            "messages": [{"role": "user", "content": [image, text]}],
            "max_tokens": max_tokens,
            **({"ignore_eos": True} if ignore_eos else {}),
        }
        return "/v1/chat/completions", body
    return "/v1/images/generations", {
        "model": model,
        "prompt": prompts[i % len(prompts)] if prompts else f"a lighthouse at dusk, variant {i}",
        "seed": i,
    }


async def _send(
    client: httpx.AsyncClient, route: str, model: str, i: int, args: argparse.Namespace, stream: bool
) -> tuple[int, float, float | None]:
    """One request: (HTTP status or 0, seconds to the end, seconds to the first content when streamed)."""
    path, body = request_body(route, model, i, answer_tokens(args, i), args.ignore_eos, args.prompt_list)
    t0 = time.perf_counter()
    first = None
    try:
        if stream and route == "chat":
            async with client.stream("POST", path, json={**body, "stream": True}) as r:
                status = r.status_code
                async for line in r.aiter_lines():
                    if first is None and '"content": "' in line and '"content": ""' not in line:
                        first = time.perf_counter() - t0
        else:
            status = (await client.post(path, json=body)).status_code
    except httpx.HTTPError:
        status = 0
    return status, time.perf_counter() - t0, first


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
                status, latency, _ = await _send(client, route, model, i, args, stream=False)
                statuses[status] = statuses.get(status, 0) + 1
                if status == 200:
                    latencies.append(latency)

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
            j = args.requests + i
            path, body = request_body(route, model, j, answer_tokens(args, j), args.ignore_eos, args.prompt_list)
            (await client.post(path, json=body)).raise_for_status()


def _route_config(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--config`` as read (the whole dict) and the section of the model ``--route`` loads."""
    import yaml

    with open(args.config) as f:
        data = yaml.safe_load(f)
    return data, data["applications"][0]["args"]["caption" if args.route == "chat" else "synthesis"]


def _server_config(args: argparse.Namespace, mode: str | None) -> str:
    """The config to serve: ``--config`` with only the loaded route's model (one model on the machine
    at a time: like for like), ``--model-path`` as its weights and ``mode`` as its batching. A temp
    file: the caller removes it."""
    import yaml

    data, route = _route_config(args)
    app_args = data["applications"][0]["args"]
    app_args["synthesis" if args.route == "chat" else "caption"] = None
    if mode in SPECULATIVE:  # the scheduler, its image requests decoded speculatively
        spec = {"method": mode, "window": args.window}
        if args.max_rows:
            spec["max_rows"] = args.max_rows
        route.setdefault("engine", {})["speculative"] = spec
        mode = "scheduler"
    if mode is not None:
        route.setdefault("batching", {})["mode"] = mode
    if args.model_path:
        route["model"]["path"] = args.model_path
        route["model"]["name"] = "janus-" + os.path.basename(args.model_path.rstrip("/"))
    fd, path = tempfile.mkstemp(prefix="load_serve.", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(data, f)
    return path


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


async def _open_loop(
    url: str, route: str, model: str, rate: float, n: int, args: argparse.Namespace
) -> dict[str, Any]:
    """``n`` requests with Poisson arrivals at ``rate``/s (seeded); chat requests stream (TTFT)."""
    gaps = np.random.default_rng(int(rate * 1000)).exponential(1 / rate, size=n)
    arrivals = np.cumsum(gaps) - gaps[0]
    latencies, ttfts, statuses = [], [], {}
    limits = httpx.Limits(max_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout, limits=limits) as client:
        start = time.perf_counter()

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, start + arrivals[i] - time.perf_counter()))
            j = 10_000 + i
            status, latency, first = await _send(client, route, model, j, args, stream=True)
            statuses[status] = statuses.get(status, 0) + 1
            if status == 200:
                latencies.append(latency)
                if first is not None:
                    ttfts.append(first)

        await asyncio.gather(*(one(i) for i in range(n)))
        wall = time.perf_counter() - start
    return {
        "offered_rate": round(rate, 4),
        "requests": n,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "throughput": round(len(latencies) / wall, 4),
        "latency_s": _percentiles(latencies),
        **({"ttft_s": _percentiles(ttfts)} if ttfts else {}),
    }


async def _alone(url: str, route: str, model: str, n: int, args: argparse.Namespace) -> dict[str, Any]:
    """The open loop's first ``n`` requests one at a time (streamed, as there): each latency is what
    the request costs with nobody to share with, the floor any batching can reach at a percentile. On
    a CPU a decode step's cost grows with the rows it runs, so sharing can only add to it."""
    latencies, ttfts = [], []
    async with httpx.AsyncClient(base_url=url, timeout=args.timeout) as client:
        for i in range(n):
            status, latency, first = await _send(client, route, model, 10_000 + i, args, stream=True)
            if status == 200:
                latencies.append(latency)
                if first is not None:
                    ttfts.append(first)
    return {"requests": n, "ok": len(latencies), "latency_s": _percentiles(latencies),
            **({"ttft_s": _percentiles(ttfts)} if ttfts else {})}


def _percentiles(values: list[float]) -> dict[str, float]:
    v = np.array(values) if values else np.array([float("nan")])
    return {q: round(float(np.percentile(v, int(q[1:]))), 4) for q in ("p50", "p95", "p99")}


def _engine_step_times(args: argparse.Namespace) -> dict[str, float]:
    """The yardstick for time to first token (prefill + 2 decode steps), in this process, same model:
    the decode step of a full batch (the config's ``max_batch_size`` rows) and the prefill of one
    request that joins a running batch, as an arrival at a busy replica does (the step it joins in,
    less a plain step; the median of 5 joins). Dividing one step that prefills a whole batch by its
    size would give each request the batched prefill's lower cost per request."""
    import torch

    from janus.engine import CaptionEngine
    from janus.engine.scheduler import Scheduler
    from pipeline.actors.common import load_for_actor
    from pipeline.serve.config import check_serve_config

    config = _server_config(args, None)
    try:
        [(_, cfg), *_] = check_serve_config(config)
    finally:
        os.remove(config)
    section = cfg.caption
    batch = section.batching.max_batch_size
    # the replica's torch threads: Ray sets OMP_NUM_THREADS to the actor's whole CPUs, at least 1
    cpus = section.deployment.get("ray_actor_options", {}).get("num_cpus", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cpus)))
    model, processor = load_for_actor(section.model.model_dump())
    engine = CaptionEngine(model, processor)
    image = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    request = {"image": image, "question": "Describe this image.", "max_new_tokens": 256}
    scheduler = Scheduler(engine, slots=batch)
    for _ in range(batch - 1):
        scheduler.submit(request)
    joins, fulls = [], []
    with torch.inference_mode():
        for _ in range(3):  # the batch's prefill, then warm steps
            scheduler.step()
        for _ in range(5):
            while len(scheduler.running) < batch - 1:  # rows that stopped at EOS are replaced (untimed)
                scheduler.submit(request)
                scheduler.step()
            ticket = scheduler.submit(request)
            t0 = time.perf_counter()
            scheduler.step()  # prefills the newcomer, then one decode step of all rows
            t1 = time.perf_counter()
            scheduler.step()  # a plain step of the full batch
            fulls.append(time.perf_counter() - t1)
            joins.append(t1 - t0)
            ticket.cancel()
            scheduler.step()  # the newcomer leaves
    step = float(np.median(fulls))
    prefill = float(np.median(joins)) - step
    for run in list(scheduler.running):
        run.ticket.cancel()
    scheduler.step()
    torch.set_num_threads(threads)
    return {
        "torch_threads": max(1, int(cpus)),
        "prefill_one_s": round(prefill, 4),
        "decode_step_s": round(step, 4),
        "batch": batch,
        "yardstick_s": round(prefill + 2 * step, 4),
    }


def _open_loop_main(args: argparse.Namespace) -> dict[str, Any]:
    from ray import serve

    deployment = "Captioner" if args.route == "chat" else "Synthesizer"
    report: dict[str, Any] = {
        "route": args.route,
        "config": args.config,
        "model_path": getattr(args, "model_label", None) or args.model_path,
        "max_tokens": args.max_tokens_range or args.max_tokens,
        "ignore_eos": args.ignore_eos,
        "modes": {},
    }
    if args.route == "chat":  # measured first, on a machine without a server running yet
        report["engine_step_times"] = _engine_step_times(args)
    base_rate = None  # --same-rates: the first mode's saturation sets every mode's arrival rates
    for mode in args.modes:
        config = _server_config(args, mode)
        try:
            url, app, model = _start_server(config)
        finally:
            os.remove(config)
        asyncio.run(_warmup(url, args.route, model, args))
        saturation = asyncio.run(_load(url, args.route, model, args))
        peak = saturation["requests_per_s"]
        if args.same_rates:
            base_rate = base_rate or peak
            peak = base_rate
        runs = []
        for load in args.loads:
            n = max(8, min(args.requests, int(peak * load * args.max_seconds)))
            before = _batching(app, deployment)
            runs.append(
                {"load": load, **asyncio.run(_open_loop(url, args.route, model, peak * load, n, args))}
            )
            runs[-1].update(_replica_first_token(before, _batching(app, deployment)))
            print(json.dumps({"mode": mode, **runs[-1]}), file=sys.stderr)
        alone = asyncio.run(_alone(url, args.route, model, args.alone, args)) if args.alone else None
        report["modes"][mode] = {
            "saturation": saturation,
            **({"alone": alone} if alone else {}),
            "open_loop": runs,
            "batching": {k: v for k, v in _batching(app, deployment).items() if not isinstance(v, list)},
            "rates_from": "first mode's saturation" if args.same_rates else "own saturation",
        }
        serve.shutdown()
        import ray

        ray.shutdown()
    report["device"] = _device()
    return report


def _plot(report: dict[str, Any], path: str) -> None:
    """p50 and p95 latency against offered load, one line pair per mode (PIL only)."""
    from PIL import ImageDraw

    w, h, m = 640, 400, 60
    img = PIL.Image.new("RGB", (w, h), "white")
    pen = ImageDraw.Draw(img)
    pen.rectangle((m, 20, w - 20, h - m), outline="black")
    # the floor: the same requests one at a time, p95 (the lowest of the modes')
    alone = [d["alone"]["latency_s"]["p95"] for d in report["modes"].values() if "alone" in d]
    points = [
        r["latency_s"][q] for mode in report["modes"].values() for r in mode["open_loop"] for q in ("p50", "p95")
    ] + alone
    top = max(points) * 1.1 or 1.0
    colours = {"batch": (220, 30, 30), "scheduler": (30, 70, 220), "coupled": (30, 150, 60), "jacobi": (150, 90, 20)}
    for i, (mode, data) in enumerate(report["modes"].items()):
        for q, width in (("p50", 3), ("p95", 1)):
            xy = [
                (m + r["load"] * (w - 20 - m), (h - m) - r["latency_s"][q] / top * (h - m - 20))
                for r in data["open_loop"]
            ]
            pen.line(xy, fill=colours.get(mode, (0, 0, 0)), width=width)
        pen.text((m + 10, 25 + 14 * i), f"{mode}: p50 (thick), p95 (thin)", fill=colours.get(mode, (0, 0, 0)))
    if alone:
        y = (h - m) - min(alone) / top * (h - m - 20)
        for x in range(m, w - 20, 12):
            pen.line([(x, y), (x + 6, y)], fill=(90, 90, 90), width=1)
        pen.text((m + 10, 25 + 14 * len(report["modes"])), "dashed: p95 one request at a time", fill=(90, 90, 90))
    base = next(iter(report["modes"].values())).get("rates_from", "own saturation")
    pen.text((m, h - m + 8), f"offered load, fraction of {base} (0 .. 1)", fill="black")
    pen.text((4, 4), f"{report['route']} latency, s (0 .. {top:.1f})", fill="black")
    img.save(path)


def _replica_first_token(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """What one open-loop run's streams took in the replica to their first token (arrival there -> the
    token with the event loop) and first text (-> first delta sent; random weights often make a first
    token that is half a character), the parts' medians, and the issue's yardstick measured in the same
    run: the median prefill of a request admitted alone + 2 x the median decode step, both of this run's
    batches (the in-process yardstick ``engine_step_times`` is measured before any server runs)."""
    if "first_token_s" not in after:
        return {}
    out: dict[str, Any] = {}
    server = after["first_token_s"][len(before["first_token_s"]) :]
    if server:
        out["server_ttft_s"] = _percentiles(server)
        parts = np.array(after["first_token_parts"][len(before["first_token_parts"]) :])
        names = ("to_queue", "queued", "prefill", "hand_over", "to_text")
        out["server_ttft_parts_p50_s"] = {k: round(float(np.median(parts[:, i])), 4) for i, k in enumerate(names)}
        # the time to first token: the token is with the event loop (text may need more tokens)
        out["server_first_token_s"] = _percentiles(parts[:, :4].sum(axis=1).tolist())
    if "steps" not in after:
        return out

    def window(key: str, total: str) -> list[tuple[int, float]]:
        new = after[total] - before[total]
        return after[key][len(after[key]) - min(new, len(after[key])) :] if new else []

    alone = [t for n, t in window("prefill_rounds", "prefills") if n == 1]
    decode = window("decode_rounds", "steps")
    if alone and decode:
        prefill, step = float(np.median(alone)), float(np.median([t for _, t in decode]))
        out["same_run_yardstick"] = {
            "prefill_one_s": round(prefill, 4),
            "decode_step_s": round(step, 4),
            "decode_rows_p50": float(np.median([n for n, _ in decode])),
            "yardstick_s": round(prefill + 2 * step, 4),
        }
    return out


def _batching(app: str, deployment: str) -> dict[str, Any]:
    from ray import serve

    return serve.get_deployment_handle(deployment, app_name=app).stats.remote().result()


def _device() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({cpu()})"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(
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
    parser.add_argument(
        "--max-tokens-range",
        type=int,
        nargs=2,
        metavar=("LO", "HI"),
        help="chat answers of different lengths: each request's max_tokens uniform in [LO, HI] (seeded)",
    )
    parser.add_argument("--model-path", help="serve this model instead of the config's (e.g. tiny)")
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="the model with fresh random weights (same architecture and cost per token): its answers "
        "never stop early, each runs to its max_tokens (a load test's ignore-EOS)",
    )
    parser.add_argument(
        "--ignore-eos",
        action="store_true",
        help="chat requests ask for ignore_eos (vLLM's extension): each answer runs to its max_tokens "
        "with the trained weights, whose text streams as real words (random weights mostly make tokens "
        "that end inside a character, so their text is held back to the end)",
    )
    parser.add_argument(
        "--prompts",
        help="images route: prompts from this file, one per line, taken in turn (default: one prompt the "
        "shapes model never saw, whose codes it is unsure of; configs/demo_prompts.txt is what it draws)",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--out", help="also write the result JSON here")
    parser.add_argument(
        "--open-loop", action="store_true", help="Poisson arrivals at fractions of saturation"
    )
    parser.add_argument(
        "--modes",
        nargs="+",
        default=["batch", "scheduler"],
        choices=("batch", "scheduler", *SPECULATIVE),
        help="batching modes to compare; jacobi / coupled: the scheduler with speculative decoding of images",
    )
    parser.add_argument("--window", type=int, default=16, help="speculative modes: codes fed per pass")
    parser.add_argument("--max-rows", type=int, help="speculative modes: the policy's max_rows (default: any)")
    parser.add_argument("--loads", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument(
        "--alone",
        type=int,
        default=0,
        metavar="N",
        help="also send the open loop's first N requests one at a time: the latency floor",
    )
    parser.add_argument(
        "--same-rates",
        action="store_true",
        help="every mode gets the same arrivals: --loads are fractions of the first mode's saturation",
    )
    args = parser.parse_args(argv)
    args.prompt_list = _prompt_list(args.prompts) if args.prompts else None
    if args.random_weights:
        with tempfile.TemporaryDirectory(prefix="load_serve_model.") as tmp:
            args.model_label = f"{args.model_path or 'the config model'}, random weights"
            args.model_path = _random_copy(args, tmp)
            return main_with(args, parser)
    return main_with(args, parser)


def _random_copy(args: argparse.Namespace, directory: str) -> str:
    """``--model-path`` (default: the config's model for the route) with random weights, in ``directory``."""
    from janus.checkpoints import write_random_like
    from pipeline.model_ref import resolve_model_ref

    path = args.model_path or _route_config(args)[1]["model"]["path"]
    name = os.path.basename(str(path).rstrip("/")) + "-random"
    return str(write_random_like(resolve_model_ref(path), os.path.join(directory, name)))


def main_with(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.open_loop:
        report = _open_loop_main(args)
        text = json.dumps(report, indent=2)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
            _plot(report, args.out.removesuffix(".json") + ".png")
        return 0
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
        config = _server_config(args, None)
        try:
            url, app, model = _start_server(config)
        finally:
            os.remove(config)
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
