"""The Wan family: Wan2.2 registry entries, variant detection in both layouts, refusals."""
from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from engine.checkpoint import find_spec, resolve_checkpoint
from engine.families import get_family
from engine.models.wan import tiny
from engine.models.wan.adapter import ConcatAdapter, FirstFrameAdapter
from engine.options import EngineOptions
from engine.registry import get_spec

torch.set_num_threads(1)
WAN = get_family("wan")


def test_wan22_entries_follow_the_official_defaults():
    t2v, i2v, ti2v = get_spec("wan2.2-t2v-a14b"), get_spec("wan2.2-i2v-a14b"), get_spec("wan2.2-ti2v-5b")
    assert [(e.name, e.role) for e in t2v.experts] == [("transformer", "high_noise"), ("transformer_2", "low_noise")]
    assert (t2v.boundary_ratio, i2v.boundary_ratio, ti2v.boundary_ratio) == (0.875, 0.9, None)
    d = t2v.defaults
    assert (d.num_frames, d.fps, d.steps, d.shift, d.guidance_scale, d.guidance_scale_2) == (81, 16, 40, 12.0, 4.0, 3.0)
    d = i2v.defaults
    assert (d.steps, d.shift, d.guidance_scale, d.guidance_scale_2) == (40, 5.0, 3.5, 3.5)
    d = ti2v.defaults
    assert (d.num_frames, d.fps, d.height, d.width, d.steps, d.shift) == (121, 24, 704, 1280, 50, 5.0)
    assert ti2v.tasks == frozenset({"t2v", "i2v"}) and i2v.tasks == frozenset({"i2v"})
    assert (ti2v.latent.channels, ti2v.spatial_stride, t2v.latent.channels, t2v.spatial_stride) == (48, 32, 16, 16)


def test_names_people_use_resolve_case_insensitively():
    assert find_spec("Wan2.2-T2V-A14B").name == "wan2.2-t2v-a14b"
    assert find_spec("wan-ai/wan2.2-ti2v-5b-diffusers").name == "wan2.2-ti2v-5b"
    assert find_spec("WAN2.1-T2V-14B").name == "wan2.1-t2v-14b"
    assert find_spec("Wan2.3") is None


@pytest.mark.parametrize("name,experts,adapter", [
    ("tiny-wan2.2-a14b", 2, ConcatAdapter), ("tiny-wan2.2-ti2v", 1, FirstFrameAdapter), ("tiny-wan", 1, ConcatAdapter)])
def test_tiny_models_detect_as_their_entries_in_both_layouts(name, experts, adapter, tmp_path):
    ckpt = resolve_checkpoint(name)
    assert ckpt.spec.name == name and len(ckpt.spec.experts) == experts
    assert resolve_checkpoint(ckpt.path).spec.name == name  # the folder itself, by its config
    assert isinstance(WAN.adapter(ckpt.spec), adapter)
    official = resolve_checkpoint(tiny.write_official_layout(ckpt.path, str(tmp_path / "official")))
    assert official.layout == "official" and official.spec.name == name


def _copy(name: str, tmp_path) -> str:
    dst = str(tmp_path / name)
    shutil.copytree(resolve_checkpoint(name).path, dst)
    return dst


def _edit_index(path: str, **changes) -> None:
    file = os.path.join(path, "model_index.json")
    with open(file) as f:
        index = json.load(f)
    index.update(changes)
    with open(file, "w") as f:
        json.dump(index, f)


def test_a_component_the_loader_would_ignore_is_refused(tmp_path):
    path = _copy("tiny-wan2.2-a14b", tmp_path)
    _edit_index(path, image_encoder=["transformers", "CLIPVisionModel"])
    with pytest.raises(ValueError, match=r"components this Wan variant does not use: \['image_encoder'\]"):
        resolve_checkpoint(path)
    _edit_index(path, image_encoder=[None, None], transformer_3=["diffusers", "WanTransformer3DModel"])
    with pytest.raises(ValueError, match="transformer_3"):
        resolve_checkpoint(path)
    _edit_index(path, transformer_3=[None, None], boundary_ratio=None)
    with pytest.raises(ValueError, match="transformer_2 but no boundary_ratio"):
        resolve_checkpoint(path)


def test_a_folder_boundary_ratio_replaces_the_entry(tmp_path):
    path = _copy("tiny-wan2.2-a14b", tmp_path)
    _edit_index(path, boundary_ratio=0.9)
    assert resolve_checkpoint(path).spec.boundary_ratio == 0.9


def test_expert_offload_needs_two_experts():
    ckpt = resolve_checkpoint("tiny-wan")
    with pytest.raises(ValueError, match="offload='expert'.*one DiT"):
        WAN.load_dits(ckpt, EngineOptions(offload="expert"))
    dits = WAN.load_dits(resolve_checkpoint("tiny-wan2.2-a14b"), EngineOptions(offload="expert"))
    assert sorted(dits) == ["transformer", "transformer_2"]
    assert not torch.equal(dits["transformer"].proj_out.weight, dits["transformer_2"].proj_out.weight)


def test_the_text_only_a14b_has_no_image_encoder_and_ti2v_none_needed():
    assert WAN.load_image_encoder(resolve_checkpoint("tiny-wan2.2-ti2v"), EngineOptions()) is None
    assert WAN.load_image_encoder(resolve_checkpoint("tiny-wan2.2-a14b"), EngineOptions()) is None
