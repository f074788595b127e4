"""Text encode stage: prompt (and negative prompt when guidance is on) -> TextEmbeds."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import torch

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
        if getattr(self.encoder, "reads_images", False):  # e.g. Qwen-Image-Edit: a vision-language encoder
            embeds = self.encoder.encode(prompts, images=list(request.images))
        else:
            embeds = self.encoder.encode(prompts)  # (B, L, D), or one family object per prompt
        # 2. Split into the payload: CPU copies, each owning only its own storage.
        if isinstance(embeds, torch.Tensor):
            items = [e.to("cpu").clone() for e in embeds]                         # (L, D) each
        else:
            items = [e.to("cpu", None) for e in embeds]
        return TextEmbeds(context=items[0], negative_context=items[1] if request.do_cfg else None)

    def check_output(self, request: ResolvedRequest, out: TextEmbeds) -> None:
        for what, item in (("context", out.context), ("negative_context", out.negative_context)):
            if item is None:
                continue
            if isinstance(item, torch.Tensor) and item.dim() != 2:
                raise StageError(f"text_encode: {what} has shape {tuple(item.shape)}, expected (L, D)")
            for name, tensor in _tensors(item):
                expect_finite(self.name, f"{what}{name}", tensor)
        if isinstance(out.context, torch.Tensor) and out.negative_context is not None \
                and out.negative_context.shape != out.context.shape:
            raise StageError("text_encode: negative_context and context shapes differ")


def _tensors(item) -> list[tuple[str, torch.Tensor]]:
    """The floating-point tensors of a tensor or of a family's embeddings dataclass."""
    if isinstance(item, torch.Tensor):
        return [("", item)]
    fields = dataclasses.fields(item) if dataclasses.is_dataclass(item) else ()
    return [(f".{f.name}", v) for f in fields
            if isinstance(v := getattr(item, f.name), torch.Tensor) and v.is_floating_point()]
