"""LoRA (engine/lora.py): load-time merge and per-request application equal diffusers 0.42.1's
`load_lora_weights` + `set_adapters` (float32, CPU, tiny Wan DiT, official/ComfyUI format with
alpha != rank and diff_b); the PEFT and kohya forms read the same; fused q|k|v, 8-bit linears,
parameter diffs; clear errors; the bank's names and LRU."""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from engine.lora import (LoRABank, LoRAUse, apply_loras, check_lora_name, load_time_loras, merge_lora,
                         read_lora)
from engine.models.wan.family import WAN
from engine.models.wan.transformer import WanDiTConfig, WanTransformer

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers import WanPipeline, WanTransformer3DModel  # noqa: E402

torch.set_num_threads(1)

TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=24,
            freq_dim=16, ffn_dim=48, num_layers=2)
D, FFN, RANK = 32, 48, 4
KEYS = WAN.lora_keys
TOL = 1e-3

# official name -> (in, out) of every LoRA'd linear of a block
LINEARS = {"self_attn.q": (D, D), "self_attn.k": (D, D), "self_attn.v": (D, D), "self_attn.o": (D, D),
           "cross_attn.q": (D, D), "cross_attn.k": (TINY["text_dim"] and D, D), "cross_attn.v": (D, D),
           "cross_attn.o": (D, D), "ffn.0": (D, FFN), "ffn.2": (FFN, D)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def make_models(seed: int = 0):
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**TINY).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.2 * torch.randn_like(p))
    ours = WanTransformer(WanDiTConfig.from_dict(dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 3, 6, 10, generator=g), torch.tensor([700.0]),
            torch.randn(1, 7, TINY["text_dim"], generator=g))


def official_lora(seed: int = 0, alpha: float = 2.0, with_diff_b: bool = True) -> dict[str, torch.Tensor]:
    """An official/ComfyUI-format LoRA on every block linear: rank 4, alpha 2 (!= rank), diff_b."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(TINY["num_layers"]):
        for name, (fan_in, fan_out) in LINEARS.items():
            key = f"diffusion_model.blocks.{i}.{name}"
            sd[f"{key}.lora_down.weight"] = torch.randn(RANK, fan_in, generator=g) * 0.4
            sd[f"{key}.lora_up.weight"] = torch.randn(fan_out, RANK, generator=g) * 0.4
            sd[f"{key}.alpha"] = torch.tensor(alpha)
            if with_diff_b:
                sd[f"{key}.diff_b"] = torch.randn(fan_out, generator=g) * 0.3
    return sd


@torch.no_grad()
def diffusers_with_lora(ref, adapters: list[tuple[dict, float]]):
    """diffusers' output with the LoRAs loaded and weighted (load_lora_weights + set_adapters)."""
    ref = copy.deepcopy(ref)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=None, transformer=ref)
    names = []
    for i, (sd, _) in enumerate(adapters):
        # (diffusers scales some of the given tensors in place: it gets copies)
        pipe.load_lora_weights({k: v.clone() for k, v in sd.items()}, adapter_name=f"a{i}")
        names.append(f"a{i}")
    pipe.set_adapters(names, adapter_weights=[s for _, s in adapters])
    x, t, ctx = inputs()
    return ref(x, t, ctx, return_dict=False)[0]


@torch.no_grad()
def forward(model):
    return model(*inputs())


def test_merge_and_per_request_equal_diffusers():
    ref, ours = make_models()
    sd = official_lora()
    expected = diffusers_with_lora(ref, [(sd, 0.7)])
    base = forward(ours)
    assert rel_err(base, expected) > 100 * TOL          # the LoRA matters far beyond the tolerance

    lora = read_lora(sd, ours, KEYS)
    assert len(lora.linears) == 2 * len(LINEARS) and not lora.params
    with apply_loras(ours, [(lora, 0.7)]):               # per request
        assert rel_err(forward(ours), expected) < TOL
    assert torch.equal(forward(ours), base)              # nothing left behind

    merged = copy.deepcopy(ours)
    merge_lora(merged, lora, 0.7)                        # load time
    assert rel_err(forward(merged), expected) < TOL
    # deliberate mistakes: alpha taken as rank, diff_b dropped, another strength
    assert rel_err(forward(_merged(ours, official_lora(alpha=RANK), 0.7)), expected) > 10 * TOL
    assert rel_err(forward(_merged(ours, official_lora(with_diff_b=False), 0.7)), expected) > 10 * TOL
    assert rel_err(forward(_merged(ours, sd, 0.5)), expected) > 10 * TOL


