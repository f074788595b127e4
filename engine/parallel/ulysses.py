"""Ulysses sequence parallelism for a DiT, applied by swapping two kinds of modules.

Inside a Ulysses group of d ranks, each rank holds 1/d of the video tokens through the blocks. The
modules swapped are the model's declared seams (engine.dit):

- its `SequenceHooks` (`sequence_hooks`) -> `UlyssesSequence`: `split` pads the token axis to a
  multiple of d and keeps this rank's slice of the tokens and of every tensor aligned with them
  (rotary tables; per-token modulation, e.g. Wan2.2 TI2V's per-token timesteps; a tensor of size 1
  on the token axis is shared by all tokens and kept whole); `gather` all-gathers the slices and
  drops the padding before the output head (which uses its own, unsplit, per-token conditioning);
- each block's `sequence_attention` cores -> `UlyssesAttention`: an all-to-all turns the sequence
  split into a head split (every rank sees all tokens for H/d heads), the padding tokens are
  dropped so they never act as keys, the wrapped core attends, and a second all-to-all turns the
  result back.

Everything else in a block is per token (norms, modulation, q/k RMSNorm across heads, which is
computed before the head split on the full width, rotary embeddings on the rank's own slice, the
feed-forward) or attends to tokens every rank holds in full (cross-attention to text and image
tokens: those cores are not declared and are left alone). So the output equals the single-rank
output up to float rounding.

Which group the split uses is chosen per forward (`UlyssesState.use`): the CFG-parallel
predictor uses the mesh's Ulysses group, or the whole world when guidance is off.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from engine.attention import AttentionCore
from engine.dit import SequenceHooks, sequence_attention_slots, sequence_hooks_of, set_sequence_hooks
from engine.parallel.mesh import SINGLE, SubGroup


def check_heads(num_heads: int, degree: int, what: str) -> None:
    """Refuse a sequence-parallel degree that does not divide the attention heads."""
    if num_heads % degree:
        allowed = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"{what}={degree} does not divide the model's {num_heads} attention heads "
            f"(Ulysses splits heads across ranks); allowed degrees: {allowed}")


class UlyssesState:
    """The group the current forward splits over, and that forward's token counts.

    Shared by the model's `UlyssesSequence` and all its `UlyssesAttention` modules. One forward
    at a time per model (a worker runs one request at a time).
    """

    def __init__(self) -> None:
        self.group: SubGroup = SINGLE
        self.tokens = 0
        """Real token count L of the current forward (set by `split`)."""
        self.padded = 0
        """L rounded up to a multiple of the group size."""

    @contextlib.contextmanager
    def use(self, group: SubGroup) -> Iterator[None]:
        """Run the forwards inside this block split over `group`."""
        previous, self.group = self.group, group
        try:
            yield
        finally:
            self.group = previous


def _shard(t: Tensor, group: SubGroup, padded: int) -> Tensor:
    """This rank's slice of the token axis (dim 1) of t, after zero-padding it to `padded`."""
    t = F.pad(t, (0, 0) * (t.dim() - 2) + (0, padded - t.shape[1]))
    chunk = padded // group.size
    return t[:, group.rank * chunk:(group.rank + 1) * chunk]


