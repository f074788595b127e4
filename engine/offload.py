"""CPU offload of a DiT's weights (EngineOptions.offload), applied from outside by forward hooks.

"model": every weight lives in (pinned) CPU memory; the whole model is copied to the GPU for a
    sequence of forward calls and dropped after. `resident(model)` is that sequence (the denoise
    stage holds it for one request: one full weight copy per request). A forward call outside
    `resident` copies in, runs and drops again: one full weight copy per CALL, i.e. per step.
    This mode is for sharing one GPU between stages, not for speed.
"expert": "model"'s mechanics applied to each expert of a model with several (Wan2.2 A14B): the
    loader applies it to every expert, and the denoise loop holds `resident(expert)` for each
    phase, so only the active expert's weights are on the GPU and the idle one waits in pinned
    CPU memory (one full copy of an expert per phase per request). Allowed with a parallel DiT
    group (each rank offloads its own copy) and with torch.compile.
"block": the non-block weights (patch embedding, conditioning embedders, output head; small) live
    on the GPU; each repeated block's weights (the `engine.dit` seam `repeated_blocks`) live in
    pinned CPU memory. Two GPU slots, each the size of one block, are allocated once. Block i runs
    from one slot while block i+1 is copied into the other on a separate copy stream (double
    buffering); events order copy and compute:

        copy stream     [copy b0 -> s0]      [copy b1 -> s1]            [copy b2 -> s0] ...
        compute stream           wait(c0) [ block 0 on s0 ] wait(c1) [ block 1 on s1 ] ...
                                        done0 ---------------------------> (copy b2 waits done0)

    A block's parameters point at its slot only while it runs (`param.data` swapped in a forward
    pre-hook, put back in the post-hook). GPU weight memory: non-block weights + 2 blocks. The last
    block prefetches block 0 for the next call (the next denoising step).

Whatever tensors a block holds are moved: nn.Linear weights, the fused q|k|v projections of
engine.kernels, the 8-bit weights + scales (buffers) of engine.quant's linears. Apply offload
after `optimize_transformer` (the loader does).

Limits (refused at start-up by `check_offload`): "model" and "block" with parallel world size > 1
(a single-GPU memory saver), torch.compile with "block" (the weight swap runs in the block's
forward hooks, which torch.compile would trace). On a CPU device offload is a no-op (logged).

Pinned storage is one `HostArena` per offloaded module: a single host buffer page-locked with
cudaHostRegister, the tensors carved out of it at 256-byte offsets. (PyTorch's pinned allocator
rounds every allocation up to a power of two: pinned tensor by tensor, a 14B DiT's 26.7 GiB would
lock about 1.6 times that.)

Testing without CUDA: the storage / compute devices and the copy/compute ordering (`StreamOps`)
are parameters; `SyncStreams` runs copies at once on the current thread.
"""
from __future__ import annotations

import contextlib
import logging
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol

import torch
from torch import Tensor, nn

from engine.dit import blocks_of
from engine.options import EngineOptions

if TYPE_CHECKING:
    from engine.registry import ModelSpec

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Start-up checks


SINGLE_RANK_MODES = ("model", "block")
"""Offload modes refused with a parallel DiT group ("expert" is allowed: each rank offloads its own
copy of the idle expert)."""


def check_offload(options: EngineOptions) -> None:
    """Raise ValueError at start-up for an offload setting this engine cannot run. (A model with a
    single expert under offload="expert" is the loader's to refuse: only it knows the experts.)"""
    mode = options.offload  # one of options.Offload (EngineOptions checks it)
    if mode == "none":
        return
    if mode in SINGLE_RANK_MODES and options.parallel.world_size > 1:
        raise ValueError(
            f"offload={mode!r} is not supported with a parallel DiT group (parallel.cfg="
            f"{options.parallel.cfg} x parallel.ulysses={options.parallel.ulysses}); use offload='none' "
            "with parallel degrees > 1 (or offload='expert' for a model with several experts), or a "
            "single-GPU group with offload")
    if mode == "block" and options.compile:
        raise ValueError(
            "offload='block' with compile=True is not supported: the per-block weight swap runs in "
            "forward hooks that torch.compile would trace; use compile=False, or offload='model'")


