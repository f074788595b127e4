"""The Qwen-Image family (Qwen-Image, -2512, Qwen-Image-Edit, -2509, -2511): recognising a
checkpoint's variant, and its components.

A folder is a Qwen-Image checkpoint when it is in the diffusers layout and its DiT config is a
`QwenImageTransformer2DModel`'s (the releases come in no other layout). Its variant
(`specs.QwenVariant`) is read from the folder: the pipeline from model_index.json's `_class_name`
(text-to-image, Edit, Edit-Plus), `zero_cond_t` and the DiT's size from the DiT config. A pipeline
we do not implement (Qwen-Image-Layered, the ControlNet and inpainting pipelines) or a component
the loaders would not use is refused: never a silent partial load.
"""
from __future__ import annotations

import dataclasses
import logging
import os

import torch

from engine.loading import Checkpoint, Layout, read_json
from engine.models.qwen_image import loader
from engine.models.qwen_image.adapter import QwenImageAdapter
from engine.models.qwen_image.specs import (
    FAMILY, PIPELINES, REAL_ARCH, SPECS, TINY_AREAS, TINY_ARCH, VARIANTS, QwenArch, QwenVariant,
)
from engine.offload import check_expert_offload
from engine.options import EngineOptions
from engine.registry import ModelSpec, get_spec

log = logging.getLogger(__name__)

_COMPONENTS = {"scheduler", "text_encoder", "tokenizer", "transformer", "vae"}


def _components(model_index: dict) -> set[str]:
    """The components a model_index.json names (entries like ["diffusers", "Class"], not null)."""
    return {k for k, v in model_index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1] is not None}


class QwenImageFamily:
    """See the module docstring."""

    name = FAMILY

    # -- variant detection ----------------------------------------------------------------------

    def _read_variant(self, path: str, layout: Layout) -> QwenVariant | None:
        if layout != "diffusers":
            return None
        config_path = os.path.join(path, "transformer", "config.json")
        if not (os.path.isfile(config_path) and
                read_json(config_path).get("_class_name") == loader.DIFFUSERS_TRANSFORMER_CLASS):
            return None
        index = read_json(os.path.join(path, "model_index.json"))
        pipeline = index.get("_class_name")
        if pipeline not in PIPELINES:
            raise ValueError(f"{path}: pipeline {pipeline!r} is not supported for Qwen-Image DiTs; "
                             f"supported: {', '.join(PIPELINES)}")
        used = _COMPONENTS | ({"processor"} if PIPELINES[pipeline].edits else set())
        unused, missing = sorted(_components(index) - used), sorted(used - _components(index))
        if unused or missing:
            raise ValueError(f"{path}: model_index.json of a {pipeline} must name exactly {sorted(used)}; "
                             f"{'unused: ' + str(unused) if unused else ''}"
                             f"{' missing: ' + str(missing) if missing else ''}; refusing a partial load")
        config = loader.read_dit_config(path)
        arch = QwenArch.of(config)
        return QwenVariant(arch, pipeline, config.zero_cond_t, **(TINY_AREAS if arch == TINY_ARCH else {}))

    def detect_spec(self, path: str, layout: Layout, spec_name: str | None = None) -> ModelSpec | None:
        """The registered variant whose shape the folder matches (the first such entry unless
        `spec_name` picks another); a spec derived from the family defaults when none does."""
        variant = self._read_variant(path, layout)
        if variant is None:
            return None
        matching = [spec for spec, spec_variant in SPECS if spec_variant == variant]
        if spec_name is not None:
            wanted = get_spec(spec_name)
            if wanted not in matching:
                raise ValueError(f"spec_name={spec_name!r} does not fit the checkpoint in {path} ({variant}); "
                                 f"entries that fit: {[s.name for s in matching] or 'none'}")
            return wanted
        if matching:
            return matching[0]
        # Same pipeline and zero_cond_t, another size: the real entry of that kind, renamed.
        kind = next(spec for spec, v in SPECS if (v.pipeline, v.zero_cond_t, v.arch) ==
                    (variant.pipeline, variant.zero_cond_t, REAL_ARCH))
        derived = dataclasses.replace(kind, name=f"{kind.name}-custom", aliases=(), materialize=None,
                                      description=f"derived from the config in {path}")
        log.warning("checkpoint %s matches no registered Qwen-Image variant (%s); using %s", path, variant,
                    derived.name)
        VARIANTS.setdefault(derived.name, variant)
        return derived

    def _variant(self, spec: ModelSpec) -> QwenVariant:
        try:
            return VARIANTS[spec.name]
        except KeyError:
            raise ValueError(f"{spec.name!r} is not a Qwen-Image variant this family registered") from None

    # -- components -----------------------------------------------------------------------------

    def adapter(self, spec: ModelSpec) -> QwenImageAdapter:
        return QwenImageAdapter(self._variant(spec).reference_area)

    def load_dits(self, ckpt: Checkpoint, options: EngineOptions) -> dict[str, torch.nn.Module]:
        check_expert_offload(ckpt.spec, options)
        return {ckpt.spec.experts[0].name: loader.load_dit(ckpt, options)}

    def load_vae(self, ckpt: Checkpoint, options: EngineOptions) -> torch.nn.Module:
        return loader.load_vae(ckpt, options)

    def load_text_encoder(self, ckpt: Checkpoint, options: EngineOptions):
        return loader.load_text_encoder(ckpt, options, self._variant(ckpt.spec))

    def load_image_encoder(self, ckpt: Checkpoint, options: EngineOptions) -> None:
        """None: the edit models' images condition the prompt through the text encoder (Qwen2.5-VL)
        and enter the DiT as VAE latents (the adapter); refused for text-to-image models."""
        if "edit" not in ckpt.spec.tasks:
            raise ValueError(f"model {ckpt.spec.name!r} takes no input image (tasks: {sorted(ckpt.spec.tasks)})")
        return None


QWEN_IMAGE = QwenImageFamily()
