"""engine.dit: the seams a DiT declares on its class, what the helpers say when one is missing, and
the import rule behind them: engine.kernels (and the other shared code that works on any DiT)
imports no model; a family's fusions live in its folder."""
from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest
from torch import nn

from engine import dit

ROOT = pathlib.Path(__file__).resolve().parents[2]
SHARED = sorted(
    [*(ROOT / "engine" / "kernels").glob("*.py"), *(ROOT / "engine" / "quant").glob("*.py"),
     *(ROOT / "engine" / "parallel" / name for name in ("__init__.py", "ulysses.py", "cfg.py", "mesh.py")),
     *(ROOT / "engine" / name for name in ("dit.py", "offload.py", "attention.py"))])
"""Shared code working on any DiT through its seams: no model import allowed."""


def imported_modules(text: str, package: str) -> set[str]:
    """Every module a source imports, at any level (function-level imports too), relative imports
    resolved against `package` (the dotted package the file lives in)."""
    found = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")
            base = parts[: len(parts) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)  # `from engine import models`
    return found


@pytest.mark.parametrize("path", SHARED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shared_code_imports_no_model(path):
    package = ".".join(path.relative_to(ROOT).parts[:-1])
    models = sorted(m for m in imported_modules(path.read_text(), package)
                    if m == "engine.models" or m.startswith("engine.models."))
    assert not models, f"{path.relative_to(ROOT)} imports {models}: model specifics belong in the family's folder"


def test_the_scan_sees_relative_and_function_level_imports():
    """Guard against a vacuous scan: the resolver finds the model imports the rule forbids."""
    probe = ("import torch\n"
             "def f():\n    from ..models.wan import transformer\n"
             "def g():\n    import engine.models.wan.vae\n"
             "from engine import models\n"
             "from .fused_ffn import fuse_ffn\n")
    found = imported_modules(probe, "engine.kernels")
    assert {"engine.models.wan", "engine.models.wan.vae", "engine.models", "engine.kernels.fused_ffn"} <= found
    assert len(SHARED) > 15


def test_importing_the_kernels_loads_no_model():
    """At run time too (a fresh interpreter): engine.kernels and what it pulls in load no engine.models module."""
    code = ("import sys, engine.kernels, engine.offload, engine.parallel, engine.quant; "
            "print(sorted(m for m in sys.modules if m.startswith('engine.models')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


# ---------------------------------------------------------------------------------------------
# helpers on a model that declares nothing, or something wrong


class Bare(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(2, 2)])


class Declared(Bare):
    repeated_blocks = "blocks"
    sequence_hooks = "sequence"
    sequence_attention = ("attn.core",)
    keep_in_fp32 = ("norm",)
    quant_skip = ("head",)

    def __init__(self) -> None:
        super().__init__()
        self.sequence = nn.Identity()  # not a SequenceHooks


def test_missing_seams_are_named():
    with pytest.raises(TypeError, match="Bare does not declare `repeated_blocks`"):
        dit.blocks_of(Bare())  # an attribute called `blocks` is not enough
    with pytest.raises(TypeError, match="Bare does not declare `repeated_blocks`"):
        dit.check_dit(Bare)
    assert not isinstance(Bare(), dit.DiT)
    with pytest.raises(TypeError, match="Bare has no config.num_attention_heads"):
        dit.num_heads(Bare())
    assert dit.fusions_of(Bare()) is dit.NO_FUSIONS


def test_wrong_seams_are_named():
    model = Declared()
    dit.check_dit(model)
    assert dit.blocks_of(model) is model.blocks
    with pytest.raises(TypeError, match=r"Declared.sequence \(its `sequence_hooks`\) is not a SequenceHooks"):
        dit.sequence_hooks_of(model)
    with pytest.raises(TypeError, match=r"block 0 has no 'attn.core'"):
        dit.sequence_attention_slots(model)
    assert dit.keeps_fp32(model, "blocks.0.norm.weight") and not dit.keeps_fp32(model, "blocks.0.normal.weight")
    assert dit.skipped("blocks.3.head", dit.quant_skip_of(model)) and not dit.skipped("head2", ("head",))


def test_identity_sequence_hooks_return_everything_whole():
    import torch

    x, a, b = torch.zeros(1, 5, 4), torch.ones(1, 5, 1, 2), torch.ones(1, 1, 6, 4)
    out = dit.SequenceHooks().split(x, a, b)
    assert len(out) == 3 and all(o is i for o, i in zip(out, (x, a, b)))
