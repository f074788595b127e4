"""CPU offload of the Wan DiT (engine/offload.py), on the CPU: compute "cpu", storage "cpu", and a
recording StreamOps in place of CUDA streams and events."""
from __future__ import annotations

import copy
import logging
import os
import sys

import pytest
import torch

from engine.models.wan.transformer import WanDiTConfig, WanTransformer
from engine.offload import (BlockOffload, ModelOffload, SyncStreams, apply_offload, check_offload,
                            get_offloader, resident)
from engine.options import EngineOptions, ParallelConfig

sys.path.insert(0, os.path.dirname(__file__))
from parallel_ranks import dit_inputs  # noqa: E402

torch.set_num_threads(1)
CPU = torch.device("cpu")


def tiny_config(num_layers: int = 3, image: bool = False) -> WanDiTConfig:
    return WanDiTConfig(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                        ffn_dim=32, num_layers=num_layers, text_dim=16, freq_dim=8,
                        image_dim=12 if image else None, added_kv_proj_dim=16 if image else None)


def tiny_model(num_layers: int = 3, image: bool = False) -> WanTransformer:
    torch.manual_seed(0)
    return WanTransformer(tiny_config(num_layers, image)).eval().requires_grad_(False)


def inputs(cfg: WanDiTConfig, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, cfg.in_channels, 2, 4, 4, generator=g)
    ctx = torch.randn(1, 5, cfg.text_dim, generator=g)
    img = torch.randn(1, 3, cfg.image_dim, generator=g) if cfg.image_dim else None
    return x, torch.tensor([700.0]), ctx, img


class RecordingStreams(SyncStreams):
    """Copies at once (like SyncStreams) and logs every copy / wait / done with its block; events
    are ("copy", i) / ("done", i) tuples so the test sees what each copy waited for."""

    def __init__(self) -> None:
        self.log: list[tuple] = []

    def copy(self, dst, src, after, label):
        super().copy(dst, src, after, label)
        self.log.append(("copy", label, after))
        return ("copy", label)

    def wait(self, event, label):
        self.log.append(("wait", label, event))

    def mark(self, label):
        self.log.append(("done", label))
        return ("done", label)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding: the CPU kernels' summation order can depend on the memory
    alignment of the weights (a deepcopy of a model differs by ~1e-6 already), and offloaded
    weights live in other buffers. Any wrong weight gives differences of order 1."""
    return a.shape == b.shape and bool((a - b).abs().max() <= 1e-5 * (1 + b.abs().max()))


def ptrs(tensors) -> set[int]:
    return {t.data_ptr() for t in tensors}


def block_tensors(block: torch.nn.Module) -> list[torch.Tensor]:
    return [*block.parameters(), *block.buffers()]


# ---------------------------------------------------------------------------------------------
# block offload


@pytest.mark.parametrize("num_layers,image", [(3, False), (2, True), (1, False)])
def test_block_offload_matches_plain_model(num_layers, image):
    model = tiny_model(num_layers, image)
    ref_model = copy.deepcopy(model)
    off = BlockOffload(model, compute=CPU, storage=CPU, streams=SyncStreams())
    args = inputs(model.config)
    with torch.no_grad():
        ref = ref_model(*args)
        out1 = model(*args)
        out2 = model(*inputs(model.config, seed=2))  # second call: block 0 was prefetched by the last
        ref2 = ref_model(*inputs(model.config, seed=2))
    assert same(out1, ref) and same(out2, ref2)
    # between calls every block points at its stored (storage-device) weights again
    for block, stored in zip(model.blocks, off.stored):
        assert ptrs(block_tensors(block)) == ptrs(stored)


def test_prefetch_order_and_copy_waits():
    """Block i+1's copy is issued before block i's compute ends; a copy into a slot waits for the
    block that last ran from it; compute waits for its block's copy."""
    model = tiny_model(4)
    streams = RecordingStreams()
    BlockOffload(model, compute=CPU, storage=CPU, streams=streams)
    with torch.no_grad():
        model(*inputs(model.config))
        model(*inputs(model.config))
    log = streams.log

    def first(kind, i, start=0):
        return next(k for k in range(start, len(log)) if log[k][0] == kind and log[k][1] == i)

    n = 4
    # first call: blocks 0..3, then block 0 of the second call was prefetched by block 3
    for i in range(n - 1):
        assert first("copy", i + 1) < first("done", i), f"block {i + 1} not prefetched during block {i}"
        assert first("wait", i) < first("done", i)
        assert log[first("wait", i)][2] == ("copy", i)            # compute waits for its own copy
    for j in range(2, n):
        assert log[first("copy", j)][2] == ("done", j - 2)        # slot reuse waits for its last user
    second_call = first("done", n - 1)
    assert first("copy", 0, first("wait", n - 1)) < second_call  # wrap-around prefetch of block 0
    copies_in_second_call = [e for e in log[second_call:] if e[0] == "copy"]
    assert [e[1] for e in copies_in_second_call][:1] == [1]      # block 0 was not copied again
    assert sum(e[0] == "copy" for e in log) == 2 * n + 1          # one per block per call + the wrap


