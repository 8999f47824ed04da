"""Which Ray a job runs on, said in its log: a cluster it attaches to, or a private local Ray it starts.

- ``ray.address``, else ``RAY_ADDRESS``: attach to that cluster (``auto``: the Ray that ``ray start``
  began on this machine). ``ray.num_cpus`` / ``num_gpus`` size a Ray the job starts, not one it joins:
  given while attaching they are ignored with a warning that says so (the shipped demo configs set
  them, and run unchanged through ``ray job submit``).
- Neither (or ``local``): a private local Ray for this job alone, even when another Ray runs on this machine (a job
  never joins a cluster by accident); the log names the running one and how to run there instead.
- ``ray://`` (Ray Client) is refused before anything starts: the driver holds the output's committed
  keys and the crash journal, so it must run on the cluster; the Jobs API (``ray job submit``) is the
  way to start it from elsewhere.
- A submitted job (``ray job submit``) runs in a temporary copy of ``--working-dir`` that the cluster
  deletes: a relative output path there would be lost with it, so it is refused.

Ray 2.60 turns token authentication on for a local Ray it starts and logs a WARNING saying so at every
start. The private Ray (and the local one ``janus-pipeline serve`` starts) asks for it explicitly
(``RAY_AUTH_MODE=token`` unless set), which keeps it on without the warning; the token is Ray's own
(``RAY_AUTH_TOKEN``, else ``~/.ray/auth_token``, made if missing).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from .config import RAY_CLIENT_REFUSED, ConfigError, JobConfig

logger = logging.getLogger(__name__)

#: set by Ray's job supervisor in the environment of a job submitted with ``ray job submit``
SUBMITTED_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
AUTH_MODE_ENV = "RAY_AUTH_MODE"


def cluster_address(cfg: JobConfig) -> str | None:
    """The address the job attaches to, or None for a private local Ray; a ``ray://`` address in
    RAY_ADDRESS is a ``ConfigError`` (in ``ray.address`` the config refuses it already)."""
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS") or None
    if address and address.startswith("ray://"):
        raise ConfigError(f"RAY_ADDRESS: {RAY_CLIENT_REFUSED}")
    return None if address == "local" else address  # Ray's own word for "start one here"


def check_where_it_runs(cfg: JobConfig) -> None:
    """What the job's place refuses, found before Ray starts: Ray Client addresses, and a relative
    output path in a job submitted with ``ray job submit``."""
    cluster_address(cfg)
    url = cfg.output.url
    if SUBMITTED_JOB_ENV in os.environ and "://" not in url and not os.path.isabs(url):
        raise ConfigError(
            f"output.url: {url!r} is relative, and a submitted job runs in a temporary copy of --working-dir "
            "that the cluster deletes: give an absolute path on storage every node sees, or a URL (s3://...)"
        )


def started_here(address: str) -> str:
    """``auto`` as the docs mean it: the cluster that ``ray start`` began on this machine (its address
    file in Ray's temp dir, ``RAY_TMPDIR`` honoured). Ray's own ``auto`` prefers any single Ray process
    it finds running over that file, which on a machine with another Ray (a test's, a notebook's)
    attaches to the wrong cluster. Without the file, Ray's rule applies."""
    if address != "auto":
        return address
    try:
        from ray._private.utils import read_ray_address

        return read_ray_address() or address
    except Exception:  # a private API: its failure leaves the choice to Ray
        return address


def running_local_ray() -> str | None:
    """The GCS address of a Ray already running on this machine, if any (for the log only)."""
    try:
        from ray._private.services import find_gcs_addresses

        found = sorted(find_gcs_addresses())
    except Exception:  # a private API: its failure must not stop the job
        return None
    return found[0] if found else None


def ask_for_token_auth() -> None:
    """``RAY_AUTH_MODE=token`` for the Ray this process starts, unless the environment says otherwise.
    Ray reads its config once per process (at import), so it is read again, as Ray's own default
    does when it turns token authentication on (pinned Ray: ``_raylet.Config``)."""
    if AUTH_MODE_ENV in os.environ:
        return
    from ray._raylet import Config

    os.environ[AUTH_MODE_ENV] = "token"
    Config.initialize("")


def connect(cfg: JobConfig) -> None:
    """Attach to the job's cluster, or start its private local Ray; the log says which."""
    import ray

    if ray.is_initialized():
        return
    address = cluster_address(cfg)
    quiet: dict[str, Any] = {"logging_level": logging.WARNING}
    if address:
        sized = {k: v for k, v in (("num_cpus", cfg.ray.num_cpus), ("num_gpus", cfg.ray.num_gpus)) if v is not None}
        if sized:
            logger.warning(
                "ignoring %s: they size a Ray that the job starts, and this job attaches to %s, whose "
                "resources were set when it started",
                ", ".join(f"ray.{k}={v}" for k, v in sized.items()),
                address,
            )
        resolved = started_here(address)
        logger.info("attaching to the Ray cluster at %s%s", address, f" ({resolved})" if resolved != address else "")
        ray.init(address=resolved, **quiet)
        return
    running = running_local_ray()
    logger.info(
        "starting a private local Ray for this job (num_cpus=%s, num_gpus=%s)%s",
        cfg.ray.num_cpus,
        cfg.ray.num_gpus,
        f"; the Ray already running on this machine ({running}) is not used: set ray.address=auto to run there"
        if running
        else "",
    )
    ask_for_token_auth()
    ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus, include_dashboard=False, **quiet)
