"""DiT CPU offload (engine/offload.py): time and peak GPU memory of one Wan DiT forward, plain vs
offload="model" (per call: full weight copy in, run, drop) vs offload="block" (double-buffered
block streaming), in one run, random weights at the Wan2.1-T2V-1.3B sizes (bf16, the fp32 norms
and modulation tables kept as the loader keeps them, fused attention projections as the loader
applies them on CUDA).

    python bench/offload.py --json $OUT/offload.json                       # 480x832, 81 frames
    python bench/offload.py --tiny --device cpu                            # a smoke run on the CPU

Times: CUDA-synchronised wall clock after one warm-up, the median of --repeats runs. Peak memory:
torch.cuda.max_memory_allocated during the timed runs; weights: memory_allocated before them.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.kernels import optimize_transformer  # noqa: E402
from engine.models.wan.transformer import WanDiTConfig, WanTransformer  # noqa: E402
from engine.offload import BlockOffload, ModelOffload  # noqa: E402
from engine.options import EngineOptions  # noqa: E402

from dit_sizes import DIT_SIZES  # noqa: E402

WAN_1_3B = DIT_SIZES["1.3b"]
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
            ffn_dim=64, num_layers=3, text_dim=32, freq_dim=16)
GIB = 2**30


def build(config: WanDiTConfig, device: torch.device, dtype: torch.dtype) -> WanTransformer:
    torch.manual_seed(0)
    with torch.device(device):
        model = WanTransformer(config)
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if WanTransformer.keeps_fp32(name) else dtype)
    model.eval().requires_grad_(False)
    return optimize_transformer(model, EngineOptions(device=str(device), dtype="bfloat16" if dtype == torch.bfloat16 else "float32"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model, args, device: torch.device, repeats: int) -> dict:
    with torch.no_grad():
        model(*args)                                    # warm-up (kernels, Triton JIT)
        sync(device)
        weights = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            out = model(*args)
            sync(device)
            times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0
    return {"forward_s": round(statistics.median(times), 4), "times_s": [round(t, 4) for t in times],
            "resident_gib_before_forward": round(weights / GIB, 3), "peak_gib": round(peak / GIB, 3),
            "out": out.float().cpu()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--text-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="tiny model and 16x16x5 video (smoke run)")
    parser.add_argument("--json", default=None, help="write the results here (after each mode)")
    ns = parser.parse_args()

    device = torch.device(ns.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = WanDiTConfig(**(TINY if ns.tiny else WAN_1_3B))
    h, w, f = (16, 16, 5) if ns.tiny else (ns.height, ns.width, ns.frames)
    lat = (1, config.in_channels, (f - 1) // 4 + 1, h // 8, w // 8)
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(lat, generator=g).to(device, dtype), torch.tensor([500.0], device=device),
            torch.randn(1, ns.text_len if not ns.tiny else 8, config.text_dim, generator=g).to(device, dtype))
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "model": "tiny" if ns.tiny else "wan2.1-1.3B-sized (random)",
              "video": f"{h}x{w}x{f}", "latents": list(lat), "dtype": str(dtype), "modes": {}}

    def save() -> None:
        print(json.dumps(result, indent=1), flush=True)
        if ns.json:
            with open(ns.json, "w") as fh:
                json.dump(result, fh, indent=1)

    model = build(config, device, dtype)
    result["block_weight_gib"] = round(sum(t.numel() * t.element_size() for t in
                                           (*model.blocks[0].parameters(), *model.blocks[0].buffers())) / GIB, 4)
    result["modes"]["plain"] = measure(model, args, device, ns.repeats)
    reference = result["modes"]["plain"].pop("out")
    save()

    start = time.perf_counter()
    off = ModelOffload(model, compute=device)           # weights -> pinned CPU; per call: in, run, drop
    result["model_offload_setup_s"] = round(time.perf_counter() - start, 2)
    result["modes"]["model"] = measure(model, args, device, ns.repeats)
    result["modes"]["model"]["max_abs_diff_vs_plain"] = float((result["modes"]["model"].pop("out") - reference).abs().max())
    off.remove()                                        # hooks off; weights stay in pinned CPU memory
    save()

    start = time.perf_counter()
    BlockOffload(model, compute=device)                 # non-block weights -> GPU; 2 block slots
    result["block_offload_setup_s"] = round(time.perf_counter() - start, 2)
    result["modes"]["block"] = measure(model, args, device, ns.repeats)
    result["modes"]["block"]["max_abs_diff_vs_plain"] = float((result["modes"]["block"].pop("out") - reference).abs().max())
    plain = result["modes"]["plain"]
    for mode in ("model", "block"):
        m = result["modes"][mode]
        m["x_plain_time"] = round(m["forward_s"] / plain["forward_s"], 3)
    result["reference_abs_max"] = float(reference.abs().max())
    save()


if __name__ == "__main__":
    main()
