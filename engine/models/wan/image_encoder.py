"""Wan image encoder: CLIP ViT-H/14 vision tower (transformers `CLIPVisionModel`) + processor.

`encode` reproduces diffusers' `WanImageToVideoPipeline.encode_image`: the image processor
(resize, center crop, normalise), then the vision tower's penultimate hidden state.
"""
from __future__ import annotations

import torch
from torch import nn


def clip_image_processor_cls():
    """The PIL-backed CLIP image processor when this transformers has one (no torchvision needed),
    else `CLIPImageProcessor`."""
    try:
        from transformers import CLIPImageProcessorPil
        return CLIPImageProcessorPil
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor
        return CLIPImageProcessor


class WanImageEncoder:
    """PIL images -> (B, tokens, dim) CLIP hidden states (257 x 1280 for ViT-H/14 at 224 px)."""

    def __init__(self, model: nn.Module, processor) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: list) -> torch.Tensor:
        """(B, tokens, dim) penultimate hidden states on the model's device."""
        # 1. preprocess: (B, 3, S, S) normalised pixels
        pixels = self.processor(images=images, return_tensors="pt").pixel_values
        pixels = pixels.to(device=self.device, dtype=self.dtype)
        # 2. vision tower; hidden_states[-2] is the output of the second-to-last layer
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2]                              # (B, tokens, dim)
