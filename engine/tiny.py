"""What every built-in tiny random-weight model shares: the cache folder, deterministic random
weights, saving a module in the diffusers layout, and generating a checkpoint once, atomically.

A family's `tiny.py` writes its checkpoint (`write(directory)`, which ends by writing MARKER with
the `fingerprint` of its generator and module layouts) and calls `materialize(version,
fingerprint, write)`: the folder `$LIGHTX2V_CACHE/<version>` (default `~/.cache/lightx2v`) is
written through a temporary folder and an atomic rename, so concurrent processes never see a
half-written checkpoint, and regenerated when the recorded fingerprint is stale. Their outputs
are noise: they are tiny instances of the real architectures.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from typing import Callable

import torch
from torch import nn

MARKER = "lightx2v_tiny.json"
"""The generator's record in a tiny checkpoint folder: {"version", "fingerprint", ...}."""


def cache_root() -> str:
    return os.environ.get("LIGHTX2V_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lightx2v")


def randomize_(module: nn.Module, seed: int = 0, scale: float = 1.0, qk_gain: float = 1.0) -> nn.Module:
    """Deterministic random weights that depend only on parameter names and shapes: biases
    0.02 * N(0, 1); 1-D scales (norm weights, `gamma`) 1 + 0.1 * N(0, 1), those of the attention
    q/k norms (`norm_q`, `norm_k`, `norm_added_q`, `norm_added_k`, as diffusers names them) times
    `qk_gain` (> 1 sharpens attention, so that which tokens are attended matters: the parity tests
    use it); embedding tables N(0, 1); other weights scale * N(0, 1) / sqrt(fan_in). Outputs are
    neither zero nor exploding."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            parts = name.split(".")
            if parts[-1] == "bias":
                value = 0.02 * noise
            elif p.ndim == 1 or parts[-1] == "gamma":
                value = 1.0 + 0.1 * noise
                if any(n in parts for n in ("norm_q", "norm_k", "norm_added_q", "norm_added_k")):
                    value = qk_gain * value
            elif p.ndim == 2 and isinstance(module.get_submodule(".".join(parts[:-1])), nn.Embedding):
                value = noise
            else:
                value = scale * noise / max(1, p[0].numel()) ** 0.5
            p.copy_(value.to(p.dtype))
    return module


def save_diffusers_module(module: nn.Module, directory: str, config: dict, class_name: str,
                          dtype: torch.dtype | None = None) -> None:
    """`module`'s weights (floating ones cast to `dtype` when given) and its diffusers
    `config.json` into `directory`, as diffusers' `save_pretrained` lays them out."""
    from safetensors.torch import save_file

    os.makedirs(directory, exist_ok=True)
    state = {k: v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype).contiguous()
             for k, v in module.state_dict().items()}
    save_file(state, os.path.join(directory, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({"_class_name": class_name, "_diffusers_version": "0.42.1", **config}, f, indent=2)


def is_current(directory: str, fingerprint: str) -> bool:
    """Whether `directory` holds a tiny checkpoint written with this generator fingerprint."""
    try:
        with open(os.path.join(directory, MARKER)) as f:
            return json.load(f).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def materialize(version: str, fingerprint: str, write: Callable[[str], None], root: str | None = None) -> str:
    """The folder `<root>/<version>` written by `write(folder)`, generated on first use or when
    stale (see the module docstring). Returns its path."""
    root = root or cache_root()
    final = os.path.join(root, version)
    if is_current(final, fingerprint):
        return final
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{version}-", dir=root)
    try:
        write(tmp)
        if os.path.isdir(final) and not is_current(final, fingerprint):
            # stale (older generator or module layout): move it aside, then drop it
            stale = os.path.join(root, f".{version}-stale-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(final, stale)
                shutil.rmtree(stale, ignore_errors=True)
            except OSError:
                pass  # another process replaced it first
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_current(final, fingerprint):  # another process won the race with a stale one
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return final
