"""`tiny` interpolator: a random-weight RIFE IFNet written as a Practical-RIFE `flownet.pkl`.

Deterministic (seed 0), 0.15 M parameters, so tests and the CPU demo run frame interpolation without
real weights; its in-between frames are warped blends of the inputs, not good interpolations.
Written once into `$LIGHTX2V_CACHE/tiny-rife-v1/flownet.pkl` (default `~/.cache/lightx2v/...`)
with the releases' `module.` key prefix, so it loads through the same code as a real checkpoint.
Files are written under a temporary name and renamed (atomic); a `lightx2v_tiny.json` records a
fingerprint of the generator and the parameter layout, and a stale file is rewritten.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile

import torch
from torch import nn

from engine.models.rife.ifnet import IFNet
from engine.models.rife.loader import CHECKPOINT_FILE, PREFIX, VARIANTS

VERSION = "tiny-rife-v1"
MARKER = "lightx2v_tiny.json"
SEED = 0


def randomize_(module: nn.Module, seed: int = SEED) -> nn.Module:
    """Deterministic weights from the parameter names and shapes: biases 0.05 * N(0, 1), the
    residual scales `beta` 1 + 0.1 * N(0, 1), other weights N(0, 1) / sqrt(fan_in). Flows come
    out a few pixels long and the blend mask away from 0.5, so mistakes in warping, timing or
    blending change the output visibly."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            if name.endswith("bias"):
                value = 0.05 * noise
            elif name.endswith("beta"):
                value = 1.0 + 0.1 * noise
            else:
                value = noise / max(1, p[0].numel()) ** 0.5
            p.copy_(value.to(p.dtype))
    return module


def tiny_ifnet(seed: int = SEED) -> IFNet:
    """The tiny IFNet with its deterministic weights (float32, CPU)."""
    return randomize_(IFNet(VARIANTS["tiny"].config), seed).eval()


def fingerprint() -> str:
    with torch.device("meta"):
        layout = [(k, list(v.shape)) for k, v in IFNet(VARIANTS["tiny"].config).state_dict().items()]
    blob = json.dumps([VERSION, SEED, layout], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _is_current(directory: str, expected: str) -> bool:
    try:
        with open(os.path.join(directory, MARKER)) as f:
            current = json.load(f).get("fingerprint") == expected
    except (OSError, ValueError):
        return False
    return current and os.path.isfile(os.path.join(directory, CHECKPOINT_FILE))


def _write_atomic(directory: str, name: str, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, os.path.join(directory, name))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def materialize_tiny_rife(root: str | None = None) -> str:
    """The folder holding the tiny `flownet.pkl`, written on first use. Returns its path."""
    from engine.tiny import cache_root

    directory = os.path.join(root or cache_root(), VERSION)
    expected = fingerprint()
    if _is_current(directory, expected):
        return directory
    os.makedirs(directory, exist_ok=True)
    state = {PREFIX + k: v.contiguous() for k, v in tiny_ifnet().state_dict().items()}
    # the weights first, the marker last: a reader that sees the marker sees the weights
    _write_atomic(directory, CHECKPOINT_FILE, lambda path: torch.save(state, path))

    def write_marker(path: str) -> None:
        with open(path, "w") as f:
            json.dump({"version": VERSION, "fingerprint": expected, "seed": SEED}, f)

    _write_atomic(directory, MARKER, write_marker)
    return directory
