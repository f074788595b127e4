"""RIFE v4 interpolation: parity with ccvfi's IFNet (a published RIFE v4.26 implementation) on the
same random weights, float32 CPU, for a factor of 2 and a non-integer fps ratio; the timing against
ccvfi's TMapper; scene cuts against ccvfi's SSIM check; the checkpoint loader; the tiny model."""
from __future__ import annotations

import importlib.util
import math
import sys
import types
from fractions import Fraction

import pytest
import torch

from engine.models.rife.ifnet import IFNet
from engine.models.rife.interpolator import RifeInterpolator, frame_plan, output_count, ssim_thumbnails
from engine.models.rife.loader import PREFIX, VARIANTS, detect_variant, load_ifnet, strip_prefix

TOL = 1e-3  # relative, as the issue asks


def _import_ccvfi():
    """ccvfi's IFNet, TMapper and check_scene. Its package __init__ imports its model wrappers,
    which need torchvision and cv2 that the IFNet does not use: import the package as a bare
    namespace so only the submodules asked for are executed."""
    if "ccvfi" not in sys.modules:
        spec = importlib.util.find_spec("ccvfi")
        if spec is None:
            pytest.skip("ccvfi is not installed (pip install -e '.[dev]')")
        pkg = types.ModuleType("ccvfi")
        pkg.__spec__ = spec
        pkg.__path__ = list(spec.submodule_search_locations)
        sys.modules["ccvfi"] = pkg
    from ccvfi.arch import ifnet_arch
    from ccvfi.util import misc

    return ifnet_arch, misc


def smooth_clip(n: int, h: int, w: int, shift: float = 2.0, cut_at: int | None = None) -> torch.Tensor:
    """(n, h, w, 3) in [0, 1]: a smooth colour pattern moving `shift` px per frame; from frame
    `cut_at` on, a different pattern (a scene cut)."""
    y = torch.arange(h, dtype=torch.float32).view(h, 1)
    x = torch.arange(w, dtype=torch.float32).view(1, w)
    frames = []
    for i in range(n):
        xs = x - shift * i
        if cut_at is not None and i >= cut_at:
            rgb = (0.5 + 0.45 * torch.cos(xs / 3 - y / 4), 0.5 - 0.45 * torch.sin(y / 2),
                   0.5 + 0.45 * torch.cos(xs / 2))
        else:
            rgb = (0.5 + 0.4 * torch.sin(xs / 7 + y / 11), 0.5 + 0.4 * torch.cos(y / 5 - xs / 13),
                   0.5 + 0.4 * torch.sin((xs + y) / 9))
        frames.append(torch.stack([c.expand(h, w) for c in rgb], -1))
    return torch.stack(frames)


def randomize_reference_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Weights large enough that the flows are several pixels and the mask far from 0.5:
    N(0, 1) / sqrt(fan_in), biases 0.1 N(0, 1), residual scales 1 + 0.2 N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif name.endswith("beta"):
                p.copy_(1.0 + 0.2 * noise)
            else:
                p.copy_(noise / max(1, p[0].numel()) ** 0.5)
    return module


def save_flownet(module: torch.nn.Module, path) -> str:
    """As the Practical-RIFE releases: a torch.save'd state dict with DataParallel's prefix."""
    torch.save({PREFIX + k: v for k, v in module.state_dict().items()}, path)
    return str(path)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """ccvfi's IFNet (the v4.26 heavy shapes) with random weights, and ours loaded from its file."""
    ifnet_arch, misc = _import_ccvfi()
    torch.manual_seed(0)
    ref = randomize_reference_(ifnet_arch.IFNet()).eval()
    path = save_flownet(ref, tmp_path_factory.mktemp("rife") / "flownet.pkl")
    ours = RifeInterpolator.load(path, scene_threshold=0.2, batch_size=3)
    return ref, ours, misc


def reference_clip(ref, misc, frames: torch.Tensor, src: float, dst: float, threshold: float) -> torch.Tensor:
    """ccvfi's own two-frame loop (ccvfi.vs.vfi.inference_vsr_two_frame_in) without VapourSynth:
    per input pair, TMapper's normalised timestamps; a copy of I0 across a scene cut or at t == 0,
    I1 at t == 1, else the IFNet; over every pair (ccvfi stops one pair early), then the last
    input frame when an output time falls on it (ccvfi pads the tail with repeats instead)."""
    video = frames.permute(0, 3, 1, 2)[:, None]                       # (N, 1, 3, H, W), as ccvfi's frames
    mapper = misc.TMapper(src, dst)
    out = []
    n = video.shape[0]
    for i in range(n - 1):
        i0, i1 = video[i], video[i + 1]
        ts = mapper.get_range_timestamps(i, i + 1, lclose=True, rclose=False, normalize=True)
        scene = misc.check_scene(i0, i1, True, threshold)
        for t in ts:
            if scene or t == 0:
                out.append(i0[0])
            elif t == 1:
                out.append(i1[0])
            else:
                with torch.no_grad():
                    out.append(ref(torch.cat([i0, i1], 1), t, [16, 8, 4, 2, 1])[0])
    if ((n - 1) * mapper.times).is_integer():
        out.append(video[-1, 0])
    return torch.stack(out).permute(0, 2, 3, 1)


