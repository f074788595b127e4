"""Typed payloads that cross stage boundaries (and Ray's object store).

All tensors are CPU tensors so a payload travels by reference between processes.
One payload type per boundary; no grab-bag dicts.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from engine.conditioning import ImageCond

__all__ = ["Encoded", "EncodedImage", "EncodedVideo", "ImageCond", "Latents", "TextEmbeds", "VideoFrames"]


@dataclass
class TextEmbeds:
    """Text encoder output for one request."""

    context: "torch.Tensor | object"
    """The prompt's embeddings as the model's text encoder makes them: Wan's (L, D) umT5 states
    zero-padded to the text length, or a family's own embeddings object (several streams, masks),
    which its adapter turns into the DiT's input."""
    negative_context: "torch.Tensor | object | None"
    """The negative prompt's, the same kind; None when guidance is off."""


@dataclass
class Latents:
    """Denoised latents of one request, before the VAE."""

    latents: torch.Tensor
    """(C, F_lat, H_lat, W_lat), normalised as the DiT sees them (the VAE un-normalises)."""


class Encoded:
    """A finished result in its container (what the decode stage returns): `data` bytes of
    `mime_type`. `EncodedVideo` (MP4) or `EncodedImage` (PNG)."""

    data: bytes
    mime_type: str


@dataclass
class EncodedVideo(Encoded):
    """The finished video."""

    data: bytes
    """Container bytes (MP4, H.264, yuv420p)."""
    num_frames: int
    height: int
    width: int
    fps: int
    mime_type: str = "video/mp4"


@dataclass
class EncodedImage(Encoded):
    """The finished image (image models)."""

    data: bytes
    """PNG bytes (8-bit RGB)."""
    height: int
    width: int
    mime_type: str = "image/png"


@dataclass
class VideoFrames:
    """Decoded frames, for callers that want pixels rather than a container (output_type="np")."""

    frames: np.ndarray
    """(F, H, W, 3) float32 in [0, 1]."""
    fps: int
