"""GPU check, not a timing: training whose steps replay from CUDA graphs (core.step_graphs) against the same run
launched eagerly, through the paths a ComfyUI run takes besides one long session:

- ``plain``: one session; captured at its third step.
- ``previews``: a preview every 5 steps, so sessions of 5, 5 and 2 steps, each with graphs of its own (the last one
  too short to capture) and one optimizer carried across them.
- ``stop``: should_stop answers true after step 7: the run must end at step 7 with step 7's adapter.
- ``batch_shapes``: two image sizes in the dataset, each replayed from graphs of its own (step_graph_shapes 2).
- ``eager_again``: eager against eager, the yardstick for the differences above.
- ``after``: the session's graphs are gone afterwards (GPU memory allocated as after the eager sessions).

Prints one JSON line per case: the largest relative loss difference to eager, and the largest and mean adapter
difference.
Full-width Flux-dev blocks, shallow (2 double + 4 single) by default:

    python benchmarks/step_graphs_check.py [--depth 2 4] [--resolution 512] [--steps 12] [--cases batch_shapes ...]

Needs a CUDA GPU and ComfyUI importable (COMFYUI_PATH).
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train_step  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, nargs=2, default=[2, 4], metavar=("DOUBLE", "SINGLE"))
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--cases", nargs="*", default=["plain", "previews", "stop", "batch_shapes"],
                        help="cases besides eager_again (always run: the yardstick)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model on the CPU (no graphs there): checks the script")
    a = parser.parse_args()
    pack = train_step.import_comfyui_and_pack(cpu=a.smoke)
    core = pack.core
    shape = train_step.TINY_FLUX if a.smoke else dict(train_step.FLUX_DEV, depth=a.depth[0], depth_single_blocks=a.depth[1])
    patcher, _ = train_step.random_flux_dev(shape)
    width = patcher.model.diffusion_model.params.context_in_dim
    a.resolution = 64 if a.smoke else a.resolution
    latent, context, pooled = train_step.data(a.resolution, 8 if a.smoke else 512, width)
    one_size = core.dataset.TrainingDataset.from_batches(latent, [(context[0], pooled[0])])
    small = torch.randn(1, 16, a.resolution // 16, a.resolution // 16, generator=torch.Generator().manual_seed(1))
    two_sizes = core.dataset.TrainingDataset(one_size.samples + core.dataset.TrainingDataset.from_batches(
        small, [(context[0], pooled[0])]).samples)

    def train(dataset, graphs: bool, **kwargs):
        config = core.training.TrainConfig(steps=a.steps, learning_rate=1e-4, rank=16, alpha=16.0, seed=0)
        speed = {"step_graphs": graphs, "step_graph_shapes": 2}
        with torch.inference_mode():
            return core.training.train_lora(patcher.clone(), dataset, config, speed=speed, **kwargs)

    def compare(name, eager, graphed_result, **extra):
        losses = [abs(x - y) / abs(y) for x, y in zip(graphed_result.losses, eager.losses)]
        diffs = torch.cat([(graphed_result.weights.up[n] - eager.weights.up[n]).flatten() for n in eager.weights.up])
        ups = torch.cat([eager.weights.up[n].flatten() for n in eager.weights.up])
        print(json.dumps({"case": name, "steps": [len(eager.losses), len(graphed_result.losses)],
                          "step_graphs": graphed_result.speed["step_graphs"],
                          "step_graph_shapes": graphed_result.speed["step_graph_shapes"],
                          "loss_max_rel_diff": round(max(losses), 6),
                          "adapter_up_max_abs_diff": diffs.abs().max().item(),
                          "adapter_up_mean_abs_diff": diffs.abs().mean().item(),
                          "adapter_up_max_abs": ups.abs().max().item(), "adapter_up_mean_abs": ups.abs().mean().item(),
                          **extra}), flush=True)

    eager = train(one_size, graphs=False)
    # the yardstick: how far two eager runs of the same settings drift apart (nondeterministic GPU kernels, which
    # Adam's normalised steps amplify on adapter entries whose gradients are near zero)
    compare("eager_again", eager, train(one_size, graphs=False))
    loaded = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0  # after eager sessions
    if "plain" in a.cases:
        compare("plain", eager, train(one_size, graphs=True))
        compare("after", eager, eager, allocated_increase_gib=round(((torch.cuda.memory_allocated() if torch.cuda.is_available() else 0) - loaded) / 2**30, 4))
    if "previews" in a.cases:
        previews = []
        compare("previews", eager, train(one_size, graphs=True, preview_every=5,
                                         on_preview=lambda step, weights: previews.append(step)), previews=previews)
    if "stop" in a.cases:
        seen = []

        def stop_after_7():
            return len(seen) >= 7

        eager_7 = train(one_size, graphs=False, stop_at=7)
        stopped = train(one_size, graphs=True, on_step=lambda info: seen.append(info.step), should_stop=stop_after_7)
        compare("stop", eager_7, stopped, stopped_early=stopped.stopped_early, state_step=stopped.state.step)
    if "batch_shapes" in a.cases:
        eager_two = train(two_sizes, graphs=False)
        compare("batch_shapes", eager_two, train(two_sizes, graphs=True))

if __name__ == "__main__":
    main()
