"""Stub for PyAV (`av`, ~40 MB wheel) used only by the ai-toolkit peer benchmark.

ai-toolkit imports `av` at module level (toolkit/data_transfer_object/data_loader.py) but uses it only to read video
and audio files; the Flux image-LoRA path never touches it. Any attribute access raises, so a use cannot pass silently.
"""
__version__ = "0.0.0+stub"


def __getattr__(name):
    raise ImportError(f"av is a stub in this benchmark (attribute {name!r} requested): video/audio datasets are not supported")
