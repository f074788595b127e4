"""Rewrite the `serveConfigV2` block of deploy/rayservice.yaml from serve_config.yaml.

    python deploy/sync_serve_config.py           # rewrite
    python deploy/sync_serve_config.py --check   # exit 1 if the manifest is out of date

The block is serve_config.yaml from its first setting (`proxy_location:`) to the end, verbatim,
indented under `serveConfigV2: |` (its comments before that line stay in serve_config.yaml).
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "deploy" / "rayservice.yaml"
SERVE_CONFIG = ROOT / "serve_config.yaml"
KEY = "  serveConfigV2: |\n"
INDENT = "    "


def synced_manifest(manifest: str, serve_config: str) -> str:
    """`manifest` with its serveConfigV2 block replaced by `serve_config`'s settings."""
    body = serve_config[serve_config.index("proxy_location:"):]
    block = "".join(INDENT + line if line.strip() else "\n" for line in body.splitlines(keepends=True))
    start = manifest.index(KEY) + len(KEY)
    end = start
    lines = manifest[start:].splitlines(keepends=True)
    for line in lines:  # the block ends at the next line indented less than INDENT
        if line.strip() and not line.startswith(INDENT):
            break
        end += len(line)
    return manifest[:start] + block + manifest[end:]


def main(argv: list[str]) -> int:
    current = MANIFEST.read_text()
    wanted = synced_manifest(current, SERVE_CONFIG.read_text())
    if "--check" in argv:
        if current != wanted:
            print(f"{MANIFEST.relative_to(ROOT)} is out of date: run python deploy/sync_serve_config.py")
            return 1
        return 0
    MANIFEST.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
