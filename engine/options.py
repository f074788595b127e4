"""Engine options: fixed at start-up, never mutated by a request.

Each option is declared once, below: its type (a `Literal` lists the allowed values), its
default and the docstring under it. The `lightx2v` CLI flags (lightx2v/cli.py), the serve-config
arguments (serving/config.py `AppArgs`) and the facade's keywords (`LightX2V.from_pretrained`) are
derived from these declarations by the helpers at the end of this file (`option_fields`,
`options_from_flat`, `field_docs`): a new option appears on all three with no other edit.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping, get_args, get_origin, get_type_hints

import torch

DType = Literal["float32", "bfloat16", "float16"]
Quantization = Literal["none", "fp8", "int8"]
Offload = Literal["none", "model", "block", "expert"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ParallelConfig:
    """Degrees of the DiT worker group: world size = cfg * ulysses."""

    cfg: int = 1
    """CFG-parallel degree: 1 or 2 (conditional / unconditional branch on different ranks)."""
    ulysses: int = 1
    """Ulysses sequence-parallel degree (>= 1); heads must divide by it."""

    def __post_init__(self) -> None:
        if isinstance(self.cfg, bool) or self.cfg not in (1, 2):
            raise ValueError(f"parallel.cfg must be 1 or 2, got {self.cfg!r}")
        if isinstance(self.ulysses, bool) or not isinstance(self.ulysses, int) or self.ulysses < 1:
            raise ValueError(f"parallel.ulysses must be an integer >= 1, got {self.ulysses!r}")

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses


@dataclass(frozen=True)
class EngineOptions:
    """Everything about *how* a model runs. Frozen: a request never changes it."""

    device: str = "cpu"
    """Torch device string: "cpu", "cuda", "cuda:1", ..."""
    dtype: DType = "float32"
    """Compute dtype of every component: DiT (its norms, modulation and time embedder stay float32),
    VAE, text and image encoders (umT5 runs "float16" as bfloat16: it overflows in float16).
    "float32" on CPU is the parity setting."""
    attention: str = "sdpa"
    """Attention backend, a name in engine.attention's registry."""
    quantization: Quantization = "none"
    """DiT linear-layer quantization."""
    offload: Offload = "none"
    """CPU offload of the DiT (engine/offload.py): "model" = weights in pinned CPU memory, copied
    to the GPU once per request; "block" = non-block weights on the GPU, blocks streamed through
    two GPU slots with prefetch; "expert" = a model with several experts (Wan2.2 A14B) keeps the
    idle expert in pinned CPU memory and swaps at the phase boundary (allowed with parallel ranks).
    A logged no-op on the CPU; "model"/"block" refused with parallel world size > 1, "block" with
    compile=True."""
    vae_tiling: bool = False
    """Decode the VAE in spatial tiles to bound memory."""
    compile: bool = False
    """torch.compile the DiT blocks."""
    cfg_batch: bool = False
    """Run classifier-free guidance's two branches as one batch-2 DiT forward instead of two
    batch-1 forwards (engine/guidance.py: no faster at the real sizes on an H200, and twice the
    activation memory; it can pay for small models)."""
    interpolator: str | None = None
    """Frame interpolator for requests' target_fps, loaded once per decoder: a RIFE v4.x
    `flownet.pkl` (Practical-RIFE's release; or the folder holding it), or "tiny" (random
    weights, for tests). None: requests asking target_fps are refused."""
    lora_path: tuple[str, ...] = ()
    """LoRA files applied to the DiT(s) at load (engine/lora.py: diffusers/PEFT, official/ComfyUI,
    kohya): merged into 16-bit weights; beside FP8/INT8 linears, never merged into them."""
    lora_strength: tuple[float, ...] = ()
    """The strength of each lora_path, or one for all (empty: 1.0)."""
    lora_expert: tuple[str, ...] = ()
    """The expert of each lora_path for two-expert models ("high_noise", "low_noise"); empty: every
    expert."""
    lora_dir: str | None = None
    """Folder in which requests' LoRA names resolve (a request names a file in it, never a path);
    None: requests cannot name LoRAs."""
    lora_cache: int = 4
    """LoRAs each DiT worker keeps loaded for requests (least recently used dropped first)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    def __post_init__(self) -> None:
        self._normalize_loras()
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device string such as cpu, cuda, cuda:1; "
                             f"got {self.device!r}") from None
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        if self.quantization not in get_args(Quantization):
            raise ValueError(f"quantization must be one of {', '.join(get_args(Quantization))}; "
                             f"got {self.quantization!r}")
        if self.offload not in get_args(Offload):
            raise ValueError(f"offload must be one of {', '.join(get_args(Offload))}; got {self.offload!r}")
        if not isinstance(self.attention, str) or not self.attention:
            raise ValueError(f"attention must be an attention backend name (e.g. 'sdpa'), got {self.attention!r}")
        for name in ("vae_tiling", "compile", "cfg_batch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.interpolator is not None and (not isinstance(self.interpolator, str) or not self.interpolator):
            raise ValueError(f"interpolator must be a RIFE flownet.pkl path (or its folder), \"tiny\" or None; "
                             f"got {self.interpolator!r}")
        if not isinstance(self.parallel, ParallelConfig):
            raise ValueError(f"parallel must be a ParallelConfig, got {type(self.parallel).__name__}")

    def _normalize_loras(self) -> None:
        """One value or a list -> a tuple (the facade's `lora_path="x.safetensors"`); types checked."""
        for name, kind in (("lora_path", str), ("lora_strength", (int, float)), ("lora_expert", str)):
            value = getattr(self, name)
            value = (value,) if isinstance(value, (str, int, float)) and not isinstance(value, bool) else value
            if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, kind)
                                                          for v in value):
                what = "strings" if kind is str else "numbers"
                raise ValueError(f"{name} must be one value or a list of {what}, got {getattr(self, name)!r}")
            object.__setattr__(self, name, tuple(float(v) if name == "lora_strength" else v for v in value))
        if self.lora_strength and len(self.lora_strength) not in (1, len(self.lora_path)):
            raise ValueError(f"lora_strength must give one value, or one per lora_path ({len(self.lora_path)}), "
                             f"got {len(self.lora_strength)}")
        if self.lora_expert and len(self.lora_expert) != len(self.lora_path):
            raise ValueError(f"lora_expert must give one expert per lora_path ({len(self.lora_path)}), "
                             f"got {len(self.lora_expert)}")
        if self.lora_dir is not None and (not isinstance(self.lora_dir, str) or not self.lora_dir):
            raise ValueError(f"lora_dir must be a folder path or None, got {self.lora_dir!r}")
        if isinstance(self.lora_cache, bool) or not isinstance(self.lora_cache, int) or self.lora_cache < 0:
            raise ValueError(f"lora_cache must be an integer >= 0, got {self.lora_cache!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    def with_(self, **changes) -> "EngineOptions":
        """A copy with some fields changed (the original stays as it was)."""
        return replace(self, **changes)


# ----------------------------------------------------------------------------- derivation

FLAT_NAMES: dict[str, str] = {"parallel.cfg": "cfg_parallel", "parallel.ulysses": "ulysses_degree"}
"""The names of nested options where options are flat (CLI flags, serve-config arguments): the
names people use today. A nested option not listed here is named by its path joined with "_"."""


@dataclass(frozen=True)
class OptionField:
    """One option as the flat surfaces (CLI flags, serve-config arguments) see it."""

    name: str
    """Flat name: "cfg_batch", "cfg_parallel" (for parallel.cfg)."""
    path: tuple[str, ...]
    """Where it lives in the options: ("cfg_batch",), ("parallel", "cfg")."""
    annotation: Any
    """The declared type, resolved (a Literal lists the allowed values)."""
    default: Any
    doc: str
    """The docstring under the field ("" when it has none)."""

    @property
    def choices(self) -> tuple[Any, ...] | None:
        """The allowed values when the type is a Literal, else None."""
        return get_args(self.annotation) if get_origin(self.annotation) is Literal else None


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> Mapping[str, str]:
    """The docstring written under each field in the class body (and its bases'), by field name,
    whitespace collapsed (read-only; parsed once per class). Works for dataclasses and pydantic
    models; a class without source (e.g. made by `create_model`) contributes none."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return types.MappingProxyType(docs)


def option_fields(cls: type) -> tuple[OptionField, ...]:
    """Every option of the dataclass `cls` (EngineOptions) in declaration order; a field whose
    type is itself an options dataclass (ParallelConfig) is flattened into its fields, named by
    `FLAT_NAMES`."""
    return tuple(_flat_fields(cls, ()))


def _flat_fields(cls: type, prefix: tuple[str, ...]):
    hints, docs = get_type_hints(cls), field_docs(cls)
    for f in dataclasses.fields(cls):
        path = (*prefix, f.name)
        annotation = hints[f.name]
        if dataclasses.is_dataclass(annotation):
            yield from _flat_fields(annotation, path)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        dotted = ".".join(path)
        yield OptionField(FLAT_NAMES.get(dotted, "_".join(path)), path, annotation, default, docs.get(f.name, ""))


def options_from_flat(cls: type, values: Mapping[str, Any]):
    """`cls` (EngineOptions) from flat values named as `option_fields(cls)` names them; an option
    not given keeps its default. Unknown names raise TypeError; a bad value raises the options'
    ValueError with the flat name in place of the nested path ("cfg_parallel must be 1 or 2")."""
    fields = option_fields(cls)
    unknown = sorted(set(values) - {f.name for f in fields})
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(f.name for f in fields)}")
    nested: dict[str, Any] = {}
    for f in fields:
        if f.name in values:
            node = nested
            for key in f.path[:-1]:
                node = node.setdefault(key, {})
            node[f.path[-1]] = values[f.name]
    try:
        return _build(cls, nested)
    except ValueError as e:
        message = str(e)
        for f in fields:
            dotted = ".".join(f.path)
            if dotted != f.name and message.startswith(dotted + " "):
                raise ValueError(f.name + message[len(dotted):]) from None
        raise


def _build(cls: type, values: dict[str, Any]):
    hints = get_type_hints(cls)
    return cls(**{name: _build(hints[name], value) if dataclasses.is_dataclass(hints[name]) else value
                  for name, value in values.items()})


def default_dtype(device: str) -> DType:
    """The dtype a surface picks when none is given: float32 on the CPU (the parity setting),
    bfloat16 on GPUs."""
    return "float32" if device == "cpu" else "bfloat16"
