"""One rank of the DiT worker group: the denoise stage with the parallel engine applied.

Lifecycle (vLLM-style), each step a collective call over the group (`WorkerGroup.call`):

    init_device(ctx)             the group calls it in start(): rank, device, backend
    load_model(checkpoint, opts) load the model's DiT(s) (every expert) on this rank's device,
                                 build the cfg x ulysses mesh, swap in the parallel modules (each
                                 expert on the same mesh, its own predictor), build the DenoiseStage
    warm_up()                    one guided forward at a tiny size (first-call costs, collectives)
    denoise(request, text, image_cond, job_id)
                                 all ranks run the sampler loop; rank 0 returns the Latents,
                                 the others None
    load_vae(checkpoint, opts) / decode(latents)
                                 optional: the VAE decode split over the ranks (row stripes with
                                 halo exchange by default, or overlapping tiles)
    cancel(job_id) / progress(job_id)
                                 answered while denoise runs (the group's actors are threaded)
    check_health() / shutdown()

Cancellation is agreed: before every step each rank contributes its local flag to an all-reduce
(max), so all ranks stop at the same step and none is left waiting in a collective. A cancel that
arrives before its job starts is kept until the job runs.

Calls that run collectives (`warm_up`, `denoise`, `decode`) take one lock per rank, but the
caller must still issue them one at a time: the actors are threaded, so two calls in flight at
once could start in different orders on different ranks and pair their collectives wrongly
(`GroupDenoiseStage` and the `DiTGroup` deployment hold a lock around each request).
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from cluster.worker_group import WorkerContext, WorkerGroup
from engine.offload import resident
from engine.options import EngineOptions
from stages.request import ResolvedRequest

if TYPE_CHECKING:
    from engine.loading import Checkpoint
    from stages.payloads import ImageCond, Latents, TextEmbeds


_MAX_REMEMBERED = 1024
"""Cancel flags / progress entries kept for jobs that have not run (oldest dropped)."""


class DiTWorker:
    """See the module docstring. Built by `WorkerGroup.start()` on every rank."""

    def __init__(self) -> None:
        self.ctx: WorkerContext | None = None
        self.device = torch.device("cpu")
        self.options: EngineOptions | None = None
        self.spec = None
        self.stage = None
        self.vae = None
        self._run_lock = threading.Lock()        # one denoise at a time on this rank
        self._state_lock = threading.Lock()      # cancel flags and progress
        self._cancelled: OrderedDict[str, None] = OrderedDict()
        self._progress: OrderedDict[str, dict] = OrderedDict()

    # -- lifecycle ----------------------------------------------------------------------------
    def init_device(self, ctx: WorkerContext) -> None:
        """Remember this rank's place; the group already chose and set the device."""
        self.ctx = ctx
        self.device = torch.device(ctx.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def load_model(self, checkpoint: "str | Checkpoint", options: EngineOptions) -> dict:
        """Load the DiT(s) from `checkpoint` (registry name, local folder or `Checkpoint`) with
        `options` on this rank's device; apply the parallel config. Returns a short summary."""
        from engine.checkpoint import resolve_checkpoint
        from engine.families import get_family
        from engine.guidance import combiner
        from engine.parallel import check_parallel_config, guided_predictors, init_mesh
        from stages.denoise import DenoiseStage, load_dits_with_loras

        ctx = self._require_ctx()
        if options.parallel.world_size != ctx.world_size:
            raise ValueError(
                f"options.parallel (cfg={options.parallel.cfg} x ulysses={options.parallel.ulysses}"
                f" = {options.parallel.world_size}) does not match the group's {ctx.world_size} ranks")
        options = options.with_(device=self._rank_device(options))
        ckpt = resolve_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
        start = time.perf_counter()
        family = get_family(ckpt.spec.family)
        dits = load_dits_with_loras(ckpt, options)             # the family's, with options.lora_path
        for dit in dits.values():
            check_parallel_config(dit, options.parallel.ulysses)   # before any collective
        mesh = init_mesh(options.parallel, options.device)
        predictors = guided_predictors(dits, options, mesh,
                                       combine_fn=combiner(ckpt.spec.guidance, ckpt.spec.latent.patch))
        self.stage = DenoiseStage(dits, family.adapter(ckpt.spec), ckpt.spec, options, predictors=predictors,
                                  cache_group=mesh.world.group)      # TeaCache's ranks agree over it
        self.options, self.spec = options, ckpt.spec
        return {"rank": ctx.rank, "device": options.device, "model": ckpt.spec.name,
                "experts": sorted(dits), "load_s": round(time.perf_counter() - start, 3)}

    def _rank_device(self, options: EngineOptions) -> str:
        """The device this rank runs on: the group's choice, unless the options ask for CPU."""
        ctx = self._require_ctx()
        wants_cuda = options.torch_device.type == "cuda"
        if wants_cuda and self.device.type != "cuda":
            raise RuntimeError(
                f"options.device={options.device!r} but rank {ctx.rank} has no CUDA GPU "
                f"(group backend {ctx.backend}, GPUs {ctx.gpu_ids or 'none'}); use device='cpu' "
                "or give the group real GPUs")
        if not wants_cuda and ctx.backend == "nccl":
            raise RuntimeError(f"options.device={options.device!r} cannot run over NCCL; "
                               "use a CUDA device or a gloo group (gpus_per_worker=0)")
        return str(self.device) if wants_cuda else options.device

    def warm_up(self) -> float:
        """One guided forward of every expert at a tiny size on every rank (exercises the
        collectives; the inputs are the family adapter's). Seconds."""
        stage = self._require_stage()
        dtype = self.options.torch_dtype
        start = time.perf_counter()
        with self._run_lock, torch.no_grad():
            for name, dit in stage.dits.items():
                x, t, context, image = stage.adapter.dummy_inputs(dit, self.spec.text_len, self.device, dtype)
                with resident(dit):
                    stage.predictors[name](x, t, context, context, 5.0, image)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def denoise(self, request: ResolvedRequest, text_embeds: "TextEmbeds",
                image_cond: "ImageCond | None", job_id: str) -> "Latents | None":
        """Run the sampler loop on every rank; rank 0 returns the Latents, the others None.
        Raises `stages.base.Cancelled` on every rank when the job was cancelled.

        `request` is resolved once by the caller (`GenerationRequest.resolve(spec)`): every rank
        must run the same request, the same seed included."""
        if not isinstance(request, ResolvedRequest):
            raise TypeError(f"DiTWorker.denoise: expected a ResolvedRequest (resolve it once before "
                            f"sending it to the group: GenerationRequest.resolve(spec)), got "
                            f"{type(request).__name__}")
        stage = self._require_stage()
        with self._run_lock:
            self._set_progress(job_id, 0, request.steps)
            try:
                latents = stage(request, text_embeds, image_cond,
                                progress=lambda done, total: self._set_progress(job_id, done, total),
                                should_cancel=lambda: self._agreed_cancel(job_id))
            finally:
                with self._state_lock:
                    self._cancelled.pop(job_id, None)
        return latents if self._require_ctx().rank == 0 else None

    def load_vae(self, checkpoint: "str | Checkpoint", options: EngineOptions) -> None:
        """Load the VAE on this rank too, for `decode` split over the group's ranks."""
        from engine.checkpoint import resolve_checkpoint
        from engine.families import get_family

        options = options.with_(device=self._rank_device(options))
        ckpt = resolve_checkpoint(checkpoint) if isinstance(checkpoint, str) else checkpoint
        self.vae = get_family(ckpt.spec.family).load_vae(ckpt, options)

    def decode(self, latents: "Latents", mode: str = "halo", tile_latent: tuple[int, int] = (32, 32),
               overlap_latent: tuple[int, int] = (8, 8)) -> "torch.Tensor | None":
        """VAE decode split over all ranks; rank 0 returns the video (1, 3, F, H, W) in [-1, 1]
        (CPU, float32), the other ranks None. Modes (`SPLIT_DECODES`):
        "halo" (default): row stripes with halo exchange, equal to the single-rank decode
        (`engine.parallel.vae_halo`); "tiles": overlapping tiles blended on rank 0, bounded memory
        per tile, close to but not equal to the plain decode (`engine.parallel.vae`)."""
        from engine.parallel.mesh import SINGLE, SubGroup

        if self.vae is None:
            raise RuntimeError("DiTWorker: no VAE loaded; call load_vae(checkpoint, options) first")
        if mode not in SPLIT_DECODES:
            raise ValueError(f"decode mode must be one of {sorted(SPLIT_DECODES)}, got {mode!r}")
        ctx = self._require_ctx()
        group = SINGLE if ctx.world_size == 1 else SubGroup(dist.group.WORLD, ctx.world_size, ctx.rank)
        x = latents.latents[None].to(self.device)
        with self._run_lock, torch.no_grad():  # never two threads' collectives at once
            video = SPLIT_DECODES[mode](self.vae, x, group, tile_latent, overlap_latent)
        return None if video is None else video.float().cpu()

    def cancel(self, job_id: str) -> None:
        """Ask the job to stop before its next step (or not to start)."""
        with self._state_lock:
            self._cancelled[job_id] = None
            while len(self._cancelled) > _MAX_REMEMBERED:
                self._cancelled.popitem(last=False)

    def progress(self, job_id: str) -> dict | None:
        """{"step": done, "total": steps} of a job this rank has started, else None."""
        with self._state_lock:
            entry = self._progress.get(job_id)
            return dict(entry) if entry is not None else None

    def check_health(self) -> dict:
        """Raises if this rank cannot work (device lost); returns a short status."""
        ctx = self._require_ctx()
        if self.device.type == "cuda":
            # Raises on a sticky CUDA error without waiting for a running job's queued kernels
            # (the DiTGroup deployment calls this from Serve's periodic health check).
            torch.cuda.current_stream(self.device).query()
            # GPU memory of this rank, for the service's metrics (lightx2v_gpu_memory_bytes).
            return {"rank": ctx.rank, "device": str(self.device), "loaded": self.stage is not None,
                    "gpu_memory_bytes": torch.cuda.memory_allocated(self.device),
                    "gpu_peak_bytes": torch.cuda.max_memory_allocated(self.device)}
        return {"rank": ctx.rank, "device": str(self.device), "loaded": self.stage is not None}

    def shutdown(self) -> None:
        """Drop the model (the group destroys the process group afterwards)."""
        self.stage = self.vae = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- helpers ------------------------------------------------------------------------------
    def _agreed_cancel(self, job_id: str) -> bool:
        """Whether any rank saw a cancel for the job: all ranks agree (one tiny all-reduce)."""
        with self._state_lock:
            flag = job_id in self._cancelled
        if self._require_ctx().world_size == 1:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def _set_progress(self, job_id: str, done: int, total: int) -> None:
        with self._state_lock:
            self._progress[job_id] = {"step": done, "total": total}
            self._progress.move_to_end(job_id)
            while len(self._progress) > _MAX_REMEMBERED:
                self._progress.popitem(last=False)

    def _require_ctx(self) -> WorkerContext:
        if self.ctx is None:
            raise RuntimeError("DiTWorker: init_device(ctx) was not called (start it in a WorkerGroup)")
        return self.ctx

    def _require_stage(self) -> Any:
        if self.stage is None:
            raise RuntimeError("DiTWorker: no model loaded; call load_model(checkpoint, options) first")
        return self.stage


def start_dit_group(worker_cls: type, world_size: int, checkpoint: "str | Checkpoint",
                    options: EngineOptions, *, gpus_per_worker: float, timeout_s: float = 600,
                    wait_for_gpus: bool = False, **worker_kwargs: Any) -> WorkerGroup:
    """A started group of `world_size` DiT workers with the DiT of `checkpoint` loaded and warmed
    up on every rank. On any failure the group is shut down (no workers left behind) and the
    error raised. `wait_for_gpus`: see `WorkerGroup`."""
    group = WorkerGroup(worker_cls, world_size, gpus_per_worker=gpus_per_worker, timeout_s=timeout_s,
                        wait_for_gpus=wait_for_gpus)
    group.start(**worker_kwargs)
    try:
        group.get(group.call("load_model", checkpoint, options))
        group.get(group.call("warm_up"))
    except BaseException:
        group.shutdown()
        raise
    return group


def _halo_decode(vae, latents, group, tile_latent, overlap_latent):
    from engine.parallel.vae_halo import halo_split_decode

    return halo_split_decode(vae, latents, group)


def _tile_decode(vae, latents, group, tile_latent, overlap_latent):
    from engine.parallel.vae import split_decode

    return split_decode(vae, latents, group, tile_latent, overlap_latent)


SPLIT_DECODES = {"halo": _halo_decode, "tiles": _tile_decode}
"""How `DiTWorker.decode` splits the VAE decode over the group's ranks."""
