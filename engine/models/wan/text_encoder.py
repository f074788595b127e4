"""Wan text encoder: umT5 (transformers `UMT5EncoderModel`) + its tokenizer.

`encode` reproduces diffusers' `WanPipeline._get_t5_prompt_embeds`: clean the prompt (ftfy, double
HTML unescape, collapse whitespace), tokenize to `text_len` tokens, encode, and zero the
embeddings after each prompt's valid tokens.
"""
from __future__ import annotations

import html
import re

import torch
from torch import nn


def _fix_text(text: str) -> str:
    """ftfy.fix_text when ftfy is installed (it is optional at run time), else the text as is."""
    try:
        import ftfy
    except ImportError:
        return text
    return ftfy.fix_text(text)


def prompt_clean(text: str) -> str:
    """The Wan prompt cleaning: ftfy, HTML unescape (twice), whitespace collapsed, stripped."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanTextEncoder:
    """Prompts -> (B, text_len, dim) umT5 embeddings, zero-padded after the valid tokens."""

    def __init__(self, model: nn.Module, tokenizer, text_len: int = 512) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """(B, text_len, dim) embeddings on the model's device, in the model's dtype."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of strings, got a single str")
        # 1. clean and tokenize to exactly text_len tokens
        cleaned = [prompt_clean(p) for p in prompts]
        tokens = self.tokenizer(
            cleaned, padding="max_length", max_length=self.text_len, truncation=True,
            add_special_tokens=True, return_attention_mask=True, return_tensors="pt",
        )
        ids = tokens.input_ids.to(self.device)                   # (B, L)
        mask = tokens.attention_mask.to(self.device)             # (B, L)
        seq_lens = mask.gt(0).sum(dim=1)                         # (B,)

        # 2. encode
        hidden = self.model(ids, mask).last_hidden_state         # (B, L, D)

        # 3. zero everything after each prompt's valid tokens
        positions = torch.arange(self.text_len, device=hidden.device)
        valid = positions[None, :] < seq_lens[:, None]           # (B, L)
        return torch.where(valid[..., None], hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device))
