"""LightX2V nodes for ComfyUI: a model loader, a LoRA node, a sampler (frames as IMAGE plus the
fps, for the core CreateVideo -> SaveVideo, with ComfyUI's progress bar) and a remote sampler
that sends the job to a running `lightx2v serve`. Install: docs/UI.md ("ComfyUI nodes").

The nodes need the `lightx2v-serve` project in ComfyUI's Python (`pip install -e <repo>`); when
this folder is (a link to) `comfyui/lightx2v_nodes` of a checkout and the project is not
installed, the checkout is put on sys.path instead (its dependencies must be installed).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _find_project() -> None:
    if importlib.util.find_spec("lightx2v") is not None:
        return
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / "lightx2v" / "__init__.py").exists():
        sys.path.insert(0, str(checkout))
        return
    raise ImportError("the LightX2V nodes need the lightx2v-serve project: `pip install -e /path/to/lightx2v-serve` "
                      "in ComfyUI's Python environment (docs/UI.md)")


_find_project()

from comfy_api.latest import ComfyExtension, io  # noqa: E402

from .nodes import NODES  # noqa: E402


class LightX2VExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(NODES)


async def comfy_entrypoint() -> LightX2VExtension:
    """ComfyUI's V3 entry point (no NODE_CLASS_MAPPINGS: ComfyUI would take those instead)."""
    return LightX2VExtension()