def test_at_most_two_blocks_resident():
    """While block i runs: only block i points at a compute slot, the other slot already holds
    block i+1's weights, every other block is in storage; two block-sized slots in all."""
    model = tiny_model(4)
    off = BlockOffload(model, compute=CPU, storage=CPU, streams=SyncStreams())
    slot_ptrs = [ptrs(s.tensors) for s in off.slots]
    seen = []

    def probe(i):
        def hook(module, args):
            running = [k for k, b in enumerate(model.blocks)
                       if any(ptrs(block_tensors(b)) <= p for p in slot_ptrs)]
            assert running == [i]
            held = sorted(s.holds for s in off.slots)
            assert len(held) == 2 and i in held
            nxt = (i + 1) % len(model.blocks)
            other = next(s for s in off.slots if s.holds != i)
            assert other.holds == nxt
            assert all(torch.equal(a, b) for a, b in zip(other.tensors, off.stored[nxt]))
            for k, b in enumerate(model.blocks):
                if k != i:
                    assert ptrs(block_tensors(b)) == ptrs(off.stored[k])
            seen.append(i)
        return hook

    for i, block in enumerate(model.blocks):
        block.ffn.register_forward_pre_hook(probe(i))   # runs inside the block, after the swap
    with torch.no_grad():
        model(*inputs(model.config))
    assert seen == [0, 1, 2, 3]
    assert len(off.slots) == 2 and off.compute_bytes() == 2 * off.block_bytes
    assert off.block_bytes == sum(t.numel() * t.element_size() for t in block_tensors(model.blocks[0]))


@pytest.mark.parametrize("mode", ["int8", "fp8"])
def test_block_offload_composes_with_quantization_and_fused_attention(mode):
    from engine.kernels import fuse_modules
    from engine.quant import QuantLinear, quantize_model

    model = tiny_model(3)
    fuse_modules(model)  # the Wan fusions (q|k|v in one linear)
    quantize_model(model, mode)
    ref_model = copy.deepcopy(model)
    off = BlockOffload(model, compute=CPU, storage=CPU, streams=SyncStreams())
    qlinear = model.blocks[1].attn1.to_qkv
    assert isinstance(qlinear, QuantLinear)
    stored = ptrs(off.stored[1])
    assert {qlinear.weight_q.data_ptr(), qlinear.weight_scale.data_ptr()} <= stored  # buffers move too
    swapped = []
    qlinear.register_forward_pre_hook(
        lambda m, a: swapped.append(m.weight_q.data_ptr() in ptrs(off.slots[0].tensors + off.slots[1].tensors)))
    with torch.no_grad():
        assert same(model(*inputs(model.config)), ref_model(*inputs(model.config)))
    assert swapped == [True]


def test_block_offload_recovers_after_an_exception():
    model = tiny_model(3)
    ref_model = copy.deepcopy(model)
    off = BlockOffload(model, compute=CPU, storage=CPU, streams=SyncStreams())
    handle = model.blocks[1].ffn.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(RuntimeError("boom")))
    with torch.no_grad(), pytest.raises(RuntimeError, match="boom"):
        model(*inputs(model.config))
    handle.remove()
    assert ptrs(block_tensors(model.blocks[1])) == ptrs(off.stored[1])
    with torch.no_grad():
        assert same(model(*inputs(model.config)), ref_model(*inputs(model.config)))


def test_block_offload_refuses_models_without_identical_blocks():
    model = tiny_model(2)
    model.blocks[1].ffn.net[2] = torch.nn.Linear(32, 16, bias=False)
    with pytest.raises(ValueError, match="block 1 holds different tensor shapes"):
        BlockOffload(model, compute=CPU, storage=CPU)
    with pytest.raises(ValueError, match="offload='block' needs the model's repeated blocks.*does not declare `repeated_blocks`"):
        BlockOffload(torch.nn.Linear(2, 2), compute=CPU, storage=CPU)


