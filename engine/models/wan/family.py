"""The Wan family (Wan2.1, Wan2.2): recognising a checkpoint's variant, and its components.

A folder is a Wan checkpoint when its DiT config is a Wan DiT's. Its variant (`WanVariant`) is
read from the checkpoint itself: the DiT architecture from the (first) DiT config, the number of
experts from `transformer_2` in model_index.json (diffusers) or the `high_noise_model/` +
`low_noise_model/` folders (official), per-token timesteps from model_index.json's
`expand_timesteps` (diffusers) or the 48-channel TI2V DiT (official). A diffusers folder's
`boundary_ratio` replaces the entry's. A component the loaders would not use (e.g. an image
encoder for a DiT without an image branch, an unknown component) is refused: never a silent
partial load.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

from engine.loading import Checkpoint, Layout, read_json
from engine.lora import LoRAKeys
from engine.models.wan import keymap_dit, loader
from engine.models.wan.loader import OFFICIAL_EXPERT_DIRS
from engine.models.wan.adapter import ConcatAdapter, FirstFrameAdapter
from engine.models.wan.specs import (
    FAMILY, I2V_DEFAULTS, SPECS, T2V_DEFAULTS, TWO_EXPERTS, VARIANTS, WanArch, WanVariant,
)
from engine.offload import check_expert_offload
from engine.options import EngineOptions
from engine.registry import ModelSpec, get_spec

log = logging.getLogger(__name__)

DIFFUSERS_TRANSFORMER_CLASS = "WanTransformer3DModel"
OFFICIAL_TRANSFORMER_CLASS = "WanModel"
_DIFFUSERS_COMPONENTS = {"text_encoder", "tokenizer", "transformer", "vae", "scheduler"}



def dit_dirs(path: str, layout: Layout, experts: int) -> list[str]:
    """The folders of a checkpoint's DiTs, the (high-noise) first expert first."""
    if layout == "diffusers":
        return [os.path.join(path, "transformer"), os.path.join(path, "transformer_2")][:experts]
    if experts == 1:
        return [path]
    return [os.path.join(path, d) for d in OFFICIAL_EXPERT_DIRS]


def _components(model_index: dict) -> set[str]:
    """The components a model_index.json names (entries like ["diffusers", "Class"], not null)."""
    return {k for k, v in model_index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1] is not None}


