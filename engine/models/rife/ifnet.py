"""RIFE v4.x IFNet: the intermediate-flow network of Practical-RIFE (v4.15 to v4.26, lite and heavy).

Given two frames and a time t in (0, 1), IFNet estimates two flows (from the unknown frame at t
back to each input frame) and a blend mask, coarse to fine: block 0 sees both frames at 1/16 of
the resolution (v4.25+; 1/8 before), each later block refines the flow at a finer scale from
the frames and the head's features warped by the current flow. The output is the blend of the
two backward-warped frames. One module covers the published v4.15+ checkpoints: they differ only
in widths, the number of blocks, their scales and whether a block hands features to the next
(v4.21+); `RifeConfig` holds those, `engine.models.rife.loader.VARIANTS` the published values.

Parameter keys equal the published `flownet.pkl` state dicts (after their `module.` prefix):
`encode.cnn{0..3}`, `block{i}.conv0.{0,1}.0`, `block{i}.convblock.{0..7}.{conv,beta}`,
`block{i}.lastconv.0`.

Precision: the convolutions run in the weights' dtype (bfloat16 on the GPU, if chosen); the
flows, the mask, every warp (grid_sample) and the final blend run in float32. The sampling grid is
in normalised [-1, 1] coordinates, where bfloat16's 8-bit mantissa would be off by several
pixels at 832 px, so warps never run in 16 bits (vs-rife does the same for float16).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RifeConfig:
    """The shape of one IFNet variant (the published ones: loader.VARIANTS)."""

    head_width: int = 16
    """Channels inside the feature head (`encode.cnn0..2`)."""
    head_channels: int = 4
    """Feature channels per frame out of the head (`encode.cnn3`): 4, 8 (v4.15-v4.24) or 16 (heavy)."""
    widths: tuple[int, ...] = (192, 128, 96, 64, 32)
    """Channels of each IFBlock, coarse to fine; its length is the number of blocks."""
    scales: tuple[float, ...] = (16.0, 8.0, 4.0, 2.0, 1.0)
    """Downscale factor each block works at (Practical-RIFE's `scale_list` at scale=1.0)."""
    block_out: int = 13
    """Channels a block emits: 4 flow + 1 mask + features (8 in v4.21+; v4.15-v4.20 and v4.24
    emit 6 and leave the sixth unused)."""
    carry_features: bool = True
    """Whether a block's features (channels 5: of its output) feed the next block (v4.21+)."""

    def __post_init__(self) -> None:
        if len(self.widths) != len(self.scales) or not self.widths:
            raise ValueError(f"RifeConfig: widths {self.widths} and scales {self.scales} must have the same, "
                             f"non-zero length")
        if self.carry_features and self.block_out <= 5:
            raise ValueError(f"RifeConfig: carry_features needs block_out > 5, got {self.block_out}")

    @property
    def feature_channels(self) -> int:
        """Channels a block hands to the next one (0 without carry_features)."""
        return self.block_out - 5 if self.carry_features else 0

    def block_inputs(self, index: int) -> int:
        """Input channels of block `index` (the published `IFBlock(in_planes, ...)` sums)."""
        frames = 2 * 3 + 2 * self.head_channels + 1                 # img0, img1, f0, f1, t
        if index == 0:
            return frames
        return frames + 1 + 4 + self.feature_channels                # + mask, flow, features

    def modulo(self, flow_scale: float = 1.0) -> int:
        """Frames are padded to a multiple of this: the coarsest block works at 1/max(scales) and
        then halves twice (conv0), at flow resolution `flow_scale` (vs-rife's `modulo / scale`)."""
        base = int(max(self.scales) * 4)
        return max(base, int(base / flow_scale))


# ---------------------------------------------------------------------------------------------
# Warping
# ---------------------------------------------------------------------------------------------


def base_grid(height: int, width: int, device: torch.device) -> Tensor:
    """The identity sampling grid (1, 2, H, W) in grid_sample's [-1, 1] coordinates (x, then y)."""
    xs = torch.linspace(-1.0, 1.0, width, device=device, dtype=torch.float32)
    ys = torch.linspace(-1.0, 1.0, height, device=device, dtype=torch.float32)
    return torch.stack([xs.view(1, width).expand(height, width), ys.view(height, 1).expand(height, width)])[None]


def warp(image: Tensor, flow: Tensor, grid: Tensor) -> Tensor:
    """Backward warp: out(p) = image(p + flow(p)), bilinear, border padding; float32 throughout.

    image (B, C, H, W), flow (B, 2, H, W) in pixels, grid = base_grid(H, W); returns image's dtype.
    """
    height, width = image.shape[-2:]
    norm = flow.new_tensor([(width - 1.0) / 2.0, (height - 1.0) / 2.0]).view(1, 2, 1, 1)
    coords = (grid + flow.float() / norm).permute(0, 2, 3, 1)                  # (B, H, W, 2)
    out = F.grid_sample(image.float(), coords, mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(image.dtype)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------


def conv_lrelu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 convolution + LeakyReLU(0.2); keys `.0.weight`, `.0.bias`."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.LeakyReLU(0.2))


class Head(nn.Module):
    """Per-frame features at full resolution: 3x3 s2, 3x3, 3x3, 4x4 transposed s2."""

    def __init__(self, width: int, channels: int) -> None:
        super().__init__()
        self.cnn0 = nn.Conv2d(3, width, 3, 2, 1)
        self.cnn1 = nn.Conv2d(width, width, 3, 1, 1)
        self.cnn2 = nn.Conv2d(width, width, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(width, channels, 4, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = x.clamp(0.0, 1.0).to(self.cnn0.weight.dtype)                        # (B, 3, H, W)
        x = F.leaky_relu(self.cnn0(x), 0.2)                                      # (B, w, H/2, W/2)
        x = F.leaky_relu(self.cnn1(x), 0.2)
        x = F.leaky_relu(self.cnn2(x), 0.2)
        return self.cnn3(x)                                                      # (B, c, H, W)


class ResConv(nn.Module):
    """LeakyReLU(conv(x) * beta + x), beta a learnt per-channel scale."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        return F.leaky_relu(self.conv(x) * self.beta + x, 0.2)


class IFBlock(nn.Module):
    """One coarse-to-fine step: inputs at 1/scale, two stride-2 convs, 8 residual convs, a
    transposed conv + pixel shuffle back to 1/scale, then bilinear up to full resolution."""

    def __init__(self, cin: int, c: int, cout: int) -> None:
        super().__init__()
        self.conv0 = nn.Sequential(conv_lrelu(cin, c // 2, 2), conv_lrelu(c // 2, c, 2))
        self.convblock = nn.Sequential(*[ResConv(c) for _ in range(8)])
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(c, 4 * cout, 4, 2, 1), nn.PixelShuffle(2))

    def forward(self, x: Tensor, flow: Tensor | None, scale: float) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, cin - 4 or cin, H, W), flow (B, 4, H, W) or None -> flow delta (B, 4, H, W),
        mask logit (B, 1, H, W), features (B, cout - 5, H, W); all float32."""
        dtype = self.conv0[0][0].weight.dtype
        # 1. inputs (and the current flow, in pixels of the smaller image) at 1/scale
        x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear", align_corners=False)
        if flow is not None:
            flow = F.interpolate(flow, scale_factor=1.0 / scale, mode="bilinear", align_corners=False) / scale
            x = torch.cat((x, flow), 1)                                          # (B, cin, H/s, W/s)
        # 2. encode at 1/(4 scale), refine, decode to 1/scale
        feat = self.conv0(x.to(dtype))                                           # (B, c, H/4s, W/4s)
        feat = self.convblock(feat)
        out = self.lastconv(feat)                                                # (B, cout, H/s, W/s)
        # 3. back to full resolution; flows scale with the image
        out = F.interpolate(out.float(), scale_factor=scale, mode="bilinear", align_corners=False)
        return out[:, :4] * scale, out[:, 4:5], out[:, 5:]


# ---------------------------------------------------------------------------------------------
# IFNet
# ---------------------------------------------------------------------------------------------


class IFNet(nn.Module):
    """Frames at t between img0 and img1 (Practical-RIFE `IFNet.forward(...)`'s `merged[-1]`)."""

    def __init__(self, config: RifeConfig = RifeConfig()) -> None:
        super().__init__()
        self.config = config
        self.encode = Head(config.head_width, config.head_channels)
        for i, width in enumerate(config.widths):
            self.add_module(f"block{i}", IFBlock(config.block_inputs(i), width, config.block_out))

    @property
    def blocks(self) -> list[IFBlock]:
        return [getattr(self, f"block{i}") for i in range(len(self.config.widths))]

    def forward(self, img0: Tensor, img1: Tensor, timestep: Tensor, f0: Tensor | None = None,
                f1: Tensor | None = None, flow_scale: float = 1.0) -> Tensor:
        """img0, img1 (B, 3, H, W) in [0, 1], H and W multiples of `config.modulo(flow_scale)`;
        timestep (B,) or a float in (0, 1); f0, f1 the head's features of img0, img1 when already
        computed (a frame is shared by two neighbouring pairs). Returns (B, 3, H, W) float32.
        `flow_scale` < 1 estimates the flow at a lower resolution (Practical-RIFE's --scale)."""
        # 1. inputs in float32, the time as a constant plane, features of both frames
        img0, img1 = img0.float().clamp(0.0, 1.0), img1.float().clamp(0.0, 1.0)  # (B, 3, H, W)
        batch, _, height, width = img0.shape
        t = torch.as_tensor(timestep, dtype=torch.float32, device=img0.device).reshape(-1, 1, 1, 1)
        t = t.expand(batch, 1, height, width)                                    # (B, 1, H, W)
        f0 = (self.encode(img0) if f0 is None else f0).float()                  # (B, c, H, W)
        f1 = (self.encode(img1) if f1 is None else f1).float()
        grid = base_grid(height, width, img0.device)                            # (1, 2, H, W)
        scales = [s / flow_scale for s in self.config.scales]

        # 2. block 0: flow (B, 4, H, W: to img0, to img1), mask logit, features from the frames alone
        flow, mask, feat = self.block0(torch.cat((img0, img1, f0, f1, t), 1), None, scales[0])
        warped0, warped1 = warp(img0, flow[:, :2], grid), warp(img1, flow[:, 2:4], grid)

        # 3. finer blocks: refine the flow from the frames and features warped by the current one
        for block, scale in zip(self.blocks[1:], scales[1:]):
            wf0, wf1 = warp(f0, flow[:, :2], grid), warp(f1, flow[:, 2:4], grid)
            x = [warped0, warped1, wf0, wf1, t, mask]
            if self.config.carry_features:
                x.append(feat)
            delta, mask, feat = block(torch.cat(x, 1), flow, scale)
            flow = flow + delta
            warped0, warped1 = warp(img0, flow[:, :2], grid), warp(img1, flow[:, 2:4], grid)

        # 4. blend the two warped frames
        alpha = torch.sigmoid(mask)                                              # (B, 1, H, W)
        return warped0 * alpha + warped1 * (1.0 - alpha)                         # (B, 3, H, W)
