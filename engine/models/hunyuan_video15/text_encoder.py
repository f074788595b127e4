"""HunyuanVideo-1.5 text encoders: Qwen2.5-VL (the prompt) and ByT5 (the quoted text, "glyphs").

`encode` reproduces diffusers 0.42.1 `HunyuanVideo15Pipeline.encode_prompt`:

1. Qwen2.5-VL: the prompt (" " when empty) is put in a chat with a fixed system message (describe
   the video: content, objects, actions, background, camera), the generation prompt appended, and
   tokenized to `MLLM_MAX_TOKENS + CROP_START` tokens (padded, truncated). The states are those 2
   layers before the last (`hidden_states[-3]`: `SKIPPED_LAYERS` = 2), and the first `CROP_START`
   = 108 positions are cut off, which with Qwen2.5-VL's tokenizer is exactly the template up to
   and including "<|im_start|>user\\n". The official repository finds that position by searching
   for the marker instead; both give 108 for the real tokenizer. The loader builds the text
   model with the 2 skipped layers left out and no final norm, so its `last_hidden_state` is that
   hidden state.
2. ByT5: the text between double quotes ("..." or “...”) is collected, deduplicated when there are
   several, formatted as `Text "A". Text "B". ` and encoded to at most `GLYPH_MAX_TOKENS` tokens;
   a prompt without quotes has no glyph tokens (diffusers: zeros with a zero mask). The negative
   prompt's glyphs come from the negative prompt, as diffusers encodes it (the official pipeline
   uses none; LightX2V reuses the positive ones).

The DiT attends only to valid tokens, so each prompt's result keeps those only (`PromptTokens`).
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass

import torch
from torch import Tensor, nn

SYSTEM_MESSAGE = (
    "You are a helpful assistant. Describe the video by detailing the following aspects: \
        1. The main content and theme of the video. \
        2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects. \
        3. Actions, events, behaviors temporal relationships, physical movement changes of the objects. \
        4. background environment, light, style and atmosphere. \
        5. camera angles, movements, and transitions used in the video."
)
"""The system message of diffusers' HunyuanVideo15Pipeline, byte for byte (its backslash line
continuations keep the following indentation inside the string)."""
CROP_START = 108
"""Template tokens cut from the front of the Qwen2.5-VL states (`prompt_template_encode_start_idx`)."""
MLLM_MAX_TOKENS = 1000
"""Prompt tokens kept after the crop (`tokenizer_max_length`)."""
SKIPPED_LAYERS = 2
"""The states are `hidden_states[-(SKIPPED_LAYERS + 1)]` (`num_hidden_layers_to_skip`)."""
GLYPH_MAX_TOKENS = 256
"""ByT5 tokens (`tokenizer_2_max_length`)."""

_QUOTED = re.compile(r"\"(.*?)\"|“(.*?)”")


def chat(prompt: str) -> list[dict[str, str]]:
    """The conversation diffusers' `format_text_input` builds for one prompt."""
    return [{"role": "system", "content": SYSTEM_MESSAGE}, {"role": "user", "content": prompt if prompt else " "}]


def glyph_text(prompt: str) -> str | None:
    """The ByT5 input for a prompt (diffusers' `extract_glyph_texts`): quoted texts, deduplicated
    (when more than one), as `Text "A". Text "B". `; None without quotes."""
    found = [m[0] or m[1] for m in _QUOTED.findall(prompt)]
    if len(found) > 1:
        found = list(dict.fromkeys(found))
    if not found:
        return None
    return ". ".join(f'Text "{text}"' for text in found) + ". "


@dataclass
class PromptTokens:
    """One prompt's text conditioning, valid tokens only (what crosses the text -> denoise boundary)."""

    text: Tensor
    """(L_txt, text_dim) Qwen2.5-VL states after the template crop."""
    glyph: Tensor
    """(L_gly, glyph_dim) ByT5 states of the quoted text; (0, glyph_dim) without quotes."""

    def to(self, device: "torch.device | str | None" = None, dtype: torch.dtype | None = None) -> "PromptTokens":
        """A copy on `device` in `dtype` (None keeps it), owning its storage."""
        return PromptTokens(self.text.to(device, dtype).clone(), self.glyph.to(device, dtype).clone())


class HunyuanVideo15TextEncoder:
    """Prompts -> one `PromptTokens` per prompt (see the module docstring)."""

    def __init__(self, mllm: nn.Module, tokenizer, byt5: nn.Module, byt5_tokenizer,
                 crop_start: int = CROP_START) -> None:
        """`mllm`: a Qwen2.5-VL text model whose `last_hidden_state` is the wanted hidden state
        (the loader leaves out the skipped layers and the final norm)."""
        self.mllm = mllm.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.byt5 = byt5.eval().requires_grad_(False)
        self.byt5_tokenizer = byt5_tokenizer
        self.crop_start = crop_start
        self._tokenizer_lock = threading.Lock()
        """Fast tokenizers are not safe to call from two threads at once (Serve runs sync methods
        in a thread pool): one thread at a time."""

    @property
    def device(self) -> torch.device:
        return next(self.mllm.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[PromptTokens]:
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got a single str")
        return [PromptTokens(self._mllm_states(p), self._glyph_states(p)) for p in prompts]

    def _mllm_states(self, prompt: str) -> Tensor:
        # 1. chat template, tokenized to crop + max tokens
        with self._tokenizer_lock:
            tokens = self.tokenizer.apply_chat_template(
                [chat(prompt)], add_generation_prompt=True, tokenize=True, return_dict=True,
                padding="max_length", max_length=MLLM_MAX_TOKENS + self.crop_start, truncation=True,
                return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)                               # (1, 1108)
        mask = tokens["attention_mask"].to(self.device)                         # (1, 1108)
        # 2. the state SKIPPED_LAYERS before the last, template positions cut off, valid tokens kept
        states = self.mllm(input_ids=ids, attention_mask=mask).last_hidden_state  # (1, 1108, D)
        states, mask = states[0, self.crop_start:], mask[0, self.crop_start:]
        return states[mask.bool()]                                              # (L_txt, D)

    def _glyph_states(self, prompt: str) -> Tensor:
        text = glyph_text(prompt)
        dim = self.byt5.config.d_model
        if text is None:
            return torch.zeros(0, dim, device=self.device, dtype=next(self.byt5.parameters()).dtype)
        with self._tokenizer_lock:
            tokens = self.byt5_tokenizer(text, padding="max_length", max_length=GLYPH_MAX_TOKENS, truncation=True,
                                         add_special_tokens=True, return_tensors="pt")
        ids = tokens.input_ids.to(self.device)                                  # (1, 256)
        mask = tokens.attention_mask.to(self.device)                            # (1, 256)
        states = self.byt5(input_ids=ids, attention_mask=mask.float())[0]      # (1, 256, 1472)
        return states[0][mask[0].bool()]                                        # (L_gly, 1472)
