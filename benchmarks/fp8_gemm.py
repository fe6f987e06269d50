"""The bare kernels behind fp8_matmul at Flux-dev's Linear shapes (4608 tokens, a 1024x1024 image with 512 text
tokens): bf16 matmul, the fp8 weight's cast to bf16, fp8 ``torch._scaled_mm`` (tensor-wise and row-wise scaled,
with and without fast accumulation), the input's amax and quantization in eager mode, and the fp8 weight's
transpose (what an fp8 input gradient would need). Milliseconds per call, one JSON line per shape:

    python benchmarks/fp8_gemm.py

Needs a CUDA GPU of compute capability 8.9 or newer.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fp8_linear import gpu_ms  # noqa: E402

TOKENS = 4608
SHAPES = [(9216, 3072), (3072, 3072), (12288, 3072), (3072, 12288), (21504, 3072), (3072, 15360)]  # (out, in)


def ms(fn):
    return gpu_ms(fn, repeat=50, warmup=5)


def main():
    m = TOKENS
    for n, k in SHAPES:
        w8 = (torch.randn(n, k, device="cuda") / k ** .5).to(torch.float8_e4m3fn)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        wb, q = w8.to(torch.bfloat16), x.to(torch.float8_e4m3fn)
        one = torch.ones((), device="cuda")
        rows, columns = torch.ones(m, 1, device="cuda"), torch.ones(1, n, device="cuda")
        r = {"N": n, "K": k}
        r["bf16_mm"] = ms(lambda: x @ wb.t())
        r["cast_w"] = ms(lambda: w8.to(torch.bfloat16))
        r["fp8_mm"] = ms(lambda: torch._scaled_mm(q, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        r["fp8_mm_fast"] = ms(lambda: torch._scaled_mm(q, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16,
                                                       use_fast_accum=True))
        r["fp8_rowwise_mm"] = ms(lambda: torch._scaled_mm(q, w8.t(), scale_a=rows, scale_b=columns,
                                                          out_dtype=torch.bfloat16))
        r["fp8_rowwise_mm_fast"] = ms(lambda: torch._scaled_mm(q, w8.t(), scale_a=rows, scale_b=columns,
                                                               out_dtype=torch.bfloat16, use_fast_accum=True))
        r["amax"] = ms(lambda: x.abs().amax())
        r["quant"] = ms(lambda: (x.float() / one).to(torch.float8_e4m3fn))
        r["wT"] = ms(lambda: w8.t().contiguous())
        tflop = 2 * m * n * k / 1e9
        r["bf16_tflops"] = round(tflop / r["bf16_mm"], 0)
        r["fp8_tflops"] = round(tflop / r["fp8_mm"], 0)
        r["fp8_fast_tflops"] = round(tflop / r["fp8_mm_fast"], 0)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)


if __name__ == "__main__":
    main()
