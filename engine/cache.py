"""Feature caching across denoising steps: TeaCache and MagCache, applied from outside on a DiT's
repeated blocks (the `engine.dit` seam `repeated_blocks`).

    config = cache_config("magcache", {"threshold": 0.12}, spec.name)   # calibrated defaults + options
    cache = FeatureCache(config, num_steps, group)                      # one per request
    with cache.applied(dits):                                           # blocks wrapped, then restored
        run_phases(..., on_step=cache.begin_step)

A skipped step runs none of the repeated blocks: the tokens entering the first block get the
residual (last block's output - first block's input) of that branch's last computed step, as
TeaCache and MagCache do; what runs around the blocks (embeddings, output head) always runs.

State is per request (a `FeatureCache` lives for one request; nothing is kept on the model) and
per (expert, guidance branch). The branch of a forward is its order within the step: the guided
predictors run the conditional branch first, then the unconditional one (engine/guidance.py); a
batch-2 forward of both branches or a CFG-parallel rank (one branch per rank) is one branch with its
own residual. Both methods decide from values every branch shares (the step index; the timestep
modulation), so the branches of a step take the same decision.

MagCache (`MagCacheConfig`, diffusers' names and defaults) reproduces diffusers 0.42.1's
`hooks/mag_cache.py`: `mag_ratios` nearest-interpolated to the step count, no skipping before
`int(retention_ratio * steps + 0.5)`, then per step `ratio *= mag_ratios[i]`, `k += 1`,
`err += |1 - ratio|`; skip while a residual exists, `err <= threshold` and `k <= max_skip_steps`,
else compute and reset. The decision depends on the step index alone: every rank of a parallel
group takes it without communication. The accumulators are float32 tensors, as diffusers'.

TeaCache (`TeaCacheConfig`) follows ali-vilab/TeaCache (`TeaCache4Wan2.1`, `use_ret_steps`): its
signal is the timestep modulation the repeated blocks receive (the block argument the DiT class
declares as `cache_signal`; Wan: `modulation`, TeaCache's `e0`); the first `ret_steps` steps are
computed, then per step `acc += poly(coefficients)(mean|s - s_prev| / mean|s_prev|)`, skip while
`acc < threshold`, else compute and `acc = 0`; `s_prev` is updated every step. In a parallel group
the two means are all-reduced (sums) over the group, so every rank takes the same decision even
when the signal is split over the ranks (per-token modulation under Ulysses).

Calibrated defaults are registered by the families (`register_calibration`, e.g.
engine/models/wan/caching.py) per registry entry; a request's `cache_options` override them.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar, Iterator, Literal, Mapping, get_args

import torch
import torch.distributed as dist
from torch import Tensor, nn

from engine.dit import blocks_of

CacheMethod = Literal["none", "teacache", "magcache"]
CACHE_METHODS: tuple[str, ...] = get_args(CacheMethod)


# ---------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class MagCacheConfig:
    """MagCache's parameters, in diffusers' names (`diffusers.hooks.MagCacheConfig`) and defaults."""

    mag_ratios: tuple[float, ...]
    """Calibrated magnitude ratios ||res_t|| / ||res_t-1|| per step (the conditional branch's),
    nearest-interpolated to the request's step count."""
    threshold: float = 0.06
    """Largest accumulated error |1 - ratio| summed over the skipped steps."""
    max_skip_steps: int = 3
    """Most consecutive skipped steps (K)."""
    retention_ratio: float = 0.2
    """Fraction of the first steps never skipped."""

    method: ClassVar[str] = "magcache"

    def __post_init__(self) -> None:
        _check_floats("mag_ratios", self.mag_ratios, positive=True)
        object.__setattr__(self, "mag_ratios", tuple(float(r) for r in self.mag_ratios))
        _check_number("threshold", self.threshold, 0.0, math.inf)
        _check_int("max_skip_steps", self.max_skip_steps, 0)
        _check_number("retention_ratio", self.retention_ratio, 0.0, 1.0)


@dataclass(frozen=True)
class TeaCacheConfig:
    """TeaCache's parameters (ali-vilab/TeaCache, `use_ret_steps` form)."""

    coefficients: tuple[float, ...]
    """Rescaling polynomial, highest degree first (numpy.poly1d order), calibrated on the blocks'
    timestep modulation (TeaCache's use_ret_steps coefficients for Wan)."""
    threshold: float
    """Accumulated rescaled relative L1 change below which a step is skipped."""
    ret_steps: int = 5
    """The first steps, always computed."""

    method: ClassVar[str] = "teacache"

    def __post_init__(self) -> None:
        _check_floats("coefficients", self.coefficients)
        object.__setattr__(self, "coefficients", tuple(float(c) for c in self.coefficients))
        _check_number("threshold", self.threshold, 0.0, math.inf)
        _check_int("ret_steps", self.ret_steps, 0)


CacheConfig = MagCacheConfig | TeaCacheConfig
_CONFIGS: dict[str, type] = {"magcache": MagCacheConfig, "teacache": TeaCacheConfig}
_CALIBRATIONS: dict[tuple[str, str], dict[str, Any]] = {}


def register_calibration(spec_name: str, method: str, options: Mapping[str, Any]) -> None:
    """Published calibrated options of `method` for the registry entry `spec_name` (a family
    registers them with its entries). Checked now: a bad table fails at import."""
    config_cls = _config_cls(method)
    _build(config_cls, dict(options), f"calibration of {spec_name}")  # complete and valid on its own
    _CALIBRATIONS[(spec_name, method)] = dict(options)


def calibration(spec_name: str, method: str) -> dict[str, Any]:
    """The registered calibrated options (a copy; {} when none is published)."""
    return dict(_CALIBRATIONS.get((spec_name, method), {}))


def option_names(method: str) -> tuple[str, ...]:
    """The `cache_options` keys `method` takes."""
    return tuple(f.name for f in fields(_config_cls(method)))


def cache_config(method: str | None, options: Mapping[str, Any] | None, spec_name: str) -> CacheConfig | None:
    """The config of `method` for the entry `spec_name`: its calibrated defaults, then `options`
    over them. None for "none" (or None). ValueError naming the option and the allowed values."""
    if method is None or method == "none":
        if options:
            raise ValueError(f"cache_options is given but cache is {method!r}: choose one of "
                             f"{', '.join(m for m in CACHE_METHODS if m != 'none')}")
        return None
    config_cls = _config_cls(method)
    options = dict(options or {})
    unknown = sorted(set(options) - set(option_names(method)))
    if unknown:
        raise ValueError(f"cache_options: unknown option(s) {', '.join(map(str, unknown))} for {method}; "
                         f"allowed: {', '.join(option_names(method))}")
    merged = {**calibration(spec_name, method), **options}
    return _build(config_cls, merged, f"{method} for {spec_name}")


def config_options(config: CacheConfig) -> dict[str, Any]:
    """The options that rebuild `config` (lists for tuples: JSON-ready)."""
    return {name: list(v) if isinstance(v, tuple) else v
            for name in option_names(config.method) for v in [getattr(config, name)]}


def _config_cls(method: str) -> type:
    try:
        return _CONFIGS[method]
    except KeyError:
        raise ValueError(f"cache must be one of {', '.join(CACHE_METHODS)}, got {method!r}") from None


def _build(config_cls: type, options: dict[str, Any], what: str):
    required = [f.name for f in fields(config_cls) if f.default is MISSING and f.default_factory is MISSING]
    missing = [name for name in required if name not in options]
    if missing:
        raise ValueError(f"cache_options.{missing[0]}: required for {what} (no calibrated default is "
                         f"registered for this model: pass {', '.join(missing)})")
    try:
        return config_cls(**options)
    except ValueError as e:
        raise ValueError(f"cache_options.{e}") from None


def _check_number(name: str, value: Any, lo: float, hi: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not lo <= value <= hi:
        bound = f">= {lo}" if hi == math.inf else f"in {lo}..{hi}"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")


def _check_floats(name: str, values: Any, positive: bool = False) -> None:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__len__") or len(values) == 0:
        raise ValueError(f"{name} must be a non-empty list of numbers, got {values!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
            kind = "positive finite numbers" if positive else "finite numbers"
            raise ValueError(f"{name} must be a list of {kind}, got an element {v!r}")


# ---------------------------------------------------------------------------------------------
# The per-request cache


def nearest_interp(values: Tensor, length: int) -> Tensor:
    """`values` (n,) resampled to `length` by nearest index: i -> round(i * (n - 1) / (length - 1))
    (the last value alone for length 1), computed in float32 as diffusers' MagCache does."""
    if length == 1:
        return values[-1:]
    step = (len(values) - 1) / (length - 1)
    index = torch.round(torch.arange(length, dtype=torch.float32) * step).long()
    return values[index]


@dataclass
class BranchState:
    """What one (expert, branch) carries from step to step."""

    residual: Tensor | None = None
    """Last computed step's last-block output - first-block input (this rank's tokens)."""
    head_input: Tensor | None = None
    computing: bool = True
    """Whether the current forward runs the blocks."""
    computed: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    # MagCache accumulators (float32 tensors once a step has been accumulated, as diffusers')
    ratio: Any = 1.0
    err: Any = 0.0
    run: int = 0
    # TeaCache
    acc: float = 0.0
    signal: Tensor | None = None


class FeatureCache:
    """One request's feature cache over a DiT's (or every expert's) repeated blocks.

    config: a `MagCacheConfig` or `TeaCacheConfig`; num_steps: the request's denoising steps;
    group: the process group whose ranks must agree (TeaCache all-reduces its signal over it), or
    None for a lone process."""

    def __init__(self, config: CacheConfig, num_steps: int, group: "dist.ProcessGroup | None" = None) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.config = config
        self.num_steps = num_steps
        self.group = group
        self.states: dict[tuple[str, int], BranchState] = {}
        self._step: int | None = None
        self._calls: dict[str, int] = {}
        self._current: dict[str, BranchState] = {}
        if isinstance(config, MagCacheConfig):
            ratios = torch.tensor(config.mag_ratios, dtype=torch.float32)
            self._ratios = ratios if len(ratios) == num_steps else nearest_interp(ratios, num_steps)
            self._retention = int(config.retention_ratio * num_steps + 0.5)

    # -- the loop's side --------------------------------------------------------------------------

    def begin_step(self, index: int) -> None:
        """Called by the denoise loop before each step's guided prediction (`run_phases(on_step=)`)."""
        self._step = index
        self._calls.clear()

    @contextlib.contextmanager
    def applied(self, dits: Mapping[str, nn.Module] | nn.Module) -> Iterator["FeatureCache"]:
        """Wrap the repeated blocks of every DiT (a mapping expert -> DiT, or one DiT) for the
        duration; the original blocks are back in place afterwards, even on error."""
        models = dits if isinstance(dits, Mapping) else {"transformer": dits}
        restore: list[tuple[nn.ModuleList, int, nn.Module]] = []
        try:
            for expert, dit in models.items():
                blocks = blocks_of(dit)
                signal = _signal_getter(dit, blocks[0]) if isinstance(self.config, TeaCacheConfig) else None
                last = len(blocks) - 1
                for i, block in enumerate(blocks):
                    restore.append((blocks, i, block))
                    blocks[i] = _CachedBlock(block, self, expert, head=i == 0, tail=i == last, signal=signal)
            yield self
        finally:
            for blocks, i, block in reversed(restore):
                blocks[i] = block

    def skipped_steps(self, expert: str = "transformer", branch: int = 0) -> list[int]:
        """The step indices this (expert, branch) skipped so far."""
        state = self.states.get((expert, branch))
        return list(state.skipped) if state is not None else []

    def computed_steps(self, expert: str = "transformer", branch: int = 0) -> list[int]:
        state = self.states.get((expert, branch))
        return list(state.computed) if state is not None else []

    # -- the blocks' side -------------------------------------------------------------------------

    def enter(self, expert: str, tokens: Tensor, signal: Tensor | None) -> BranchState:
        """The first block of a forward: this forward's branch state, with the decision made."""
        if self._step is None:
            raise RuntimeError("FeatureCache: no step begun (the denoise loop calls begin_step(i) "
                               "before each step: run_phases(..., on_step=cache.begin_step))")
        branch = self._calls.get(expert, 0)
        self._calls[expert] = branch + 1
        state = self.states.setdefault((expert, branch), BranchState())
        if isinstance(self.config, MagCacheConfig):
            compute = self._magcache(state)
        else:
            compute = self._teacache(state, signal)
        state.computing = compute
        (state.computed if compute else state.skipped).append(self._step)
        state.head_input = tokens if compute else None
        self._current[expert] = state
        return state

    def current(self, expert: str) -> BranchState:
        return self._current[expert]

    def _magcache(self, state: BranchState) -> bool:
        config, step = self.config, self._step
        if step < self._retention:
            return True
        scale = self._ratios[step] if step < len(self._ratios) else 1.0
        state.ratio = state.ratio * scale             # float32 tensor arithmetic, as diffusers
        state.run += 1
        state.err = state.err + abs(1.0 - state.ratio)
        if state.residual is not None and bool(state.err <= config.threshold) and state.run <= config.max_skip_steps:
            return False
        state.ratio, state.err, state.run = 1.0, 0.0, 0
        return True

    def _teacache(self, state: BranchState, signal: Tensor | None) -> bool:
        config = self.config
        if signal is None:
            raise RuntimeError("TeaCache needs the blocks' timestep modulation (the DiT's `cache_signal`)")
        signal = signal.detach().float()
        previous, state.signal = state.signal, signal
        if self._step < config.ret_steps or previous is None:
            state.acc = 0.0
            return True
        change = _relative_l1(signal, previous, self.group)
        state.acc += _poly(config.coefficients, change)
        if state.acc < config.threshold and state.residual is not None:
            return False
        state.acc = 0.0
        return True


def _poly(coefficients: tuple[float, ...], x: float) -> float:
    """numpy.poly1d(coefficients)(x): highest degree first, evaluated in float64."""
    y = 0.0
    for c in coefficients:
        y = y * x + c
    return y


def _relative_l1(signal: Tensor, previous: Tensor, group: "dist.ProcessGroup | None") -> float:
    """mean|s - s_prev| / mean|s_prev| over the whole signal: with a group, the sums (and counts)
    of every rank's part, all-reduced, so all ranks get the same value."""
    if group is None:
        return float((signal - previous).abs().mean() / previous.abs().mean())
    sums = torch.stack([(signal - previous).abs().sum(), previous.abs().sum(),
                        torch.tensor(float(signal.numel()), device=signal.device)]).double()
    dist.all_reduce(sums, group=group)
    return float((sums[0] / sums[2]) / (sums[1] / sums[2]))


def _signal_getter(dit: nn.Module, block: nn.Module):
    """A function (args, kwargs) -> the block argument the DiT declares as `cache_signal`."""
    name = getattr(type(dit), "cache_signal", None)
    if not isinstance(name, str):
        raise TypeError(f"TeaCache needs {type(dit).__name__} to declare `cache_signal` (the repeated "
                        "block's argument carrying the timestep modulation)")
    params = list(inspect.signature(block.forward).parameters)
    if name not in params:
        raise TypeError(f"{type(dit).__name__}.cache_signal = {name!r} is not an argument of "
                        f"{type(block).__name__}.forward {tuple(params)}")
    position = params.index(name)

    def get(args: tuple, kwargs: dict) -> Tensor:
        return kwargs[name] if name in kwargs else args[position]

    return get


class _CachedBlock(nn.Module):
    """A repeated block inside a request with a feature cache: the first block decides (and adds
    the residual on a skipped step), the others pass the tokens through on a skipped step, the
    last keeps the residual of a computed step. Tokens are the block's first argument and its
    return value (the `repeated_blocks` contract)."""

    def __init__(self, block: nn.Module, cache: FeatureCache, expert: str, head: bool, tail: bool,
                 signal) -> None:
        super().__init__()
        self.block = block
        self.head, self.tail, self.expert = head, tail, expert
        self._cache = [cache]       # a list: not a submodule, not a parameter
        self._signal = signal

    def forward(self, tokens: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        cache = self._cache[0]
        if self.head:
            signal = self._signal((tokens, *args), kwargs) if self._signal is not None else None
            state = cache.enter(self.expert, tokens, signal)
            if not state.computing:
                return tokens + state.residual.to(tokens.device)
        else:
            state = cache.current(self.expert)
            if not state.computing:
                return tokens
        out = self.block(tokens, *args, **kwargs)
        if self.tail:
            state.residual = out - state.head_input
            state.head_input = None
        return out
