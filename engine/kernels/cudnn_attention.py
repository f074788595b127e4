"""FP8 attention through cuDNN's fused flash-attention (`sdpa_fp8`, via the cuDNN frontend).

cuDNN's FP8 SDPA is a Hopper-native kernel (TMA, warp-specialised producer / consumer warp
groups): the FA3-class structure our Triton loop (sage_attention.py) lacks. It takes per-TENSOR
FP8 scales, so the numerics differ from the per-block Sage kernels:

  1. smooth K: subtract its mean over tokens (softmax is unchanged; it shrinks K's range when K
     has a common offset, as trained models' keys do);
  2. Q, K, V to FP8 e4m3 with one float32 scale each (amax / 448 over the whole tensor; FP8 is a
     floating-point format, so one scale per tensor keeps ~2^-4 relative precision for every
     value within 2^15 of the maximum);
  3. cuDNN: S = Q·K^T * descale_q * descale_k / sqrt(D), online softmax, P scaled by 448 into
     FP8, O = P·V * descale_s * descale_v * scale_o, stored as FP8 (on Hopper cuDNN writes FP8 O
     only). With scale_o = 1 / scale_v, O is in V's FP8 units (|O| <= max |V|: a convex
     combination of V's rows), so no amax of O is needed;
  4. O back to the input dtype: O_fp8 * scale_v.

Steps 1, 2 and 4 are plain torch, so under torch.compile Inductor fuses them with the norm /
rotary before and the output projection's quantization after; step 3 is one opaque custom op.

Requires the `nvidia-cudnn-frontend` package (`pip install -e ".[cudnn]"` in this repo), a cuDNN >= 9.1
backend (the one torch ships) and an FP8-capable GPU (compute capability >= 9.0); the backend's
requirement check says which is missing, at start-up.
"""
from __future__ import annotations

import threading
from typing import Any

import torch
from torch import Tensor

from engine.requirements import gpu_requirement

FP8_MAX = 448.0
HEAD_DIMS = (64, 128)
"""Head sizes cuDNN's FP8 forward takes on Hopper."""
MIN_CUDNN = 90100


def cudnn_fp8_requirement(device: torch.device) -> str | None:
    """None if cuDNN FP8 attention can run on `device`, else the reason."""
    reason = gpu_requirement(device, (9, 0), "FP8 flash attention in cuDNN", needs_triton=False)
    if reason is not None:
        return reason
    version = torch.backends.cudnn.version() or 0
    if version < MIN_CUDNN:
        return f"needs cuDNN >= 9.1 (torch's cuDNN is {version})"
    try:
        import cudnn  # noqa: F401
    except Exception as e:
        return (f"needs the cuDNN frontend: pip install nvidia-cudnn-frontend "
                f"(or pip install -e '.[cudnn]' in this repo); it does not import here ({e})")
    return None


# ---------------------------------------------------------------------------------------------
# The cuDNN graph: built once per (shape, strides, device), executed on torch's current stream


