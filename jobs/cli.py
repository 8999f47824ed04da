"""``janus-pipeline``: the one command users run (batch jobs, dedup of their outputs, the online server).

Exit codes (``jobs/outcome.py``, listed by ``--help``): 0 done, 1 the job ran but did not complete,
2 nothing ran because the command, the configuration or the input is wrong (one line on stderr),
3 the job completed but no row succeeded, or more of its rows failed than ``max_failed_fraction``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys

from janus.utils.cli import OneLineParser
from jobs.outcome import EXIT_CODES, INCOMPLETE, NOTHING_RAN, summary_text, verdict

PROG = "janus-pipeline"


def _parser() -> argparse.ArgumentParser:
    raw = argparse.RawDescriptionHelpFormatter
    parser = OneLineParser(
        prog=PROG, description="Janus-Pro batch jobs and serving on Ray.", epilog=EXIT_CODES, formatter_class=raw
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    for name, help_text in (
        ("synthesize", "text prompts -> images (CFG), written as tar + Parquet shards"),
        ("caption", "images -> captions, written as Parquet shards"),
    ):
        p = sub.add_parser(name, help=help_text, epilog=EXIT_CODES, formatter_class=raw)
        p.add_argument("--config", help="job YAML (see configs/); defaults apply where it is silent")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set output.url=s3://bucket/run (repeatable)",
        )
        p.add_argument(
            "--dry-run",
            action="store_true",
            help="check what a run checks before Ray starts (config, input, model, output), print the config, exit",
        )
        p.add_argument("-v", "--verbose", action="store_true")
        if name == "synthesize":
            _plan_arguments(p)
    p = sub.add_parser("dedup", help="near-duplicate images of an output -> {output}/dedup/remove.parquet")
    p.add_argument("--output", required=True, help="a job's output URL (output.url)")
    p.add_argument("--max-distance", type=int, default=6, help="bits of 64 two hashes may differ in (default 6)")
    p.add_argument("--by", choices=("phash", "embedding"), default="phash", help="which hash (default phash)")
    p.add_argument("--storage-options", type=json.loads, default=None, help="fsspec options as JSON")
    p.add_argument(
        "--tmp-dir", help="local directory for the hash spill, 16 bytes a row (default: the system's temp dir)"
    )
    p = sub.add_parser("serve", help="the OpenAI-compatible online API on Ray Serve (runs until Ctrl-C)")
    p.add_argument(
        "--config", required=True, help="Serve YAML (see configs/serve_*.yaml), as for `serve run`"
    )
    p.add_argument("--address", help="Ray cluster to deploy to (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print its arguments, exit")
    _deploy_arguments(sub.add_parser("deploy", help="KubeRay manifests made from a job or Serve config"))
    return parser


def _deploy_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "kind", choices=["rayjob", "rayservice"], help="rayjob: a batch job config; rayservice: a Serve YAML"
    )
    p.add_argument("--config", required=True, help="the job YAML (rayjob) or Serve YAML (rayservice)")
    p.add_argument("--image", required=True, help="the image built from docker/Dockerfile, as pods pull it")
    p.add_argument("--name", help="the resource's name (default: janus-<config file name>)")
    p.add_argument("--namespace")
    p.add_argument("--gpus-per-pod", type=int, default=1, help="GPUs of each worker pod (default 1)")
    p.add_argument(
        "--worker-memory-gib", type=int, help="each GPU worker pod's memory (default: from the model)"
    )
    p.add_argument(
        "--head-memory-gib", type=int, default=16, help="the driver's pod (resume: ~15 bytes a row)"
    )
    p.add_argument("--service-account", help="pods run as it (e.g. one with an IAM role for S3)")
    p.add_argument("-o", "--output", help="write the manifests here (default: stdout)")


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--plan",
        action="store_true",
        help="count the input's rows and print shards, output bytes, driver memory, GPU-hours and wall "
        "time, then exit (no Ray, no model)",
    )
    p.add_argument(
        "--images-per-s",
        type=float,
        help="--plan: images/s per GPU (default: the GPU suite's measured figure)",
    )
    p.add_argument(
        "--gpus", type=int, help="--plan: GPUs for the wall time (default: compute.max_actors' GPUs)"
    )


def _plan(cfg, args: argparse.Namespace) -> int:
    from pipeline.plan import format_plan, plan_synthesis
    from pipeline.storage import StorageError

    try:
        print(format_plan(plan_synthesis(cfg, args.images_per_s, args.gpus)))
    except (FileNotFoundError, ValueError, StorageError) as exc:
        return _fail("cannot plan", exc, 2)
    return 0


def _fail(what: str, exc: BaseException, code: int) -> int:
    print(f"{PROG}: {what}: {' '.join(str(exc).split())}", file=sys.stderr)
    return code


def _serve(args: argparse.Namespace) -> int:
    """Validate the config with our own checks first, then run it exactly as `serve run` does."""
    from pipeline.serve.config import ServeConfigError, check_serve_config

    try:
        apps = check_serve_config(args.config)
    except ServeConfigError as exc:
        return _fail("bad serve configuration", exc, 2)
    if args.dry_run:
        print(json.dumps({name: cfg.model_dump() for name, cfg in apps}, indent=2, default=str))
        return 0
    from ray.serve.scripts import cli as serve_cli

    from pipeline.connect import ask_for_token_auth
    from pipeline.console import SERVE_SHUTDOWN_NOISE, DropLines

    if not (args.address or os.environ.get("RAY_ADDRESS")):
        ask_for_token_auth()  # for the local Ray `serve run` starts: on, without Ray's warning
    argv = ["run", args.config, *(["--address", args.address] if args.address else [])]
    _stop_on_signals()
    stdout, sys.stdout = sys.stdout, DropLines(sys.stdout, SERVE_SHUTDOWN_NOISE)
    try:
        return serve_cli.main(argv, prog_name="serve", standalone_mode=False) or 0
    finally:
        sys.stdout.flush()
        sys.stdout = stdout


def _stop_on_signals() -> None:
    """Ctrl-C takes `serve run`'s graceful path (Serve shuts down, then the local Ray it started), even
    where the parent ignored SIGINT (a command started with ``&`` by a script, or by a test runner's
    worker): a server that cannot be interrupted is a surprise. SIGTERM is Ray's: the driver exits
    and the local Ray stops with it."""
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _dedup(args: argparse.Namespace) -> int:
    """Write the ids to drop beside the shards (which stay as they are); the summary on stdout."""
    from pipeline.dedup import DedupError, dedup
    from pipeline.storage import StorageError

    try:
        summary = dedup(args.output, args.storage_options, args.max_distance, args.by, args.tmp_dir)
    except (DedupError, StorageError) as exc:
        return _fail("dedup", exc, 2)
    print(json.dumps(summary, indent=2))
    return 0


def _storage_cause(exc: BaseException):
    """The StorageError behind a job failure (Ray wraps task errors), if that is what it was."""
    from pipeline.storage import StorageError

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StorageError):
            return exc
        inner = getattr(exc, "cause", None)
        exc = inner if isinstance(inner, BaseException) else (exc.__cause__ or exc.__context__)
    return None


def _deploy(args: argparse.Namespace, argv: list[str]) -> int:
    """The manifests for one config, headed by the command that made them (minus ``-o``)."""
    from pipeline.config import ConfigError, load_config
    from pipeline.kuberay import ClusterOptions, DeployError, default_name, rayjob, rayservice, render
    from pipeline.serve.config import ServeConfigError, check_serve_config

    opts = ClusterOptions(
        image=args.image,
        name=args.name or default_name(args.config),
        namespace=args.namespace,
        gpus_per_pod=args.gpus_per_pod,
        head_memory_gib=args.head_memory_gib,
        worker_memory_gib=args.worker_memory_gib,
        service_account=args.service_account,
    )
    try:
        if args.kind == "rayjob":
            docs = rayjob(args.config, load_config(args.config), opts)
        else:
            docs = rayservice(args.config, check_serve_config(args.config), opts)
    except (ConfigError, ServeConfigError, DeployError) as exc:
        return _fail("cannot deploy", exc, 2)
    out = [
        a
        for i, a in enumerate(argv)
        if a not in ("-o", "--output") and argv[i - 1 : i] not in (["-o"], ["--output"])
    ]
    text = render(docs, [PROG, *out])
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return _serve(args)
    if args.command == "deploy":
        return _deploy(args, argv)
    if args.command == "dedup":
        return _dedup(args)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from pipeline.config import ConfigError, load_config
    from pipeline.job import check_job, own_sections, run_job
    from pipeline.recipe import RecipeMismatch

    try:
        cfg = load_config(args.config, args.overrides, job=args.command)
        if args.dry_run:
            check_job(cfg)
            print(json.dumps(own_sections(cfg), indent=2, default=str))
            return 0
        if getattr(args, "plan", False):
            return _plan(cfg, args)
        summary = run_job(cfg)
    except RecipeMismatch as exc:  # one line per difference
        print(f"{PROG}: {exc}", file=sys.stderr)
        return NOTHING_RAN
    except ConfigError as exc:
        return _fail("bad configuration", exc, NOTHING_RAN)
    except Exception as exc:
        storage = _storage_cause(exc)
        if storage is None:
            raise
        return _fail("storage failed; rerun the same command to resume", storage, INCOMPLETE)
    code, why = verdict(summary, cfg.max_failed_fraction)
    if code != NOTHING_RAN:
        print(summary_text(summary))
    if why:
        print(f"{PROG}: {why}", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