def check_expert_offload(spec: "ModelSpec", options: EngineOptions) -> None:
    """offload="expert" keeps the idle expert in CPU memory: refuse it for a one-DiT model (the
    families' `load_dits` ask this before loading)."""
    if options.offload == "expert" and len(spec.experts) < 2:
        raise ValueError(f"offload='expert' keeps the idle expert of a multi-expert model in CPU memory; "
                         f"{spec.name} has one DiT: use offload='model' or 'block'")


def offload_applies(options: EngineOptions) -> bool:
    """Whether `options.offload` changes anything: a mode other than "none" on a CUDA device
    (on the CPU the weights are in host memory already: offload is a logged no-op)."""
    return options.offload != "none" and options.torch_device.type == "cuda"


def storage_device(options: EngineOptions) -> torch.device:
    """Where the loader should put the DiT's weights: CPU when offload applies, else the
    compute device."""
    return torch.device("cpu") if offload_applies(options) else options.torch_device


# ---------------------------------------------------------------------------------------------
# Copy / compute ordering


class StreamOps(Protocol):
    """How copies and compute are ordered. `label` names the block (for logs and tests)."""

    def copy(self, dst: list[Tensor], src: list[Tensor], after: Any, label: int) -> Any:
        """Copy src -> dst once the compute point `after` (an event or None) is reached, without
        blocking compute; return an event marking the end of the copies."""
        ...

    def wait(self, event: Any, label: int) -> None:
        """Make the compute stream wait for `event` (a copy) before what it runs next."""
        ...

    def mark(self, label: int) -> Any:
        """An event at the compute stream's current point (block `label` done)."""
        ...


class SyncStreams:
    """Copies run at once on the calling thread; events are None (CPU, tests)."""

    def copy(self, dst: list[Tensor], src: list[Tensor], after: Any, label: int) -> Any:
        for d, s in zip(dst, src):
            d.copy_(s)
        return None

    def wait(self, event: Any, label: int) -> None:
        return None

    def mark(self, label: int) -> Any:
        return None


