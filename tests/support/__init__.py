"""What the tests stand on: helpers, stand-in actors, a fault-injecting S3 proxy, a local multi-node
cluster and transformers' Janus in the official layout. Nothing here is a test."""

from pathlib import Path

#: the repository root: the working directory of CLI subprocesses and where configs/ lives
REPO = Path(__file__).resolve().parents[2]
