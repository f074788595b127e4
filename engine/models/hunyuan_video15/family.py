"""The HunyuanVideo-1.5 family: recognising a checkpoint's variant, and its components.

Diffusers layout: a folder whose `transformer/config.json` is a `HunyuanVideo15Transformer3DModel`.
Its variant (`specs.Variant`) is the DiT's architecture and size buckets (`target_size`), the task
of its pipeline (`model_index.json` `_class_name`: HunyuanVideo15Pipeline = text-to-video,
HunyuanVideo15ImageToVideoPipeline = image-to-video) and its distillation (MeanFlow DiT = step-
distilled; a guider with guidance_scale 1 = CFG-distilled). The folder's guider sets the default
guidance scale (its scheduler the shift: engine.checkpoint), as diffusers samples it; a guider
option this engine does not implement (rescale, a start/stop window, the original formulation) is
refused, naming it.

Official layout (tencent/HunyuanVideo-1.5): `transformer/<version>/` folders, one per released
variant, beside `vae/`, `text_encoder/`, `vision_encoder/`. The registry entry says which version
folder it loads (`Variant.official_dir`); without `spec_name` the first registered entry whose
folder is present (and whose architecture the folder's config has) is taken, logged.

A component the loaders would not use (an unknown one, an image encoder in a text-to-video
folder) is refused: never a silent partial load.
"""
from __future__ import annotations

import logging
import os

import torch

from engine.loading import Checkpoint, Layout, read_json
from engine.models.hunyuan_video15 import loader
from engine.models.hunyuan_video15.adapter import HunyuanVideo15Adapter
from engine.models.hunyuan_video15.specs import FAMILY, SPECS, VARIANTS, Arch, Variant, _defaults, _spec
from engine.offload import check_expert_offload
from engine.options import EngineOptions
from engine.registry import ModelSpec, get_spec

log = logging.getLogger(__name__)

DIFFUSERS_TRANSFORMER_CLASS = "HunyuanVideo15Transformer3DModel"
OFFICIAL_TRANSFORMER_KEYS = {"hidden_size", "heads_num", "mm_double_blocks_depth"}
PIPELINE_TASKS = {"HunyuanVideo15Pipeline": "t2v", "HunyuanVideo15ImageToVideoPipeline": "i2v"}
_T2V_COMPONENTS = {"transformer", "vae", "scheduler", "guider", "text_encoder", "tokenizer", "text_encoder_2",
                   "tokenizer_2"}
_I2V_COMPONENTS = _T2V_COMPONENTS | {"image_encoder", "feature_extractor"}
GUIDER_CLASS = "ClassifierFreeGuidance"
_GUIDER_FIXED = {"guidance_rescale": 0.0, "use_original_formulation": False, "start": 0.0, "stop": 1.0}
"""ClassifierFreeGuidance options this engine implements only at these values (diffusers' defaults)."""


def _components(model_index: dict) -> set[str]:
    return {k for k, v in model_index.items()
            if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[1] is not None}


def guider_scale(path: str) -> float:
    """The guidance scale of a diffusers folder's `guider/guider_config.json` (1.0 when disabled);
    ValueError naming an option this engine does not implement."""
    file = os.path.join(path, "guider", "guider_config.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path}: no guider/guider_config.json (HunyuanVideo-1.5 pipelines guide with it)")
    config = read_json(file)
    if config.get("_class_name", GUIDER_CLASS) != GUIDER_CLASS:
        raise ValueError(f"{file}: guider {config['_class_name']!r} is not supported (only {GUIDER_CLASS})")
    for key, value in _GUIDER_FIXED.items():
        if key in config and config[key] != value:
            raise ValueError(f"{file}: {key}={config[key]!r} is not supported (only {value!r})")
    if not config.get("enabled", True):
        return 1.0
    return float(config.get("guidance_scale", 7.5))


def official_versions(path: str) -> list[str]:
    """The DiT folders of an official release folder (`transformer/<version>/config.json` with an
    official HunyuanVideo-1.5 DiT config), sorted."""
    root = os.path.join(path, loader.OFFICIAL_DIT_DIR)
    if not os.path.isdir(root):
        return []
    found = []
    for name in sorted(os.listdir(root)):
        config = os.path.join(root, name, "config.json")
        if os.path.isfile(config) and OFFICIAL_TRANSFORMER_KEYS <= read_json(config).keys():
            found.append(name)
    return found