class CudaStreams:
    """A dedicated copy stream; CUDA events order it against the compute (current) stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)

    def copy(self, dst: list[Tensor], src: list[Tensor], after: Any, label: int) -> Any:
        if after is not None:
            self.copy_stream.wait_event(after)       # the slot's previous block is done with it
        with torch.cuda.stream(self.copy_stream):
            for d, s in zip(dst, src):
                d.copy_(s, non_blocking=True)        # pinned host memory: asynchronous
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return done

    def wait(self, event: Any, label: int) -> None:
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)

    def mark(self, label: int) -> Any:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event


def default_streams(compute: torch.device) -> StreamOps:
    return CudaStreams(compute) if compute.type == "cuda" else SyncStreams()


# ---------------------------------------------------------------------------------------------
# Tensors of a module, swappable in place


@dataclass
class TensorSlots:
    """The parameters and buffers of a module (each once), and how to point them elsewhere.

    Parameters keep their identity (`param.data` is swapped), so hooks, optimisers of other code
    and `state_dict` keys see the same objects; buffers are re-bound in their owner's `_buffers`.
    """

    params: list[nn.Parameter] = field(default_factory=list)
    buffers: list[tuple[nn.Module, str]] = field(default_factory=list)

    @classmethod
    def of(cls, module: nn.Module, exclude: nn.Module | None = None) -> "TensorSlots":
        skip = {id(t) for t in (*exclude.parameters(), *exclude.buffers())} if exclude is not None else set()
        slots, seen = cls(), set(skip)
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                slots.params.append(p)
        for owner in module.modules():
            for name, b in owner._buffers.items():
                if b is not None and id(b) not in seen:
                    seen.add(id(b))
                    slots.buffers.append((owner, name))
        return slots

    def tensors(self) -> list[Tensor]:
        return [p.data for p in self.params] + [owner._buffers[name] for owner, name in self.buffers]

    def point_to(self, tensors: list[Tensor]) -> None:
        """Make the module's tensors `tensors` (same order as `tensors()`)."""
        n = len(self.params)
        for p, t in zip(self.params, tensors[:n]):
            p.data = t
        for (owner, name), t in zip(self.buffers, tensors[n:]):
            owner._buffers[name] = t

    def move_each(self, move: Callable[[Tensor], Tensor]) -> list[Tensor]:
        """Re-point each tensor to `move(tensor)`, one at a time (so an original is released before
        the next is copied: never the whole module twice); returns the new tensors in order."""
        moved: list[Tensor] = []
        for p in self.params:
            t = move(p.data)
            p.data = t
            moved.append(t)
        for owner, name in self.buffers:
            t = move(owner._buffers[name])
            owner._buffers[name] = t
            moved.append(t)
        return moved

    def signature(self) -> list[tuple[tuple[int, ...], torch.dtype]]:
        return [(tuple(t.shape), t.dtype) for t in self.tensors()]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class HostArena:
    """Host buffers holding copies of many tensors (see the module docstring): tensors are placed
    in order at 256-byte offsets in chunks of about `chunk_bytes` (a larger tensor gets a chunk of
    its own); a chunk is allocated, and page-locked when `pin`, when its first tensor arrives, so
    moving a module holds at most one chunk more than the module. `take(t)` copies `t` into its
    slice and returns that view; a chunk stays locked until the arena and its views are gone."""

    ALIGN = 256

    def __init__(self, tensors: list[Tensor], pin: bool, chunk_bytes: int = 2**30) -> None:
        self.pin = pin
        self.places: list[tuple[int, int]] = []  # (chunk, offset) per tensor, in order
        self.chunk_sizes: list[int] = []
        for t in tensors:
            size = -(-t.numel() * t.element_size() // self.ALIGN) * self.ALIGN
            if not self.chunk_sizes or self.chunk_sizes[-1] + size > chunk_bytes:
                self.chunk_sizes.append(0)
            self.places.append((len(self.chunk_sizes) - 1, self.chunk_sizes[-1]))
            self.chunk_sizes[-1] += size
        self.nbytes = sum(self.chunk_sizes)
        self.chunks: list[Tensor] = []
        self._next = 0

    def _chunk(self, i: int) -> Tensor:
        while len(self.chunks) <= i:
            size = self.chunk_sizes[len(self.chunks)]
            buffer = torch.empty(max(size, 1), dtype=torch.uint8)
            if self.pin and size:
                torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), size, 0))
                weakref.finalize(self, _host_unregister, buffer)
            self.chunks.append(buffer)
        return self.chunks[i]

    def take(self, t: Tensor) -> Tensor:
        """A copy of `t` in its slice of the arena (same dtype and shape)."""
        chunk, offset = self.places[self._next]
        self._next += 1
        nbytes = t.numel() * t.element_size()
        view = self._chunk(chunk)[offset:offset + nbytes].view(t.dtype).view(t.shape)
        return view.copy_(t)


def _host_unregister(buffer: Tensor) -> None:
    torch.cuda.cudart().cudaHostUnregister(buffer.data_ptr())


def storage_arena(tensors: list[Tensor], device: torch.device, pin: bool) -> HostArena | None:
    """Where `tensors` (in this order) go on the storage device: a `HostArena` when the storage is
    the CPU (page-locked when `pin`; the offloader keeps it as long as its weights), else None
    (a plain copy each)."""
    return HostArena(tensors, pin) if device.type == "cpu" else None


def _mover(arena: HostArena | None, device: torch.device) -> Callable[[Tensor], Tensor]:
    return arena.take if arena is not None else (lambda t: t.to(device))


def _copy_to(t: Tensor, device: torch.device, non_blocking: bool = False) -> Tensor:
    """A new tensor on `device` (always a copy, even when `device` is where `t` is)."""
    return torch.empty_like(t, device=device).copy_(t, non_blocking=non_blocking)


# ---------------------------------------------------------------------------------------------
# "model": the whole DiT in and out


