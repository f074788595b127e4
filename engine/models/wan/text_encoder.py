"""Wan text encoder: umT5 (transformers `UMT5EncoderModel`) + its tokenizer.

`encode` reproduces diffusers' `WanPipeline._get_t5_prompt_embeds`: clean the prompt (ftfy, double
HTML unescape, collapse whitespace), tokenize to `text_len` tokens, encode, and zero the
embeddings after each prompt's valid tokens.
"""
from __future__ import annotations

import html
import re
import threading

import torch
from torch import nn


def _require_ftfy():
    """ftfy (a runtime dependency): without it prompts would be cleaned differently from the
    reference pipeline, silently, so its absence is an error at start-up."""
    try:
        import ftfy
    except ImportError as e:
        raise ImportError("the Wan text encoder needs ftfy for its prompt cleaning (pip install ftfy)") from e
    return ftfy


def _fix_text(text: str) -> str:
    """ftfy.fix_text (repairs mojibake and the like), as the Wan pipelines do."""
    return _require_ftfy().fix_text(text)


def prompt_clean(text: str) -> str:
    """The Wan prompt cleaning: ftfy, HTML unescape (twice), whitespace collapsed, stripped."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return re.sub(r"\s+", " ", text).strip()


class WanTextEncoder:
    """Prompts -> (B, text_len, dim) umT5 embeddings, zero-padded after the valid tokens."""

    def __init__(self, model: nn.Module, tokenizer, text_len: int = 512) -> None:
        _require_ftfy()  # fail at start-up, not at the first prompt
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self._tokenizer_lock = threading.Lock()
        """Serve runs sync methods in a thread pool: a fast tokenizer's first call sets its padding
        and truncation (a mutable borrow in Rust) and may meet another thread's encoding
        ("RuntimeError: Already borrowed"), so tokenizing is one thread at a time."""

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
        with self._tokenizer_lock:
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
