"""Checkpoint loading: weights files and meta-device module building (layout and variant
detection, and resolving a model name to a folder: engine/checkpoint.py).

Two checkpoint layouts are understood:

- "diffusers": a pipeline folder with `model_index.json` and one sub-folder per component
  (`transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `image_encoder/`, `image_processor/`).
- "official": the model authors' release folder, e.g. for Wan a root `config.json` plus
  `diffusion_pytorch_model*.safetensors`, `Wan2.1_VAE.pth`, `models_t5_umt5-xxl-enc-bf16.pth`, ...

Modules are built with their parameters on the meta device and the checkpoint tensors assigned
(`load_state_dict(strict=True, assign=True)`), so weights are never initialised twice.
Which model family and variant a folder holds is decided by the families from its config
(never from the directory name).
"""
from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, TypeVar

import torch
from torch import nn

from engine.dit import in_fp32_modules
from engine.quant.checkpoint import QUANTIZED_SUFFIXES
from engine.registry import ModelSpec

log = logging.getLogger(__name__)

Layout = Literal["diffusers", "official"]
M = TypeVar("M", bound=nn.Module)

DIFFUSERS_MARKER = "model_index.json"
OFFICIAL_CONFIG = "config.json"
OFFICIAL_WEIGHTS_STEM = "diffusion_pytorch_model"


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint folder on local disk, its layout and the model variant it holds."""

    path: str
    layout: Layout
    spec: ModelSpec

    def file(self, *parts: str) -> str:
        """Path of a file or folder inside the checkpoint."""
        return os.path.join(self.path, *parts)


# --------------------------------------------------------------------------- weights files


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def safetensors_files(directory: str, stem: str = OFFICIAL_WEIGHTS_STEM) -> list[str]:
    """The safetensors files of one model in `directory`: the shards named by
    `{stem}.safetensors.index.json`, else `{stem}.safetensors`, else `{stem}*.safetensors`."""
    index = os.path.join(directory, f"{stem}.safetensors.index.json")
    if os.path.isfile(index):
        shards = sorted(set(read_json(index)["weight_map"].values()))
        files = [os.path.join(directory, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"{index} names shards that do not exist: {missing}")
        return files
    single = os.path.join(directory, f"{stem}.safetensors")
    if os.path.isfile(single):
        return [single]
    shards = sorted(glob.glob(os.path.join(glob.escape(directory), f"{stem}*.safetensors")))
    if shards:
        return shards
    raise FileNotFoundError(
        f"no weights in {directory}: looked for {stem}.safetensors.index.json, {stem}.safetensors "
        f"and {stem}-*.safetensors"
    )


class LazyTensor:
    """A tensor left in its safetensors file until `load()` (so a whole checkpoint is never held
    in host memory: `build_module` reads, casts and moves one tensor at a time)."""

    __slots__ = ("_handle", "key", "shape")

    def __init__(self, handle, key: str) -> None:
        self._handle = handle
        self.key = key
        self.shape = tuple(handle.get_slice(key).get_shape())

    def load(self) -> torch.Tensor:
        return self._handle.get_tensor(self.key)

    def __repr__(self) -> str:
        return f"LazyTensor({self.key!r}, shape={self.shape})"


Weights = dict[str, "torch.Tensor | LazyTensor"]


def lazy_safetensors(path: str, stem: str = OFFICIAL_WEIGHTS_STEM) -> dict[str, LazyTensor]:
    """Every tensor of a `.safetensors` file, or of the (possibly sharded) model in a folder, as a
    `LazyTensor` (nothing is read yet; key maps can rename them freely)."""
    from safetensors import safe_open

    files = [path] if os.path.isfile(path) else safetensors_files(path, stem)
    state_dict: dict[str, LazyTensor] = {}
    for file in files:
        handle = safe_open(file, framework="pt", device="cpu")
        keys = list(handle.keys())
        overlap = state_dict.keys() & set(keys)
        if overlap:
            raise ValueError(f"{file} repeats keys of an earlier shard, e.g. {sorted(overlap)[:3]}")
        state_dict.update({k: LazyTensor(handle, k) for k in keys})
    return state_dict


def read_safetensors(path: str, stem: str = OFFICIAL_WEIGHTS_STEM) -> dict[str, torch.Tensor]:
    """All tensors of a `.safetensors` file, or of the (possibly sharded) model in a folder, read now."""
    return {k: v.load() for k, v in lazy_safetensors(path, stem).items()}


def read_pth(path: str) -> dict[str, torch.Tensor]:
    """A `.pth` state dict (the official releases' format), loaded safely and memory-mapped."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    state_dict = torch.load(path, weights_only=True, map_location="cpu", mmap=True)
    if not isinstance(state_dict, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state_dict).__name__})")
    return state_dict


# --------------------------------------------------------------------------- module building


