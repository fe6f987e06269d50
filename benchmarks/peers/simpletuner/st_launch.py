"""Runs SimpleTuner's train entry point (simpletuner/train.py as __main__) in this very process, after installing the
benchmark import stubs (st_stubs.py). Usage: python3 st_launch.py --arg=value ... (SimpleTuner CLI args)."""
import os
import runpy
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_stubs  # noqa: E402

used = st_stubs.install()

if os.environ.get("ST_REHEARSAL_CPU") == "1":
    # CPU rehearsal only (never set by run.sh on a CUDA machine): the CUDA build of torch without a driver cannot
    # pin memory, which SimpleTuner's collate does for latents; make pin_memory a no-op there.
    import torch

    if not torch.cuda.is_available():
        torch.Tensor.pin_memory = lambda self, *a, **k: self
        if os.environ.get("ST_REHEARSAL_FAKE_FP8") == "1":
            # CPU probe only: let torchao build its float8 weights without a sm_89+ GPU, to exercise SimpleTuner's
            # fp8-torchao quantise + PEFT wrapping path (the fp8 matmuls themselves need CUDA)
            import torchao.quantization.quant_api as _qa

            _qa._check_hardware_support = lambda *a, **k: None
os.environ.setdefault("SIMPLETUNER_CONFIG_BACKEND", "cmd")
if os.environ.get("ST_COUNT_STEPS"):
    # rehearsal aid: count optimizer steps seen by a global post-step hook (the same hook type sitecustomize.py uses)
    from torch.optim.optimizer import register_optimizer_step_post_hook

    _steps = [0]
    register_optimizer_step_post_hook(lambda opt, a, k: _steps.__setitem__(0, _steps[0] + 1))
    import atexit

    atexit.register(lambda: print(f"[st_launch] optimizer steps seen by a global hook: {_steps[0]}", file=sys.stderr))
sys.argv = ["simpletuner-train"] + sys.argv[1:]
try:
    runpy.run_module("simpletuner.train", run_name="__main__", alter_sys=True)
finally:
    if os.environ.get("ST_DUMP_MODULES"):
        with open(os.environ["ST_DUMP_MODULES"], "w") as f:
            for name in sorted({n.split(".")[0] for n in list(sys.modules)}):
                m = sys.modules.get(name)
                f.write(f"{name}\t{getattr(m, '__file__', None)}\n")
    if used:
        print(f"[st_stubs] stub modules created: {sorted(set(used))}", file=sys.stderr, flush=True)
