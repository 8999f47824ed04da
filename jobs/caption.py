"""`ray job submit -- python -m jobs.caption --config configs/....yaml`: the caption job."""

from __future__ import annotations

import sys

from jobs.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["caption", *sys.argv[1:]]))