class UlyssesSequence(SequenceHooks):
    """`SequenceHooks` that shards the token sequence over the active Ulysses group."""

    def __init__(self, state: UlyssesState) -> None:
        super().__init__()
        self.state = state

    def split(self, x: Tensor, *aligned: Tensor) -> tuple[Tensor, ...]:
        group = self.state.group
        if group.size == 1:
            return (x, *aligned)
        tokens = x.shape[1]                                             # L
        padded = -(-tokens // group.size) * group.size                  # L_pad = d * L_local
        self.state.tokens, self.state.padded = tokens, padded
        parts = [_shard(x, group, padded).contiguous()]                 # (B, L_local, D)
        for t in aligned:                                               # e.g. rope (1, L, 1, Dh // 2)
            if t.shape[1] == 1:                                         # shared by all tokens: whole
                parts.append(t)
            elif t.shape[1] == tokens:
                parts.append(_shard(t, group, padded))                  # (.., L_local, ..)
            else:
                raise ValueError(f"UlyssesSequence.split: an aligned tensor {tuple(t.shape)} has neither "
                                 f"{tokens} tokens nor 1 on dim 1")
        return tuple(parts)

    def gather(self, x: Tensor) -> Tensor:
        group = self.state.group
        if group.size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(group.size)]
        dist.all_gather(parts, x.contiguous(), group=group.group)      # d x (B, L_local, D)
        return torch.cat(parts, dim=1)[:, :self.state.tokens]           # (B, L, D)


def _seq_to_heads(qkv: Tensor, group: SubGroup) -> Tensor:
    """(S, B, L_local, H, Dh) split by tokens -> (S, B, L_pad, H / d, Dh) split by heads."""
    s, b, n, h, dh = qkv.shape
    d = group.size
    send = qkv.reshape(s, b, n, d, h // d, dh).permute(3, 0, 1, 2, 4, 5).contiguous()  # (d, S, B, L_local, H/d, Dh)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group.group)             # chunk i: rank i's tokens, our heads
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(s, b, d * n, h // d, dh)  # (S, B, L_pad, H/d, Dh)


def _heads_to_seq(out: Tensor, group: SubGroup) -> Tensor:
    """(B, L_pad, H / d, Dh) split by heads -> (B, L_local, H, Dh) split by tokens."""
    b, padded, hd, dh = out.shape
    d = group.size
    send = out.reshape(b, d, padded // d, hd, dh).transpose(0, 1).contiguous()  # (d, B, L_local, H/d, Dh)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group.group)             # chunk i: our tokens, rank i's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, padded // d, d * hd, dh)  # (B, L_local, H, Dh)


class UlyssesAttention(nn.Module):
    """Self-attention core with all-to-all around it: tokens split -> heads split -> tokens split.

    The wrapped core stays a child module, so `set_attention_backend` still reaches it.
    """

    def __init__(self, inner: AttentionCore, state: UlyssesState) -> None:
        super().__init__()
        self.inner = inner
        self.state = state

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        group = self.state.group
        if group.size == 1:
            return self.inner(q, k, v)
        tokens, padded = self.state.tokens, self.state.padded
        # 1. all-to-all: this rank's tokens of all heads -> all tokens of this rank's heads
        qkv = _seq_to_heads(torch.stack([q, k, v]), group)             # (3, B, L_pad, H/d, Dh)
        # 2. attention over the real tokens only (padding must not act as keys)
        out = self.inner(*qkv[:, :, :tokens].unbind(0))                 # (B, L, H/d, Dh)
        out = F.pad(out, (0, 0, 0, 0, 0, padded - tokens))             # (B, L_pad, H/d, Dh)
        # 3. all-to-all back: this rank's tokens of all heads
        return _heads_to_seq(out, group)                                # (B, L_local, H, Dh)


def apply_ulysses(model: nn.Module, state: UlyssesState) -> None:
    """Swap the model's `SequenceHooks` and every block's `sequence_attention` cores (engine.dit
    seams) for their Ulysses versions, all sharing `state`. Applying again re-points already
    swapped cores at the new `state` (a core left on an old state would attend over its local
    token slice only). TypeError if the model does not declare the seams."""
    sequence_hooks_of(model)  # checks the seam before anything is swapped
    slots = sequence_attention_slots(model)
    if not slots:
        raise TypeError(f"{type(model).__name__} declares no `sequence_attention` core; Ulysses cannot be applied")
    set_sequence_hooks(model, UlyssesSequence(state))
    for owner, name in slots:
        core = getattr(owner, name)
        if isinstance(core, UlyssesAttention):
            core.state = state
        else:
            setattr(owner, name, UlyssesAttention(core, state))