def _merged(model, sd, strength):
    model = copy.deepcopy(model)
    merge_lora(model, read_lora(sd, model, KEYS), strength)
    return model


def test_two_loras_add_up_as_diffusers_weights_them():
    ref, ours = make_models()
    a, b = official_lora(seed=1), official_lora(seed=2, alpha=8.0)
    expected = diffusers_with_lora(ref, [(a, 0.6), (b, -0.3)])
    with apply_loras(ours, [(read_lora(a, ours, KEYS), 0.6), (read_lora(b, ours, KEYS), -0.3)]):
        assert rel_err(forward(ours), expected) < TOL


def test_peft_and_kohya_forms_read_the_same():
    _, ours = make_models()
    sd = official_lora(with_diff_b=False)
    peft, kohya = {}, {}
    own = KEYS.to_model({k.removeprefix("diffusion_model.").rsplit(".", 2)[0] + ".weight": None
                         for k in sd if k.endswith("lora_down.weight")})
    for key, value in sd.items():
        base, _, suffix = key.removeprefix("diffusion_model.").partition(".lora_")
        if key.endswith(".alpha"):
            base, suffix = key.removeprefix("diffusion_model.")[:-len(".alpha")], "alpha"
        own_base = next(o for o in own if KEYS.from_model({o: None}) == {base + ".weight": None})[:-len(".weight")]
        if suffix == "alpha":
            kohya[f"lora_unet_{base.replace('.', '_')}.alpha"] = value
            continue
        kind = suffix.split(".")[0]                       # down / up
        kohya[f"lora_unet_{base.replace('.', '_')}.lora_{kind}.weight"] = value
        scale = 2.0 / RANK if kind == "down" else 1.0      # PEFT files carry no alpha: folded in
        peft[f"transformer.{own_base}.lora_{'A' if kind == 'down' else 'B'}.weight"] = value * scale
    reference = read_lora(sd, ours, KEYS)
    x = inputs()
    outs = []
    for state in (sd, peft, kohya):
        with apply_loras(ours, [(read_lora(state, ours, KEYS), 1.0)]), torch.no_grad():
            outs.append(ours(*x))
    assert rel_err(outs[1], outs[0]) < 1e-5 and rel_err(outs[2], outs[0]) < 1e-5
    assert sorted(reference.linears) == sorted(read_lora(kohya, ours, KEYS).linears)


def test_fused_projections_take_their_rows():
    """CUDA swaps q|k|v for one GEMM (engine/models/wan/fusions.py): a LoRA on to_q / to_k / to_v
    lands on its rows of to_qkv, merged or beside."""
    from engine.kernels.apply import fuse_modules
    from engine.models.wan.fusions import DIT_FUSIONS

    ref, ours = make_models()
    sd = official_lora()
    expected = diffusers_with_lora(ref, [(sd, 0.7)])
    fused = copy.deepcopy(ours)
    assert fuse_modules(fused, DIT_FUSIONS) == 2 * TINY["num_layers"]
    lora = read_lora(sd, fused, KEYS)
    with apply_loras(fused, [(lora, 0.7)]):
        assert rel_err(forward(fused), expected) < TOL
    merge_lora(fused, lora, 0.7)
    assert rel_err(forward(fused), expected) < TOL


