"""FP8 attention kernels at the Wan-14B self-attention shape (40 heads x 32,760 tokens x 128),
one GPU, one run: cuDNN's `sdpa_fp8` (what `attention="cudnn_fp8"` calls) against our Triton
sage kernels (the pointer-based loop and the TMA-descriptor loop, with and without Triton's warp
specialisation), the attention kernel alone (inputs quantized
beforehand) and the whole backend call. One JSON line per measurement.

    python3 bench/attn_sweep.py [--tokens 32760] [--heads 40] [--repeats 5] [--budget-s 420] \
        [--json $OUT/attn_sweep.json]

Needs a GPU; the cuDNN rows need the cuDNN frontend (`pip install nvidia-cudnn-frontend`).
Times: CUDA events after two warm-up calls, the median of --repeats calls.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_dit import rel, timed  # noqa: E402
from engine.kernels import sage_attention as sa  # noqa: E402

TILES = [(128, 128, 4, 3), (128, 128, 4, 2), (128, 128, 8, 2), (256, 128, 8, 2), (128, 128, 8, 3),
         (128, 64, 4, 3), (128, 128, 4, 4), (128, 256, 8, 2)]
"""(BLOCK_M, BLOCK_N, num_warps, num_stages) tried for the TMA kernel."""


def variants() -> list[sa.SageConfig]:
    """The pointer kernel's default first, then the TMA kernel per tile, plain and warp-specialised."""
    out = [sa.SageConfig(128, 128, 4, 3, qk_fp8=True)]
    for ws in (False, True):
        out += [sa.SageConfig(*t, qk_fp8=True, tma=True, warp_specialize=ws) for t in TILES]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--budget-s", type=float, default=420.0, help="stop sweeping after this many seconds")
    p.add_argument("--json", default="")
    args = p.parse_args()
    records: list[dict] = []

    def log(rec: dict) -> None:
        records.append(rec)
        print(json.dumps(rec), flush=True)
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rec) + "\n")

    t0 = time.time()
    torch.manual_seed(0)
    seq, heads = args.tokens, args.heads
    q, k, v = (torch.randn(1, seq, heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    k = k + 0.5 * torch.randn(1, 1, heads, 128, device="cuda", dtype=torch.bfloat16)  # a key offset
    flop = 4 * seq * seq * 128 * heads
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    log(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, tokens=seq, heads=heads))

    from engine.kernels import cudnn_attention as ca

    reason = ca.cudnn_fp8_requirement(torch.device("cuda"))
    if reason is None:
        q8, k8, v8, scales = ca.quantize_inputs(q, k, v)
        ms = timed(lambda: ca.cudnn_fp8_sdpa(q8, k8, v8, scales), args.repeats, warmup=2)
        log(dict(op="cudnn sdpa_fp8 call alone", ms=ms, tflops=flop / ms / 1e9))
        ms = timed(lambda: ca.cudnn_fp8_attention(q, k, v), args.repeats, warmup=2)
        log(dict(op="cudnn_fp8 backend (quant + call + dequant)", ms=ms, tflops=flop / ms / 1e9,
                 rel_err=rel(ca.cudnn_fp8_attention(q, k, v), ref)))
        del q8, k8, v8
    else:
        log(dict(op="cudnn sdpa_fp8", error=reason))

    best = None
    for cfg in variants():
        if time.time() - t0 > args.budget_s:
            log(dict(op="sweep stopped", reason=f"budget {args.budget_s} s spent"))
            break
        try:
            x = sa.sage_quantize(q, k, v, cfg, pv_fp8=True)
            out = torch.empty_like(q)
            c0 = time.time()
            sa.sage_kernel(x, out, cfg, pv_fp8=True)
            torch.cuda.synchronize()
            compile_s = time.time() - c0
            ms = timed(lambda: sa.sage_kernel(x, out, cfg, pv_fp8=True), args.repeats, warmup=2)
            ms_all = timed(lambda: sa.sage_attention(q, k, v, config=cfg, pv_fp8=True), args.repeats, warmup=2)
        except Exception as e:
            log(dict(op="sage_fp8 kernel", config=cfg._asdict(), error=f"{type(e).__name__}: {str(e)[:300]}"))
            traceback.print_exc()
            continue
        rec = dict(op="sage_fp8 kernel alone", config=cfg._asdict(), ms=ms, tflops=flop / ms / 1e9,
                   ms_with_quant=ms_all, rel_err=rel(out, ref), first_call_s=round(compile_s, 1))
        log(rec)
        if best is None or ms < best["ms"]:
            best = rec
    if best is not None:
        log(dict(op="sage_fp8 best", **{k: best[k] for k in ("config", "ms", "tflops", "rel_err")}))


if __name__ == "__main__":
    main()
