"""dev2pro-lora: train Flux LoRAs on Flux-dev2pro at guidance 1.0 inside a ComfyUI graph, apply them to Flux-dev."""
WEB_DIRECTORY = "./js"

# ComfyUI imports this file as the package of the pack. pytest 8+ also imports a rootdir __init__.py on its own,
# as a top-level module, when the checkout's folder is not a Python name (custom_nodes/dev2pro-lora): then there
# is no package to import from, and nothing to register.
if __package__:
    from comfy_api.latest import ComfyExtension

    from .nodes import NODES
    from .nodes.routes import register_on_server

    register_on_server()

    class Dev2ProExtension(ComfyExtension):
        async def get_node_list(self):
            return list(NODES)

    async def comfy_entrypoint() -> ComfyExtension:
        return Dev2ProExtension()
