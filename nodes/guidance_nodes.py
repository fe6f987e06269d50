"""Did the recipe keep Flux-dev's guidance? The guidance-response check, on the user's own models."""
from __future__ import annotations

import comfy.utils
from comfy_api.latest import io, ui

from ..core.guidance_response import (SETTINGS, CheckSettings, ResponseInputError, check_latent, check_model, measure,
                                      prompts_of, report, to_json)
from ..core.response_plot import draw_response
from .common import CATEGORY, node_error
from .train_nodes import pil_to_image

NODE = "Dev2ProGuidanceResponse"


def _int_input(name: str):
    s = SETTINGS[name]
    return io.Int.Input(name, default=s.default, min=int(s.low), max=int(s.high), step=int(s.step), tooltip=s.help)


class Dev2ProGuidanceResponse(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=NODE,
            display_name="Guidance Response Check (Dev2Pro)",
            category=CATEGORY,
            description="Measures how far Flux-dev's prediction moves with its guidance input, relative to guidance "
            "1.0, for the model and (optionally) the same model with a LoRA applied; says whether the LoRA kept "
            "that response. Numbers, not image quality: see the help page.",
            inputs=[
                io.Model.Input("model", tooltip="Flux-dev as you sample it, without the LoRA (the base curve)."),
                io.Conditioning.Input("conditioning", tooltip="Prompt(s) from CLIP Text Encode with the Flux text "
                                      "encoders; each entry is measured and averaged. Its guidance is ignored."),
                io.String.Input("guidance_values", default=SETTINGS["guidance_values"].default,
                                tooltip=SETTINGS["guidance_values"].help),
                io.String.Input("noise_levels", default=SETTINGS["noise_levels"].default,
                                tooltip=SETTINGS["noise_levels"].help),
                _int_input("seeds"),
                _int_input("first_seed"),
                _int_input("width"),
                _int_input("height"),
                io.Model.Input("model_b", optional=True, tooltip="The same Flux-dev with the LoRA applied (Apply "
                               "LoRA): its curve is compared with the base's."),
                io.Latent.Input("latent", optional=True, tooltip="An encoded image to noise instead of the empty "
                                "latent (its first image; its size replaces width and height)."),
            ],
            outputs=[
                io.Image.Output(display_name="plot", tooltip="Response per guidance value, base and with LoRA."),
                io.String.Output(display_name="numbers", tooltip="Every measured number, as JSON."),
                io.String.Output(display_name="verdict", tooltip="One line: how much of the base's response the "
                                 "LoRA keeps at 3.5."),
            ],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,  # runs and shows its plot with nothing connected to its outputs
        )

    @classmethod
    def execute(cls, model, conditioning, guidance_values, noise_levels, seeds, first_seed, width, height, model_b=None,
                latent=None) -> io.NodeOutput:
        try:
            settings = CheckSettings.parse(guidance_values, noise_levels, seeds, first_seed, width, height)
            prompts = prompts_of(conditioning)
            check_model("model", model, prompts)
            if model_b is not None:
                check_model("model_b", model_b, prompts)
            x0 = latent["samples"] if latent is not None else None
            if x0 is not None:
                check_latent(model, x0)
        except ResponseInputError as e:
            raise node_error(NODE, e.input_name, str(e)) from e
        models = [model] + ([model_b] if model_b is not None else [])
        progress = comfy.utils.ProgressBar(settings.forwards * len(prompts) * len(models), node_id=cls.hidden.unique_id)
        curves = [measure(m, prompts, settings, x0, on_forward=lambda: progress.update(1)) for m in models]
        base, other = curves[0], (curves[1] if len(curves) > 1 else None)
        numbers = report(base, other, settings, len(prompts))
        line = numbers["verdict"]
        plot = pil_to_image(draw_response(base, other, line))
        return io.NodeOutput(plot, to_json(numbers), line, ui=ui.PreviewImage(plot))