class ModelOffload:
    """The model's weights in storage (pinned CPU); `onload()` copies all of them to `compute`,
    `offload()` drops the copies. Forward calls outside `resident()` onload and offload themselves."""

    def __init__(self, model: nn.Module, compute: torch.device, storage: torch.device = torch.device("cpu"),
                 pin: bool | None = None) -> None:
        self.compute, self.storage = torch.device(compute), torch.device(storage)
        pin = (self.compute.type == "cuda" and self.storage.type == "cpu") if pin is None else pin
        self.slots = TensorSlots.of(model)
        self.arena = storage_arena(self.slots.tensors(), self.storage, pin)
        self.stored = self.slots.move_each(_mover(self.arena, self.storage))
        self.is_resident = False
        self.copies = 0
        """Full weight copies made so far (tests, logs)."""
        self._depth = 0
        self._auto = False
        self._handles = [model.register_forward_pre_hook(self._before),
                         model.register_forward_hook(self._after, always_call=True)]
        model.offloader = self

    def onload(self) -> None:
        """Copy every weight to the compute device (no-op if already there)."""
        if self.is_resident:
            return
        self.slots.point_to([_copy_to(t, self.compute, non_blocking=True) for t in self.stored])
        self.is_resident = True
        self.copies += 1

    def offload(self) -> None:
        """Point the model back at the stored weights; the compute copies are freed."""
        if not self.is_resident:
            return
        self.slots.point_to(self.stored)
        self.is_resident = False
        if self.compute.type == "cuda":
            torch.cuda.empty_cache()  # give the memory back to other processes on this GPU

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        """Weights on the compute device for the whole block (nested uses share one copy)."""
        self._depth += 1
        try:
            self.onload()
            yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.offload()

    def _before(self, module: nn.Module, args: tuple) -> None:
        if not self.is_resident:
            self._auto = True
            self.onload()

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._auto and self._depth == 0:
            self._auto = False
            self.offload()

    def remove(self) -> None:
        """Undo: weights stay on the storage device, hooks removed."""
        self.offload()
        for h in self._handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# "block": double-buffered block streaming


@dataclass
class _Slot:
    """One block-sized buffer on the compute device."""

    tensors: list[Tensor]
    holds: int | None = None   # index of the block whose weights are in it (copied or in flight)
    copied: Any = None         # event: the copy of `holds` is done
    free: Any = None           # event: the last block that ran from this slot is done


class BlockOffload:
    """Keeps the model's repeated blocks (`engine.dit.blocks_of`) in storage and streams them
    through two compute-device slots.

    Non-block tensors are moved to `compute` once. All blocks must hold the same tensor shapes
    and dtypes (true of a DiT's repeated blocks), so one slot fits any block.
    """

    def __init__(self, model: nn.Module, compute: torch.device, storage: torch.device = torch.device("cpu"),
                 streams: StreamOps | None = None, pin: bool | None = None, prefetch: bool = True) -> None:
        try:
            blocks = blocks_of(model)
        except TypeError as e:
            raise ValueError(f"offload='block' needs the model's repeated blocks: {e}") from e
        self.compute, self.storage = torch.device(compute), torch.device(storage)
        pin = (self.compute.type == "cuda" and self.storage.type == "cpu") if pin is None else pin
        self.streams = streams if streams is not None else default_streams(self.compute)
        self.prefetch = prefetch
        self.num_blocks = len(blocks)

        # 1. non-block tensors: to the compute device, once
        rest = TensorSlots.of(model, exclude=blocks)
        rest.move_each(lambda t: t.to(self.compute))

        # 2. block tensors: to (pinned) storage, one block at a time
        self.blocks = [TensorSlots.of(b) for b in blocks]
        ids = [id(p) for slots in self.blocks for p in slots.params]
        if len(ids) != len(set(ids)):
            raise ValueError("offload='block': some parameters are shared between blocks")
        self.stored: list[list[Tensor]] = []
        signature = self.blocks[0].signature()
        for i, slots in enumerate(self.blocks):
            if slots.signature() != signature:
                raise ValueError(f"offload='block': block {i} holds different tensor shapes/dtypes than "
                                 "block 0; block offload needs identical blocks")
        self.arena = storage_arena([t for slots in self.blocks for t in slots.tensors()], self.storage, pin)
        for slots in self.blocks:
            self.stored.append(slots.move_each(_mover(self.arena, self.storage)))

        # 3. two block-sized slots on the compute device
        self.slots = [_Slot([torch.empty_like(t, device=self.compute) for t in self.stored[0]]) for _ in range(2)]
        self.block_bytes = self.blocks[0].nbytes()
        self._running: dict[int, _Slot] = {}  # block index -> the slot it runs from
        self._handles = [model.register_forward_pre_hook(self._begin_call)]
        for i, block in enumerate(blocks):
            self._handles.append(block.register_forward_pre_hook(self._hook_before(i)))
            self._handles.append(block.register_forward_hook(self._hook_after(i), always_call=True))
        model.offloader = self

    # -- copies ---------------------------------------------------------------------------------

    def _load(self, index: int, avoid: _Slot | None) -> _Slot:
        """Issue the copy of block `index` into a slot other than `avoid` (after that slot's last
        user is done); returns the slot."""
        slot = self.slots[1] if avoid is self.slots[0] else self.slots[0]
        slot.copied = self.streams.copy(slot.tensors, self.stored[index], slot.free, index)
        slot.holds = index
        return slot

    def _slot_holding(self, index: int) -> _Slot | None:
        return next((s for s in self.slots if s.holds == index), None)

    # -- hooks ----------------------------------------------------------------------------------

    def _begin_call(self, module: nn.Module, args: tuple) -> None:
        """A call that died mid-way (exception) may have left a block pointing at a slot."""
        for index in list(self._running):
            self._release(index)

    def _hook_before(self, index: int) -> Callable[[nn.Module, tuple], None]:
        def before(block: nn.Module, args: tuple) -> None:
            # 1. block `index` in a slot (prefetched by the previous block, or copied now)
            slot = self._slot_holding(index)
            if slot is None:
                slot = self._load(index, avoid=None)
            self.streams.wait(slot.copied, index)
            self.blocks[index].point_to(slot.tensors)
            self._running[index] = slot
            # 2. prefetch the next block (block 0 after the last: the next call) into the other slot
            if self.prefetch:
                following = (index + 1) % self.num_blocks
                if following != index and self._slot_holding(following) is None:
                    self._load(following, avoid=slot)
        return before

    def _hook_after(self, index: int) -> Callable[[nn.Module, tuple, Any], None]:
        def after(block: nn.Module, args: tuple, output: Any) -> None:
            self._release(index)
        return after

    def _release(self, index: int) -> None:
        slot = self._running.pop(index)
        slot.free = self.streams.mark(index)   # the next copy into this slot waits for this point
        self.blocks[index].point_to(self.stored[index])

    def resident(self) -> contextlib.AbstractContextManager:
        """Nothing to hold: blocks stream in each call."""
        return contextlib.nullcontext()

    def weights_changed(self) -> None:
        """The stored weights were changed in place (engine.lora's parameter deltas): forget the
        slots' copies, so each block is copied again on its next use."""
        for slot in self.slots:
            slot.holds = None

    def compute_bytes(self) -> int:
        """Block weight bytes held on the compute device: the two slots."""
        return 2 * self.block_bytes

    def remove(self) -> None:
        """Undo the hooks (weights stay where they are: blocks in storage)."""
        for h in self._handles:
            h.remove()


