"""``janus-pipeline``: the one command users run (batch jobs now; ``serve`` once it lands)."""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="janus-pipeline", description="Janus-Pro batch jobs on Ray.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (
        ("synthesize", "text prompts -> images (CFG), written as tar + Parquet shards"),
        ("caption", "images -> captions, written as Parquet shards"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", help="job YAML (see configs/); defaults apply where it is silent")
        p.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a config value, e.g. --set output.url=s3://bucket/run (repeatable)",
        )
        p.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    from pipeline.config import ConfigError, load_config
    from pipeline.job import run_job

    try:
        cfg = load_config(args.config, [f"job={args.command}", *args.overrides])
    except (ConfigError, OSError) as exc:
        print(f"janus-pipeline: bad configuration: {exc}", file=sys.stderr)
        return 2
    summary = run_job(cfg)
    print(json.dumps(summary, indent=2, default=str))
    return 0 if summary.get("complete") else 1


if __name__ == "__main__":
    raise SystemExit(main())
