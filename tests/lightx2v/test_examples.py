"""The README's examples run as written. Each statement of its "## Examples" code runs, on the CPU,
with the model names it shows standing for the tiny random-weight Wan2.2 TI2V
(`tiny-wan2.2-ti2v`, the same architecture as Wan2.2-TI2V-5B): the name through
$LIGHTX2V_MODEL_ROOT, the hub id through a Hugging Face cache laid out as huggingface_hub lays it
out. Also `offload=True` and `--download` without network."""
from __future__ import annotations

import ast
import os
import re
import shlex
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))  # tests/: the fake hub cache writer
from hub_cache import write_snapshot  # noqa: E402

import lightx2v  # noqa: E402
from engine import hub  # noqa: E402
from engine.registry import get_spec  # noqa: E402
from lightx2v.api import LightX2V, recommended_offload  # noqa: E402
from lightx2v.cli import main  # noqa: E402
from stages.request import image_video_size  # noqa: E402

README = Path(__file__).resolve().parents[2] / "README.md"
TINY = "tiny-wan2.2-ti2v"
STANDS_FOR = {"Wan2.2-TI2V-5B": "tiny-ti2v",                              # a folder in the model root
              "Wan-AI/Wan2.2-TI2V-5B-Diffusers": "tiny-org/tiny-wan2.2-ti2v"}  # a repo in the hub cache
"""The README's model names -> names that resolve to the tiny model the same way."""


