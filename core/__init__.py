"""The plain-Python core of dev2pro-lora: Flux file loading, LoRA layers and key formats, the training loop.

Nothing here imports ComfyUI's ``server`` or ``nodes``; the node layer in ``nodes/`` translates ComfyUI inputs
into calls of these modules and passes progress callbacks in.
"""
