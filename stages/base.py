"""Stage base class: one final `__call__` (checks, timing, no-grad) around a `forward` per stage.

A stage takes the resolved request plus the payloads of the stages before it and returns one
payload (stages/payloads.py) holding CPU tensors, so payloads can cross process boundaries.
Timings go into a caller-owned dict (never into the stage: one stage object serves concurrent
requests).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, ClassVar, final

import torch

from engine.denoise import Cancelled  # noqa: F401  (raised by the denoise loop; re-exported for callers)
from stages.request import ResolvedRequest

logger = logging.getLogger(__name__)

Timings = dict[str, float]
"""Stage name -> seconds, filled by `Stage.__call__` in call order."""


class StageError(RuntimeError):
    """A stage produced something that breaks its contract (wrong type, shape, device, NaN)."""


class Stage:
    """Base of every pipeline stage. Subclasses set `name`, `output_type` and write `forward`."""

    name: ClassVar[str]
    output_type: ClassVar[type]

    @final
    def __call__(self, request: ResolvedRequest, *inputs: Any, timings: Timings | None = None,
                 **kwargs: Any) -> Any:
        # 1. Inputs: a resolved request (defaults filled, validated).
        if not isinstance(request, ResolvedRequest):
            raise TypeError(f"{self.name}: expected a ResolvedRequest (GenerationRequest.resolve(spec)), "
                            f"got {type(request).__name__}")
        # 2. Run, timed, without autograd.
        start = time.perf_counter()
        with torch.no_grad():
            out = self.forward(request, *inputs, **kwargs)
        elapsed = time.perf_counter() - start
        # 3. Output contract: the declared payload type with CPU tensors, then stage checks.
        if not isinstance(out, self.output_type):
            raise StageError(f"{self.name} returned {type(out).__name__}, expected {self.output_type.__name__}")
        _check_cpu(self.name, out)
        self.check_output(request, out)
        if timings is not None:
            timings[self.name] = timings.get(self.name, 0.0) + elapsed
        logger.debug("stage %s took %.3f s", self.name, elapsed)
        return out

    def forward(self, request: ResolvedRequest, *inputs: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    def check_output(self, request: ResolvedRequest, out: Any) -> None:
        """Stage-specific checks of the output (shapes, finiteness); raise StageError."""


def _check_cpu(stage: str, payload: Any) -> None:
    if not dataclasses.is_dataclass(payload):
        return
    for f in dataclasses.fields(payload):
        value = getattr(payload, f.name)
        if isinstance(value, torch.Tensor) and value.device.type != "cpu":
            raise StageError(f"{stage}: payload field {f.name} is on {value.device}; payloads hold CPU tensors")


def expect_shape(stage: str, what: str, tensor: torch.Tensor, shape: tuple[int, ...]) -> None:
    """Raise StageError unless `tensor.shape == shape` (-1 matches any size)."""
    ok = tensor.dim() == len(shape) and all(s == -1 or s == t for s, t in zip(shape, tensor.shape))
    if not ok:
        raise StageError(f"{stage}: {what} has shape {tuple(tensor.shape)}, expected {shape}")


def expect_finite(stage: str, what: str, tensor: torch.Tensor) -> None:
    if not torch.isfinite(tensor).all():
        raise StageError(f"{stage}: {what} contains NaN or inf")
