"""The injectable "engine" of the stage deployments: what builds the stage objects in a replica.

Each stage deployment builds only its own stage (`text_stage()`, `image_stage()`,
`decode_stage()`), so a replica loads only the weights it needs. The DiT is not built here: its
worker class (`AppArgs.dit_worker_cls`) loads it on every rank from `checkpoint_path`.
Tests inject fakes with the same shape (serving/fakes.py) to run the serving logic without models.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol

from engine.options import EngineOptions
from engine.registry import ModelSpec
from stages.payloads import EncodedVideo, ImageCond, Latents, TextEmbeds
from stages.request import ResolvedRequest

TextStage = Callable[[ResolvedRequest], TextEmbeds]
ImageStage = Callable[[ResolvedRequest], ImageCond]
DecodeStage = Callable[[ResolvedRequest, Latents], EncodedVideo]


class StageEngine(Protocol):
    """Builds the stages of one model. Constructed once per replica; must not load anything
    until a `*_stage()` method is called."""

    def __init__(self, model: str, options: EngineOptions, **kwargs: Any) -> None: ...

    @classmethod
    def resolve(cls, model: str) -> ModelSpec:
        """The spec of a registry name or a local checkpoint directory (raises if neither)."""
        ...

    def text_stage(self) -> TextStage: ...
    def image_stage(self) -> ImageStage: ...
    def decode_stage(self) -> DecodeStage: ...


class WanStageEngine:
    """The real stages (stages/), loaded through the model family of the checkpoint."""

    def __init__(self, model: str, options: EngineOptions, **kwargs: Any) -> None:
        if kwargs:
            raise TypeError(f"WanStageEngine takes no extra arguments, got {sorted(kwargs)}")
        self.model = model
        self.options = options

    @classmethod
    def resolve(cls, model: str) -> ModelSpec:
        from engine.checkpoint import resolve_checkpoint

        return resolve_checkpoint(model).spec

    def _checkpoint(self):
        from engine.checkpoint import resolve_checkpoint

        return resolve_checkpoint(self.model)

    def text_stage(self) -> TextStage:
        from stages.text_encode import TextEncodeStage

        return TextEncodeStage.from_checkpoint(self._checkpoint(), self.options)

    def image_stage(self) -> ImageStage:
        from stages.image_encode import ImageEncodeStage

        return ImageEncodeStage.from_checkpoint(self._checkpoint(), self.options)

    def decode_stage(self) -> DecodeStage:
        from stages.decode import DecodeStage

        return DecodeStage.from_checkpoint(self._checkpoint(), self.options)
