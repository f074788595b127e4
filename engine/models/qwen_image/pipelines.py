"""The conditioning conventions of diffusers 0.42.1's Qwen-Image pipelines (`QwenImagePipeline`,
`QwenImageEditPipeline`, `QwenImageEditPlusPipeline`): the prompt templates, how many template
tokens are dropped from the text encoder's states, the image prompts and the image sizes.
(Imported by the specs, the text encoder and the tiny checkpoints; imports nothing of the family.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

T2I_PIPELINE = "QwenImagePipeline"
EDIT_PIPELINE = "QwenImageEditPipeline"
EDIT_PLUS_PIPELINE = "QwenImageEditPlusPipeline"

T2I_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
_EDIT_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a "
    "new image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n"
)
EDIT_TEMPLATE = _EDIT_SYSTEM + "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
EDIT_PLUS_TEMPLATE = _EDIT_SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"
PICTURE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
"""Edit-Plus: one per input image, numbered from 1, before the prompt."""

REFERENCE_AREA = 1024 * 1024
"""Pixels of the VAE-encoded reference image(s) (and of the default output size) of the Edit models."""
PLUS_VL_AREA = 384 * 384
"""Pixels of each image the Edit-Plus text encoder sees (diffusers' CONDITION_IMAGE_SIZE)."""

QWEN_NEGATIVE_PROMPT = " "
"""The Qwen-Image model cards' negative prompt (true CFG needs one)."""


def area_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(width, height) with `ratio` = width / height and about `area` pixels, each rounded to a
    multiple of 32 (diffusers' `calculate_dimensions` in the Qwen-Image-Edit pipelines)."""
    width = math.sqrt(area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


@dataclass(frozen=True)
class QwenPipeline:
    """How one diffusers pipeline conditions the DiT on the prompt (and images)."""

    name: str
    """The diffusers pipeline class (model_index.json `_class_name`)."""
    template: str
    """The chat template; the prompt (after the image prompts) replaces `{}`."""
    drop_tokens: int
    """Leading template tokens dropped from the text encoder's last hidden states."""
    tokenizer_max_length: int | None = None
    """Text-to-image: the template is tokenized with truncation to this many tokens (1024 + the
    dropped ones); None: no truncation (the edit pipelines' processor)."""
    max_text_tokens: int | None = None
    """Text-to-image: the states are cut to this many tokens after the drop; None: not cut."""
    picture_prompts: bool = False
    """Edit-Plus: `PICTURE_PROMPT` once per image before the prompt."""
    vl_area: int | None = None
    """Pixels of each image the text encoder sees (resized to that area, multiples of 32);
    None: the text encoder sees no image (text-to-image)."""
    vl_is_reference: bool = False
    """The original Edit: the text encoder sees the reference image itself (the variant's
    `reference_area`, one megapixel for the releases) rather than `vl_area`."""
    max_images: int = 0
    """Input images a request may give."""

    @property
    def edits(self) -> bool:
        return self.vl_area is not None


PIPELINES: dict[str, QwenPipeline] = {p.name: p for p in (
    QwenPipeline(T2I_PIPELINE, T2I_TEMPLATE, drop_tokens=34, tokenizer_max_length=1024 + 34, max_text_tokens=512),
    QwenPipeline(EDIT_PIPELINE, EDIT_TEMPLATE, drop_tokens=64, vl_area=REFERENCE_AREA, vl_is_reference=True,
                 max_images=1),
    # The Edit-2509 model card: best with 1 to 3 input images.
    QwenPipeline(EDIT_PLUS_PIPELINE, EDIT_PLUS_TEMPLATE, drop_tokens=64, picture_prompts=True,
                 vl_area=PLUS_VL_AREA, max_images=3),
)}
