"""How much a Flux-dev model's prediction follows its guidance input, measured through ComfyUI's own sampling path.

For each guidance value g, on the same noised latents and prompts, the model's velocity v(g) is compared with its
velocity at guidance 1.0: the prediction response is ||v(g) - v(1)|| / ||v(1)||, averaged over seeds, noise levels
and prompts. The guidance input reaches the network only through the modulation vectors (``vec`` = time + guidance +
pooled text embeddings, turned into shift/scale/gate by every block's ``*_mod.lin`` / ``modulation.lin`` and the
final ``adaLN_modulation``); their relative change is the modulation response. A LoRA that leaves those layers and
the embedders alone leaves the modulation response exactly as it was, whatever it does to the prediction.

One forward per (prompt, noise level, guidance value), batched over the seeds, through ``comfy.sample.sample_custom``
with a one-step sampler: ComfyUI loads, patches (LoRAs), offloads and casts the model as it does for KSampler.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

import comfy.sample
import comfy.samplers

from .config import GUIDANCE_OPTION, InputError

# Modules whose outputs carry the guidance into the network (Flux.1 in ComfyUI 0.3.64 and 0.33).
MODULATION = re.compile(r"(^|\.)((img|txt)_mod|modulation|double_stream_modulation_(img|txt)|single_stream_modulation)"
                        r"\.lin$|(^|\.)adaLN_modulation\.1$")
REFERENCE_GUIDANCE = 1.0  # what every response is measured from: Flux-dev2pro's training value
VERDICT_GUIDANCE = 3.5  # Flux-dev's usual sampling value, where the verdict is read
KEPT = (0.8, 1.25)  # a response within these fractions of the base's counts as kept (a convention, see the help page)
FLAT = 1e-6  # a response below this is no response at all (float32 noise of identical predictions is 0)


class ResponseInputError(InputError):
    """An input of the guidance-response check is unusable; ``input_name`` says which."""


@dataclass(frozen=True)
class Setting:
    default: object
    help: str
    low: float | None = None
    high: float | None = None
    step: float | None = None


# Each setting of the check, defined once: the node's inputs, tooltips and the checks below come from here.
SETTINGS = {
    "guidance_values": Setting("1, 2, 3.5, 5, 7", "Guidance values to measure, separated by commas. 1.0 is the "
                               "reference and is always measured; the verdict is read at 3.5 (or the largest value)."),
    "noise_levels": Setting("0.5, 0.75, 0.9", "Noise levels (sigma, 0 < sigma <= 1) the latents are noised to, "
                            "separated by commas. Guidance acts most at high noise."),
    "seeds": Setting(2, "Noise seeds per noise level, counted from 'first_seed': more average out more noise.", 1, 16, 1),
    "first_seed": Setting(0, "First noise seed; both models see the same seeds.", 0, 0xFFFFFFFFFFFFFFFF, 1),
    "width": Setting(1024, "Image width in pixels of the latents measured on (ignored when 'latent' is connected).",
                     64, 4096, 16),
    "height": Setting(1024, "Image height in pixels (ignored when 'latent' is connected).", 64, 4096, 16),
}
MAX_GUIDANCE_VALUES, MAX_NOISE_LEVELS = 16, 8


def parse_values(input_name: str, text: str, low: float, high: float, low_open: bool, limit: int) -> list[float]:
    """Sorted distinct floats from a comma- (or space-) separated list, each in [low, high] ((low, high] with
    ``low_open``)."""
    values = []
    for part in re.split(r"[,;\s]+", text.strip()):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ResponseInputError(input_name, f"'{part}' is not a number; write numbers separated by commas, "
                                     f"e.g. '{SETTINGS[input_name].default}'") from None
        if not math.isfinite(value) or value > high or value < low or (low_open and value == low):
            bound = f"({low:g}, {high:g}]" if low_open else f"[{low:g}, {high:g}]"
            raise ResponseInputError(input_name, f"{part} is outside {bound}")
        values.append(value)
    values = sorted(set(values))
    if not values:
        raise ResponseInputError(input_name, f"no values given; write e.g. '{SETTINGS[input_name].default}'")
    if len(values) > limit:
        raise ResponseInputError(input_name, f"{len(values)} values given; at most {limit} are measured")
    return values


@dataclass(frozen=True)
class CheckSettings:
    guidances: tuple[float, ...]  # always holds REFERENCE_GUIDANCE
    noise_levels: tuple[float, ...]
    seeds: int
    first_seed: int
    width: int
    height: int

    @classmethod
    def parse(cls, guidance_values: str, noise_levels: str, seeds: int, first_seed: int, width: int, height: int):
        guidances = parse_values("guidance_values", guidance_values, 0.0, 100.0, False, MAX_GUIDANCE_VALUES)
        if guidances == [REFERENCE_GUIDANCE]:
            raise ResponseInputError("guidance_values", "give at least one value besides 1.0, e.g. '1, 2, 3.5, 5, 7'")
        levels = parse_values("noise_levels", noise_levels, 0.0, 1.0, True, MAX_NOISE_LEVELS)
        for name, value in (("seeds", seeds), ("width", width), ("height", height)):
            s = SETTINGS[name]
            if not s.low <= value <= s.high:
                raise ResponseInputError(name, f"{value} is outside {s.low:g}..{s.high:g}")
        return cls(tuple(sorted(set(guidances) | {REFERENCE_GUIDANCE})), tuple(levels), seeds, first_seed, width, height)

    @property
    def forwards(self) -> int:
        """Forwards per prompt and model (each one batched over the seeds)."""
        return len(self.guidances) * len(self.noise_levels)


@dataclass
class Curve:
    """One model's response at each guidance value (0 at the reference)."""

    guidances: list[float]
    prediction: list[float]
    modulation: list[float]
    by_noise_level: dict[float, list[float]] = field(default_factory=dict)  # prediction response per sigma

    @property
    def monotone(self) -> bool:
        """Whether the prediction moves further from its guidance-1.0 value the further g is from 1.0."""
        above = [r for g, r in zip(self.guidances, self.prediction) if g >= REFERENCE_GUIDANCE]
        below = [r for g, r in zip(self.guidances, self.prediction) if g <= REFERENCE_GUIDANCE][::-1]
        return all(b > a for side in (above, below) for a, b in zip(side, side[1:]))

    def at(self, guidance: float) -> float:
        return self.prediction[self.guidances.index(guidance)]

    def to_dict(self) -> dict:
        return {"guidance": self.guidances, "prediction_response": self.prediction,
                "modulation_response": self.modulation, "monotone": self.monotone,
                "prediction_response_by_noise_level": {f"{s:g}": v for s, v in self.by_noise_level.items()}}