class _Fp8SdpaGraph:
    """One built cuDNN FP8 SDPA graph for fixed q/k/v/o geometry (dims (B, H, L, D), any strides)."""

    def __init__(self, q: Tensor, k: Tensor, v: Tensor, o: Tensor, handle: Any) -> None:
        import cudnn

        e4m3, f32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=e4m3, intermediate_data_type=f32, compute_data_type=f32,
                              handle=handle)

        def fp8(name: str, t: Tensor) -> Any:
            return graph.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=e4m3)

        def scalar(name: str) -> Any:
            return graph.tensor(name=name, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=f32)

        self.q, self.k, self.v = fp8("q", q), fp8("k", k), fp8("v", v)
        self.scales = [scalar(n) for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
        out, _, amax_s, amax_o = graph.sdpa_fp8(
            q=self.q, k=self.k, v=self.v,
            descale_q=self.scales[0], descale_k=self.scales[1], descale_v=self.scales[2],
            descale_s=self.scales[3], scale_s=self.scales[4], scale_o=self.scales[5],
            is_inference=True, attn_scale=q.shape[-1] ** -0.5, use_causal_mask=False, name="sdpa_fp8")
        out.set_output(True).set_dim(list(o.shape)).set_stride(list(o.stride())).set_data_type(e4m3)
        self.out = out
        # amax outputs are required ports; bound to small buffers, never read
        self.amax = []
        for t in (amax_s, amax_o):
            t.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(f32)
            self.amax.append(t)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        self.graph = graph
        self.workspace_size = graph.get_workspace_size()

    def run(self, q: Tensor, k: Tensor, v: Tensor, scales: Tensor, o: Tensor, handle: Any) -> None:
        import cudnn

        cudnn.set_stream(handle=handle, stream=torch.cuda.current_stream(q.device).cuda_stream)
        amax = scales.new_empty((2, 1, 1, 1, 1))
        pack = {self.q: q, self.k: k, self.v: v, self.out: o, self.amax[0]: amax[0], self.amax[1]: amax[1]}
        for i, t in enumerate(self.scales):
            pack[t] = scales[i].view(1, 1, 1, 1)
        workspace = torch.empty(self.workspace_size, dtype=torch.uint8, device=q.device)
        self.graph.execute(pack, workspace, handle=handle)


_lock = threading.Lock()
_handles: dict[int, Any] = {}
_graphs: dict[tuple, _Fp8SdpaGraph] = {}


def _handle(device: torch.device) -> Any:
    import cudnn

    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _handles:
        with torch.cuda.device(index):
            _handles[index] = cudnn.create_handle()
    return _handles[index]


def _graph(q: Tensor, k: Tensor, v: Tensor, o: Tensor) -> tuple[_Fp8SdpaGraph, Any]:
    key = tuple((tuple(t.shape), tuple(t.stride())) for t in (q, k, v, o)) + (q.device.index,)
    with _lock:
        handle = _handle(q.device)
        if key not in _graphs:
            with torch.cuda.device(q.device):
                _graphs[key] = _Fp8SdpaGraph(q, k, v, o, handle)
        return _graphs[key], handle


@torch.library.custom_op("lightx2v::cudnn_fp8_sdpa", mutates_args=())
def cudnn_fp8_sdpa(q: Tensor, k: Tensor, v: Tensor, scales: Tensor) -> Tensor:
    """FP8 e4m3 q (B, Lq, H, D), k/v (B, Lk, H, D) and float32 `scales` (6,) = descale q, k, v,
    descale_s, scale_s, scale_o -> FP8 O (B, Lq, H, D). One node under torch.compile."""
    out = torch.empty(q.shape, dtype=torch.float8_e4m3fn, device=q.device)
    views = [t.transpose(1, 2) for t in (q, k, v, out)]  # dims (B, H, L, D), strides of (B, L, H, D)
    graph, handle = _graph(*views)
    graph.run(views[0], views[1], views[2], scales, views[3], handle)
    return out


@cudnn_fp8_sdpa.register_fake
def _(q, k, v, scales):
    return torch.empty(q.shape, dtype=torch.float8_e4m3fn, device=q.device)


# ---------------------------------------------------------------------------------------------
# Quantization around the cuDNN call (plain torch: fused by Inductor under torch.compile)


def quantize_per_tensor(x: Tensor) -> tuple[Tensor, Tensor]:
    """x -> (FP8 e4m3 of x / scale, scale (float32 0-d)), scale = amax(|x|) / 448."""
    scale = (x.abs().amax().float() / FP8_MAX).clamp_min(1e-12)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def quantize_inputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Steps 1-2 of the module text: smoothed K, FP8 Q/K/V (contiguous) and the six scales
    `cudnn_fp8_sdpa` takes (descale q, k, v; descale_s, scale_s; scale_o = 1 / scale_v)."""
    k = k - k.mean(dim=1, keepdim=True)
    (q8, s_q), (k8, s_k), (v8, s_v) = (quantize_per_tensor(t) for t in (q, k, v))
    one = torch.ones((), dtype=torch.float32, device=q.device)
    scales = torch.stack([s_q, s_k, s_v, one / FP8_MAX, one * FP8_MAX, 1.0 / s_v])
    return q8.contiguous(), k8.contiguous(), v8.contiguous(), scales


def cudnn_fp8_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """q (B, Lq, H, D), k/v (B, Lk, H, D) -> (B, Lq, H, D) in v's dtype; see the module text."""
    q8, k8, v8, scales = quantize_inputs(q, k, v)
    out = cudnn_fp8_sdpa(q8, k8, v8, scales)
    return (out.float() * scales[2]).to(v.dtype)  # O is in V's FP8 units