def test_eight_bit_linears_get_the_lora_beside_never_merged():
    from engine.quant import QuantLinear, quantize_model

    _, ours = make_models()
    sd = official_lora()
    quantized = copy.deepcopy(ours)
    quantize_model(quantized, "int8")
    q = quantized.blocks[0].attn1.to_q
    assert isinstance(q, QuantLinear)
    weights = {n: b.clone() for n, b in quantized.named_buffers()}
    x = torch.randn(2, 5, D)
    base = q(x)
    lora = read_lora(sd, quantized, KEYS)
    part = lora.linears["blocks.0.attn1.to_q"]
    exact = x @ part.weight_delta(0.7).T + 0.7 * part.diff_b
    with apply_loras(quantized, [(lora, 0.7)]):
        assert torch.allclose(q(x) - base, exact, atol=1e-5)
    assert torch.equal(q(x), base)
    merge_lora(quantized, lora, 0.7)                    # load time on an 8-bit DiT: beside, for good
    assert torch.allclose(q(x) - base, exact, atol=1e-5)
    assert all(torch.equal(b, weights[n]) for n, b in quantized.named_buffers())  # 8-bit weights untouched


def test_parameter_diffs_merge_and_restore():
    """`.diff` on a norm and on a linear's weight, `.diff_m` on a block's modulation (LightX2V's
    loader adds them x strength)."""
    _, ours = make_models()
    g = torch.Generator().manual_seed(3)
    sd = {"diffusion_model.blocks.0.norm3.diff": torch.randn(D, generator=g),          # diffusers norm2
          "diffusion_model.blocks.1.diff_m": torch.randn(1, 6, D, generator=g),         # scale_shift_table
          "diffusion_model.blocks.1.self_attn.o.diff": torch.randn(D, D, generator=g) * 0.1}
    lora = read_lora(sd, ours, KEYS)
    assert sorted(lora.params) == ["blocks.0.norm2.weight", "blocks.1.scale_shift_table"]
    manual = copy.deepcopy(ours)
    with torch.no_grad():
        manual.blocks[0].norm2.weight += 0.5 * sd["diffusion_model.blocks.0.norm3.diff"]
        manual.blocks[1].scale_shift_table += 0.5 * sd["diffusion_model.blocks.1.diff_m"]
        manual.blocks[1].attn1.to_out[0].weight += 0.5 * sd["diffusion_model.blocks.1.self_attn.o.diff"]
    expected, base = forward(manual), forward(ours)
    assert rel_err(base, expected) > 10 * TOL
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    with apply_loras(ours, [(lora, 0.5)]):
        assert rel_err(forward(ours), expected) < 1e-5
    assert all(torch.equal(v, state[k]) for k, v in ours.state_dict().items())   # restored exactly
    merge_lora(ours, lora, 0.5)
    assert rel_err(forward(ours), expected) < 1e-5


