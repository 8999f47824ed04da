"""Actor classes that the job tests run through ``compute.actor_class``.

All keep the job's real path (reader -> drop committed -> actor pool -> ShardDatasink) and change
only what happens inside the pool: ``TracedSynthesizer`` is the real model actor that also says
where it ran; the stand-ins replace the model so that thousands of rows (or a million) cross the
pipeline in seconds on a CPU, and ``GatedStandIn`` and ``GatedCaptionStandIn`` let a test hold a
batch in flight (``gate``).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import ray

from .gate import ENV as GATE_ENV
from .gate import Gate

IMAGE_TOKENS = 576
POISON = "POISON"


class TracedSynthesizer:
    """The real Synthesizer; each row's ``model`` value gets ``@<node id>`` appended, so a test can read
    from the committed output alone which cluster node produced every row."""

    def __init__(self, *args: Any, **kwargs: Any):
        from pipeline.actors import Synthesizer  # here, so that the stand-ins never import torch

        self.synthesizer = Synthesizer(*args, **kwargs)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.synthesizer(batch)
        node = ray.get_runtime_context().get_node_id()
        out["model"] = np.array([f"{name}@{node}" for name in out["model"]], dtype=object)
        return out


class _StandIn:
    """A model-free actor with the Synthesizer's constructor arguments (the ones jobs pass)."""

    def __init__(
        self,
        model: dict[str, Any],
        engine: dict | None = None,
        sampling: dict | None = None,
        quality: dict | None = None,
    ):
        self.model_name = f"stand-in:{model.get('name') or model['path']}"


def unread(n: int) -> dict[str, np.ndarray]:
    """The Synthesizer's read-back columns for rows nothing read (no score, no best-of, no hash) and no
    record of their decoding."""
    return {
        "score": np.full(n, np.nan, dtype=np.float32),
        "candidate": np.full(n, -1, dtype=np.int32),
        "scores": np.full(n, None, dtype=object),
        "phash": np.zeros(n, dtype=np.int64),
        "decode_method": np.full(n, None, dtype=object),
        "decode_passes": np.zeros(n, dtype=np.int32),
    }


class StandInSynthesizer(_StandIn):
    """Model-free: answers every good prompt row at once with a 384 x 384 image (Janus-Pro's real
    output size, so blocks weigh what production blocks weigh) and the Synthesizer's columns."""

    image_size = 384

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n, size = len(batch["key"]), self.image_size
        status = np.array(["error" if s == "error" else "ok" for s in batch["status"]], dtype=object)
        images = np.empty((n, size, size, 3), dtype=np.uint8)
        images[:] = (np.asarray(batch["seed"], dtype=np.int64) % 256).astype(np.uint8)[:, None, None, None]
        out = dict(batch)
        out.update(
            status=status,
            image=images,
            seconds=np.zeros(n, dtype=np.float64),
            model=np.array([self.model_name] * n, dtype=object),
            **unread(n),
        )
        return out


class GatedStandIn(StandInSynthesizer):
    """Model-free ``GatedSynthesizer``: enters the gate before each batch and appends ``@<node id>``
    to each row's ``model``, with small images. For the tests of kills, lost and new nodes and resume,
    where what matters is the pool, the retries and the sink, not the model (whose actors take ~10 s
    of CPU each to start on a 2-core machine)."""

    image_size = 48

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.gate = Gate.from_env()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        node = ray.get_runtime_context().get_node_id()
        if self.gate is not None:
            self.gate.enter(node)
        out = super().__call__(batch)
        out["model"] = np.array([f"{name}@{node}" for name in out["model"]], dtype=object)
        return out


