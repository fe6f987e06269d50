"""One frozen fp8 Linear of Flux-dev: bf16 compute (ComfyUI's cast of the fp8 weight) against fp8_matmul's
tensor-core path (tensor-wise and row-wise scaled), forward alone and forward plus input gradient, eager and compiled. Prints one JSON line per
layer shape and path:

    python benchmarks/fp8_linear.py [--tokens 4608 1536] [--compiled no|too|only]

Needs a CUDA GPU of compute capability 8.9 or newer.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os

import torch

PACK_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (name, out features, in features): the block Linears that fp8_matmul routes, at Flux-dev's width
SHAPES = [("double qkv", 9216, 3072), ("double proj / mlp.2 in", 3072, 3072), ("double mlp.0", 12288, 3072),
          ("double mlp.2", 3072, 12288), ("single linear1", 21504, 3072), ("single linear2", 3072, 15360)]


def load_fp8_matmul():
    spec = importlib.util.spec_from_file_location("fp8_matmul", os.path.join(PACK_DIR, "core", "fp8_matmul.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Fp8Weight(torch.nn.Module):
    """What ComfyUI's manual-cast Linear does with an fp8 weight: cast it to bf16, then a bf16 matmul."""

    def __init__(self, out_features, in_features):
        super().__init__()
        w = torch.randn(out_features, in_features, device="cuda") / in_features ** 0.5
        self.weight = torch.nn.Parameter(w.to(torch.float8_e4m3fn), requires_grad=False)
        self.bias = torch.nn.Parameter(torch.zeros(out_features, device="cuda", dtype=torch.bfloat16), requires_grad=False)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias)


def gpu_ms(fn, repeat=20, warmup=3) -> float:
    """Milliseconds per call of ``fn`` on the GPU timeline (CUDA events around ``repeat`` calls)."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(repeat):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeat


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[4608, 1536])
    parser.add_argument("--compiled", choices=["no", "too", "only"], default="no",
                        help="also (too) or only through torch.compile (slow to start)")
    a = parser.parse_args()
    fp8_matmul = load_fp8_matmul()
    for tokens in a.tokens:
        for name, n, k in SHAPES:
            layer = Fp8Weight(n, k)
            paths = {"bf16": layer}
            for scaling in ("tensorwise", "rowwise"):
                for accumulation in ("", "_fast_accumulation"):
                    paths[f"fp8_{scaling}{accumulation}"] = fp8_matmul.Fp8BaseLinear(
                        layer, torch.bfloat16, rowwise=scaling == "rowwise", fast=bool(accumulation))
            row = {}
            for path, module in paths.items():
                for compiled in {"no": (False,), "too": (False, True), "only": (True,)}[a.compiled]:
                    run = torch.compile(module) if compiled else module
                    x = torch.randn(1, tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                    upstream = torch.randn(1, tokens, n, device="cuda", dtype=torch.bfloat16)

                    def forward():
                        with torch.no_grad():
                            run(x)

                    def forward_backward():
                        x.grad = None
                        run(x).backward(upstream)

                    tag = f"{path}{'_compiled' if compiled else ''}"
                    row[f"{tag}_forward_ms"] = round(gpu_ms(forward), 4)
                    row[f"{tag}_forward_backward_ms"] = round(gpu_ms(forward_backward), 4)
                    tflop = 2 * tokens * n * k / 1e12
                    row[f"{tag}_forward_tflops"] = round(tflop / (row[f"{tag}_forward_ms"] / 1e3), 1)
            print(json.dumps({"benchmark": "fp8_linear", "layer": name, "tokens": tokens, "out": n, "in": k, **row,
                              "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                              "date": datetime.date.today().isoformat()}), flush=True)


if __name__ == "__main__":
    main()
