"""Frame-rate up-conversion of a decoded clip with RIFE: which frames to make, scene cuts, batching.

Timing. Input frame i is shown at i / source_fps. Output frame k is the picture at k / target_fps,
so it lies between input frames i = floor(k * r) and i + 1 (r = source_fps / target_fps) at
t = k * r - i: the placement of ccvfi's `TMapper` and vs-rife (`n * den % num / num`), in exact
fractions here. The output spans the input's first to last frame: floor((N - 1) / r) + 1 frames,
which for an integer factor m is Practical-RIFE's (N - 1) * m + 1 (ccvfi and vs-rife instead pad
the tail to N / r frames by repeating the last one). Where t is 0 the input frame is copied.

Scene cuts. As Practical-RIFE's inference_video.py and ccvfi: a pair whose SSIM, computed on
32 x 32 bilinear thumbnails with MATLAB's 3-D Gaussian window, is below `scene_threshold` is a
cut, and every output frame inside it repeats the earlier frame (no morph across the cut).
Practical-RIFE uses 0.2, ccvfi 0.3; the default here is Practical-RIFE's. (Practical-RIFE's extra
"static frame" path for SSIM > 0.996, which re-times the clip, is not reproduced.)

Batching. The head's features are computed once per input frame (a frame serves two pairs and
every t between them), and IFNet runs on `batch_size` output frames at a time. Frames are
zero-padded right and bottom to the model's modulo (as Practical-RIFE and vs-rife; ccvfi resizes
instead) and cropped back.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.models.rife.ifnet import IFNet

FLOW_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)
DEFAULT_SCENE_THRESHOLD = 0.2


@dataclass(frozen=True)
class OutputFrame:
    """Output frame = input frames `source` and `source + 1` blended at `t` (0: a copy of `source`)."""

    source: int
    t: Fraction


def as_fraction(fps: float | int | Fraction) -> Fraction:
    """An fps as an exact fraction (float rates such as 29.97002997 become 30000/1001)."""
    return Fraction(fps).limit_denominator(10_000)


def frame_plan(num_frames: int, source_fps: float, target_fps: float) -> list[OutputFrame]:
    """Where each output frame lies between the input frames (see the module docstring)."""
    if num_frames < 1:
        raise ValueError(f"interpolation needs at least one frame, got {num_frames}")
    src, dst = as_fraction(source_fps), as_fraction(target_fps)
    if src <= 0:
        raise ValueError(f"source fps must be positive, got {source_fps}")
    if dst < src:
        raise ValueError(f"target_fps ({target_fps}) must be at least the source fps ({source_fps}): "
                         f"frame interpolation only raises the frame rate")
    step = src / dst                                                # input frames per output frame
    count = math.floor((num_frames - 1) / step) + 1
    plan = []
    for k in range(count):
        pos = k * step
        source = math.floor(pos)
        plan.append(OutputFrame(source, pos - source))
    return plan


def output_count(num_frames: int, source_fps: float, target_fps: float) -> int:
    """How many frames `interpolate` returns for a clip of `num_frames`."""
    return len(frame_plan(num_frames, source_fps, target_fps))


# ---------------------------------------------------------------------------------------------
# Scene cuts: SSIM as Practical-RIFE's model/pytorch_msssim.ssim_matlab
# ---------------------------------------------------------------------------------------------


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> Tensor:
    """(1, 1, size, size, size) separable Gaussian, each 1-D factor summing to 1."""
    x = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return (g[:, None, None] * g[None, :, None] * g[None, None, :])[None, None]


def ssim_thumbnails(a: Tensor, b: Tensor) -> Tensor:
    """SSIM per pair of (B, 3, H, W) frames in [0, 1], on 32 x 32 thumbnails; the three colour
    channels are the third axis of one volume (MATLAB-style 3-D window, replicate padding)."""
    a = F.interpolate(a.float(), (32, 32), mode="bilinear", align_corners=False)[:, None]  # (B, 1, 3, 32, 32)
    b = F.interpolate(b.float(), (32, 32), mode="bilinear", align_corners=False)[:, None]
    window = _gaussian_window().to(a.device)

    def blur(x: Tensor) -> Tensor:
        return F.conv3d(F.pad(x, (5, 5, 5, 5, 5, 5), mode="replicate"), window)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a ** 2
    var_b = blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01 ** 2, 0.03 ** 2                                   # (k * L)^2 with L = 1
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return ssim.flatten(1).mean(1)                                  # (B,)


# ---------------------------------------------------------------------------------------------
# The interpolator
# ---------------------------------------------------------------------------------------------


class RifeInterpolator:
    """Raises the frame rate of decoded clips with an IFNet; load once, call per clip."""

    def __init__(self, model: IFNet, *, flow_scale: float = 1.0,
                 scene_threshold: float | None = DEFAULT_SCENE_THRESHOLD, batch_size: int = 8) -> None:
        if flow_scale not in FLOW_SCALES:
            raise ValueError(f"flow_scale must be one of {FLOW_SCALES}, got {flow_scale!r}")
        if scene_threshold is not None and not 0.0 <= scene_threshold <= 1.0:
            raise ValueError(f"scene_threshold must be in [0, 1] or None (no scene detection), got {scene_threshold!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        self.model = model.eval().requires_grad_(False)
        self.flow_scale = flow_scale
        self.scene_threshold = scene_threshold
        self.batch_size = batch_size

    @classmethod
    def load(cls, source: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
             **kwargs) -> "RifeInterpolator":
        """`source`: a `flownet.pkl`, a folder holding one, or "tiny" (the built-in random model)."""
        from engine.models.rife.loader import load_ifnet

        if source == "tiny":
            from engine.models.rife.tiny import materialize_tiny_rife

            source = materialize_tiny_rife()
        return cls(load_ifnet(source, device, dtype), **kwargs)

    @property
    def device(self) -> torch.device:
        return self.model.encode.cnn0.weight.device

    def scene_cuts(self, frames: Tensor) -> Tensor:
        """(N, 3, H, W) -> (N - 1,) bool: a cut between frame i and i + 1."""
        if self.scene_threshold is None or frames.shape[0] < 2:
            return torch.zeros(max(frames.shape[0] - 1, 0), dtype=torch.bool, device=frames.device)
        return ssim_thumbnails(frames[:-1], frames[1:]) < self.scene_threshold

    @torch.no_grad()
    def interpolate(self, frames: Tensor, source_fps: float, target_fps: float) -> Tensor:
        """(N, H, W, 3) float frames in [0, 1] at `source_fps` -> (M, H, W, 3) float32 at
        `target_fps`, on the model's device (M: `output_count`)."""
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be (N, H, W, 3), got {tuple(frames.shape)}")
        plan = frame_plan(frames.shape[0], source_fps, target_fps)
        # 1. frames channels-first on the device, scene cuts between neighbours
        video = frames.to(self.device).permute(0, 3, 1, 2).float()              # (N, 3, H, W)
        _, _, height, width = video.shape
        cuts = self.scene_cuts(video).tolist()
        # 2. copies (t = 0, or inside a cut) straight away; the rest queued for the model
        out = torch.empty(len(plan), height, width, 3, dtype=torch.float32, device=self.device)
        jobs: list[tuple[int, int, float]] = []                                 # (output, source, t)
        for k, frame in enumerate(plan):
            if frame.t == 0 or cuts[frame.source]:
                out[k] = frames[frame.source].to(out.device, torch.float32)
            else:
                jobs.append((k, frame.source, float(frame.t)))
        # 3. the model, batch_size output frames at a time; head features once per input frame
        m = self.model.config.modulo(self.flow_scale)
        pad = (0, -width % m, 0, -height % m)
        features: dict[int, Tensor] = {}
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            sources = torch.tensor([j[1] for j in chunk], device=self.device)
            needed = sorted({j[1] for j in chunk} | {j[1] + 1 for j in chunk})
            missing = [i for i in needed if i not in features]
            if missing:
                encoded = self.model.encode(F.pad(video[missing], pad))          # (n, c, H', W')
                features.update(zip(missing, encoded))
            for i in [i for i in features if i < needed[0]]:
                del features[i]
            img0 = F.pad(video[sources], pad)                                   # (b, 3, H', W')
            img1 = F.pad(video[sources + 1], pad)
            f0 = torch.stack([features[j[1]] for j in chunk])
            f1 = torch.stack([features[j[1] + 1] for j in chunk])
            t = torch.tensor([j[2] for j in chunk], device=self.device)
            mid = self.model(img0, img1, t, f0, f1, self.flow_scale)            # (b, 3, H', W')
            out[[j[0] for j in chunk]] = mid[:, :, :height, :width].permute(0, 2, 3, 1)
        return out