class _MetaPatch:
    """nn.Module.register_parameter, patched while any thread is inside `params_on_meta()`; the
    patch sends parameters to meta only on the threads that asked (a thread-local depth)."""

    lock = threading.Lock()
    users = 0                               # threads inside params_on_meta() now
    original: Callable | None = None        # the unpatched register_parameter while patched
    thread = threading.local()              # .depth > 0: this thread is inside

    @staticmethod
    def register_parameter(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if getattr(_MetaPatch.thread, "depth", 0) and param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        _MetaPatch.original(module, name, param)  # type: ignore[misc]


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Inside, new parameters are created on the meta device (no memory, no init cost).

    Buffers stay real: modules often compute non-persistent buffers (rotary tables, position
    ids) in `__init__`, and those are not in the checkpoint. Only the calling thread is affected:
    a module built meanwhile on another thread keeps real parameters.
    """
    with _MetaPatch.lock:
        if _MetaPatch.users == 0:
            _MetaPatch.original = nn.Module.register_parameter
            nn.Module.register_parameter = _MetaPatch.register_parameter  # type: ignore[method-assign]
        _MetaPatch.users += 1
    _MetaPatch.thread.depth = getattr(_MetaPatch.thread, "depth", 0) + 1
    try:
        yield
    finally:
        _MetaPatch.thread.depth -= 1
        with _MetaPatch.lock:
            _MetaPatch.users -= 1
            if _MetaPatch.users == 0:
                nn.Module.register_parameter = _MetaPatch.original  # type: ignore[method-assign]
                _MetaPatch.original = None


def match_prefix(prefix: str) -> Callable[[nn.Module, "Weights"], "Weights"]:
    """A `fit_keys` that adds or strips `prefix` so the checkpoint keys agree with the module's
    (transformers 5.2x flattened `CLIPVisionModel.vision_model.*` to the top level)."""

    def fit(module: nn.Module, state_dict: "Weights") -> "Weights":
        want = any(k.startswith(prefix) for k in module.state_dict().keys())
        have = any(k.startswith(prefix) for k in state_dict)
        if want and not have:
            return {prefix + k: v for k, v in state_dict.items()}
        if have and not want:
            return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state_dict.items()}
        return state_dict

    return fit


def cast_tensor(key: str, value: "torch.Tensor | LazyTensor", dtype: torch.dtype,
                keep_in_fp32: tuple[str, ...]) -> torch.Tensor:
    """Floating tensors to `dtype` (float32 for the keep-in-fp32 modules); others unchanged, and
    so are a pre-quantized linear's 8-bit weight and float32 scales (`engine.quant.checkpoint`)."""
    if isinstance(value, LazyTensor):
        value = value.load()
    if not value.is_floating_point() or key.endswith(QUANTIZED_SUFFIXES):
        return value
    return value.to(torch.float32 if in_fp32_modules(key, keep_in_fp32) else dtype)


def build_module(
    factory: Callable[[], M],
    state_dict: Weights,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    keep_in_fp32: tuple[str, ...] = (),
    fit_keys: Callable[[nn.Module, Weights], Weights] | None = None,
) -> M:
    """Build `factory()` with meta parameters and assign the checkpoint's tensors (strict).
    `state_dict` values may be tensors or `LazyTensor`s (read here, one at a time).

    Tensors are cast (`keep_in_fp32` modules stay float32) and moved to `device` one at a time,
    so at most one extra copy of a tensor exists at once. `fit_keys(module, state_dict)` may adapt
    the keys to the built module first (e.g. a prefix that differs between library versions).
    Returns the module in eval mode, without gradients (inference only).
    """
    device = torch.device(device)
    # 1. skeleton: parameters on meta, buffers real
    with params_on_meta():
        module = factory()
    if fit_keys is not None:
        state_dict = fit_keys(module, state_dict)
    # 2. cast + move the checkpoint tensors, releasing the CPU copies as we go
    #    (a value under two keys, e.g. tied embeddings, is read once and stays shared)
    ids = [id(v) for v in state_dict.values()]
    repeated = {i for i in ids if ids.count(i) > 1} if len(set(ids)) < len(ids) else set()
    ready: dict[str, torch.Tensor] = {}
    shared: dict[tuple[int, bool], tuple[object, torch.Tensor]] = {}  # (id, fp32) -> (source, result)
    for key in list(state_dict):
        value = state_dict.pop(key)
        if id(value) not in repeated:
            ready[key] = cast_tensor(key, value, dtype, keep_in_fp32).to(device)
            continue
        slot = (id(value), in_fp32_modules(key, keep_in_fp32))
        if slot not in shared:  # `shared` keeps the source alive, so its id is not reused
            shared[slot] = (value, cast_tensor(key, value, dtype, keep_in_fp32).to(device))
        ready[key] = shared[slot][1]
    del shared
    # 3. assign (strict: every key must match, both ways)
    try:
        module.load_state_dict(ready, strict=True, assign=True)
    except RuntimeError as e:
        raise RuntimeError(f"checkpoint does not fit {type(module).__name__}: {e}") from None
    # 4. everything left is a buffer computed in __init__: move it (keeping its dtype)
    still_meta = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    still_meta += [n for n, b in module.named_buffers() if b.device.type == "meta"]
    if still_meta:
        raise RuntimeError(f"{type(module).__name__}: tensors not in the checkpoint: {still_meta[:10]}")
    for sub in module.modules():
        for name, buf in list(sub.named_buffers(recurse=False)):
            if buf.device != device:
                sub._buffers[name] = buf.to(device)
    return module.eval().requires_grad_(False)
