"""Test-only nodes, loaded beside dev2pro-lora in the tests: seeded random conditioning and latents, so graphs can
feed tiny random Flux models without a 4.7B-parameter T5-XXL. The pack's own nodes stay real."""
import torch


class TestDev2ProConditioning:
    CATEGORY = "testing"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "context_dim": ("INT", {"default": 48, "min": 1, "max": 8192}),
            "pooled_dim": ("INT", {"default": 32, "min": 1, "max": 8192}),
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512}),
            "count": ("INT", {"default": 1, "min": 1, "max": 64}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
            "guidance": ("FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0}),
        }}

    def make(self, context_dim, pooled_dim, tokens, count, seed, guidance):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, context_dim, generator=g),
                  {"pooled_output": torch.randn(1, pooled_dim, generator=g), "guidance": guidance}]
                 for _ in range(count)],)


class TestDev2ProLatents:
    CATEGORY = "testing"
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "count": ("INT", {"default": 2, "min": 1, "max": 64}),
            "size": ("INT", {"default": 8, "min": 2, "max": 256}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31}),
        }, "optional": {
            "broken_index": ("INT", {"default": -1, "min": -1, "max": 63}),  # this latent gets a NaN
        }}

    def make(self, count, size, seed, broken_index=-1):
        g = torch.Generator().manual_seed(seed)
        samples = torch.randn(count, 16, size, size, generator=g)
        if broken_index >= 0:
            samples[broken_index, 0, 0, 0] = float("nan")
        return ({"samples": samples},)


class _Zero(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.width = width

    def forward(self, x):
        return torch.zeros(*x.shape[:-1], self.width, dtype=x.dtype, device=x.device)


class TestDev2ProCutGuidance:
    """A copy of a Flux MODEL whose guidance embedder outputs zeros (a ComfyUI object patch): guidance has no effect."""

    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "cut"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",)}}

    def cut(self, model):
        patched = model.clone()
        patched.add_object_patch("diffusion_model.guidance_in", _Zero(model.model.diffusion_model.hidden_size))
        return (patched,)


class _FailOnRank(torch.nn.Module):
    def __init__(self, inner, rank, at_call, how):
        super().__init__()
        self.inner, self.rank, self.at_call, self.how, self.calls = inner, rank, at_call, how, 0

    def forward(self, x):
        import torch.distributed as dist

        self.calls += 1
        here = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if here == self.rank and self.calls == self.at_call:
            if self.how == "exit":
                import os

                os._exit(3)  # killed: no exception, no cleanup
            raise RuntimeError(f"injected failure on rank {here}, forward call {self.calls}")
        return self.inner(x)


class TestDev2ProFailOnRank:
    """A copy of a Flux MODEL whose image embedder raises in its ``at_call``-th forward on torch.distributed rank
    ``rank`` (a ComfyUI object patch): a rank that fails mid-training."""

    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "rank": ("INT", {"default": 1, "min": 0, "max": 63}),
                             "at_call": ("INT", {"default": 3, "min": 1, "max": 1000}),
                             "how": (["raise", "exit"],)}}

    def patch(self, model, rank, at_call, how):
        patched = model.clone()
        patched.add_object_patch("diffusion_model.img_in",
                                 _FailOnRank(model.get_model_object("diffusion_model.img_in"), rank, at_call, how))
        return (patched,)


NODE_CLASS_MAPPINGS = {"TestDev2ProConditioning": TestDev2ProConditioning, "TestDev2ProLatents": TestDev2ProLatents,
                       "TestDev2ProCutGuidance": TestDev2ProCutGuidance, "TestDev2ProFailOnRank": TestDev2ProFailOnRank}
