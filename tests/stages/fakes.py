"""Small deterministic stand-ins for the model components (plumbing tests, no real model)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.wan.adapter import ConcatAdapter
from engine.options import EngineOptions
from engine.registry import ModelSpec, SamplingDefaults
from stages.decode import DecodeStage
from stages.denoise import DenoiseStage
from stages.image_encode import ImageEncodeStage
from stages.pipeline import LocalPipeline
from stages.text_encode import TextEncodeStage

TEXT_LEN, TEXT_DIM, IMAGE_TOKENS, IMAGE_DIM = 8, 4, 5, 6

SPEC = ModelSpec(
    name="fake-wan", family="fake", tasks=frozenset({"t2v", "i2v"}),
    defaults=SamplingDefaults(num_frames=5, height=32, width=48, steps=3, guidance_scale=4.0, shift=3.0,
                              sampler="euler", fps=8, negative_prompt="bad"),
)


class FakeTextEncoder:
    def __init__(self) -> None:
        self.calls: list[list[str]] = []

    def encode(self, prompts: list[str]) -> torch.Tensor:
        self.calls.append(list(prompts))
        out = torch.zeros(len(prompts), TEXT_LEN, TEXT_DIM)
        for i, p in enumerate(prompts):
            g = torch.Generator().manual_seed(sum(map(ord, p)) + len(p))
            n = min(len(p), TEXT_LEN)
            out[i, :n] = torch.randn(n, TEXT_DIM, generator=g)
        return out


class FakeImageEncoder:
    def encode(self, images) -> torch.Tensor:
        vals = [torch.tensor(list(im.getpixel((0, 0))), dtype=torch.float32).mean() / 255 for im in images]
        return torch.stack([torch.full((IMAGE_TOKENS, IMAGE_DIM), v) for v in vals])


class FakeVAE(nn.Module):
    """encode: every 4th frame, 8x average pool, 3 -> 16 channels; decode: the reverse."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Parameter(torch.linspace(-1, 1, 48).reshape(16, 3))
        self.decode_shape_bug = False

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        x = video[:, :, ::4]                                             # (B, 3, F_lat, H, W)
        b, c, f, h, w = x.shape
        x = F.avg_pool2d(x.transpose(1, 2).reshape(b * f, c, h, w), 8)   # (B*F_lat, 3, H/8, W/8)
        x = torch.einsum("oc,nchw->nohw", self.proj, x)
        return x.reshape(b, f, 16, h // 8, w // 8).transpose(1, 2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        b, _, f, h, w = z.shape
        x = z[:, :3]
        x = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(4, dim=2)], dim=2)  # (B, 3, F, h, w)
        x = x.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)
        if self.decode_shape_bug:
            x = x[:, :, 1:]
        return torch.tanh(x)


@dataclass
class FakeDiTConfig:
    in_channels: int
    out_channels: int = 16
    image_dim: int | None = None


class FakeTransformer(nn.Module):
    """Per-sample velocity that depends on every input (so batching and CFG are observable)."""

    def __init__(self, in_channels: int = 36, image_dim: int | None = IMAGE_DIM) -> None:
        super().__init__()
        self.config = FakeDiTConfig(in_channels=in_channels, image_dim=image_dim)
        self.scale = nn.Parameter(torch.tensor(0.5))
        self.batch_sizes: list[int] = []

    def forward(self, x, timestep, context, image_context=None):
        b = x.shape[0]
        self.batch_sizes.append(b)
        assert x.shape[1] == self.config.in_channels
        assert (image_context is not None) == (self.config.image_dim is not None)
        v = x[:, :16] * self.scale + x[:, 16:].mean(1, keepdim=True) if x.shape[1] > 16 else x * self.scale
        v = v + context.float().mean(dim=(1, 2)).view(b, 1, 1, 1, 1) + timestep.view(b, 1, 1, 1, 1) / 1000
        if image_context is not None:
            v = v + image_context.float().mean(dim=(1, 2)).view(b, 1, 1, 1, 1)
        return v


def denoise_stage(dit: nn.Module, options: EngineOptions, predictor=None, spec: ModelSpec = SPEC) -> DenoiseStage:
    """A one-expert DenoiseStage around `dit` with the Wan concat adapter (channels + image tokens)."""
    predictors = None if predictor is None else {"transformer": predictor}
    return DenoiseStage({"transformer": dit}, ConcatAdapter(), spec, options, predictors=predictors)


def image_stage(image_encoder, vae, options: EngineOptions) -> ImageEncodeStage:
    """An ImageEncodeStage with the Wan concat adapter (mask + latents, image tokens)."""
    return ImageEncodeStage(image_encoder, vae, ConcatAdapter(), options)


def fake_pipeline(in_channels: int = 36, image_dim: int | None = IMAGE_DIM):
    options = EngineOptions(device="cpu", dtype="float32")
    vae, dit, text = FakeVAE(), FakeTransformer(in_channels, image_dim), FakeTextEncoder()
    pipe = LocalPipeline(
        spec=SPEC, text=TextEncodeStage(text), denoise=denoise_stage(dit, options),
        decode=DecodeStage(vae, options),
        image=image_stage(FakeImageEncoder() if image_dim else None, vae, options),
    )
    return pipe, dit, vae, text