def assert_close_rel(ours: torch.Tensor, ref: torch.Tensor, tol: float = TOL) -> float:
    err = (ours - ref).abs().max().item() / ref.abs().max().item()
    assert err < tol, f"relative error {err:.2e} >= {tol}"
    return err


# --------------------------------------------------------------------------- parity


def test_loader_detects_the_reference_variant(reference):
    _, ours, _ = reference
    assert ours.model.config == VARIANTS["4.26.heavy"].config


def test_factor_two_matches_ccvfi(reference):
    ref, ours, misc = reference
    frames = smooth_clip(4, 128, 128)
    got = ours.interpolate(frames, 16, 32)
    want = reference_clip(ref, misc, frames, 16, 32, 0.2)
    assert got.shape == want.shape == (7, 128, 128, 3)
    assert_close_rel(got, want)
    # the in-between frames are not copies, and a wrong timestep is far outside the tolerance
    assert (got[1] - frames[0]).abs().max() > 100 * TOL
    with torch.no_grad():
        a, b = frames[0:1].permute(0, 3, 1, 2), frames[1:2].permute(0, 3, 1, 2)
        wrong_t = ours.model(a, b, torch.tensor([0.4]))[0].permute(1, 2, 0)
    assert (wrong_t - want[1]).abs().max() > 30 * TOL * want.abs().max()


def test_non_integer_ratio_matches_ccvfi(reference):
    ref, ours, misc = reference
    frames = smooth_clip(4, 128, 128, shift=3.0)
    got = ours.interpolate(frames, 16, 25)                             # ratio 25/16
    want = reference_clip(ref, misc, frames, 16, 25, 0.2)
    assert got.shape[0] == want.shape[0] == output_count(4, 16, 25) == 5
    assert_close_rel(got, want)


def test_scene_cut_matches_ccvfi(reference):
    ref, ours, misc = reference
    frames = smooth_clip(4, 128, 128, cut_at=2)
    cuts = ours.scene_cuts(frames.permute(0, 3, 1, 2)).tolist()
    video = frames.permute(0, 3, 1, 2)
    assert cuts == [misc.check_scene(video[i:i + 1], video[i + 1:i + 2], True, 0.2) for i in range(3)]
    assert cuts == [False, True, False]
    ssim = ssim_thumbnails(video[:-1], video[1:])
    for i in range(3):
        small = [torch.nn.functional.interpolate(v, (32, 32), mode="bilinear", align_corners=False)
                 for v in (video[i:i + 1], video[i + 1:i + 2])]
        assert ssim[i].item() == pytest.approx(misc.ssim_matlab(*small).item(), abs=1e-5)
    got = ours.interpolate(frames, 16, 32)
    want = reference_clip(ref, misc, frames, 16, 32, 0.2)
    assert torch.equal(got[3], frames[1])                              # across the cut: a copy
    assert_close_rel(got, want)


def test_v4_25_shapes_match_ccvfi_blocks(tmp_path):
    """The v4.25/v4.26 (non-heavy) shapes: ccvfi's IFNet with its own Head and IFBlocks resized."""
    ifnet_arch, _ = _import_ccvfi()
    ref = ifnet_arch.IFNet()
    ref.encode.cnn3 = torch.nn.ConvTranspose2d(16, 4, 4, 2, 1)
    widths = VARIANTS["4.25"].config.widths
    ref.block0 = ifnet_arch.IFBlock(7 + 8, c=widths[0])
    for i, c in enumerate(widths[1:], 1):
        setattr(ref, f"block{i}", ifnet_arch.IFBlock(8 + 4 + 8 + 8, c=c))
    ref = randomize_reference_(ref, seed=1).eval()
    ours = load_ifnet(save_flownet(ref, tmp_path / "flownet.pkl"))
    assert ours.config == VARIANTS["4.25"].config
    frames = smooth_clip(2, 128, 192).permute(0, 3, 1, 2)
    with torch.no_grad():
        want = ref(torch.cat([frames[0:1], frames[1:2]], 1), 0.3, [16, 8, 4, 2, 1])
        got = ours(frames[0:1], frames[1:2], torch.tensor([0.3]))
    assert_close_rel(got, want)


# --------------------------------------------------------------------------- timing


