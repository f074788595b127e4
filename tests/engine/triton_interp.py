"""Run engine/kernels functions under the Triton CPU interpreter, for the kernel tests.

The interpreter must be switched on before triton is first imported, so the kernels run in one
child process (TRITON_INTERPRET=1) that loads fresh copies of the (self-contained) kernel files
and calls each case; the tests compare the outputs with reference math made in this process.
"""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import torch

KERNELS = pathlib.Path(__file__).resolve().parents[2] / "engine" / "kernels"

_DRIVER = r"""
import importlib.util, sys, torch
torch.set_num_threads(1)
modules = {}
def load(name):
    if name not in modules:
        spec = importlib.util.spec_from_file_location(name, sys.argv[1] + "/" + name + ".py")
        modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules[name])
    return modules[name]
cases = torch.load(sys.argv[2], weights_only=False)
out = {}
for name, (fn, args, kwargs) in cases.items():
    module, attr = fn.split(".")
    out[name] = getattr(load(module), attr)(*args, **kwargs)
torch.save(out, sys.argv[3])
"""


def run_interpreted(directory: pathlib.Path, cases: dict[str, tuple[str, tuple, dict]]) -> dict:
    """cases: name -> ("kernel_file.function", args, kwargs); returns name -> the call's output."""
    torch.save(cases, directory / "in.pt")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _DRIVER, str(KERNELS), str(directory / "in.pt"),
                           str(directory / "out.pt")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(directory / "out.pt")
