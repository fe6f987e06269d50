"""The guidance value at Flux's guidance input is exactly the training value in every training forward.

The model is hooked, not trusted: a global forward pre-hook finds every Flux transformer the graph builds and
records what its ``guidance_in`` embedder receives.
"""
import contextlib

import pytest
import torch

import comfy.ldm.flux.model
from comfy.ldm.flux.layers import timestep_embedding
import random_models
from graphs import sampling_nodes, training_graph


@contextlib.contextmanager
def guidance_inputs():
    seen, hooked = [], set()

    def on_guidance_in(module, args):
        seen.append(args[0].detach().float().clone())

    def on_any_module(module, args):
        if isinstance(module, comfy.ldm.flux.model.Flux) and id(module) not in hooked:
            hooked.add(id(module))
            handles.append(module.guidance_in.register_forward_pre_hook(on_guidance_in))

    handles = [torch.nn.modules.module.register_module_forward_pre_hook(on_any_module)]
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def embedding_of(value: float) -> torch.Tensor:
    return timestep_embedding(torch.tensor([value]), 256).float()


@pytest.fixture(scope="module")
def tiny_dev2pro(comfy):
    random_models.write_flux(comfy.path("diffusion_models", "guidance_dev2pro.safetensors"), seed=11)
    return "guidance_dev2pro.safetensors"


@pytest.mark.parametrize("guidance, with_node", [(1.0, True), (2.5, True), (1.0, False)])
def test_every_training_forward_sees_the_training_guidance(comfy, tiny_dev2pro, guidance, with_node):
    steps = 4
    graph = training_graph(tiny_dev2pro, steps=steps, guidance=guidance, with_guidance_node=with_node,
                           cond_guidance=3.5, seed=int(guidance * 10) + with_node, prefix=f"guidance/{guidance}_{with_node}")
    with guidance_inputs() as seen:
        comfy.run(graph)
    # The conditioning says 3.5; every one of the training forwards must see the training value instead.
    assert len(seen) == steps
    for embedding in seen:
        assert torch.equal(embedding, embedding_of(guidance))


def test_sampling_a_training_model_also_uses_its_guidance(comfy, tiny_dev2pro):
    """ComfyUI fills in 3.5 (or FluxGuidance's value) on the sampler path; the node's wrapper overrides it."""
    graph = {
        "load": {"class_type": "Dev2ProLoadModel", "inputs": {"model_name": tiny_dev2pro, "weight_dtype": "bf16"}},
        "guidance": {"class_type": "Dev2ProTrainingGuidance", "inputs": {"model": ["load", 0], "guidance": 1.0}},
        **sampling_nodes(["guidance", 0], "guidance_sampling", guidance=3.5),
    }
    with guidance_inputs() as seen:
        comfy.run(graph)
    assert len(seen) == 2
    assert all(torch.equal(e, embedding_of(1.0)) for e in seen)
