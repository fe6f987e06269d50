"""dev2pro-lora: train Flux LoRAs on Flux-dev2pro at guidance 1.0 inside a ComfyUI graph, apply them to Flux-dev."""
from comfy_api.latest import ComfyExtension

from .nodes import NODES
from .nodes.routes import register_on_server

WEB_DIRECTORY = "./js"
register_on_server()


class Dev2ProExtension(ComfyExtension):
    async def get_node_list(self):
        return list(NODES)


async def comfy_entrypoint() -> ComfyExtension:
    return Dev2ProExtension()
