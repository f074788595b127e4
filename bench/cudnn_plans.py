"""Sweep cuDNN's execution plans for the DiT's attention shape (bf16 `sdpa` and FP8 `sdpa_fp8`),
in the (B, L, H, D) layout the engine passes and in (B, H, L, D). One JSON line per plan.

    python3 bench/cudnn_plans.py [--tokens 32760] [--heads 40] [--batch 1] [--json $OUT/plans.json]

Needs a GPU and the cuDNN frontend (`pip install nvidia-cudnn-frontend`)."""
from __future__ import annotations

import argparse
import json
import os
import traceback

import torch

from bench_dit import timed  # (bench/ is on sys.path when this runs as a script)


def sweep(kind: str, layout: str, b: int, h: int, s: int, d: int, records: list) -> None:
    import cudnn

    fp8 = kind == "fp8"
    io = cudnn.data_type.FP8_E4M3 if fp8 else cudnn.data_type.BFLOAT16
    f32 = cudnn.data_type.FLOAT
    dtype = torch.float8_e4m3fn if fp8 else torch.bfloat16
    shape = (b, s, h, d) if layout == "bshd" else (b, h, s, d)
    tensors = [torch.randn(shape, device="cuda").to(dtype) for _ in range(4)]
    views = [t.transpose(1, 2) if layout == "bshd" else t for t in tensors]  # dims (B, H, L, D)
    handle = cudnn.create_handle()
    cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream().cuda_stream)
    graph = cudnn.pygraph(io_data_type=io, intermediate_data_type=f32, compute_data_type=f32, handle=handle)
    q, k, v = (graph.tensor(name=n, dim=list(t.shape), stride=list(t.stride()), data_type=io)
               for n, t in zip("qkv", views))
    pack = {q: views[0], k: views[1], v: views[2]}
    if fp8:
        scal = [graph.tensor(name=f"s{i}", dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32) for i in range(6)]
        values = [1.0, 1.0, 1.0, 1 / 448.0, 448.0, 1.0]
        for t, val in zip(scal, values):
            pack[t] = torch.full((1, 1, 1, 1), val, device="cuda")
        o, _, amax_s, amax_o = graph.sdpa_fp8(q=q, k=k, v=v, descale_q=scal[0], descale_k=scal[1], descale_v=scal[2],
                                              descale_s=scal[3], scale_s=scal[4], scale_o=scal[5], is_inference=True,
                                              attn_scale=d ** -0.5, use_causal_mask=False, name="sdpa")
        for i, t in enumerate((amax_s, amax_o)):
            t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
            pack[t] = torch.zeros((1, 1, 1, 1), device="cuda")
    else:
        o, _ = graph.sdpa(q=q, k=k, v=v, is_inference=True, attn_scale=d ** -0.5, use_causal_mask=False, name="sdpa")
    o.set_output(True).set_dim(list(views[3].shape)).set_stride(list(views[3].stride())).set_data_type(io)
    pack[o] = views[3]
    graph.validate()
    graph.build_operation_graph()
    graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.B, cudnn.heur_mode.FALLBACK])
    graph.check_support()
    n = graph.get_execution_plan_count()
    flop = 4 * b * h * s * s * d
    for i in range(n):
        rec = dict(kind=kind, layout=layout, batch=b, heads=h, tokens=s, plan=i)
        try:
            rec["name"] = graph.get_plan_name_at_index(i)
            graph.build_plan_at_index(i)
            ws = torch.empty(graph.get_workspace_size_plan_at_index(i), device="cuda", dtype=torch.uint8)
            ms = timed(lambda: graph.execute_plan_at_index(pack, ws, i, handle=handle), 3)
            rec.update(ms=ms, tflops=flop / ms / 1e9)
        except Exception as e:
            rec["error"] = (str(e) or traceback.format_exc())[-300:]
        print(json.dumps(rec), flush=True)
        records.append(rec)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, default=32760)
    p.add_argument("--heads", type=int, default=40)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--kinds", default="fp8,bf16")
    p.add_argument("--layouts", default="bshd,bhsd")
    p.add_argument("--json", default=os.path.join(os.environ.get("OUT", "."), "cudnn_plans.json"))
    args = p.parse_args()
    records: list = []
    for kind in args.kinds.split(","):
        for layout in args.layouts.split(","):
            try:
                sweep(kind, layout, args.batch, args.heads, args.tokens, 128, records)
            except Exception:
                print(json.dumps(dict(kind=kind, layout=layout, error=traceback.format_exc()[-800:])), flush=True)
            torch.cuda.empty_cache()
    with open(args.json, "w") as fh:
        json.dump(records, fh, indent=1)


if __name__ == "__main__":
    main()
