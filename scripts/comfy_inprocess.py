"""Importing ComfyUI in-process the way its main.py does, for the tests and the workflow builder."""
from __future__ import annotations

import asyncio
import os
import sys


def comfyui_path() -> str:
    path = os.path.expanduser(os.environ.get("COMFYUI_PATH", "~/comfy/ComfyUI"))
    if not os.path.isfile(os.path.join(path, "main.py")):
        raise SystemExit(f"ComfyUI not found at {path}: set COMFYUI_PATH to a ComfyUI 0.3.64 checkout "
                         "(git clone --branch v0.3.64 https://github.com/comfyanonymous/ComfyUI).")
    return path


def import_comfyui():
    """Put ComfyUI on sys.path for the CPU and import its executor; returns the ``nodes`` module."""
    sys.path.insert(0, comfyui_path())
    from comfy.cli_args import args

    args.cpu = True
    import utils.extra_config  # noqa: F401  ComfyUI's utils package must win over comfy/utils.py, as in main.py
    import execution  # noqa: F401
    import nodes
    import server  # noqa: F401

    return nodes


def load_packs(nodes, *pack_dirs: str):
    """ComfyUI's built-in extra nodes plus the given custom-node packs, loaded as the server loads them."""
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    for pack_dir in pack_dirs:
        if not asyncio.run(nodes.load_custom_node(pack_dir)):
            raise RuntimeError(f"custom node pack failed to load: {pack_dir}")
    return sys.modules[pack_dirs[0].replace(".", "_x_")]