# ---------------------------------------------------------------------------------------------
# Entry points


Offloader = ModelOffload | BlockOffload

OFFLOADERS: dict[str, type[ModelOffload] | type[BlockOffload]] = {
    "model": ModelOffload, "block": BlockOffload, "expert": ModelOffload}
"""offload mode -> the class that applies it ("none" applies nothing; "expert" is ModelOffload on
each expert, the loader applying it to every one)."""


def apply_offload(model: nn.Module, options: EngineOptions, streams: StreamOps | None = None) -> nn.Module:
    """Apply `options.offload` to a loaded (and optimised) DiT, in place; returns the model. With
    offload="expert" call it on each expert. The offloader is reachable as `model.offloader`
    (None when nothing is applied)."""
    check_offload(options)
    model.offloader = None
    if options.offload == "none":
        return model
    if not offload_applies(options):
        log.info("offload=%r on device %s is a no-op: the weights are already in host memory",
                 options.offload, options.device)
        return model
    kwargs = {"streams": streams} if options.offload == "block" else {}
    OFFLOADERS[options.offload](model, options.torch_device, **kwargs)  # sets model.offloader
    log.info("offload=%r applied to %s", options.offload, type(model).__name__)
    return model


def get_offloader(model: nn.Module) -> Offloader | None:
    return getattr(model, "offloader", None)


def resident(model: nn.Module) -> contextlib.AbstractContextManager:
    """Hold the model's weights on the compute device for a sequence of forward calls (one
    request, or one expert's phase): one weight copy for all of them with offload="model" or
    "expert", dropped at the end; nothing otherwise."""
    offloader = get_offloader(model)
    return offloader.resident() if offloader is not None else contextlib.nullcontext()
