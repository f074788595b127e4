"""Resolving a model to a checkpoint: a registry name or alias, or a local folder, its layout, and
the variant it holds (asked of the model families, never read from the folder's name); and
writing a pre-quantized copy of one (`quantize_checkpoint`).

Layouts:
- "diffusers": `model_index.json` and one sub-folder per component. The sampling defaults
  (solver, shift) of such a checkpoint come from its own `scheduler/scheduler_config.json`, as
  diffusers' pipelines sample it.
- "official": the authors' release folder: a root `config.json` with the DiT's
  `diffusion_pytorch_model*.safetensors`, or sub-folders each holding both (one per expert, e.g.
  Wan2.2 A14B's `high_noise_model/`, `low_noise_model/`: which is which is the family's
  business); the registry's defaults (the official repo's) apply.
"""
from __future__ import annotations

import glob
import logging
import os
import shutil

from engine.families import detect_spec, get_family
from engine.loading import (
    DIFFUSERS_MARKER, OFFICIAL_CONFIG, OFFICIAL_WEIGHTS_STEM, Checkpoint, Layout, read_json,
)
from engine.registry import ModelSpec, get_spec, list_specs

log = logging.getLogger(__name__)

SCHEDULER_CONFIG = os.path.join("scheduler", "scheduler_config.json")


def _has_official_dit(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, OFFICIAL_CONFIG)) and bool(
        glob.glob(os.path.join(glob.escape(directory), f"{OFFICIAL_WEIGHTS_STEM}*.safetensors")))