class HunyuanVideo15Family:
    """See the module docstring."""

    name = FAMILY

    # -- variant detection ----------------------------------------------------------------------

    def detect_spec(self, path: str, layout: Layout, spec_name: str | None = None) -> ModelSpec | None:
        if layout == "diffusers":
            return self._detect_diffusers(path, spec_name)
        return self._detect_official(path, spec_name)

    def _detect_diffusers(self, path: str, spec_name: str | None) -> ModelSpec | None:
        config_file = os.path.join(path, "transformer", "config.json")
        if not os.path.isfile(config_file) or read_json(config_file).get("_class_name") != DIFFUSERS_TRANSFORMER_CLASS:
            return None
        index = read_json(os.path.join(path, "model_index.json"))
        pipeline = index.get("_class_name")
        if pipeline not in PIPELINE_TASKS:
            raise ValueError(f"{path}: model_index.json _class_name {pipeline!r} is not a HunyuanVideo-1.5 pipeline "
                             f"({', '.join(PIPELINE_TASKS)})")
        task = PIPELINE_TASKS[pipeline]
        unused = sorted(_components(index) - (_I2V_COMPONENTS if task == "i2v" else _T2V_COMPONENTS))
        if unused:
            raise ValueError(f"{path}: model_index.json has components {pipeline} does not use: {unused}; "
                             "refusing a partial load")
        config = loader.read_dit_config(path, "diffusers", None, 0)
        guidance = guider_scale(path)
        distill = "step" if config.use_meanflow else ("cfg" if guidance == 1.0 else "none")
        variant = Variant(Arch.of(config), config.target_size, task, distill)
        matching = [s for s, v in SPECS if (v.arch, v.target_size, v.task, v.distill) ==
                    (variant.arch, variant.target_size, variant.task, variant.distill)]
        spec = self._pick(path, variant, matching, spec_name)
        return spec.with_defaults(guidance_scale=guidance)

    def _detect_official(self, path: str, spec_name: str | None) -> ModelSpec | None:
        versions = official_versions(path)
        if not versions:
            return None
        if spec_name is not None:
            wanted = get_spec(spec_name)
            variant = VARIANTS.get(wanted.name)
            if variant is None or variant.official_dir not in versions:
                raise ValueError(f"spec_name={spec_name!r} does not fit {path}: its DiT folder "
                                 f"{loader.OFFICIAL_DIT_DIR}/{variant.official_dir if variant else '?'} is not "
                                 f"there (found: {versions})")
            self._check_arch(path, wanted.name, variant)
            return wanted
        for spec, variant in SPECS:
            if variant.official_dir in versions and self._arch_of(path, variant) == variant.arch:
                others = [v for v in versions if v != variant.official_dir]
                if others:
                    log.info("%s holds the DiTs %s; using %s (%s); pass spec_name for another", path, versions,
                             variant.official_dir, spec.name)
                return spec
        known = sorted({v.official_dir for _, v in SPECS if v.official_dir})
        raise ValueError(f"{path}: none of its DiT folders {versions} is a registered HunyuanVideo-1.5 variant "
                         f"with this architecture (registered folders: {known})")

    @staticmethod
    def _arch_of(path: str, variant: Variant) -> Arch:
        return Arch.of(loader.read_dit_config(path, "official", variant.official_dir, variant.target_size))

    def _check_arch(self, path: str, name: str, variant: Variant) -> None:
        arch = self._arch_of(path, variant)
        if arch != variant.arch:
            raise ValueError(f"{path}/{loader.OFFICIAL_DIT_DIR}/{variant.official_dir}: the DiT is {arch}, "
                             f"{name} expects {variant.arch}")

    @staticmethod
    def _pick(path: str, variant: Variant, matching: list[ModelSpec], spec_name: str | None) -> ModelSpec:
        if spec_name is not None:
            wanted = get_spec(spec_name)
            if wanted not in matching:
                raise ValueError(f"spec_name={spec_name!r} does not fit the checkpoint in {path} ({variant}); "
                                 f"entries that fit: {[s.name for s in matching] or 'none'}")
            return wanted
        if matching:
            return matching[0]
        guidance = 1.0 if variant.distill != "none" else 6.0
        distill = "" if variant.distill == "none" else f"-{variant.distill}-distilled"
        name = f"{FAMILY}-{variant.target_size}px-{variant.task}{distill}-custom"
        spec, _ = _spec(name, variant, {variant.task},
                        _defaults(variant.target_size, guidance, 5.0), f"derived from the config in {path}")
        log.warning("checkpoint %s matches no registered HunyuanVideo-1.5 variant (%s); using a spec derived "
                    "from the family defaults: %s", path, variant, spec.name)
        VARIANTS.setdefault(spec.name, variant)
        return spec

    def variant(self, spec: ModelSpec) -> Variant:
        try:
            return VARIANTS[spec.name]
        except KeyError:
            raise ValueError(f"{spec.name!r} is not a HunyuanVideo-1.5 variant this family registered") from None

    # -- components -----------------------------------------------------------------------------

    def adapter(self, spec: ModelSpec) -> HunyuanVideo15Adapter:
        return HunyuanVideo15Adapter()

    def load_dits(self, ckpt: Checkpoint, options: EngineOptions) -> dict[str, torch.nn.Module]:
        check_expert_offload(ckpt.spec, options)
        variant = self.variant(ckpt.spec)
        dit = loader.load_dit(ckpt, options, variant.official_dir, variant.target_size)
        if dit.config.use_meanflow != variant.arch.use_meanflow:
            raise ValueError(f"{ckpt.path}: use_meanflow={dit.config.use_meanflow} does not fit {ckpt.spec.name}")
        return {ckpt.spec.experts[0].name: dit}

    def load_vae(self, ckpt: Checkpoint, options: EngineOptions) -> torch.nn.Module:
        return loader.load_vae(ckpt, options)

    def load_text_encoder(self, ckpt: Checkpoint, options: EngineOptions):
        return loader.load_text_encoder(ckpt, options)

    def load_image_encoder(self, ckpt: Checkpoint, options: EngineOptions):
        if "i2v" not in ckpt.spec.tasks:
            raise ValueError(f"model {ckpt.spec.name!r} has no image encoder (tasks: {sorted(ckpt.spec.tasks)})")
        return loader.load_image_encoder(ckpt, options)


HUNYUAN_VIDEO15 = HunyuanVideo15Family()