class WanFamily:
    """See the module docstring."""

    name = FAMILY
    lora_keys = LoRAKeys(keymap_dit.official_to_diffusers, keymap_dit.diffusers_to_official)
    """engine.lora: LoRA files in the official release's names map to the DiT's as its checkpoints do."""

    # -- variant detection ----------------------------------------------------------------------

    def _read_variant(self, path: str, layout: Layout) -> tuple[WanVariant, float | None] | None:
        """(variant, the folder's boundary_ratio or None), or None when the folder is not Wan's."""
        if layout == "diffusers":
            config = os.path.join(path, "transformer", "config.json")
            if not (os.path.isfile(config) and read_json(config).get("_class_name") == DIFFUSERS_TRANSFORMER_CLASS):
                return None
            index = read_json(os.path.join(path, "model_index.json"))
            experts = 2 if "transformer_2" in _components(index) else 1
            arch = WanArch.of(loader.read_dit_config(dit_dirs(path, layout, 1)[0], layout))
            variant = WanVariant(arch, experts, bool(index.get("expand_timesteps", False)))
            self._check_components(path, index, variant)
            return variant, index.get("boundary_ratio")
        experts = 1 if os.path.isfile(os.path.join(path, "config.json")) else 2
        if experts == 2 and not all(os.path.isdir(d) for d in dit_dirs(path, layout, 2)):
            return None  # not a Wan release: its DiTs sit in other sub-folders
        first = dit_dirs(path, layout, experts)[0]
        d = read_json(os.path.join(first, "config.json"))
        if not (d.get("_class_name") == OFFICIAL_TRANSFORMER_CLASS or {"dim", "num_heads", "in_dim"} <= d.keys()):
            return None
        arch = WanArch.of(loader.read_dit_config(first, layout))
        return WanVariant(arch, experts, expand_timesteps=d.get("model_type") == "ti2v"), None

    @staticmethod
    def _check_components(path: str, index: dict, variant: WanVariant) -> None:
        """Refuse a diffusers folder with a component the loaders would not use, or a two-expert
        folder without its boundary."""
        used = set(_DIFFUSERS_COMPONENTS)
        if variant.experts == 2:
            used.add("transformer_2")
            if index.get("boundary_ratio") is None:
                raise ValueError(f"{path}: model_index.json names transformer_2 but no boundary_ratio "
                                 "(which expert serves which timesteps is undefined)")
        if variant.arch.image_dim is not None:
            used |= {"image_encoder", "image_processor"}
        unused = sorted(_components(index) - used)
        if unused:
            raise ValueError(
                f"{path}: model_index.json has components this Wan variant does not use: {unused} "
                f"(the DiT {'has' if variant.arch.image_dim else 'has no'} image branch, "
                f"{variant.experts} expert(s)); refusing a partial load")

    def detect_spec(self, path: str, layout: Layout, spec_name: str | None = None) -> ModelSpec | None:
        """The registered variant whose shape the folder matches; the first such entry unless
        `spec_name` picks another; a derived spec when none matches."""
        found = self._read_variant(path, layout)
        if found is None:
            return None
        variant, boundary = found
        matching = [spec for spec, spec_variant in SPECS if spec_variant == variant]
        if spec_name is not None:
            wanted = get_spec(spec_name)
            if wanted not in matching:
                raise ValueError(
                    f"spec_name={spec_name!r} does not fit the checkpoint in {path} ({variant}); "
                    f"entries that fit: {[s.name for s in matching] or 'none'}"
                )
            spec = wanted
        elif matching:
            spec = matching[0]
        else:
            spec = self._derived_spec(path, variant, boundary)
        if boundary is not None and boundary != spec.boundary_ratio:
            spec = dataclasses.replace(spec, boundary_ratio=boundary)  # the folder's, as diffusers
        return spec

    @staticmethod
    def _derived_spec(path: str, variant: WanVariant, boundary: float | None) -> ModelSpec:
        tasks = variant.tasks
        two = variant.experts == 2
        derived = ModelSpec(
            name=f"{FAMILY}-{'-'.join(sorted(tasks))}-custom", family=FAMILY, tasks=tasks,
            defaults=I2V_DEFAULTS if tasks == {"i2v"} else T2V_DEFAULTS, latent=variant.latent,
            experts=TWO_EXPERTS if two else SPECS[0][0].experts,
            boundary_ratio=(boundary if boundary is not None else 0.875) if two else None,
            description=f"derived from the config in {path}",
        )
        log.warning("checkpoint %s matches no registered Wan variant (%s); using a spec derived from "
                    "the family defaults: %s", path, variant, derived.name)
        VARIANTS.setdefault(derived.name, variant)
        return derived

    def _variant(self, spec: ModelSpec) -> WanVariant:
        try:
            return VARIANTS[spec.name]
        except KeyError:
            raise ValueError(f"{spec.name!r} is not a Wan variant this family registered") from None

    # -- components -----------------------------------------------------------------------------

    def adapter(self, spec: ModelSpec):
        return FirstFrameAdapter() if self._variant(spec).expand_timesteps else ConcatAdapter()

    def load_dits(self, ckpt: Checkpoint, options: EngineOptions) -> dict[str, torch.nn.Module]:
        """Every expert's DiT (`load_dit` each; FP8/INT8, kernels, compile and offload apply to
        every expert). offload="expert" is for models with several experts."""
        check_expert_offload(ckpt.spec, options)
        experts = ckpt.spec.experts
        dirs = dit_dirs(ckpt.path, ckpt.layout, len(experts))
        return {expert.name: loader.load_dit(d, ckpt.layout, options) for expert, d in zip(experts, dirs)}

    def load_vae(self, ckpt: Checkpoint, options: EngineOptions) -> torch.nn.Module:
        return loader.load_vae(ckpt, options)

    def load_text_encoder(self, ckpt: Checkpoint, options: EngineOptions):
        return loader.load_text_encoder(ckpt, options)

    def load_image_encoder(self, ckpt: Checkpoint, options: EngineOptions):
        """CLIP for a DiT with an image branch (Wan2.1 I2V, tiny-wan); None for Wan2.2 (the image
        enters through the VAE only); refused for a text-only model."""
        if not ckpt.spec.tasks & {"i2v"}:
            raise ValueError(f"model {ckpt.spec.name!r} has no image encoder (tasks: {sorted(ckpt.spec.tasks)})")
        if self._variant(ckpt.spec).arch.image_dim is None:
            return None
        return loader.load_clip(ckpt, options)


WAN = WanFamily()