def detect_layout(path: str) -> Layout:
    """"diffusers" (`model_index.json`) or "official" (a DiT config + safetensors at the root, or
    in sub-folders: one per expert)."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    if os.path.isfile(os.path.join(path, DIFFUSERS_MARKER)):
        return "diffusers"
    if _has_official_dit(path) or any(_has_official_dit(e.path) for e in os.scandir(path) if e.is_dir()):
        return "official"
    present = sorted(os.listdir(path))[:20]
    raise ValueError(
        f"{path} is not a checkpoint folder this engine can read. Looked for: "
        f"'{DIFFUSERS_MARKER}' (diffusers layout), or '{OFFICIAL_CONFIG}' together with "
        f"'{OFFICIAL_WEIGHTS_STEM}*.safetensors' at the root or in its sub-folders (official release "
        f"layout). Found: {present}"
    )


def find_spec(name: str) -> ModelSpec | None:
    """The entry whose registry name or alias is `name` (case-insensitive), or None."""
    wanted = name.casefold()
    for spec in list_specs():
        if wanted == spec.name.casefold() or wanted in (a.casefold() for a in spec.aliases):
            return spec
    return None


def with_scheduler_defaults(spec: ModelSpec, path: str, layout: Layout) -> ModelSpec:
    """For a diffusers-layout folder with a scheduler config: the spec with the schedule that config
    and the folder's pipeline imply (solver, shift, dynamic shift, terminal stretch, spacing) as
    its defaults; a config option the samplers do not implement raises ValueError naming it."""
    if layout != "diffusers" or not os.path.isfile(os.path.join(path, SCHEDULER_CONFIG)):
        return spec
    from engine.samplers.config import checkpoint_scheduler_defaults

    try:
        found = checkpoint_scheduler_defaults(path)
    except ValueError as err:
        raise ValueError(f"{os.path.join(path, SCHEDULER_CONFIG)}: {err}") from None
    return spec.with_defaults(sampler=found.sampler, shift=found.shift, dynamic_shift=found.dynamic,
                              shift_terminal=found.shift_terminal, spacing=found.spacing)


def resolve_checkpoint(model: str, spec_name: str | None = None, *, revision: str | None = None,
                       download: bool = False) -> Checkpoint:
    """The checkpoint `model` names, looked for in this order (the first found wins):

    1. a local folder (`~` expanded);
    2. a registry name or alias, case-insensitive (`find_spec`: "wan2.1-t2v-14b",
       "Wan2.1-T2V-14B", "Wan-AI/Wan2.1-T2V-14B-Diffusers"); a generated (tiny) entry is
       materialised on first use, an entry with a `source` folder uses it; for the others, and
       for names the registry does not know, the weights are looked for in:
    3. `$LIGHTX2V_MODEL_ROOT/<name>`: the name as given, its last path component, and the entry's
       name and aliases (engine.hub.root_names);
    4. the Hugging Face hub cache (HF_HUB_CACHE / HF_HOME), by the name when it is a hub id and
       by the entry's hub ids, at `revision` (a branch, tag or commit; default "main");
    5. with `download=True` only: a download through huggingface_hub into that cache (the hub id
       given, else the entry's first), refused at once when HF_HUB_OFFLINE is set and failing
       fast without network (engine.hub.download).

    Nowhere: `ModelNotFoundError` (a ValueError) listing every place looked. For a folder the
    layout is detected from its files and the variant from its config, through the registered
    model families; a folder found for a registry entry must hold that entry's variant.
    `spec_name` picks among variants that share an architecture (e.g. "wan2.1-i2v-14b-720p"
    instead of the default 480p entry).
    """
    from engine import hub

    search = hub.Search()
    # 1. A local folder.
    folder = os.path.expanduser(model)
    if os.path.isdir(folder):
        return _from_folder(folder, spec_name)
    search.note(f"local folder {os.path.abspath(folder)}", "no such directory")
    # 2. A registry name or alias.
    spec = find_spec(model)
    if spec is not None:
        if spec_name is not None and spec_name != spec.name:
            raise ValueError(f"spec_name={spec_name!r} conflicts with the registry name {model!r}")
        path = spec.materialize() if spec.materialize is not None else spec.source
        if path is not None:
            layout = detect_layout(path)
            return Checkpoint(path=os.path.abspath(path), layout=layout,
                              spec=with_scheduler_defaults(spec, path, layout))
        search.note("model registry", f"entry {spec.name} (its weights are not part of this package)")
    else:
        search.note("model registry", "no entry or alias of this name")
    # 3-5. $LIGHTX2V_MODEL_ROOT, the hub cache, a download when allowed.
    found = hub.locate(model, spec, search, revision=revision, download_allowed=download)
    if found is None:
        if spec is not None:
            head = (f"model {model!r} (registry entry {spec.name}) has no local weights; pass the "
                    f"checkpoint directory, put it in ${hub.MODEL_ROOT_ENV}/<name> or the Hugging Face "
                    f"cache, or allow a download.")
        else:
            names = ", ".join(s.name for s in list_specs())
            head = (f"model {model!r} is neither a registered model name or alias ({names}) nor a local "
                    f"directory, and was found nowhere else.")
        raise hub.ModelNotFoundError(f"{head} Looked in:\n{search.describe()}")
    log.info("model %r found in %s: %s", model, found.place, found.path)
    try:
        return _from_folder(found.path, spec.name if spec is not None else spec_name)
    except ValueError as err:
        raise ValueError(f"model {model!r} was found in {found.place} ({found.path}), but: {err}") from None


def _from_folder(path: str, spec_name: str | None) -> Checkpoint:
    """A checkpoint folder: its layout, its variant (asked of the families), its scheduler defaults."""
    path = os.path.abspath(path)
    layout = detect_layout(path)
    spec = with_scheduler_defaults(detect_spec(path, layout, spec_name), path, layout)
    log.info("checkpoint %s: %s layout, variant %s", path, layout, spec.name)
    return Checkpoint(path=path, layout=layout, spec=spec)


def quantize_checkpoint(src: str, out: str, mode: str) -> str:
    """Write a copy of the diffusers-layout checkpoint `src` to `out` with its DiTs (every expert:
    `transformer/`, and `transformer_2/` for Wan2.2 A14B) pre-quantized to `mode` (quantized on
    the CPU, as at load time); the other components are hard-linked (or copied where links cannot
    be made). Returns `out`. Host memory: every expert's 8-bit weights at once (the family loads
    them together)."""
    from engine.options import EngineOptions
    from engine.quant.checkpoint import QUANT_CONFIG_KEY, save_quantized_dit, stored_quantization
    from engine.quant.linear import QUANT_MODES

    if mode not in QUANT_MODES:
        raise ValueError(f"quantization must be one of {sorted(QUANT_MODES)}, got {mode!r}")
    ckpt = resolve_checkpoint(src)
    if ckpt.layout != "diffusers":
        raise ValueError(f"quantize needs a diffusers-layout checkpoint; {src} is {ckpt.layout!r}")
    experts = [expert.name for expert in ckpt.spec.experts]        # the DiTs' folder names
    configs = {name: read_json(ckpt.file(name, "config.json")) for name in experts}
    for name, config in configs.items():
        if stored_quantization(config):
            raise ValueError(f"{src} is already pre-quantized ({name}: {config[QUANT_CONFIG_KEY]})")
    if os.path.exists(out) and os.listdir(out):
        raise ValueError(f"output folder {out} exists and is not empty")
    # 1. every component but the DiTs: linked (no copy of the large encoders)
    for root, _, files in os.walk(ckpt.path):
        rel = os.path.relpath(root, ckpt.path)
        if rel.split(os.sep)[0] in configs:
            continue
        os.makedirs(os.path.join(out, rel), exist_ok=True)
        for f in files:
            _link_or_copy(os.path.join(root, f), os.path.join(out, rel, f))
    # 2. the DiTs, quantized on the CPU (bf16 weights, the load-time recipe), then written
    options = EngineOptions(device="cpu", dtype="bfloat16", quantization=mode)
    dits = get_family(ckpt.spec.family).load_dits(ckpt, options)
    for name in experts:
        nbytes = save_quantized_dit(dits.pop(name), configs[name], mode, os.path.join(out, name))
        log.info("wrote %s/%s: DiT %s, %.2f GiB", out, name, mode, nbytes / 2**30)
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(os.path.realpath(src), dst)
    except OSError:
        shutil.copy2(src, dst)
