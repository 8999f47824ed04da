"""The real model actor on a "device" that breaks: from the first request whose prompt holds
``BREAK``, every call into the decoder raises the CUDA error of an illegal memory access, as every
launch on a poisoned CUDA context fails until the process ends. For Serve's replica-replacement test."""

from __future__ import annotations

from typing import Any

import torch

from pipeline.actors import Synthesizer

from .scale_actors import BREAK, ILLEGAL_ACCESS

DECODER_CALLS = ("prefill", "decode_step", "prefill_slots", "decode_slots", "decode_window")


def break_on_demand(decoder: Any) -> dict[str, bool]:
    """Wrap ``decoder``'s calls; the returned flag, once ``broken`` is set, makes each of them raise."""
    state = {"broken": False}

    def guarded(call):
        def run(*args: Any, **kwargs: Any):
            if state["broken"]:
                raise torch.AcceleratorError(ILLEGAL_ACCESS)
            return call(*args, **kwargs)

        return run

    for name in DECODER_CALLS:
        setattr(decoder, name, guarded(getattr(decoder, name)))
    return state


class DeviceBreakingSynthesizer(Synthesizer):
    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.device = break_on_demand(self.engine.decoder)

    def with_defaults(self, request: dict[str, Any]) -> dict[str, Any]:
        if BREAK in str(request.get("prompt", "")):
            self.device["broken"] = True
        return super().with_defaults(request)
