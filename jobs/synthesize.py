"""`ray job submit -- python -m jobs.synthesize --config configs/....yaml`: the synthesize job."""

from __future__ import annotations

import sys

from jobs.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["synthesize", *sys.argv[1:]]))