# ---------------------------------------------------------------------------------------------
# model offload


def test_model_offload_copies_per_call_or_once_per_resident_sequence():
    model = tiny_model(2)
    ref_model = copy.deepcopy(model)
    off = ModelOffload(model, compute=CPU, storage=CPU)
    stored = ptrs(off.stored)
    on_compute = []
    model.blocks[0].register_forward_pre_hook(
        lambda m, a: on_compute.append(not (ptrs(block_tensors(model.blocks[0])) & stored)))
    args = inputs(model.config)
    with torch.no_grad():
        ref = ref_model(*args)
        assert same(model(*args), ref)            # outside resident(): copy in, run, drop
        assert off.copies == 1 and not off.is_resident
        assert ptrs(off.slots.tensors()) == stored
        with resident(model):
            for _ in range(3):
                assert same(model(*args), ref)
            assert off.is_resident
        assert off.copies == 2 and not off.is_resident   # one copy for the three calls
    assert ptrs(off.slots.tensors()) == stored
    assert on_compute == [True] * 4                      # ran from the compute copies


@pytest.mark.parametrize("cls", [ModelOffload, BlockOffload])
def test_offloaders_move_weights_one_tensor_at_a_time(monkeypatch, cls):
    """Host memory: when a tensor is copied to storage, every tensor before it is already
    re-pointed at its copy, and the storage arena grows a chunk at a time, so the model is never
    held twice (only one chunk more)."""
    from engine import offload as off_mod

    model = tiny_model(2)
    if cls is BlockOffload:  # only the blocks go to storage (the rest to the compute device)
        before = [t.clone() for b in model.blocks for t in off_mod.TensorSlots.of(b).tensors()]
    else:
        before = [t.clone() for t in off_mod.TensorSlots.of(model).tensors()]
    copies: list[torch.Tensor] = []
    behind: list[int] = []  # per call: earlier copies the model does not point at yet
    arenas: list[off_mod.HostArena] = []
    take = off_mod.HostArena.take

    def spying_take(self, t):
        if self not in arenas:
            arenas.append(self)
        now = ptrs(off_mod.TensorSlots.of(model).tensors())
        behind.append(sum(c.data_ptr() not in now for c in copies))
        copies.append(take(self, t))
        return copies[-1]

    monkeypatch.setattr(off_mod.HostArena, "take", spying_take)
    monkeypatch.setattr(off_mod.HostArena.__init__, "__defaults__", (1024,))  # small chunks
    kwargs = {"streams": SyncStreams()} if cls is BlockOffload else {}
    off = cls(model, compute=CPU, storage=CPU, **kwargs)
    assert len(copies) > 10 and behind == [0] * len(copies)
    # exact sizes (256-byte slices), several chunks, the copies equal the originals
    (arena,) = arenas
    assert len(arena.chunk_sizes) > 2 and all(size <= 1024 or n == 1 for size, n in
                                              zip(arena.chunk_sizes, _tensors_per_chunk(arena)))
    assert arena.nbytes == sum(-(-t.numel() * t.element_size() // 256) * 256 for t in before)
    stored = off.stored if cls is ModelOffload else [t for block in off.stored for t in block]
    assert len(stored) == len(before) and all(torch.equal(a, b) for a, b in zip(stored, before))


def _tensors_per_chunk(arena) -> list[int]:
    counts = [0] * len(arena.chunk_sizes)
    for chunk, _ in arena.places:
        counts[chunk] += 1
    return counts


# ---------------------------------------------------------------------------------------------
# options, refusals, loader


def test_check_offload_refusals():
    check_offload(EngineOptions(offload="block"))
    check_offload(EngineOptions(offload="model", compile=True))
    check_offload(EngineOptions(offload="none", compile=True, parallel=ParallelConfig(cfg=2)))
    with pytest.raises(ValueError, match=r"offload='block' is not supported with a parallel DiT group"):
        check_offload(EngineOptions(offload="block", parallel=ParallelConfig(ulysses=2)))
    with pytest.raises(ValueError, match=r"offload='model' is not supported with a parallel DiT group"):
        check_offload(EngineOptions(offload="model", parallel=ParallelConfig(cfg=2)))
    with pytest.raises(ValueError, match=r"offload='block' with compile=True is not supported"):
        check_offload(EngineOptions(offload="block", compile=True))
    # "expert": each rank offloads its own copy; the swap is outside the compiled blocks
    check_offload(EngineOptions(offload="expert", compile=True, parallel=ParallelConfig(cfg=2, ulysses=2)))


# ---------------------------------------------------------------------------------------------
# expert offload (Wan2.2 A14B: two experts, one phase each)


def two_experts(monkeypatch, options: EngineOptions):
    """Two tiny experts (different weights, same shape) and their plain copies, with `options`'
    offload applied to each as the loader does (forced to apply on the CPU)."""
    import engine.offload as offload

    monkeypatch.setattr(offload, "offload_applies", lambda options: options.offload != "none")
    experts, plain = {}, {}
    for seed, name in enumerate(("transformer", "transformer_2")):
        torch.manual_seed(seed)
        model = WanTransformer(tiny_config(2)).eval().requires_grad_(False)
        plain[name] = copy.deepcopy(model)
        experts[name] = apply_offload(model, options)
    return experts, plain


def test_expert_offload_holds_one_expert_per_phase(monkeypatch):
    """offload="expert": each expert is a ModelOffload; in its phase (`resident(expert)`, as the
    denoise loop holds it) it runs from one compute copy while the other expert stays in storage;
    outputs equal the models without offload; one weight copy per expert per phase."""
    experts, plain = two_experts(monkeypatch, EngineOptions(offload="expert"))
    offloaders = {name: get_offloader(m) for name, m in experts.items()}
    assert all(type(o) is ModelOffload for o in offloaders.values())
    stored = {name: ptrs(o.stored) for name, o in offloaders.items()}
    running = []
    for name, model in experts.items():
        other = next(n for n in experts if n != name)
        model.blocks[0].register_forward_pre_hook(lambda m, a, name=name, other=other: running.append(
            (name, not (ptrs(block_tensors(experts[name].blocks[0])) & stored[name]),   # from its compute copy
             ptrs(offloaders[other].slots.tensors()) == stored[other])))               # the idle one in storage
    args = inputs(tiny_config(2))
    with torch.no_grad():
        for phase, steps in (("transformer", 3), ("transformer_2", 2)):   # high-noise, then low-noise
            with resident(experts[phase]):
                for _ in range(steps):
                    assert same(experts[phase](*args), plain[phase](*args))
            assert not offloaders[phase].is_resident
    assert running == [("transformer", True, True)] * 3 + [("transformer_2", True, True)] * 2
    assert offloaders["transformer"].copies == 1 and offloaders["transformer_2"].copies == 1
    assert not same(plain["transformer"](*args), plain["transformer_2"](*args))  # two different experts


def test_expert_offload_applies_with_parallel_ranks_and_compile(monkeypatch):
    """With a parallel group, each rank applies it to its own copy (here: the options alone, no
    group needed); the Ulysses swaps after it add no tensor, so the offloader still holds them all."""
    from engine.parallel.ulysses import UlyssesState, apply_ulysses

    options = EngineOptions(offload="expert", compile=True, parallel=ParallelConfig(cfg=2, ulysses=2))
    experts, plain = two_experts(monkeypatch, options)
    args = inputs(tiny_config(2))
    for name, model in experts.items():
        off = get_offloader(model)
        assert type(off) is ModelOffload
        apply_ulysses(model, UlyssesState())           # what apply_parallel does next (no group active)
        assert ptrs(off.slots.tensors()) == ptrs(off.stored)
        with torch.no_grad(), resident(model):
            assert same(model(*args), plain[name](*args))


@pytest.mark.slow
def test_expert_offload_with_compiled_blocks_follows_the_swapped_weights():
    """torch.compile'd blocks (Inductor on the CPU) read the weights each expert's phase copies
    in: high, low, then high again (fresh copies at new addresses), per-sample and per-token
    timesteps, all equal to the plain experts."""
    from engine.kernels import compile_blocks

    cfg = tiny_config(2)
    experts, plain = {}, {}
    for seed, name in enumerate(("transformer", "transformer_2")):
        torch.manual_seed(seed)
        model = WanTransformer(cfg).eval().requires_grad_(False)
        plain[name] = copy.deepcopy(model)
        compile_blocks(model)
        ModelOffload(model, compute=CPU, storage=CPU)
        experts[name] = model
    x, t, ctx, _ = inputs(cfg)
    per_token = torch.full((1, 8), float(t))
    per_token[:, :4] = 0                                          # latent frame 0 clean (TI2V-style)
    with torch.no_grad():
        for phase in ("transformer", "transformer_2", "transformer"):
            with resident(experts[phase]):
                for timestep in (t, per_token):
                    assert same(experts[phase](x, timestep, ctx), plain[phase](x, timestep, ctx)), phase


@pytest.mark.parametrize("mode", ["model", "block"])
def test_offload_on_cpu_device_is_a_logged_no_op(mode, caplog):
    model = tiny_model(2)
    before = ptrs(model.parameters())
    with caplog.at_level(logging.INFO, logger="engine.offload"):
        assert apply_offload(model, EngineOptions(device="cpu", offload=mode)) is model
    assert get_offloader(model) is None and ptrs(model.parameters()) == before
    assert "no-op" in caplog.text


def test_loader_refuses_impossible_combinations(tiny_wan_dir):
    from engine.families import get_family
    from engine.checkpoint import resolve_checkpoint

    ckpt = resolve_checkpoint(str(tiny_wan_dir))
    family = get_family(ckpt.spec.family)
    with pytest.raises(ValueError, match="compile=True"):
        family.load_dits(ckpt, EngineOptions(offload="block", compile=True))["transformer"]
    with pytest.raises(ValueError, match="parallel"):
        family.load_dits(ckpt, EngineOptions(offload="model", parallel=ParallelConfig(cfg=2)))
    with pytest.raises(ValueError, match="offload='expert'.*one DiT"):   # a single-expert model
        family.load_dits(ckpt, EngineOptions(offload="expert"))


@pytest.mark.parametrize("mode,quant", [("block", "int8"), ("model", "none")])
def test_loader_applies_offload_from_engine_options(tiny_wan_dir, monkeypatch, mode, quant):
    """With offload forced to apply on the CPU (storage and compute both "cpu"), the loader builds
    the offloader from EngineOptions, after quantization; outputs equal the plain load's."""
    import engine.offload as offload
    from engine.families import get_family
    from engine.checkpoint import resolve_checkpoint
    from engine.quant import QuantLinear

    ckpt = resolve_checkpoint(str(tiny_wan_dir))
    family = get_family(ckpt.spec.family)
    plain = family.load_dits(ckpt, EngineOptions(quantization=quant))["transformer"]
    monkeypatch.setattr(offload, "offload_applies", lambda options: options.offload != "none")
    model = family.load_dits(ckpt, EngineOptions(quantization=quant, offload=mode))["transformer"]
    expected = {"block": BlockOffload, "model": ModelOffload}[mode]
    assert isinstance(get_offloader(model), expected)
    if quant != "none":
        assert any(isinstance(m, QuantLinear) for m in model.blocks[0].modules())
    inputs = dit_inputs(model.config)
    with torch.no_grad():
        assert same(model(*inputs), plain(*inputs))


def test_resident_is_a_no_op_without_offloader():
    model = tiny_model(1)
    with resident(model):
        pass
    assert get_offloader(model) is None


@pytest.mark.gpu
def test_block_offload_cuda_matches_plain():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model(3).cuda()
    ref_model = copy.deepcopy(model)
    off = BlockOffload(model, compute=torch.device("cuda"))
    assert all(t.device.type == "cpu" and t.is_pinned() for t in off.stored[0])
    args = [a.cuda() if a is not None else None for a in inputs(model.config)]
    with torch.no_grad():
        for _ in range(2):
            torch.testing.assert_close(model(*args), ref_model(*args), rtol=0, atol=0)


def test_denoise_stage_copies_the_model_once_per_request():
    """offload="model" through the denoise stage: `resident()` around the sampler loop, so one
    weight copy for all steps (and both CFG branches), weights back in storage afterwards."""
    from stages.request import GenerationRequest
    from stages.text_encode import TextEncodeStage
    from tests.stages.fakes import SPEC, TEXT_DIM, FakeTextEncoder, denoise_stage

    torch.manual_seed(0)
    model = WanTransformer(WanDiTConfig(num_attention_heads=2, attention_head_dim=8, in_channels=16,
                                        out_channels=16, ffn_dim=32, num_layers=2, text_dim=TEXT_DIM,
                                        freq_dim=8)).eval().requires_grad_(False)
    off = ModelOffload(model, compute=CPU, storage=CPU)
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(off.is_resident))
    options = EngineOptions(device="cpu")
    req = GenerationRequest(prompt="a red fox", seed=3, steps=3).resolve(SPEC)
    out = denoise_stage(model, options)(req, TextEncodeStage(FakeTextEncoder())(req))
    assert len(calls) == 6 and all(calls) and off.copies == 1 and not off.is_resident  # 3 steps x 2 branches
    assert torch.isfinite(out.latents).all()