def verdict_guidance(guidances) -> float:
    return VERDICT_GUIDANCE if VERDICT_GUIDANCE in guidances else max(guidances)


def verdict(base: Curve, other: Curve | None) -> str:
    """One line: the base's response at 3.5, or how much of it the second model keeps."""
    g = verdict_guidance(base.guidances)
    shape = "monotone in guidance" if base.monotone else "NOT monotone in guidance"
    if base.at(g) < FLAT:
        return (f"no guidance response: the first model's prediction does not change with guidance (at {g:g}); "
                "connect Flux-dev, which takes guidance as an input")
    if other is None:
        return f"guidance response at {g:g}: {base.at(g):.4g} of the prediction at 1.0, {shape}"
    share = other.at(g) / base.at(g)
    pct = f"{100 * share:.0f} %"
    if share < KEPT[0]:
        line = f"guidance response reduced to {pct} of base at {g:g}"
    elif share > KEPT[1]:
        line = f"guidance response exaggerated: {pct} of base at {g:g}"
    else:
        line = f"guidance response kept: {pct} of base at {g:g}"
    if base.monotone and not other.monotone:
        line += "; no longer monotone in guidance"
    return line


def report(base: Curve, other: Curve | None, settings: CheckSettings, prompts: int) -> dict:
    return {"verdict": verdict(base, other), "verdict_guidance": verdict_guidance(base.guidances),
            "kept_range": list(KEPT), "base": base.to_dict(), "with_lora": other.to_dict() if other else None,
            "with_lora_share_of_base": [None if b < FLAT else o / b for b, o in zip(base.prediction, other.prediction)]
            if other else None,
            "settings": {"guidance_values": list(settings.guidances), "noise_levels": list(settings.noise_levels),
                         "seeds": settings.seeds, "first_seed": settings.first_seed, "width": settings.width,
                         "height": settings.height, "prompts": prompts}}


def to_json(data: dict) -> str:
    return json.dumps(data, indent=1)