def test_unknown_and_unmatched_keys_are_named():
    _, ours = make_models()
    sd = official_lora()
    with pytest.raises(ValueError, match=r"1 key\(s\) of no known LoRA form.*blocks.0.self_attn.q.lokr_w1"):
        read_lora({**sd, "diffusion_model.blocks.0.self_attn.q.lokr_w1": torch.zeros(1)}, ours, KEYS)
    extra = {"diffusion_model.blocks.7.self_attn.q.lora_down.weight": torch.zeros(RANK, D),
             "diffusion_model.blocks.7.self_attn.q.lora_up.weight": torch.zeros(D, RANK),
             "diffusion_model.blocks.0.cross_attn.k_img.lora_down.weight": torch.zeros(RANK, D),
             "diffusion_model.blocks.0.cross_attn.k_img.lora_up.weight": torch.zeros(D, RANK)}
    with pytest.raises(ValueError, match=r"2 LoRA entr.*match no layer of WanTransformer \(a LoRA for another "
                                         r"model\?\): blocks.0.cross_attn.k_img.*blocks.7.self_attn.q"):
        read_lora({**sd, **extra}, ours, KEYS)
    with pytest.raises(ValueError, match="do not fit the layer"):
        read_lora({"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(RANK, FFN),
                   "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.zeros(FFN, RANK)}, ours, KEYS)
    with pytest.raises(ValueError, match="without its other half"):
        read_lora({"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.zeros(RANK, D)}, ours, KEYS)
    with pytest.raises(ValueError, match="match no layer"):     # official names need the family's key map
        read_lora(sd, ours, keys=None)


def test_bank_names_lru_and_file_reading(tmp_path):
    from safetensors.torch import save_file

    _, ours = make_models()
    for i in range(3):
        save_file(official_lora(seed=i), str(tmp_path / f"style{i}.safetensors"))
    bank = LoRABank(KEYS, torch.device("cpu"), torch.float32, capacity=2, lora_dir=str(tmp_path))
    assert bank.resolve_name("style0") == str(tmp_path / "style0.safetensors")
    for bad in ("../style0", "sub/style0", "/etc/passwd", "..", ".hidden", "a\\b"):
        with pytest.raises(ValueError, match="lora"):
            bank.resolve_name(bad)
    with pytest.raises(ValueError, match="no LoRA named 'missing'"):
        bank.resolve_name("missing")
    experts = ours_experts = [type("E", (), {"name": "transformer", "role": "main"})()]
    dits = {"transformer": ours}
    base = forward(ours)
    for i in (0, 1, 0, 2):
        with bank.applied(dits, ours_experts, [LoRAUse(bank.resolve_name(f"style{i}"), 0.5)]):
            assert rel_err(forward(ours), base) > TOL
    assert torch.equal(forward(ours), base)
    assert [p.rsplit("/", 1)[-1] for p in bank.cached()] == ["style0.safetensors", "style2.safetensors"]
    assert experts
    with pytest.raises(ValueError, match="need the service's lora_dir"):
        LoRABank(KEYS, torch.device("cpu"), torch.float32).resolve_name("style0")
    check_lora_name("wan2.1_t2v_14b_lora_rank64_lightx2v_4step.safetensors")


def test_load_time_options():
    opts = type("O", (), {"lora_path": ("a", "b"), "lora_strength": (0.5,), "lora_expert": ()})()
    assert load_time_loras(opts) == [LoRAUse("a", 0.5), LoRAUse("b", 0.5)]
    opts.lora_expert = ("high_noise", "low_noise")
    opts.lora_strength = ()
    assert load_time_loras(opts) == [LoRAUse("a", 1.0, "high_noise"), LoRAUse("b", 1.0, "low_noise")]
    opts.lora_strength = (1.0, 2.0, 3.0)
    with pytest.raises(ValueError, match="lora_strength must give one value, or one per lora_path"):
        load_time_loras(opts)


def test_facade_load_time_and_per_request_never_leaks(tmp_path):
    """LightX2V: lora_path merges at load; generate(lora=...) applies for that request only (the next
    request equals the no-LoRA output); a LoRA by name resolves in lora_dir only."""
    from safetensors.torch import save_file

    from lightx2v import LightX2V

    g = torch.Generator().manual_seed(9)
    sd = {}
    for i in range(2):                       # tiny-wan: width 32, 2 blocks
        for name in ("self_attn.q", "cross_attn.o"):
            sd[f"diffusion_model.blocks.{i}.{name}.lora_down.weight"] = torch.randn(RANK, 32, generator=g)
            sd[f"diffusion_model.blocks.{i}.{name}.lora_up.weight"] = torch.randn(32, RANK, generator=g)
            sd[f"diffusion_model.blocks.{i}.{name}.alpha"] = torch.tensor(2.0)
    save_file(sd, str(tmp_path / "style.safetensors"))
    path = str(tmp_path / "style.safetensors")
    ask = dict(prompt="a fox", steps=2, seed=3, output_type="latent")

    plain = LightX2V.from_pretrained("tiny-wan", device="cpu", dtype="float32", lora_dir=str(tmp_path))
    base = plain.generate(**ask)
    with_lora = plain.generate(**ask, lora=[{"path": path, "strength": 0.8}])
    assert rel_err(with_lora, base) > 1e-2
    assert torch.equal(plain.generate(**ask), base)                                   # no leak
    assert torch.equal(plain.generate(**ask, lora=[{"name": "style", "strength": 0.8}]), with_lora)
    assert plain.pipeline.denoise.loras.cached() == [os.path.realpath(path)]
    with pytest.raises(ValueError, match="no LoRA named 'other'"):
        plain.generate(**ask, lora=[{"name": "other"}])

    merged = LightX2V.from_pretrained("tiny-wan", device="cpu", dtype="float32", lora_path=path,
                                      lora_strength=0.8)
    assert rel_err(merged.generate(**ask), with_lora) < 1e-4


@pytest.mark.parametrize("mode", ["block", "model"])
def test_offloaded_dit_takes_loras(mode):
    """offload="block" / "model" (on the CPU here: storage and compute both CPU): the per-request
    LoRA (hooks, parameter diffs written to the stored weights and restored) and the load-time
    merge (into the stored weights) give the non-offloaded results."""
    from engine.offload import BlockOffload, ModelOffload, SyncStreams

    _, ours = make_models()
    sd = {**official_lora(), "diffusion_model.blocks.1.diff_m": torch.randn(1, 6, D) * 0.5}
    lora = read_lora(sd, ours, KEYS)
    with apply_loras(ours, [(lora, 0.7)]):
        expected = forward(ours)
    base = forward(ours)
    offloaded = copy.deepcopy(ours)
    if mode == "block":
        BlockOffload(offloaded, compute=torch.device("cpu"), storage=torch.device("cpu"), streams=SyncStreams())
    else:
        ModelOffload(offloaded, compute=torch.device("cpu"), storage=torch.device("cpu"))
    with apply_loras(offloaded, [(lora, 0.7)]):
        assert rel_err(forward(offloaded), expected) < 1e-5
    assert torch.equal(forward(offloaded), base)
    merge_lora(offloaded, lora, 0.7)
    assert rel_err(forward(offloaded), expected) < 1e-5


def test_per_expert_loras_on_two_experts(tmp_path):
    """Wan2.2 A14B (tiny-wan2.2-a14b): a LoRA for the high-noise expert only changes the first
    phase; with both experts' LoRAs (Lightning style) both change; nothing is left behind."""
    from safetensors.torch import save_file

    from lightx2v import LightX2V

    g = torch.Generator().manual_seed(4)
    sd = {}
    for i in range(2):
        sd[f"diffusion_model.blocks.{i}.self_attn.q.lora_down.weight"] = torch.randn(RANK, 32, generator=g)
        sd[f"diffusion_model.blocks.{i}.self_attn.q.lora_up.weight"] = torch.randn(32, RANK, generator=g)
    path = str(tmp_path / "high.safetensors")
    save_file(sd, path)
    model = LightX2V.from_pretrained("tiny-wan2.2-a14b", device="cpu", dtype="float32")
    ask = dict(prompt="a fox", steps=4, seed=3, output_type="latent")
    base = model.generate(**ask)
    high = model.generate(**ask, lora=[{"path": path, "expert": "high_noise"}])
    both = model.generate(**ask, lora=[{"path": path, "expert": "high_noise"},
                                       {"path": path, "expert": "transformer_2", "strength": 0.5}])
    assert rel_err(high, base) > 1e-2 and rel_err(both, high) > 1e-3
    assert torch.equal(model.generate(**ask), base)
    with pytest.raises(ValueError, match=r"lora\[0\].expert: must be one of high_noise, low_noise"):
        model.generate(**ask, lora=[{"path": path, "expert": "middle"}])
    # load time, per expert (lora_expert): equals the per-request high-noise LoRA
    merged = LightX2V.from_pretrained("tiny-wan2.2-a14b", device="cpu", dtype="float32", lora_path=[path],
                                      lora_expert=["high_noise"])
    assert rel_err(merged.generate(**ask), high) < 1e-4
