"""Loading RIFE `flownet.pkl` checkpoints: the published variants and their detection.

The Practical-RIFE releases ship `train_log/flownet.pkl`, a plain state dict saved by
`torch.save` from a DistributedDataParallel model, so every key carries a `module.` prefix
(`module.block0.conv0.0.0.weight`); the reference loaders keep only the `module.` keys and strip
the prefix. Here the file is read with `torch.load(weights_only=True)`; keys with or without the
prefix are accepted. Which variant a file holds is decided from its tensor shapes (the files
have no config); variants with the same shapes (e.g. v4.25 and v4.26) share one architecture.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from engine.models.rife.ifnet import IFNet, RifeConfig

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "flownet.pkl"
PREFIX = "module."


@dataclass(frozen=True)
class RifeVariant:
    """One architecture and the releases that use it."""

    name: str
    releases: tuple[str, ...]
    config: RifeConfig


_OLD_SCALES = (8.0, 4.0, 2.0, 1.0)
_NEW_SCALES = (16.0, 8.0, 4.0, 2.0, 1.0)

# Shapes of the published Practical-RIFE v4.15+ IFNets (as in HolyWu/vs-rife's IFNet_HDv3_v4_*.py
# and ccvfi's ifnet_arch.py); the names are the release numbers.
VARIANTS: dict[str, RifeVariant] = {v.name: v for v in (
    RifeVariant("4.15", ("4.15", "4.17", "4.18", "4.19", "4.24"),
                RifeConfig(32, 8, (192, 128, 96, 64), _OLD_SCALES, block_out=6, carry_features=False)),
    RifeVariant("4.15.lite", ("4.15.lite", "4.16.lite", "4.17.lite"),
                RifeConfig(16, 4, (128, 96, 64, 48), _OLD_SCALES, block_out=6, carry_features=False)),
    RifeVariant("4.20", ("4.20",),
                RifeConfig(32, 8, (384, 192, 96, 48), _OLD_SCALES, block_out=6, carry_features=False)),
    RifeVariant("4.21", ("4.21", "4.22", "4.23"),
                RifeConfig(32, 8, (256, 192, 96, 48), _OLD_SCALES)),
    RifeVariant("4.22.lite", ("4.22.lite",),
                RifeConfig(16, 4, (192, 128, 64, 32), _OLD_SCALES)),
    RifeVariant("4.25", ("4.25", "4.26"),
                RifeConfig(16, 4, (192, 128, 96, 64, 32), _NEW_SCALES)),
    RifeVariant("4.25.lite", ("4.25.lite",),
                RifeConfig(16, 4, (192, 128, 96, 64, 24), (32.0, 16.0, 8.0, 4.0, 1.0))),
    RifeVariant("4.25.heavy", ("4.25.heavy",),
                RifeConfig(16, 4, (384, 256, 192, 128, 64), _NEW_SCALES)),
    RifeVariant("4.26.heavy", ("4.26.heavy",),
                RifeConfig(16, 16, (192, 128, 96, 64, 32), _NEW_SCALES)),
    # the built-in random test model (engine/models/rife/tiny.py)
    RifeVariant("tiny", ("tiny",),
                RifeConfig(8, 4, (24, 16, 16, 8), _OLD_SCALES)),
)}


def shape_signature(state_dict: dict[str, torch.Tensor]) -> tuple:
    """What the shapes of a state dict (prefix stripped) say about its architecture."""
    try:
        head = (state_dict["encode.cnn0.weight"].shape[0], state_dict["encode.cnn3.weight"].shape[1])
        widths, i = [], 0
        while f"block{i}.conv0.1.0.weight" in state_dict:
            widths.append(state_dict[f"block{i}.conv0.1.0.weight"].shape[0])
            i += 1
        block_out = state_dict["block0.lastconv.0.weight"].shape[1] // 4
        block1_in = state_dict["block1.conv0.0.0.weight"].shape[1]
    except KeyError as e:
        raise ValueError(f"not a RIFE v4.15+ IFNet state dict: key {e.args[0]!r} missing") from None
    return head, tuple(widths), block_out, block1_in


def config_signature(config: RifeConfig) -> tuple:
    return ((config.head_width, config.head_channels), tuple(config.widths), config.block_out,
            config.block_inputs(1))


def detect_variant(state_dict: dict[str, torch.Tensor]) -> RifeVariant:
    """The published variant whose shapes the (prefix-stripped) state dict has."""
    signature = shape_signature(state_dict)
    for variant in VARIANTS.values():
        if config_signature(variant.config) == signature:
            return variant
    raise ValueError(
        f"RIFE checkpoint with head (width, channels) {signature[0]}, block widths {signature[1]}, "
        f"block outputs {signature[2]} matches no known variant; known: {', '.join(VARIANTS)} "
        f"(Practical-RIFE v4.15 and later)")


def strip_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the DataParallel `module.` prefix where present (a file may hold both kinds)."""
    prefixed = {k[len(PREFIX):]: v for k, v in state_dict.items() if k.startswith(PREFIX)}
    if prefixed:
        return prefixed
    return dict(state_dict)


def checkpoint_path(path: str) -> str:
    """`path` itself if a file, else `path/flownet.pkl` (or `path/train_log/flownet.pkl`)."""
    if os.path.isfile(path):
        return path
    for candidate in (os.path.join(path, CHECKPOINT_FILE), os.path.join(path, "train_log", CHECKPOINT_FILE)):
        if os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(f"interpolator: no RIFE checkpoint at {path!r} (a {CHECKPOINT_FILE} file, or a "
                            f"folder holding one, as the Practical-RIFE releases' train_log/)")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """The prefix-stripped tensors of a `flownet.pkl` (read with weights_only=True)."""
    from engine.loading import read_pth

    return strip_prefix(read_pth(checkpoint_path(path)))


def load_ifnet(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               variant: str | None = None) -> IFNet:
    """Build an IFNet from a `flownet.pkl` (or a folder holding one): meta parameters, the file's
    tensors assigned. `variant` (a VARIANTS name) overrides the detection from shapes."""
    from engine.loading import build_module

    state_dict = read_state_dict(path)
    if variant is None:
        found = detect_variant(state_dict)
    elif variant in VARIANTS:
        found = VARIANTS[variant]
    else:
        raise ValueError(f"interpolator variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
    with torch.device("meta"):
        expected = set(IFNet(found.config).state_dict())
    extra = sorted(set(state_dict) - expected)
    if extra:  # training-only parts some releases carry; the IFNet does not use them
        log.info("RIFE checkpoint %s: ignoring %d keys outside the IFNet (%s...)", path, len(extra), extra[0])
        state_dict = {k: v for k, v in state_dict.items() if k in expected}
    log.info("RIFE checkpoint %s: variant %s (releases %s)", path, found.name, ", ".join(found.releases))
    return build_module(lambda: IFNet(found.config), state_dict, dtype=dtype, device=device)
