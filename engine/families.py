"""Model families: the protocols a family implements, and the table of built-in families.

A family lives in its own folder (`engine/models/<family>/`) and owns everything model-specific:
its registry entries, how it recognises its checkpoints, its component loaders, and its DiT
adapter (how conditioning and timesteps enter its DiT, what happens to the latents around it).
Shared code (denoise loop, guidance, parallelism, offload, stages, cluster, serving) talks to a
family only through these protocols and the seams its DiT class declares (engine/dit.py).
Adding a family = its folder and one line in `_BUILTIN`.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from PIL import Image

    from engine.loading import Checkpoint, Layout
    from engine.options import EngineOptions
    from engine.registry import ModelSpec


class TextEncoder(Protocol):
    """`reads_images` (optional attribute, default False): the encoder also takes the request's
    input images, `encode(prompts, images=[...])` (a vision-language encoder: Qwen-Image-Edit)."""

    def encode(self, prompts: list[str]) -> "Tensor | list":
        """Each prompt's text conditioning: a (B, L, D) tensor (Wan: umT5 states zero-padded after
        each prompt's valid tokens), or a list of the family's own per-prompt objects (several
        streams, masks, variable lengths) with a `.to(device, dtype)` that returns a copy; the
        family's adapter turns one into the DiT's input (`DiTAdapter.text_input`)."""
        ...


class ImageEncoder(Protocol):
    def encode(self, images: list) -> Tensor:
        """(B, tokens, dim) image tokens for the DiT's cross-attention."""
        ...


class LatentCodec(Protocol):
    """The VAE: pixels <-> the DiT's (normalised) latents."""

    def encode(self, video: Tensor) -> Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> normalised latents (B, C, F_lat, H_lat, W_lat)."""
        ...

    def decode(self, latents: Tensor) -> Tensor:
        """Normalised latents -> (B, 3, F, H, W) in [-1, 1]."""
        ...


class ModelInput(Protocol):
    """What the adapter hands the guided predictor for one step."""

    x: Tensor
    """(1, C_in, F_lat, H_lat, W_lat) DiT input in the model dtype."""
    timestep: Tensor
    """(1,) or per token (1, L), float32 in [0, 1000]."""


class DiTAdapter(Protocol):
    """How a family's conditioning enters its DiT. Stateless; one per model variant.

    The denoise loop keeps the sampler's latents (1, C, F_lat, H_lat, W_lat) float32 and asks the
    adapter, every step, for the DiT's input (`model_input`); after the last step it asks for the
    latents to decode (`final_latents`). The image stage asks it for the image conditioning.
    """

    def image_condition(self, image: "Image.Image", num_frames: int, height: int, width: int,
                        vae: LatentCodec, image_encoder: ImageEncoder | None, device: torch.device,
                        dtype: torch.dtype) -> "object":
        """The `stages.payloads.ImageCond` of one input image (CPU tensors)."""
        ...

    def text_input(self, embeds: "object", device: torch.device, dtype: torch.dtype) -> "object":
        """One prompt's embeddings (what the text encoder made for it) as the DiT's `context`
        argument at batch 1, on `device` in `dtype`."""
        ...

    def model_input(self, latents: Tensor, t: Tensor, image: "object | None", dit: nn.Module,
                    dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor | None]:
        """(x, timestep, image_tokens) for the DiT at sampler timestep `t` (a 0-d tensor). An
        adapter with `uses_next_timestep = True` (optional attribute, default False) is also given
        `t_next=` the next step's timestep (0 after the last step): MeanFlow DiTs take both."""
        ...

    def final_latents(self, latents: Tensor, image: "object | None") -> Tensor:
        """The latents after the last step, as the VAE should decode them."""
        ...

    def dummy_inputs(self, dit: nn.Module, text_len: int, device: torch.device,
                     dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """(x, timestep, context, image_tokens) at a tiny size, for warm-up forwards."""
        ...


class ModelFamily(Protocol):
    name: str

    def detect_spec(self, path: str, layout: "Layout", spec_name: str | None = None) -> "ModelSpec | None":
        """The variant held by a checkpoint folder, or None if the folder is not of this family.
        Refuses (ValueError) a folder of this family with a component it would not load."""
        ...

    def adapter(self, spec: "ModelSpec") -> DiTAdapter: ...

    def load_text_encoder(self, ckpt: "Checkpoint", options: "EngineOptions") -> TextEncoder: ...

    def load_image_encoder(self, ckpt: "Checkpoint", options: "EngineOptions") -> ImageEncoder | None:
        """The image tower of an image-conditioned model, None when the model conditions on VAE
        latents only."""
        ...

    def load_dits(self, ckpt: "Checkpoint", options: "EngineOptions") -> dict[str, nn.Module]:
        """Every expert's DiT by `Expert.name`, with the options' quantization, kernels,
        compile and offload applied."""
        ...

    def load_vae(self, ckpt: "Checkpoint", options: "EngineOptions") -> LatentCodec: ...


# family name -> "module:attribute" of a ModelFamily instance; importing the module registers the
# family's entries in engine.registry
_BUILTIN: dict[str, str] = {
    "hunyuanvideo-1.5": "engine.models.hunyuan_video15.family:HUNYUAN_VIDEO15",
    "wan": "engine.models.wan.family:WAN",
    "qwen_image": "engine.models.qwen_image.family:QWEN_IMAGE",
}
_FAMILIES: dict[str, ModelFamily] = {}


def list_families() -> list[str]:
    return sorted(_BUILTIN)


def get_family(name: str) -> ModelFamily:
    """The family registered under `name` (the `family` field of a ModelSpec)."""
    if name not in _FAMILIES:
        if name not in _BUILTIN:
            raise KeyError(f"unknown model family {name!r}; known families: {', '.join(list_families())}")
        module_name, attr = _BUILTIN[name].split(":")
        _FAMILIES[name] = getattr(importlib.import_module(module_name), attr)
    return _FAMILIES[name]


def load_builtin_families() -> None:
    """Import every built-in family (each registers its entries once)."""
    for name in _BUILTIN:
        get_family(name)


def detect_spec(path: str, layout: "Layout", spec_name: str | None = None) -> "ModelSpec":
    """Ask every family whether it recognises the folder; the first that does names the variant."""
    for name in list_families():
        spec = get_family(name).detect_spec(path, layout, spec_name)
        if spec is not None:
            return spec
    raise ValueError(
        f"{path} ({layout} layout) is not recognised by any model family "
        f"({', '.join(list_families())}): its config matches none of them"
    )
