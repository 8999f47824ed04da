"""Command-line parsing shared by every command of the project (the job CLI, the trainer, benchmarks)."""

from __future__ import annotations

import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line on stderr (and exit code 2), like every other bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")
