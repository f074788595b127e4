"""Image models through the library and the command line (tiny-qwen-image, tiny-qwen-image-edit,
CPU): PNG by default, "np" as (H, W, 3), "pil", "latent"; `-o out.png`, `--image`, `--images`."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lightx2v import LightX2V
from stages.payloads import EncodedImage

SIZE = (48, 80)  # (height, width): not square


@pytest.fixture(scope="module")
def t2i():
    return LightX2V.from_pretrained("tiny-qwen-image", device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def edit():
    return LightX2V.from_pretrained("tiny-qwen-image-edit", device="cpu", dtype="float32")


def picture(path, size=(40, 56), seed=1) -> str:
    Image.fromarray((np.random.default_rng(seed).random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


def test_output_types(t2i, tmp_path):
    kw = dict(resolution=SIZE, seed=3, steps=2)
    path = t2i.generate("a red fox", output_path=tmp_path / "fox.png", **kw)
    png = np.asarray(Image.open(path))
    pixels = t2i.generate("a red fox", output_type="np", **kw)
    pil = t2i.generate("a red fox", output_type="pil", **kw)
    latents = t2i.generate("a red fox", output_type="latent", **kw)
    assert png.shape == pixels.shape == (48, 80, 3) and pixels.dtype == np.float32 and pixels.std() > 1e-3
    assert isinstance(pil, Image.Image) and pil.size == (80, 48)
    assert np.array_equal(np.asarray(pil), png)                        # PNG = the rounded pixels
    assert np.abs(png / 255.0 - pixels).max() <= 0.5 / 255 + 1e-6
    assert tuple(latents.shape) == (16, 1, 6, 10)
    assert t2i.last_result.request.output_type == "latent"
    default = t2i.generate("a red fox", **kw)                          # PNG in a temp file by default
    assert default.endswith(".png") and np.array_equal(np.asarray(Image.open(default)), png)


def test_the_decode_stage_returns_a_png_payload(t2i):
    from stages.request import GenerationRequest

    result = t2i.pipeline.run(GenerationRequest(prompt="x", height=32, width=48, steps=2, seed=0))
    out = result.output
    assert isinstance(out, EncodedImage) and out.mime_type == "image/png" and (out.height, out.width) == (32, 48)
    assert Image.open(io.BytesIO(out.data)).format == "PNG"


def test_pil_is_for_image_models(tiny_wan_dir):
    wan = LightX2V.from_pretrained("tiny-wan", device="cpu", dtype="float32")
    with pytest.raises(ValueError, match="output_type 'pil' is for image models"):
        wan.generate("x", output_type="pil")


def test_edit_with_one_and_several_images(edit, tmp_path):
    one, two = picture(tmp_path / "a.png"), picture(tmp_path / "b.png", (64, 40), seed=2)
    a = edit.generate("make it red", image=one, resolution=SIZE, seed=1, steps=2, output_type="np")
    b = edit.generate("make it red", images=[one, two], resolution=SIZE, seed=1, steps=2, output_type="np")
    assert a.shape == b.shape == (48, 80, 3) and np.abs(a - b).max() > 1e-3
    assert edit.last_result.request.images[1].size == (64, 40)
    with pytest.raises(ValueError, match="image: is required"):
        edit.generate("make it red")


def test_cli_writes_png_and_refuses_another_extension(tmp_path, capsys):
    from lightx2v.cli import main

    out = tmp_path / "fox.png"
    assert main(["generate", "--model", "tiny-qwen-image", "--prompt", "a fox", "--size", "80x48",
                 "--steps", "2", "--device", "cpu", "-o", str(out)]) == 0
    assert Image.open(out).size == (80, 48)
    assert "wrote" in capsys.readouterr().out
    edited = tmp_path / "edited.png"
    assert main(["generate", "--model", "tiny-qwen-image-edit", "--prompt", "make it red", "--images", str(out),
                 picture(tmp_path / "b.png"), "--steps", "2", "--device", "cpu", "-o", str(edited)]) == 0
    assert Image.open(edited).size == (64, 64)
    assert main(["generate", "--model", "tiny-qwen-image", "--prompt", "a fox", "--device", "cpu",
                 "-o", str(tmp_path / "fox.mp4")]) == 2
    assert "writes PNG (image model); name the file *.png" in capsys.readouterr().err


def test_one_step_is_refused_before_any_work(t2i):
    """The schedule stretches its last sigma to shift_terminal: one step from sigma 1 is 0 / 0."""
    with pytest.raises(ValueError, match="steps: must be at least 2 for tiny-qwen-image"):
        t2i.generate("x", steps=1)
