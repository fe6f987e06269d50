"""Importing ComfyUI in-process the way its main.py does, for the tests and the workflow builder."""
from __future__ import annotations

import asyncio
import os
import sys


def comfyui_path() -> str:
    """The ComfyUI to run: $COMFYUI_PATH, else the one this pack is installed in (<ComfyUI>/custom_nodes/<pack>)."""
    pack = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.environ.get("COMFYUI_PATH")
    if not path and os.path.basename(os.path.dirname(pack)) == "custom_nodes":
        path = os.path.dirname(os.path.dirname(pack))
    if not path or not os.path.isfile(os.path.join(os.path.expanduser(path), "main.py")):
        raise SystemExit(f"ComfyUI not found (COMFYUI_PATH={path or 'unset'}, pack at {pack}): install the pack into "
                         "<ComfyUI>/custom_nodes/, or set COMFYUI_PATH to a ComfyUI checkout (0.3.64 or 0.33).")
    return os.path.expanduser(path)


def prompt_executor(server, cache_type=None):
    """ComfyUI's PromptExecutor with a classic cache; 0.33 added ``cache_args`` (its RAM-pressure cache reads
    ``cache_args["ram"]`` on every run)."""
    import inspect

    import execution

    cache_type = cache_type or execution.CacheType.CLASSIC
    if "cache_args" in inspect.signature(execution.PromptExecutor.__init__).parameters:
        return execution.PromptExecutor(server, cache_type=cache_type,
                                        cache_args={"lru": 0, "ram": 0.0, "ram_inactive": 0.0})
    return execution.PromptExecutor(server, cache_type=cache_type)


def import_comfyui(cpu: bool = True, base_directory: str | None = None):
    """Put ComfyUI on sys.path (on the CPU unless ``cpu`` is false; models, input and output under
    ``base_directory`` when given, as ComfyUI's --base-directory) and import its executor; returns ``nodes``."""
    sys.path.insert(0, comfyui_path())
    from comfy.cli_args import args

    args.cpu = cpu
    if base_directory:
        args.base_directory = base_directory
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
