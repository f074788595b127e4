"""Qwen-Image text conditioning: Qwen2.5-VL (transformers' `Qwen2_5_VLModel`, no LM head) on the
pipeline's chat template, its last hidden states with the template's leading tokens dropped.

`encode` reproduces diffusers 0.42.1's `_get_qwen_prompt_embeds` of the pipeline the checkpoint
names (`specs.QwenPipeline`), one prompt at a time (as the pipelines encode the prompt and the
negative prompt: each alone, so never padded and no attention mask is needed downstream):

- text-to-image: `T2I_TEMPLATE.format(prompt)`, tokenized with truncation to 1024 + 34 tokens;
  the states after the first 34 tokens, cut to 512;
- Edit (original): the template holds one image placeholder; the image, resized to about one
  megapixel (multiples of 32, Lanczos), goes through the vision tower; the states after the first
  64 tokens (the image's tokens stay);
- Edit-Plus (2509, 2511): "Picture n: <image>" per image before the prompt, each image resized to
  about 384 x 384 pixels; the states after the first 64 tokens.

The vision path needs no torchvision: images are prepared by `Qwen2VLImageProcessorPil` (the
checkpoint's `processor/preprocessor_config.json`), and each `<|image_pad|>` is expanded to the
image's merged patch count here, as `Qwen2VLProcessor` does.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from PIL import Image
from torch import Tensor, nn

from engine.models.qwen_image.pipelines import PICTURE_PROMPT, QwenPipeline, area_dimensions

IMAGE_TOKEN = "<|image_pad|>"


@dataclass
class QwenPromptEmbeds:
    """One prompt's text conditioning: the encoder's states of its own tokens (no padding)."""

    hidden: Tensor
    """(S, D) last hidden states after the dropped template tokens (D = 3584 for Qwen2.5-VL-7B)."""

    def to(self, device: "torch.device | str", dtype: torch.dtype | None = None) -> "QwenPromptEmbeds":
        """A copy on `device` in `dtype` (None: unchanged) owning its own storage."""
        moved = self.hidden.to(device, dtype if dtype is not None else self.hidden.dtype)
        return QwenPromptEmbeds(moved.clone() if moved.data_ptr() == self.hidden.data_ptr() else moved)


def vl_image(image: Image.Image, area: int) -> Image.Image:
    """The image the text encoder sees: resized (Lanczos) to about `area` pixels at its aspect
    ratio, sides multiples of 32 (the edit pipelines' `image_processor.resize`)."""
    width, height = area_dimensions(area, image.width / image.height)
    return image.convert("RGB").resize((width, height), resample=Image.Resampling.LANCZOS)


class QwenTextEncoder:
    """Prompts (and, for the edit models, images) -> one `QwenPromptEmbeds` per prompt."""

    def __init__(self, model: nn.Module, tokenizer, pipeline: QwenPipeline, image_processor=None,
                 vl_area: int | None = None) -> None:
        """`vl_area`: pixels of each image the encoder sees (default: the pipeline's)."""
        if pipeline.edits and image_processor is None:
            raise ValueError(f"{pipeline.name} encodes images: the text encoder needs the image processor")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.pipeline = pipeline
        self.image_processor = image_processor
        self.vl_area = vl_area if vl_area is not None else pipeline.vl_area
        self._tokenizer_lock = threading.Lock()  # fast tokenizers are not re-entrant (see WanTextEncoder)

    @property
    def reads_images(self) -> bool:
        """The text stage passes the request's input images (edit models)."""
        return self.pipeline.edits

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str], images: list[Image.Image] | None = None) -> list[QwenPromptEmbeds]:
        """One `QwenPromptEmbeds` per prompt (states in the model's dtype, on its device). Edit
        models need `images` (the request's input images, the same for every prompt)."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got a single str")
        p = self.pipeline
        if p.edits and not images:
            raise ValueError(f"{p.name} conditions the prompt on the input image(s): images are required")
        if not p.edits and images:
            raise ValueError(f"{p.name} is text-to-image: it takes no images")
        vision = self._vision_inputs(images) if p.edits else {}
        out = []
        for prompt in prompts:
            # 1. the chat template (with the image prompts), tokenized; image placeholders expanded
            text = p.template.format(("".join(PICTURE_PROMPT.format(i + 1) for i in range(len(images)))
                                      if p.picture_prompts else "") + prompt)
            if p.edits:
                text = self._expand_image_tokens(text, vision["image_grid_thw"])
            with self._tokenizer_lock:
                tokens = self.tokenizer([text], return_tensors="pt", padding=True,
                                        **({"max_length": p.tokenizer_max_length, "truncation": True}
                                           if p.tokenizer_max_length else {}))
            # 2. last hidden states (after the final norm) of every token
            hidden = self.model(input_ids=tokens.input_ids.to(self.device),
                                attention_mask=tokens.attention_mask.to(self.device),
                                **vision).last_hidden_state[0]                       # (T, D)
            # 3. drop the template's leading tokens; text-to-image: at most max_text_tokens
            hidden = hidden[p.drop_tokens:]
            if p.max_text_tokens is not None:
                hidden = hidden[:p.max_text_tokens]
            out.append(QwenPromptEmbeds(hidden))                                     # (S, D)
        return out

    def _vision_inputs(self, images: list[Image.Image]) -> dict[str, Tensor]:
        """pixel_values (patches, C * 2 * 14 * 14) and image_grid_thw (N, 3) of the resized images."""
        if len(images) > self.pipeline.max_images:
            raise ValueError(f"{self.pipeline.name} takes at most {self.pipeline.max_images} image(s), "
                             f"got {len(images)}")
        resized = [vl_image(image, self.vl_area) for image in images]
        features = self.image_processor(images=resized, return_tensors="pt")
        dtype = next(self.model.parameters()).dtype
        return {"pixel_values": features["pixel_values"].to(self.device, dtype),
                "image_grid_thw": features["image_grid_thw"].to(self.device)}

    def _expand_image_tokens(self, text: str, grid_thw: Tensor) -> str:
        """Each `<|image_pad|>` (one per image, in order) -> the image's merged patch count of them."""
        merge = self.image_processor.merge_size ** 2
        parts = text.split(IMAGE_TOKEN)
        if len(parts) - 1 != grid_thw.shape[0]:
            raise ValueError(f"the prompt has {len(parts) - 1} image placeholders for {grid_thw.shape[0]} images")
        counts = [int(thw.prod()) // merge for thw in grid_thw]
        return parts[0] + "".join(IMAGE_TOKEN * n + part for n, part in zip(counts, parts[1:]))
