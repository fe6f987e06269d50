"""The same tiny model file, dataset and seed train to the same adapter on two ComfyUI versions.

Both runs are fp32 on the CPU through the same torch; what differs is ComfyUI's Flux code (0.33 rewrote its RMSNorm,
RoPE and attention glue). Measured 2026-12-01 (0.33.0 in-process against 0.3.64 in a subprocess, 6 steps, rank 4):
the adapters differ by 3.4e-7 (relative L2 over all matrices) and the losses by 2.0e-7 at most. With 0.33's
in-place ``img +=`` left to torch.utils.checkpoint (the silently wrong backward this suite found) the gaps are
6.2e-3 and 7.4e-5. TOLERANCE sits about 300x above the first and 60x below the second.

Needs the other ComfyUI: .ci/run sets DEV2PRO_CROSS_COMFYUI (its tree) and DEV2PRO_CROSS_PYTHON (its environment's
python). Run by hand with those set to compare any two versions.
"""
import os
import subprocess

import pytest
import torch
from safetensors.torch import load_file

import cross_version_fixture as fixture

OTHER_TREE = os.environ.get("DEV2PRO_CROSS_COMFYUI")
OTHER_PYTHON = os.environ.get("DEV2PRO_CROSS_PYTHON")
# Relative L2 gap between the two versions' adapters (all up and down matrices together) and the largest relative gap
# of a step's loss. See the module docstring for where the numbers come from.
TOLERANCE = {"adapter": 1e-4, "loss": 1e-5}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.skipif(not (OTHER_TREE and OTHER_PYTHON), reason="needs a second ComfyUI: DEV2PRO_CROSS_COMFYUI and "
                    "DEV2PRO_CROSS_PYTHON (.ci/run sets them)")
def test_same_adapter_on_the_other_comfyui_version(core, tmp_path):
    model, data, theirs_path = (str(tmp_path / n) for n in ("flux.safetensors", "data.safetensors", "theirs.safetensors"))
    fixture.write_inputs(model, data)
    env = {**os.environ, "COMFYUI_PATH": OTHER_TREE}
    done = subprocess.run([OTHER_PYTHON, fixture.__file__, model, data, theirs_path], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ours, theirs = fixture.train(core, model, data), load_file(theirs_path)

    assert ours.keys() == theirs.keys()
    assert len(ours["losses"]) == fixture.STEPS
    weights = sorted(k for k in ours if k != "losses")
    flat = [torch.cat([d[k].flatten() for k in weights]) for d in (ours, theirs)]
    gaps = {"adapter": relative(*flat),
            "loss": max(abs(a - b) / abs(b) for a, b in zip(ours["losses"].tolist(), theirs["losses"].tolist()))}
    print(f"cross-version gaps: {gaps}")
    assert all(up.abs().sum() > 0 for k, up in ours.items() if k.endswith(".up")), "the run must have trained"
    assert gaps["adapter"] < TOLERANCE["adapter"] and gaps["loss"] < TOLERANCE["loss"], gaps
