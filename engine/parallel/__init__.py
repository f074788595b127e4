"""Parallel DiT inference over torch.distributed (no Ray): CFG-parallel x Ulysses.

    mesh = init_mesh(options.parallel, device)       # on every rank, after init_process_group
    predictor = apply_parallel(transformer, mesh)    # swaps modules; returns the predictor
    DenoiseStage(transformer, options, predictor=predictor)

World size N = cfg x ulysses. See `mesh` (rank layout), `ulysses` (sequence split),
`cfg` (branch split and what the cfg ranks do with guidance off) and `vae` (split VAE decode).
"""
from __future__ import annotations

from typing import Mapping

from torch import nn

from engine.dit import num_heads, sequence_attention_slots
from engine.guidance import CFGPredictor, CombineFn, GuidedPredictor, combine
from engine.options import EngineOptions
from engine.parallel.cfg import CFGParallelPredictor
from engine.parallel.mesh import ParallelMesh, SubGroup, init_mesh, single_mesh
from engine.parallel.ulysses import UlyssesState, apply_ulysses, check_heads

__all__ = ["CFGParallelPredictor", "ParallelMesh", "SubGroup", "apply_parallel", "guided_predictors", "check_heads",
           "check_parallel_config", "init_mesh", "single_mesh"]


def check_parallel_config(model: nn.Module, ulysses: int) -> None:
    """Refuse, with a clear message, a Ulysses degree the model's heads do not divide, or any
    Ulysses degree > 1 for a model without a sequence-parallel split."""
    if ulysses > 1 and not sequence_attention_slots(model):
        raise ValueError(
            f"parallel.ulysses={ulysses}: {type(model).__name__} has no sequence-parallel split (it declares "
            "no `sequence_attention` core, e.g. joint text + image attention); use parallel.ulysses=1 "
            "(CFG-parallel, parallel.cfg=2, works)")
    check_heads(num_heads(model), ulysses, "parallel.ulysses")


def guided_predictors(dits: Mapping[str, nn.Module], options: EngineOptions,
                      mesh: ParallelMesh | None = None, combine_fn: CombineFn = combine
                      ) -> dict[str, GuidedPredictor]:
    """The guided predictor of every expert's DiT (`apply_parallel` on `mesh`, each expert its
    own state and predictor; no mesh = world size 1), batching the guidance branches as the
    options say (`EngineOptions.cfg_batch`) and combining them with `combine_fn` (the model's
    guidance mode: `engine.guidance.combiner(spec.guidance, spec.latent.patch)`)."""
    mesh = mesh if mesh is not None else single_mesh()
    return {name: apply_parallel(dit, mesh, batched=options.cfg_batch, combine_fn=combine_fn)
            for name, dit in dits.items()}


def apply_parallel(model: nn.Module, mesh: ParallelMesh, batched: bool = False,
                   combine_fn: CombineFn = combine) -> GuidedPredictor:
    """Make `model` run on `mesh` and return the guided predictor the denoise loop should call.

    World size 1: the model is untouched and the plain `CFGPredictor` is returned (`batched`:
    both branches as one batch-2 forward where one rank runs both).
    Otherwise the model's sequence hooks and sequence-attention cores (engine.dit seams) are
    swapped for Ulysses versions (also when ulysses = 1: they are then no-ops unless guidance is
    off and the world splits the tokens) and a `CFGParallelPredictor` is returned. Raises ValueError when the heads do not divide by the
    Ulysses degree. Call it on each expert of a model with several (each gets its own state and
    predictor on the same mesh).
    """
    if mesh.is_single:
        return CFGPredictor(model, batched, combine_fn)
    check_parallel_config(model, mesh.config.ulysses)
    if not sequence_attention_slots(model):
        # CFG-parallel only (no sequence split): each cfg rank runs its branch whole, and with
        # guidance off every rank runs the one branch (its own 1-rank "Ulysses" group).
        return CFGParallelPredictor(model, mesh, UlyssesState(), mesh.ulysses, batched, combine_fn)
    heads = num_heads(model)
    check_heads(heads, mesh.config.ulysses, "parallel.ulysses")
    state = UlyssesState()
    apply_ulysses(model, state)
    guidance_off_group = mesh.world if heads % mesh.world_size == 0 else mesh.ulysses
    return CFGParallelPredictor(model, mesh, state, guidance_off_group, batched, combine_fn)