def prompts_of(conditioning) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(context, pooled) of every entry of a ComfyUI CONDITIONING; its own guidance values are ignored."""
    if not isinstance(conditioning, list) or not conditioning:
        raise ResponseInputError("conditioning", "no conditioning given; connect a CLIP Text Encode of the Flux text "
                                 "encoders")
    out = []
    for entry in conditioning:
        context, extra = entry[0], entry[1]
        pooled = extra.get("pooled_output")
        if pooled is None:
            raise ResponseInputError("conditioning", "the conditioning has no pooled text vector; encode the prompt "
                                     "with the Flux text encoders (DualCLIPLoader type flux + CLIP Text Encode)")
        out.append((context, pooled))
    return out


def check_model(input_name: str, model_patcher, prompts) -> None:
    transformer = getattr(model_patcher.model, "diffusion_model", None)
    params = getattr(transformer, "params", None)
    if params is None or not hasattr(params, "guidance_embed") or getattr(transformer, "guidance_in", None) is None:
        raise ResponseInputError(input_name, "this is not a Flux model with a guidance input (FLUX.1-schnell has none); "
                                 "connect Flux-dev")
    if not params.guidance_embed:
        raise ResponseInputError(input_name, "this Flux has no guidance input (FLUX.1-schnell?); connect Flux-dev")
    if GUIDANCE_OPTION in model_patcher.model_options:
        raise ResponseInputError(input_name, "this MODEL has its guidance fixed by Training Guidance (Dev2Pro), so "
                                 "every guidance value would give the same prediction; connect the model from "
                                 "before that node")
    for context, pooled in prompts:
        if context.shape[-1] != params.context_in_dim or pooled.shape[-1] != params.vec_in_dim:
            raise ResponseInputError("conditioning", f"the text is {context.shape[-1]} wide with a "
                                     f"{pooled.shape[-1]}-wide pooled vector; this Flux reads {params.context_in_dim} "
                                     f"and {params.vec_in_dim}. Encode with the Flux text encoders")


def check_latent(model_patcher, x0: torch.Tensor) -> None:
    channels = model_patcher.get_model_object("latent_format").latent_channels
    if x0.ndim != 4 or x0.shape[1] != channels:
        raise ResponseInputError("latent", f"the latent has shape {tuple(x0.shape)}; Flux latents have {channels} "
                                 "channels. Encode the image with the Flux VAE")


def _modulation_modules(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    return [(name, m) for name, m in transformer.named_modules() if MODULATION.search(name)]


class _OneStep:
    """A ComfyUI sampler that runs the model once at sigmas[0] and keeps its input and denoised output."""

    def __init__(self):
        self.x = self.denoised = None

    def __call__(self, model, x, sigmas, extra_args=None, callback=None, disable=None):
        denoised = model(x, sigmas[0] * x.new_ones([x.shape[0]]), **(extra_args or {}))
        self.x, self.denoised = x.float(), denoised.float()
        return denoised


def measure(model_patcher, prompts, settings: CheckSettings, x0: torch.Tensor | None = None,
            on_forward: Callable[[], None] | None = None) -> Curve:
    """The guidance-response curve of ``model_patcher`` (a Flux-dev ModelPatcher, LoRAs applied or not).

    ``x0``: a LATENT's samples (first image used; ``check_latent`` passed) to noise; else the empty latent samplers
    start from.
    ``on_forward`` runs after every forward (progress, Cancel). The MODEL is left as it was: nothing is patched,
    and the forward hooks that read the modulation vectors are removed again.
    """
    latent_format = model_patcher.get_model_object("latent_format")
    if x0 is None:
        shape = (1, latent_format.latent_channels, settings.height // 8, settings.width // 8)
        latent = torch.zeros(shape)
    else:
        latent = x0[:1].float().cpu()
    latent = latent.repeat(settings.seeds, *([1] * (latent.ndim - 1)))
    seeds = [(settings.first_seed + k) % 2**64 for k in range(settings.seeds)]
    noise = torch.stack([torch.randn(latent.shape[1:], generator=torch.Generator().manual_seed(s)) for s in seeds])
    step = _OneStep()
    sampler = comfy.samplers.KSAMPLER(step)
    captured: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(module, args, output):
            if name not in captured:  # row 0: every row of a forward shares t, guidance and text
                captured[name] = output[0].detach().float().flatten().cpu()
        return hook

    transformer = model_patcher.model.diffusion_model
    handles = [m.register_forward_hook(keep(name)) for name, m in _modulation_modules(transformer)]
    prediction = {g: [] for g in settings.guidances}
    modulation = {g: [] for g in settings.guidances}
    by_level = {s: {g: [] for g in settings.guidances} for s in settings.noise_levels}
    try:
        for context, pooled in prompts:
            for sigma in settings.noise_levels:
                reference_v = reference_m = None
                for g in [REFERENCE_GUIDANCE] + [g for g in settings.guidances if g != REFERENCE_GUIDANCE]:
                    captured.clear()
                    cond = [[context, {"pooled_output": pooled, "guidance": g}]]
                    comfy.sample.sample_custom(model_patcher, noise, 1.0, sampler, torch.tensor([sigma, 0.0]), cond,
                                               cond, latent, disable_pbar=True, seed=seeds[0])
                    v = ((step.x - step.denoised) / sigma).flatten(1)
                    m = torch.cat([captured[name] for name in sorted(captured)]) if captured else torch.zeros(1)
                    if reference_v is None:
                        reference_v, reference_m = v, m
                    pred = ((v - reference_v).norm(dim=1) / reference_v.norm(dim=1).clamp_min(1e-30)).tolist()
                    mod = float((m - reference_m).norm() / reference_m.norm().clamp_min(1e-30))
                    prediction[g] += pred
                    by_level[sigma][g] += pred
                    modulation[g].append(mod)
                    if on_forward is not None:
                        on_forward()
    finally:
        for h in handles:
            h.remove()

    def mean(values):
        return math.fsum(values) / len(values)

    gs = list(settings.guidances)
    return Curve(gs, [mean(prediction[g]) for g in gs], [mean(modulation[g]) for g in gs],
                 {s: [mean(by_level[s][g]) for g in gs] for s in settings.noise_levels})

