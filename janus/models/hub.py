"""Turn a model reference (local dir, hub id, or fsspec URL) into a local directory.

Real Janus-Pro weights live on the Hugging Face hub or in object storage; every loader in this
package (model, processor) goes through :func:`resolve_model_path` so that all three sources take
the same path to disk.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Files a Janus checkpoint directory may hold; anything else under a prefix is not downloaded.
CHECKPOINT_PATTERNS = ("*.json", "*.bin", "*.safetensors", "*.model", "*.txt", "*.jinja")
COMPLETE_MARKER = ".janus-download-complete"


class ModelNotFoundError(OSError):
    """The model reference could not be turned into a local checkpoint directory."""


def default_cache_dir() -> Path:
    root = os.environ.get("JANUS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "janus-pipeline"
    )
    return Path(root)


def resolve_model_path(
    name_or_path: str | os.PathLike,
    *,
    cache_dir: str | os.PathLike | None = None,
    storage_options: Mapping[str, Any] | None = None,
    revision: str | None = None,
    local_files_only: bool = False,
) -> Path:
    """Return a local directory holding the checkpoint named by ``name_or_path``.

    * an existing local directory is returned as is;
    * a URL with a scheme (``s3://bucket/prefix``, ``memory://...``, ``file://...``) is copied once
      through fsspec into ``cache_dir`` and reused afterwards;
    * anything else is a Hugging Face hub id (``deepseek-ai/Janus-Pro-7B``), fetched with
      ``huggingface_hub.snapshot_download`` (honours ``HF_HUB_OFFLINE`` and the hub cache).
    """
    ref = os.fspath(name_or_path)
    if os.path.isdir(ref):
        return Path(ref)
    if "://" in ref:
        if ref.startswith("file://") and os.path.isdir(ref[len("file://") :]):
            return Path(ref[len("file://") :])
        return _download_fsspec(ref, cache_dir=cache_dir, storage_options=storage_options or {})
    if not is_hub_id(ref):
        raise not_a_model(ref)
    return _download_hub(ref, cache_dir=cache_dir, revision=revision, local_files_only=local_files_only)


def is_hub_id(ref: str) -> bool:
    """``owner/name`` that is not a local path: what ``resolve_model_path`` fetches from the hub."""
    return not (os.path.exists(ref) or ref.startswith((".", "/", "~")) or ref.count("/") != 1)


def not_a_model(ref: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"model path {ref!r} is neither an existing directory nor a hub id of the form "
        "'owner/name' nor a URL such as s3://bucket/prefix"
    )


def read_checkpoint_file(
    name_or_path: str | os.PathLike,
    filename: str,
    *,
    cache_dir: str | os.PathLike | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> bytes:
    """One small file of a checkpoint (a config) without fetching the weights: a job's driver needs the
    image size, not 14 GB it would never use."""
    ref = os.fspath(name_or_path)
    local = ref[len("file://") :] if ref.startswith("file://") else ref
    if os.path.isdir(local):
        return (Path(local) / filename).read_bytes()
    try:
        if "://" in ref:
            import fsspec

            cached = url_cache_dir(ref, cache_dir)
            if (cached / COMPLETE_MARKER).exists():
                return (cached / filename).read_bytes()
            fs, prefix = fsspec.core.url_to_fs(ref, **dict(storage_options or {}))
            return fs.cat_file(f"{prefix.rstrip('/')}/{filename}")
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(ref, filename, cache_dir=cache_dir)).read_bytes()
    except Exception as exc:  # fsspec and the hub client raise many types for "unreachable"
        raise ModelNotFoundError(f"cannot read {filename} of model {ref!r}: {type(exc).__name__}: {exc}") from exc


def url_cache_dir(url: str, cache_dir: str | os.PathLike | None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "urls" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:24]


def _download_hub(repo_id: str, *, cache_dir, revision, local_files_only) -> Path:
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            allow_patterns=list(CHECKPOINT_PATTERNS),
        )
    except Exception as exc:  # the hub client raises many types for "unreachable" / "not cached"
        raise ModelNotFoundError(
            f"could not get {repo_id!r} from the Hugging Face hub and no complete local snapshot is "
            f"cached ({type(exc).__name__}: {exc}). On a machine with hub access run "
            f"`huggingface-cli download {repo_id}` (or copy the checkpoint to s3:// or a local "
            "directory) and pass that location instead; set HF_HUB_OFFLINE=1 to use the cache only."
        ) from exc
    return Path(path)


def _download_fsspec(url: str, *, cache_dir, storage_options: Mapping[str, Any]) -> Path:
    import fsspec

    target = url_cache_dir(url, cache_dir)
    root = target.parent.parent
    if (target / COMPLETE_MARKER).exists():
        logger.info("using cached copy of %s in %s", url, target)
        return target

    fs, prefix = fsspec.core.url_to_fs(url, **dict(storage_options))
    prefix = prefix.rstrip("/")
    try:
        files = [p for p in fs.find(prefix) if is_checkpoint_file(p)]
    except FileNotFoundError:
        files = []
    if not files:
        raise ModelNotFoundError(f"no checkpoint files (config.json, weights) found under {url!r}")
    if not any(p.endswith("/config.json") for p in files):
        raise ModelNotFoundError(f"{url!r} holds no config.json: is it a Janus checkpoint directory?")

    root.joinpath("urls").mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=root / "urls"))
    try:
        for remote in files:
            rel = remote[len(prefix) :].lstrip("/")
            local = tmp / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            logger.info("downloading %s", remote)
            fs.get_file(remote, str(local))
        (tmp / COMPLETE_MARKER).write_text(url)
        if target.exists():  # a concurrent or interrupted download: replace it
            shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def is_checkpoint_file(path: str) -> bool:
    from fnmatch import fnmatch

    name = path.rsplit("/", 1)[-1]
    return any(fnmatch(name, pat) for pat in CHECKPOINT_PATTERNS)
