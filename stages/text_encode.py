"""Text encode stage: prompt (and negative prompt when guidance is on) -> TextEmbeds."""
from __future__ import annotations

from typing import TYPE_CHECKING

from stages.base import Stage, StageError, expect_finite
from stages.payloads import TextEmbeds
from stages.request import ResolvedRequest

if TYPE_CHECKING:
    from engine.families import TextEncoder
    from engine.loading import Checkpoint
    from engine.options import EngineOptions


class TextEncodeStage(Stage):
    """Runs the model's text encoder once for [prompt] or [prompt, negative_prompt]."""

    name = "text_encode"
    output_type = TextEmbeds

    def __init__(self, encoder: "TextEncoder") -> None:
        self.encoder = encoder

    @classmethod
    def from_checkpoint(cls, ckpt: "Checkpoint", options: "EngineOptions") -> "TextEncodeStage":
        from engine.families import get_family

        return cls(get_family(ckpt.spec.family).load_text_encoder(ckpt, options))

    def forward(self, request: ResolvedRequest) -> TextEmbeds:
        # 1. One batch: the prompt, then the negative prompt if guidance runs.
        prompts = [request.prompt] + ([request.negative_prompt] if request.do_cfg else [])
        embeds = self.encoder.encode(prompts).to("cpu")  # (B, L, D)
        # 2. Split into the payload (copies, so each owns only its own storage).
        negative = embeds[1].clone() if request.do_cfg else None
        return TextEmbeds(context=embeds[0].clone(), negative_context=negative)

    def check_output(self, request: ResolvedRequest, out: TextEmbeds) -> None:
        if out.context.dim() != 2:
            raise StageError(f"text_encode: context has shape {tuple(out.context.shape)}, expected (L, D)")
        expect_finite(self.name, "context", out.context)
        if out.negative_context is not None and out.negative_context.shape != out.context.shape:
            raise StageError("text_encode: negative_context and context shapes differ")