class CrashingStandInSynthesizer(StandInSynthesizer):
    """Model-free; its process dies (``os._exit``, as a segfault in a kernel ends it) whenever it runs
    a row whose prompt contains ``POISON``: a row that crashes the model actor every time. Rows that
    arrive already failed are not run, as in every model actor."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if any(POISON in p and s != "error" for p, s in zip(batch["prompt"], batch["status"], strict=True)):
            os._exit(1)
        return super().__call__(batch)


class FailsOnceAtStart(StandInSynthesizer):
    """Model-free; the first of its actors in a test fails to start (its constructor raises, as when
    loading the model runs out of device memory), later ones start normally. (A process that exits
    instead is restarted by Ray itself.) Needs the gate's folder (reset by the ``gate`` fixture): the
    first actor leaves a mark there."""

    def __init__(self, *args: Any, **kwargs: Any):
        folder = os.environ[GATE_ENV]
        try:
            os.close(os.open(os.path.join(folder, "failed-at-start"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            super().__init__(*args, **kwargs)
        else:
            raise RuntimeError("out of memory while loading the model (a test's stand-in)")


class RejectingStandInSynthesizer(_StandIn):
    """Model-free: fails every row at once, with a message saying so. A failed row is the cheapest row
    the real sink writes, for inputs of a million rows where only their number matters."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["key"])
        out = dict(batch)
        out.update(
            status=np.array(["error"] * n, dtype=object),
            error=np.array([e or "stand-in: no model ran" for e in batch["error"]], dtype=object),
            model=np.array([self.model_name] * n, dtype=object),
            image=np.full(n, None, dtype=object),
            seconds=np.zeros(n, dtype=np.float64),
            **unread(n),
        )
        return out


class WrongColumnsStandIn(StandInSynthesizer):
    """Model-free, with a custom actor's mistake: it returns no ``phash`` and an undeclared ``tokens``."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = super().__call__(batch)
        del out["phash"]
        out["tokens"] = np.zeros((len(batch["key"]), IMAGE_TOKENS), dtype=np.int32)
        return out


class BatchSizeStandIn(StandInSynthesizer):
    """Model-free, tiny images; each row's ``seconds`` is the size of the batch it came in, so a test
    can read from the output how the pool batched the rows."""

    image_size = 8

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = super().__call__(batch)
        out["seconds"] = np.full(len(batch["key"]), float(len(batch["key"])))
        return out


class GatedCaptionStandIn(_StandIn):
    """Model-free captioner: the Captioner's columns (each caption names the image's size) behind the
    gate, for the caption job's kill and resume tests, where the model does not matter."""

    def __init__(
        self,
        model: dict[str, Any],
        engine: dict | None = None,
        caption: dict | None = None,
        quality: dict | None = None,
    ):
        super().__init__(model)
        self.question = (caption or {}).get("question")
        self.gate = Gate.from_env()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.gate is not None:
            self.gate.enter(ray.get_runtime_context().get_node_id())
        n = len(batch["key"])
        ok = [s != "error" for s in batch["status"]]

        def column(values: Any) -> np.ndarray:
            return np.array(list(values), dtype=object)

        return {
            **{name: batch[name] for name in batch if name != "pixels"},  # the reader's and CPU stage's
            "caption": column(
                f"an image of {w} x {h} pixels" if good else None
                for w, h, good in zip(batch["width"], batch["height"], ok, strict=True)
            ),
            "question": column([self.question] * n),
            "model": column([self.model_name] * n),
            "num_tokens": np.where(ok, 8, 0).astype(np.int64),
            "finish_reason": column("length" if good else None for good in ok),
            "status": column(batch["status"]),
            "error": column(batch["error"]),
            "seconds": np.zeros(n, dtype=np.float64),
        }


#: a CUDA error that poisons the process's context, as torch raises it (torch.AcceleratorError)
ILLEGAL_ACCESS = (
    "CUDA error: an illegal memory access was encountered\n"
    "CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below "
    "might be incorrect."
)
BREAK = "BREAK-THE-DEVICE"


class DeviceBreakingStandIn(StandInSynthesizer):
    """Model-free; the first batch that holds a ``BREAK`` prompt breaks this process's "device" (once per
    test, marked in the gate's folder): that batch raises the error of an illegal memory access, and so
    does every later batch in this process, as a poisoned CUDA context fails every later launch. Rows
    carry ``@<pid>`` in ``model``; ``device-broke`` in the folder names the broken pid and the batch's keys."""

    image_size = 8

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.folder = os.environ[GATE_ENV]
        self.broken = False

    def _break_once(self, keys: list[str]) -> bool:
        try:
            fd = os.open(os.path.join(self.folder, "device-broke"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "keys": keys}, f)
        return True

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.broken and any(BREAK in p for p in batch["prompt"]):
            self.broken = self._break_once([str(k) for k in batch["key"]])
        if self.broken:
            raise RuntimeError(ILLEGAL_ACCESS)
        out = super().__call__(batch)
        out["model"] = np.array([f"{name}@{os.getpid()}" for name in out["model"]], dtype=object)
        return out