def test_timestamps_match_ccvfi_tmapper():
    _, misc = _import_ccvfi()
    for src, dst, n in ((16, 32, 9), (16, 25, 9), (16, 24, 7), (24, 60, 5), (16, 48, 4)):
        plan = frame_plan(n, src, dst)
        mapper = misc.TMapper(src, dst)
        want = [(i, t) for i in range(n - 1)
                for t in mapper.get_range_timestamps(i, i + 1, lclose=True, rclose=False, normalize=True)]
        got = [(f.source, float(f.t)) for f in plan if f.source < n - 1]
        assert [g[0] for g in got] == [w[0] for w in want], (src, dst)
        assert [g[1] for g in got] == pytest.approx([w[1] for w in want], abs=1e-9), (src, dst)


def test_integer_factor_is_practical_rife_layout():
    for m in (2, 3, 4):
        plan = frame_plan(17, 16, 16 * m)
        assert len(plan) == 16 * m + 1                                 # (N - 1) * multi + 1
        assert [f.t for f in plan[:m]] == [Fraction(j, m) for j in range(m)]
        assert plan[-1] == type(plan[-1])(16, Fraction(0))


def test_frame_plan_errors_and_rates():
    with pytest.raises(ValueError, match="target_fps"):
        frame_plan(17, 16, 15)
    assert len(frame_plan(17, 16, 16)) == 17
    assert len(frame_plan(1, 16, 32)) == 1
    # NTSC rates as floats: 23.976 -> 29.97 is 5/4 exactly
    assert output_count(5, 24000 / 1001, 30000 / 1001) == math.floor(4 * 5 / 4) + 1


# --------------------------------------------------------------------------- loader


def test_every_variant_is_detected_from_its_shapes():
    for variant in VARIANTS.values():
        with torch.device("meta"):
            state = IFNet(variant.config).state_dict()
        assert detect_variant(state) == variant, variant.name
    signatures = [repr(v.config) for v in VARIANTS.values()]
    assert len(set(signatures)) == len(signatures)


def test_loader_prefix_extra_and_missing_keys(tmp_path):
    from engine.models.rife.tiny import tiny_ifnet

    model = tiny_ifnet()
    state = model.state_dict()
    # no prefix, plus a key some releases carry outside the IFNet
    torch.save({**state, "teacher.weight": torch.zeros(1)}, tmp_path / "a.pkl")
    loaded = load_ifnet(str(tmp_path / "a.pkl"))
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert strip_prefix({PREFIX + "x": 1, "y": 2}) == {"x": 1}
    # a missing tensor is an error, never a silently random layer
    partial = {PREFIX + k: v for k, v in state.items() if k != "block2.lastconv.0.bias"}
    torch.save(partial, tmp_path / "b.pkl")
    with pytest.raises(RuntimeError, match="block2.lastconv.0.bias"):
        load_ifnet(str(tmp_path / "b.pkl"))
    # unknown shapes name the known variants
    odd = {k: v for k, v in state.items()}
    odd["block1.conv0.1.0.weight"] = torch.zeros(7, 1, 3, 3)
    torch.save(odd, tmp_path / "c.pkl")
    with pytest.raises(ValueError, match="4.25"):
        load_ifnet(str(tmp_path / "c.pkl"))
    with pytest.raises(FileNotFoundError, match="flownet.pkl"):
        load_ifnet(str(tmp_path / "nowhere"))


# --------------------------------------------------------------------------- tiny, batching, padding


def test_tiny_interpolator_is_deterministic_and_loads(tmp_path, monkeypatch):
    from engine.models.rife.tiny import materialize_tiny_rife

    monkeypatch.setenv("LIGHTX2V_CACHE", str(tmp_path))
    first = materialize_tiny_rife()
    blob = open(f"{first}/flownet.pkl", "rb").read()
    assert materialize_tiny_rife() == first
    assert all(k.startswith(PREFIX) for k in torch.load(f"{first}/flownet.pkl", weights_only=True))
    import shutil

    shutil.rmtree(first)
    assert open(f"{materialize_tiny_rife()}/flownet.pkl", "rb").read() == blob
    interp = RifeInterpolator.load("tiny")
    assert interp.model.config == VARIANTS["tiny"].config


def test_batching_padding_and_copies():
    """Sizes off the model's modulo (padded and cropped back), batch size invariance, exact
    copies at t = 0."""
    from engine.models.rife.tiny import tiny_ifnet

    frames = smooth_clip(5, 40, 72)
    model = tiny_ifnet()
    one = RifeInterpolator(model, batch_size=1).interpolate(frames, 16, 40)
    many = RifeInterpolator(model, batch_size=16).interpolate(frames, 16, 40)
    assert one.shape == (output_count(5, 16, 40), 40, 72, 3) == (11, 40, 72, 3)
    torch.testing.assert_close(one, many, rtol=0, atol=1e-5)
    for k, f in enumerate(frame_plan(5, 16, 40)):
        if f.t == 0:
            assert torch.equal(one[k], frames[f.source])
        else:
            assert (one[k] - frames[f.source]).abs().max() > 1e-3
    with pytest.raises(ValueError, match="flow_scale"):
        RifeInterpolator(model, flow_scale=0.3)