def examples_section() -> str:
    text = README.read_text()
    start = text.index("\n## Examples\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def code_blocks(section: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


@pytest.fixture
def places(tmp_path, monkeypatch):
    """The tiny model under the README's names: a model root and a hub cache; no network."""
    source = get_spec(TINY).materialize()
    root = tmp_path / "models"
    root.mkdir()
    os.symlink(source, root / STANDS_FOR["Wan2.2-TI2V-5B"])
    write_snapshot(tmp_path / "hf-cache", STANDS_FOR["Wan-AI/Wan2.2-TI2V-5B-Diffusers"], source, "c" * 40)
    for name in ("HF_HOME", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(hub.MODEL_ROOT_ENV, str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")   # a download would fail: none is needed
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (1280, 720), (40, 90, 200)).save("in.jpg")
    return tmp_path


def test_readme_examples_run_as_written(places, monkeypatch):
    (python,) = code_blocks(examples_section(), "python")
    loaded, results = [], []

    class Example(LightX2V):
        """LightX2V on the CPU, with the README's model names standing for the tiny model."""

        @classmethod
        def from_pretrained(cls, model, device="cuda", dtype="bfloat16", **kwargs):
            assert device == "cuda" and model in STANDS_FOR, (model, device)   # as the README writes it
            instance = LightX2V.from_pretrained.__func__(cls, STANDS_FOR[model], "cpu", "float32", **kwargs)
            loaded.append((model, kwargs, instance))
            return instance

        def generate(self, *args, **kwargs):
            path = super().generate(*args, **kwargs)
            results.append((path, self.last_result))
            return path

    monkeypatch.setattr(lightx2v, "LightX2V", Example)   # what `from lightx2v import LightX2V` gets
    namespace: dict = {}
    for statement in ast.parse(python).body:             # line by line, as a user would paste them
        exec(compile(ast.Module([statement], []), "README.md", "exec"), namespace)

    # from_pretrained: a name (model root) and a hub id (cache), int8, offload=True, download=True
    (name, kw1, first), (hub_id, kw2, second) = loaded
    assert (name, kw1) == ("Wan2.2-TI2V-5B", {})
    assert hub_id == "Wan-AI/Wan2.2-TI2V-5B-Diffusers"
    assert kw2 == dict(quantization="int8", offload=True, download=True)
    assert first.spec.name == second.spec.name == TINY
    assert (second.options.quantization, second.options.offload) == ("int8", "block")
    # generate: 16 frames at 512x512; image-to-video, 24 frames, size from the image; dpmpp_2m
    (p1, r1), (p2, r2), (p3, r3) = results
    assert all(os.path.getsize(p) > 0 for p in (p1, p2, p3))
    assert (r1.output.num_frames, r1.request.num_frames, r1.output.height, r1.output.width) == (16, 17, 512, 512)
    expected = image_video_size(second.spec, Image.open("in.jpg"))
    assert (r2.request.task, r2.output.num_frames, r2.request.num_frames) == ("i2v", 24, 25)
    assert (r2.output.height, r2.output.width) == expected == (32, 64)       # 16:9 at 64x64, stride 32
    assert (r3.request.sampler, r3.request.seed) == ("dpmpp_2m", 7)


def test_readme_command_line_example_runs(places, capsys):
    (bash,) = code_blocks(examples_section(), "bash")
    (line,) = [line for line in bash.splitlines() if line.startswith("lightx2v generate")]
    argv = shlex.split(line)[1:]
    argv[argv.index("--model") + 1] = STANDS_FOR[argv[argv.index("--model") + 1]]
    assert main(argv + ["--device", "cpu", "--steps", "1"]) == 0
    out = capsys.readouterr().out
    assert os.path.getsize("cat.mp4") > 0 and "wrote cat.mp4: 16 frames, 64x64" in out


def test_the_readme_shows_the_issues_lines():
    section = examples_section()
    for text in ('LightX2V.from_pretrained("Wan2.2-TI2V-5B"', 'offload=True', 'download=True',
                 'video_length=16, resolution=(512, 512)', 'image=Image.open("in.jpg")', 'video_length=24',
                 'sampler="dpmpp_2m"', '"euler_a"', "--download"):
        assert text in section, text


# --------------------------------------------------------------------------- offload=True


def test_offload_true_is_the_recommended_mode():
    from engine.options import EngineOptions, ParallelConfig

    cpu = EngineOptions()
    assert recommended_offload(get_spec("tiny-wan"), cpu) == "block"
    assert recommended_offload(get_spec("wan2.2-t2v-a14b"), cpu) == "expert"              # two experts
    assert recommended_offload(get_spec("wan2.2-t2v-a14b"), cpu.with_(compile=True)) == "expert"
    assert recommended_offload(get_spec("tiny-wan"), cpu.with_(compile=True)) == "model"  # block: no compile
    two_ranks = cpu.with_(parallel=ParallelConfig(cfg=2))
    assert recommended_offload(get_spec("wan2.2-t2v-a14b"), two_ranks) == "expert"
    with pytest.raises(ValueError, match="offload=True: tiny-wan has one DiT.*parallel world size 2"):
        recommended_offload(get_spec("tiny-wan"), two_ranks)


def test_offload_keyword_takes_true_false_or_a_mode():
    load = dict(device="cpu", dtype="float32")
    assert LightX2V.from_pretrained("tiny-wan2.2-a14b", offload=True, **load).options.offload == "expert"
    assert LightX2V.from_pretrained("tiny-wan", offload=True, **load).options.offload == "block"
    assert LightX2V.from_pretrained("tiny-wan", offload=False, **load).options.offload == "none"
    assert LightX2V.from_pretrained("tiny-wan", offload="model", **load).options.offload == "model"
    for bad in ("auto", 1, None):
        with pytest.raises(ValueError, match=r"offload must be True \(the model's recommended mode\), False "
                                             r"\(none\) or one of none, model, block, expert; got"):
            LightX2V.from_pretrained("tiny-wan", offload=bad, **load)


# --------------------------------------------------------------------------- --download


def test_cli_download_without_network_fails_fast(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv(hub.MODEL_ROOT_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    t0 = time.monotonic()
    code = main(["generate", "--model", "Wan2.2-TI2V-5B", "--download", "--prompt", "x", "--device", "cpu",
                 "-o", str(tmp_path / "x.mp4")])
    assert code == 2 and time.monotonic() - t0 < 10
    err = capsys.readouterr().err
    assert "could not download Wan-AI/Wan2.2-TI2V-5B (revision main) from http://127.0.0.1:9" in err
    code = main(["generate", "--model", "Wan2.2-TI2V-5B", "--prompt", "x", "--device", "cpu",
                 "-o", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert code == 2 and "has no local weights" in err and "download: not allowed" in err
    assert not os.path.exists(tmp_path / "x.mp4")


def test_serve_download_without_network_fails_before_starting(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv(hub.MODEL_ROOT_ENV, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)

    def no_service(*args, **kwargs):
        raise AssertionError("the service was started")

    monkeypatch.setattr("serving.launch.start_service", no_service)
    assert main(["serve", "--model", "Wan-AI/Wan2.2-TI2V-5B-Diffusers", "--download", "--device", "cpu"]) == 2
    assert "could not download Wan-AI/Wan2.2-TI2V-5B-Diffusers" in capsys.readouterr().err
