"""LoRA for DiTs: read the formats found in the wild, merge at load, or apply per request.

    lora = read_lora("style.safetensors", dit, keys=family.lora_keys)   # names -> the DiT's layers
    merge_lora(dit, lora, strength=0.8)                                 # load time, 16-bit weights
    with apply_loras(dit, [(lora, 0.7)]):                               # one request, then gone
        ...

Formats (a file may mix the pair / bias / diff forms; one prefix per file):
- diffusers / PEFT: `transformer.blocks.N.attn1.to_q.lora_A.weight` / `.lora_B.weight` (PEFT's
  `base_model.model.` prefix and `lora_B.bias` too), the DiT's own module names;
- official / ComfyUI (LightX2V's distill LoRAs, Wan2.2-Lightning): `diffusion_model.blocks.N.
  self_attn.q.lora_down.weight` / `.lora_up.weight` (or lora_A / lora_B), `.alpha`, and full
  deltas `.diff` (weight), `.diff_b` (bias), `.diff_m` (the block's `modulation`), in the
  checkpoint's official names, mapped through the family's key map (`LoRAKeys`);
- kohya / musubi-tuner: `lora_unet_blocks_N_self_attn_q.lora_down.weight`, `.alpha`: the dotted
  names of the DiT or the official checkpoint with "." written "_".
A key of no known form, or one naming no layer of the DiT (a LoRA for another model), is an error
that names the keys.

Math (diffusers' `load_lora_weights` + `set_adapters(weights=[s])`, PEFT's LoRA layer): a linear
gets `s * (alpha / rank) * up @ down` on its weight (alpha = rank when the file has none) and
`s * diff_b` on its bias; a `.diff` adds `s * diff` to its parameter. Several LoRAs add up.

Where it goes:
- `merge_lora`: into the weights, in place (float32 arithmetic, rounded once to the weight's
  dtype), for 16-bit linears; wherever the weights are (offloaded storage included).
- `apply_loras`: beside the linear, as a forward hook `y += x @ (s * scale * up @ down).T + ...`
  computed as two small GEMMs, never touching its weight: for 8-bit linears (`engine.quant`, at
  load and per request) and for per-request LoRAs on any DiT. The factors live on the compute
  device outside the DiT's parameters (offload never moves them); the hooks and any parameter
  diffs are removed / restored when the request ends, even on error.
- Fused projections (a fused module declaring `linear_parts = {"to_qkv": ("to_q", "to_k",
  "to_v")}`) take each part's LoRA on its rows of the fused linear.

`LoRABank` keeps the LoRAs recently read for a model (bounded, least recently used dropped) and
resolves request names inside a configured folder only.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# key forms: suffix -> (kind, parameter the delta goes to)
_PAIR_SUFFIXES = {
    ".lora_A.weight": "down", ".lora_down.weight": "down", ".lora.down.weight": "down",
    ".lora_A.default.weight": "down",
    ".lora_B.weight": "up", ".lora_up.weight": "up", ".lora.up.weight": "up",
    ".lora_B.default.weight": "up",
    ".lora_B.bias": "bias",
    ".alpha": "alpha",
}
_DIFF_SUFFIXES = {".diff": "weight", ".diff_b": "bias", ".diff_m": "modulation"}
"""Full deltas: suffix -> the parameter of the base module they add to (`.diff_m`: the block's
`modulation`, the official name of its modulation table)."""
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.")
_KOHYA_PREFIX = "lora_unet_"


@dataclass(frozen=True)
class LoRAKeys:
    """How a family's checkpoint names relate to its DiT's own names (the family's key map):
    `to_model` renames a dict's keys from the checkpoint's (official) names to the DiT's, raising
    ValueError on a key it does not know; `from_model` the other way."""

    to_model: Callable[[Mapping[str, Any]], dict[str, Any]]
    from_model: Callable[[Mapping[str, Any]], dict[str, Any]]


@dataclass
class LinearLoRA:
    """One linear's LoRA: a low-rank pair and/or full deltas."""

    down: Tensor | None = None
    """(rank, in_features)"""
    up: Tensor | None = None
    """(out_features, rank)"""
    alpha: float | None = None
    diff: Tensor | None = None
    """(out_features, in_features) weight delta."""
    diff_b: Tensor | None = None
    """(out_features,) bias delta."""

    @property
    def scale(self) -> float:
        """alpha / rank (1 without alpha)."""
        if self.alpha is None or self.down is None:
            return 1.0
        return self.alpha / self.down.shape[0]

    def weight_delta(self, strength: float) -> Tensor | None:
        """s * scale * up @ down + s * diff, float32, (out, in); None when neither is there."""
        delta = None
        if self.down is not None:
            delta = (strength * self.scale) * (self.up.float() @ self.down.float())
        if self.diff is not None:
            delta = strength * self.diff.float() if delta is None else delta + strength * self.diff.float()
        return delta

    def to(self, device: torch.device, dtype: torch.dtype) -> "LinearLoRA":
        move = lambda t: None if t is None else t.to(device, dtype)  # noqa: E731
        return LinearLoRA(move(self.down), move(self.up), self.alpha, move(self.diff), move(self.diff_b))


@dataclass
class LoRA:
    """A LoRA file read for one DiT: per-linear LoRAs and other parameter deltas, by the DiT's names."""

    source: str
    linears: dict[str, LinearLoRA] = field(default_factory=dict)
    """DiT module name (e.g. "blocks.0.attn1.to_q") -> its LoRA."""
    params: dict[str, Tensor] = field(default_factory=dict)
    """DiT parameter name (norm weights, modulation tables) -> delta (added x strength)."""

    def to(self, device: torch.device, dtype: torch.dtype) -> "LoRA":
        return LoRA(self.source, {k: v.to(device, dtype) for k, v in self.linears.items()},
                    {k: v.to(device) for k, v in self.params.items()})

    def nbytes(self) -> int:
        tensors = [t for v in self.linears.values() for t in (v.down, v.up, v.diff, v.diff_b) if t is not None]
        return sum(t.numel() * t.element_size() for t in [*tensors, *self.params.values()])


# ---------------------------------------------------------------------------------------------
# Reading


def load_state_dict(path: str) -> dict[str, Tensor]:
    """The tensors of a LoRA file (.safetensors; .pt / .pth / .bin loaded with weights_only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path, device="cpu")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a LoRA state dict")
    return state


def read_lora(source: str | Mapping[str, Tensor], dit: nn.Module, keys: LoRAKeys | None = None,
              name: str | None = None) -> LoRA:
    """Read a LoRA (a file path or a state dict) for `dit`: every key parsed and mapped to a layer
    of `dit` (its own names, or the checkpoint's through `keys`). ValueError naming the keys of
    no known form or matching no layer."""
    label = name or (source if isinstance(source, str) else "LoRA state dict")
    state = load_state_dict(source) if isinstance(source, str) else dict(source)
    if not state:
        raise ValueError(f"{label}: the LoRA holds no tensors")
    resolver = _NameResolver(dit, keys)

    # 1. split every key into (base name, kind), the prefix removed
    entries: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, tensor in state.items():
        base, kind = _split_key(key)
        if base is None:
            unknown.append(key)
            continue
        entries.setdefault(base, {})[kind] = tensor
    if unknown:
        raise ValueError(f"{label}: {len(unknown)} key(s) of no known LoRA form (lora_A/lora_B, lora_down/"
                         f"lora_up, alpha, diff, diff_b, diff_m): {_some(unknown)}")

    # 2. base names -> the DiT's linears (pairs, weight and bias deltas) / other parameters
    targets = _Targets(dit)
    lora = LoRA(label)
    unmatched = []
    for base, parts in entries.items():
        module = resolver.module(base)
        if module is not None and _is_linear(targets.of(module)[0]):
            if ("down" in parts) != ("up" in parts):
                raise ValueError(f"{label}: {base} has a lora_{'down' if 'down' in parts else 'up'} "
                                 "without its other half")
            if "alpha" in parts and "down" not in parts:
                raise ValueError(f"{label}: {base} has an alpha without lora_down / lora_up")
            target = LinearLoRA(down=parts.get("down"), up=parts.get("up"), diff=parts.get("weight"),
                                diff_b=parts.get("bias"),
                                alpha=float(parts["alpha"]) if "alpha" in parts else None)
            _check_shapes(label, base, target, targets.of(module))
            lora.linears[module] = target
            unmatched += [f"{base}.{kind}" for kind in set(parts) - {"down", "up", "alpha", "weight", "bias"}]
            continue
        if set(parts) & {"down", "up", "alpha"}:     # a low-rank pair for no linear of this DiT
            unmatched.append(base.replace("\x00", _KOHYA_PREFIX))
            continue
        for kind, tensor in parts.items():           # parameter deltas (norms, modulation)
            param = resolver.param(f"{base}.{kind}")
            if param is None:
                unmatched.append(f"{base}.{kind}".replace("\x00", _KOHYA_PREFIX))
                continue
            expected = dit.get_parameter(param).shape
            if tuple(tensor.shape) != tuple(expected) and tensor.numel() == expected.numel():
                tensor = tensor.reshape(expected)
            if tuple(tensor.shape) != tuple(expected):
                raise ValueError(f"{label}: {base}.{kind} has shape {tuple(tensor.shape)}, the layer's "
                                 f"{param} is {tuple(expected)}")
            lora.params[param] = tensor
    if unmatched:
        raise ValueError(f"{label}: {len(unmatched)} LoRA entr(y/ies) match no layer of "
                         f"{type(dit).__name__} (a LoRA for another model?): {_some(unmatched)}")
    return lora


def _some(names: Sequence[str], n: int = 8) -> str:
    names = sorted(names)
    return ", ".join(names[:n]) + (f", ... ({len(names) - n} more)" if len(names) > n else "")


def _split_key(key: str) -> tuple[str | None, str]:
    """(base name without prefix, kind) of a LoRA key; (None, "") for an unknown form."""
    kohya = key.startswith(_KOHYA_PREFIX)
    if kohya:
        key = "\x00" + key[len(_KOHYA_PREFIX):]      # marks an underscored name for the resolver
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for suffix, kind in _PAIR_SUFFIXES.items():
        if key.endswith(suffix):
            return key[:-len(suffix)], kind
    for suffix, param in _DIFF_SUFFIXES.items():
        if key.endswith(suffix):
            return key[:-len(suffix)], param
    return None, ""


def _is_linear(module: nn.Module) -> bool:
    from engine.quant import QuantLinear

    return isinstance(module, (nn.Linear, QuantLinear))


class _NameResolver:
    """A LoRA base name -> the DiT's module / parameter name: its own names first, then the
    checkpoint's names through the family's key map; underscored (kohya) names against both."""

    def __init__(self, dit: nn.Module, keys: LoRAKeys | None) -> None:
        self.dit, self.keys = dit, keys
        self.modules = {name for name, _ in dit.named_modules() if name}
        self.params = {name for name, _ in dit.named_parameters()}
        self.modules |= set(_fused_parts(dit))
        self._underscored: dict[str, str] | None = None

    def _own(self, name: str) -> str | None:
        if self.keys is None:
            return None
        try:
            (own,) = self.keys.to_model({name: None})
        except (ValueError, KeyError):
            return None
        return own

    def module(self, base: str) -> str | None:
        if base.startswith("\x00"):
            base = self._from_underscored(base[1:])
            if base is None:
                return None
        if base in self.modules:
            return base
        own = self._own(base)
        return own if own in self.modules else None

    def param(self, name: str) -> str | None:
        if name.startswith("\x00"):
            return None
        if name in self.params:
            return name
        own = self._own(name)
        return own if own in self.params else None

    def _from_underscored(self, name: str) -> str | None:
        if self._underscored is None:
            table = {m.replace(".", "_"): m for m in self.modules}
            if self.keys is not None:
                try:
                    targets = _Targets(self.dit)
                    official = self.keys.from_model({m + ".weight": m for m in self.modules
                                                     if _is_linear(targets.of(m)[0])})
                except (ValueError, KeyError):
                    official = {}
                for key, own in official.items():
                    table.setdefault(key[:-len(".weight")].replace(".", "_"), own)
            self._underscored = table
        return self._underscored.get(name)


def _check_shapes(label: str, base: str, lora: LinearLoRA, target: tuple[nn.Module, slice | None]) -> None:
    linear, rows = target
    out = (rows.stop - rows.start) if rows is not None else linear.out_features
    problems = []
    if lora.down is not None:
        if lora.down.dim() != 2 or lora.up.dim() != 2 or lora.down.shape[1] != linear.in_features \
                or lora.up.shape[0] != out or lora.up.shape[1] != lora.down.shape[0]:
            problems.append(f"down {tuple(lora.down.shape)} / up {tuple(lora.up.shape)}")
    if lora.diff is not None and tuple(lora.diff.shape) != (out, linear.in_features):
        problems.append(f"diff {tuple(lora.diff.shape)}")
    if lora.diff_b is not None and tuple(lora.diff_b.shape) != (out,):
        problems.append(f"diff_b {tuple(lora.diff_b.shape)}")
    if problems:
        raise ValueError(f"{label}: {base}: {', '.join(problems)} do not fit the layer "
                         f"({linear.in_features} -> {out})")


# ---------------------------------------------------------------------------------------------
# Targets: a DiT module name -> (linear, rows of it)


def _fused_parts(dit: nn.Module) -> dict[str, tuple[str, slice]]:
    """Module names of the linears that fused modules replaced -> (fused linear's name, its rows),
    from each fused module's `linear_parts` declaration (equal row blocks, in order)."""
    out: dict[str, tuple[str, slice]] = {}
    for name, module in dit.named_modules():
        for fused, parts in getattr(type(module), "linear_parts", {}).items():
            linear = getattr(module, fused, None)
            if linear is None:
                continue
            size, rem = divmod(linear.out_features, len(parts))
            if rem:
                raise ValueError(f"{name}.{fused}: {linear.out_features} rows do not split into {parts}")
            prefix = f"{name}." if name else ""
            for i, part in enumerate(parts):
                out[prefix + part] = (prefix + fused, slice(i * size, (i + 1) * size))
    return out


class _Targets:
    """A DiT module name -> (the linear holding its rows, those rows or None for all of them)."""

    def __init__(self, dit: nn.Module) -> None:
        self.dit = dit
        self.fused = _fused_parts(dit)

    def of(self, name: str) -> tuple[nn.Module, slice | None]:
        if name in self.fused:
            fused_name, rows = self.fused[name]
            return self.dit.get_submodule(fused_name), rows
        return self.dit.get_submodule(name), None


# ---------------------------------------------------------------------------------------------
# Merging (load time) and applying (beside the linear)


@torch.no_grad()
def merge_lora(dit: nn.Module, lora: LoRA, strength: float = 1.0) -> int:
    """Load time: add `lora` x `strength` into the 16-bit (or float32) weights of `dit`, in place
    (float32 sums rounded once). An 8-bit linear's part is applied beside it instead, for the
    model's lifetime (a forward hook; never merged into 8-bit weights). Returns the number of
    tensors merged."""
    from engine.quant import QuantLinear

    targets = _Targets(dit)
    changed = 0
    beside: dict[int, tuple[nn.Module, _Adapters]] = {}
    for name, part in lora.linears.items():
        linear, rows = targets.of(name)
        if isinstance(linear, QuantLinear):
            device, dtype = linear.weight_scale.device, (linear.bias.dtype if linear.bias is not None
                                                         else torch.bfloat16)
            if id(linear) not in beside:
                beside[id(linear)] = (linear, _Adapters())
            beside[id(linear)][1].parts.append((part.to(device, dtype), rows, float(strength)))
            continue
        rows = rows if rows is not None else slice(0, linear.out_features)
        delta = part.weight_delta(strength)
        if delta is not None:
            w = linear.weight.data[rows]
            w.copy_((w.float() + delta.to(w.device)).to(w.dtype))
            changed += 1
        if part.diff_b is not None:
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                       device=linear.weight.device), requires_grad=False)
            b = linear.bias.data[rows]
            b.copy_((b.float() + strength * part.diff_b.float().to(b.device)).to(b.dtype))
            changed += 1
    for name, delta in lora.params.items():
        p = dit.get_parameter(name).data
        p.copy_((p.float() + strength * delta.float().to(p.device)).to(p.dtype))
        changed += 1
    for linear, adapters in beside.values():
        linear.register_forward_hook(adapters)
    _weights_changed(dit)
    return changed


def _weights_changed(dit: nn.Module) -> None:
    """Tell the DiT's offloader (engine.offload) that stored weights changed in place."""
    notify = getattr(getattr(dit, "offloader", None), "weights_changed", None)
    if notify is not None:
        notify()


class _Adapters:
    """The forward hook of one linear: every (LoRA part, rows, strength) applied to it."""

    def __init__(self) -> None:
        self.parts: list[tuple[LinearLoRA, slice | None, float]] = []

    def __call__(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        x = args[0]
        for part, rows, strength in self.parts:
            delta = None
            if part.down is not None:
                delta = ((x @ part.down.T) @ part.up.T) * (strength * part.scale)
            if part.diff is not None:
                d = (x @ part.diff.T) * strength
                delta = d if delta is None else delta + d
            if part.diff_b is not None:
                delta = part.diff_b * strength if delta is None else delta + part.diff_b * strength
            delta = delta.to(out.dtype)
            if rows is None:
                out = out + delta
            else:
                out = torch.cat([out[..., :rows.start], out[..., rows] + delta, out[..., rows.stop:]], dim=-1)
        return out


@contextlib.contextmanager
def apply_loras(dit: nn.Module, loras: Iterable[tuple[LoRA, float]]) -> Iterator[None]:
    """Apply (LoRA, strength) pairs beside the linears of `dit` for the duration (forward hooks);
    parameter deltas (norms, modulation) are written into the weights where they are stored and
    the saved originals copied back after (an offloader is told: engine.offload). The LoRAs'
    tensors must already be on the DiT's device and in its compute dtype (`LoRA.to`)."""
    hooks: dict[int, tuple[nn.Module, _Adapters]] = {}
    saved: dict[str, Tensor] = {}
    handles = []
    try:
        targets = _Targets(dit)
        with torch.no_grad():
            for lora, strength in loras:
                for name, part in lora.linears.items():
                    linear, rows = targets.of(name)
                    if id(linear) not in hooks:
                        hooks[id(linear)] = (linear, _Adapters())
                    hooks[id(linear)][1].parts.append((part, rows, float(strength)))
                for name, delta in lora.params.items():
                    p = dit.get_parameter(name).data
                    if name not in saved:
                        saved[name] = p.clone()
                    p.copy_((p.float() + strength * delta.float().to(p.device)).to(p.dtype))
            for linear, adapters in hooks.values():
                handles.append(linear.register_forward_hook(adapters))
        if saved:
            _weights_changed(dit)
        yield
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for name, original in saved.items():
                dit.get_parameter(name).data.copy_(original)
        if saved:
            _weights_changed(dit)


# ---------------------------------------------------------------------------------------------
# Load-time LoRAs (EngineOptions) and the per-request bank


@dataclass(frozen=True)
class LoRAUse:
    """One LoRA of a request or of the engine options, resolved to a file."""

    path: str
    strength: float = 1.0
    expert: str | None = None
    """An expert's name or role ("high_noise"), or None for every expert."""


def expert_matches(expert: str | None, name: str, role: str) -> bool:
    return expert is None or expert in (name, role)


def check_expert(expert: str | None, experts: Sequence[Any], field_name: str = "expert") -> None:
    """ValueError unless `expert` is None or names one of `experts` (`registry.Expert`s)."""
    if expert is None:
        return
    allowed = [e.role for e in experts if e.role != "main"] + [e.name for e in experts]
    if expert not in allowed:
        raise ValueError(f"{field_name} must be one of {', '.join(allowed)} (or unset: every expert), got {expert!r}")


def load_time_loras(options: Any) -> list[LoRAUse]:
    """The `lora_path` / `lora_strength` / `lora_expert` engine options as LoRAUses."""
    paths, strengths, experts = options.lora_path, options.lora_strength, options.lora_expert
    if not paths:
        return []
    if len(strengths) not in (0, 1, len(paths)):
        raise ValueError(f"lora_strength must give one value, or one per lora_path ({len(paths)}); got {len(strengths)}")
    if len(experts) not in (0, len(paths)):
        raise ValueError(f"lora_expert must give one expert per lora_path ({len(paths)}); got {len(experts)}")
    strengths = list(strengths) * len(paths) if len(strengths) == 1 else list(strengths) or [1.0] * len(paths)
    experts = list(experts) or [None] * len(paths)
    return [LoRAUse(p, s, e or None) for p, s, e in zip(paths, strengths, experts)]


def apply_load_time_loras(dits: Mapping[str, nn.Module], options: Any, spec: Any,
                          keys: LoRAKeys | None) -> int:
    """The engine options' LoRAs into the loaded DiTs: merged into 16-bit weights, beside 8-bit
    linears (kept for the model's lifetime). Returns how many (LoRA, expert) pairs were applied."""
    applied = 0
    for use in load_time_loras(options):
        check_expert(use.expert, spec.experts, "lora_expert")
        for expert in spec.experts:
            if not expert_matches(use.expert, expert.name, expert.role):
                continue
            merge_lora(dits[expert.name], read_lora(use.path, dits[expert.name], keys), use.strength)
            log.info("LoRA %s (strength %s) loaded into %s", use.path, use.strength, expert.name)
            applied += 1
    return applied


class LoRABank:
    """The LoRAs recently used on one set of DiTs, read once and kept on the compute device
    (at most `capacity`, least recently used dropped). `applied(dits, uses)` applies a request's
    LoRAs for its duration. Names resolve inside `lora_dir` only."""

    def __init__(self, keys: LoRAKeys | None, device: torch.device, dtype: torch.dtype,
                 capacity: int = 4, lora_dir: str | None = None) -> None:
        if capacity < 0:
            raise ValueError(f"lora_cache must be >= 0, got {capacity}")
        self.keys, self.device, self.dtype = keys, torch.device(device), dtype
        self.capacity, self.lora_dir = capacity, lora_dir
        self._cache: OrderedDict[tuple, LoRA] = OrderedDict()
        self._lock = threading.Lock()

    def resolve_name(self, name: str) -> str:
        """The file of a LoRA name inside `lora_dir` (".safetensors" added when it has no
        extension). A name with a folder part, "..", or outside the folder is refused."""
        if self.lora_dir is None:
            raise ValueError("lora: LoRAs by name need the service's lora_dir (the folder names resolve in)")
        check_lora_name(name)
        file = name if os.path.splitext(name)[1] else name + ".safetensors"
        root = os.path.realpath(self.lora_dir)
        path = os.path.realpath(os.path.join(root, file))
        if os.path.dirname(path) != root:
            raise ValueError(f"lora: name {name!r} resolves outside lora_dir")
        if not os.path.isfile(path):
            raise ValueError(f"lora: no LoRA named {name!r} in lora_dir")
        return path

    def get(self, path: str, expert: str, dit: nn.Module) -> LoRA:
        """`path` read for `dit` (cached)."""
        if not os.path.isfile(path):
            raise ValueError(f"lora: file not found: {path}")
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size, expert, id(dit))
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        lora = read_lora(path, dit, self.keys).to(self.device, self.dtype)
        with self._lock:
            if self.capacity > 0:
                self._cache[key] = lora
                while len(self._cache) > self.capacity:
                    self._cache.popitem(last=False)
        return lora

    def cached(self) -> list[str]:
        """The files held, least recently used first (for tests and the service's routing)."""
        with self._lock:
            return [k[0] for k in self._cache]

    @contextlib.contextmanager
    def applied(self, dits: Mapping[str, nn.Module], experts: Sequence[Any], uses: Sequence[LoRAUse]
                ) -> Iterator[None]:
        """Apply `uses` to the DiTs of `experts` (registry Experts) for the duration."""
        with contextlib.ExitStack() as stack:
            for expert in experts:
                pairs = [(self.get(u.path, expert.name, dits[expert.name]), u.strength)
                         for u in uses if expert_matches(u.expert, expert.name, expert.role)]
                if pairs:
                    stack.enter_context(apply_loras(dits[expert.name], pairs))
            yield


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,199}$")


def check_lora_name(name: Any) -> str:
    """A LoRA name is a file name: letters, digits, '.', '_', '+', '-' (no folder, no '..')."""
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise ValueError(f"lora name must be a file name inside the LoRA folder (letters, digits, '.', '_', "
                         f"'+', '-'; no folders or '..'), got {name!r}")
    return name
