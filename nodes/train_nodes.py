"""The training nodes: ComfyUI inputs in, a LORA_MODEL, a loss curve, previews and a training state out."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import time

import numpy as np
import torch

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

from ..core.config import LR_SCHEDULES, InputError, SettingError
from ..core.settings import MAX_STEPS, default, on_node
from ..core import distributed, run_memo
from ..core.atomic_files import WriteFailed
from ..core.dataset import TrainingDataset
from ..core.fp8_matmul import Fp8Unavailable
from ..core.live_runs import CANCELLED, FAILED, FINISHED, RUNS, STOPPED
from ..core.lora_format import TrainedLoRA
from ..core.loss_plot import draw_loss_curve
from ..core.optimizers import MissingPackage
from ..core.training import (DEFAULT_TRAINING_GUIDANCE, GUIDANCE_OPTION, NonFiniteLoss, StepInfo, TrainConfig,
                             TrainingState, TrainResult, train_lora)
from .common import (CATEGORY, MODEL_NAME_OPTION, AdvancedSettings, Dataset, PreviewSettings, TrainingStateType,
                     node_error, setting_input)
from .events import prompt_id, send_event, send_status
from .lora_nodes import write_lora
from .preview_nodes import Previews, sample_previews

log = logging.getLogger("dev2pro-lora")
RESCUE_PREFIX = "dev2pro-rescue/"


def pil_to_image(pil) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)[None]


def image_to_pil(image: torch.Tensor):
    from PIL import Image

    return Image.fromarray(np.clip(image.numpy() * 255.0 + 0.5, 0, 255).astype(np.uint8))


class _StoppedEarly:
    """Runs ended early by Stop & save, counted per node type and constant inputs, which is all that ComfyUI hands
    ``fingerprint_inputs`` (no linked inputs, and no hidden ones on 0.3.64): the count changes for that run only, so
    queuing again retrains it and leaves every other trainer's finished result in ComfyUI's cache."""

    counts: dict[str, int] = {}

    @staticmethod
    def key(node: str, constants: dict) -> str:
        # fingerprint_inputs gets linked inputs as None (V3)
        return node + json.dumps({k: v for k, v in constants.items() if v is not None}, sort_keys=True, default=str)

    @classmethod
    def add(cls, node_cls, hidden) -> None:
        """Count an early stop of the node ``hidden.unique_id``: its constant inputs as the prompt gives them, as far
        as the node declares them (those are what ComfyUI fingerprints)."""
        inputs = (hidden.prompt or {}).get(str(hidden.unique_id), {}).get("inputs", {})
        declared = {name for section in node_cls.INPUT_TYPES().values() for name in section}
        key = cls.key(node_cls.NODE, {k: v for k, v in inputs.items() if k in declared and not isinstance(v, list)})
        cls.counts[key] = cls.counts.get(key, 0) + 1


def run_training(node_cls, model, dataset: TrainingDataset, config: TrainConfig, resume: TrainingState | None,
                 stop_at_step: int, previews: Previews | None) -> io.NodeOutput:
    """What both training nodes do: progress, events, Stop & save, Cancel, previews, NaN rescue, and the four
    outputs. ``node_cls``: the executing node's class, whose ``hidden`` holds its id and prompt."""
    node, hidden = node_cls.NODE, node_cls.hidden
    ranks = distributed.current()
    # the number of ranks changes the run's rounding (and its metadata), so it is part of what was trained
    key = run_memo.run_key(node, model, dataset, config, resume, stop_at_step, previews, ranks and ranks.world)
    finished = run_memo.recall(key)
    if finished is not None:
        log.warning("%s: these inputs finished training earlier in this ComfyUI session (ComfyUI dropped that result "
                    "from its cache); handing that run on instead of training again", node)
        return finished
    node_id = str(hidden.unique_id)
    first = resume.step if resume is not None else 0
    live = RUNS.start(node_id, prompt_id(), config.steps, first, previews.every_steps if previews else 0,
                      resume.losses if resume is not None else [])
    send_status(live)
    progress = comfy.utils.ProgressBar(config.steps, node_id=node_id)
    if resume is not None:
        progress.update_absolute(min(resume.step, config.steps), config.steps)
    cancelled = [False]
    preview_images: list[torch.Tensor] = []

    def on_step(info: StepInfo) -> None:
        RUNS.step(live, info.step, info.total, info.loss, info.learning_rate, info.seconds)
        send_event(node_id, {"step": info.step, "total": info.total, "loss": info.loss,
                             "learning_rate": info.learning_rate, "seconds_per_step": info.seconds,
                             "eta_seconds": live.eta_seconds, "prompt_id": live.prompt_id, "status": live.status})
        try:
            progress.update_absolute(info.step, info.total)  # ComfyUI's hook raises here once Cancel is pressed
        except comfy.model_management.InterruptProcessingException:
            cancelled[0] = True

    def should_stop() -> bool:
        cancelled[0] = cancelled[0] or comfy.model_management.processing_interrupted()
        return cancelled[0] or live.stop_requested or distributed.stop_requested()

    def on_preview(step: int, weights) -> None:
        if ranks is not None and not ranks.main:
            return  # rank 0 samples the previews
        try:
            images = sample_previews(previews, weights.to_kohya())
            preview_images.append(images)
            for i, image in enumerate(images):  # the panel shows them with their step (ComfyUI's own preview
                RUNS.preview(live, step, save_preview(image_to_pil(image), node_id, step, i))  # grew the node)
            send_status(live)
        except comfy.model_management.InterruptProcessingException:
            cancelled[0] = True

    try:
        result = train_lora(model, dataset, config, on_step, resume=resume, stop_at=stop_at_step,
                            should_stop=should_stop, preview_every=previews.every_steps if previews else 0,
                            on_preview=on_preview if previews else None)
    except NonFiniteLoss as e:
        raise failed(live, rescue(node, live, model, config, e, "learning_rate", f"training stopped: {e}.", "Lower the "
                     "learning rate, keep max_grad_norm on (1.0), or check the dataset for broken images.")) from e
    except distributed.PeerFailed as e:
        raise failed(live, rescue(node, live, model, config, e, "ranks", f"{e}.", "Fix what that rank reported and "
                     "continue from the saved state (on any number of ranks).")) from e
    except MissingPackage as e:
        raise failed(live, node_error(node, "optimizer", str(e))) from e
    except Fp8Unavailable as e:
        raise failed(live, node_error(node, "advanced: fp8_matmul", str(e))) from e
    except InputError as e:  # SettingError, ModelInputError, StateMismatch
        raise failed(live, node_error(node, e.input_name, str(e))) from e
    except ValueError as e:
        raise failed(live, node_error(node, "model/dataset/training_state", str(e))) from e
    except BaseException as e:
        raise failed(live, e) from None
    should_stop()  # a Cancel that arrived inside an op (0.33+) ended the session; it is seen here
    step = result.state.step if result.state is not None else first
    stopped = result.stopped_early and step < config.steps and (stop_at_step == 0 or step < stop_at_step)
    if ranks is not None:  # the ranks stopped together, on a signal to any of them
        if stopped and ranks.main and result.state is not None:
            # torchrun gives the ranks 30 s after a Ctrl-C before it kills them: saved now, not by a later node
            path = save_rescue(node_id, model, config, result, f"stopped_step_{step:05d}", f"stopped at step {step} "
                               f"of {config.steps}")
            log.warning("%s: stopped at step %d of %d; the adapter and its training state are saved as %s", node,
                        step, config.steps, path)
    elif cancelled[0]:
        raise cancel(node, live, model, config, result, first)
    if stopped:
        _StoppedEarly.add(node_cls, hidden)
        log.warning("%s: Stop & save at step %d of %d; the adapter so far goes on to the next nodes", node, step,
                    config.steps)
    RUNS.end(live, STOPPED if stopped else FINISHED, f"stopped at step {step} of {config.steps}" if stopped else
             f"finished at step {step} of {config.steps}")
    send_status(live)
    output = outputs(model, config, result, preview_images, stopped, node_id)
    if not stopped:
        run_memo.remember(key, output)
    return output


def cancel(node: str, live, model, config: TrainConfig, result: TrainResult, first: int) -> BaseException:
    """Cancel keeps ComfyUI's meaning, the graph stops; what this run trained is kept as a rescue file."""
    comfy.model_management.interrupt_current_processing(False)
    step = result.state.step if result.state is not None else first
    message = f"cancelled at step {step} of {config.steps}"
    # a Cancel as training starts (0.3.64 sees it only once the first step is done) keeps no one-step adapter
    if result.state is not None and step > first + 1:
        try:
            path = save_rescue(live.node, model, config, result, f"cancelled_step_{step:05d}", message)
            message += f"; the adapter so far and its training state are saved as {rescue_name(path)}"
        except ValueError as e:
            message += f"; the adapter so far could not be saved ({e})"
        log.warning("%s: %s", node, message)
    RUNS.end(live, CANCELLED, message)
    send_status(live)
    comfy.model_management.interrupt_current_processing(True)
    return comfy.model_management.InterruptProcessingException()


def failed(live, error: BaseException) -> BaseException:
    interrupted = isinstance(error, comfy.model_management.InterruptProcessingException)
    RUNS.end(live, CANCELLED if interrupted else FAILED, f"cancelled at step {live.step}" if interrupted else str(error))
    send_status(live)
    return error


def save_preview(pil, node_id: str, step: int, index: int) -> dict:
    """A preview as a file in ComfyUI's temp folder (served by /view), so the panel can show it after a reload."""
    import folder_paths

    directory = folder_paths.get_temp_directory()
    name = f"dev2pro_preview_{node_id.replace(':', '-')}_{int(time.time() * 1000)}_{step:06d}_{index}.jpg"
    os.makedirs(directory, exist_ok=True)
    pil.save(os.path.join(directory, name), quality=90)
    return {"filename": name, "subfolder": "", "type": "temp"}


def rescue_name(path: str) -> str:
    import folder_paths

    return "models/loras/" + os.path.relpath(path, folder_paths.get_folder_paths("loras")[0]).replace(os.sep, "/")


def lora_info(model, config: TrainConfig, result: TrainResult, stopped_early: bool) -> dict[str, str]:
    base_name = model.model_options.get(MODEL_NAME_OPTION, "unknown")
    step = result.state.step if result.state else config.steps
    info = {
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": str(config.alpha),
        "ss_steps": str(step),
        "ss_max_train_steps": str(config.steps),
        "ss_learning_rate": str(config.learning_rate),
        "ss_lr_scheduler": config.lr_schedule,
        "ss_lr_warmup_steps": str(config.warmup_steps),
        "ss_optimizer": config.optimizer,
        "ss_batch_size_per_device": str(per_device_batch(config.batch_size)),
        "ss_total_batch_size": str(config.batch_size * config.gradient_accumulation),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation),
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_timestep_sampling": config.timestep_sampling,
        "ss_loss_type": config.loss,
        "ss_caption_dropout_rate": str(config.caption_dropout),
        "ss_seed": str(config.seed),
        "ss_guidance_scale": str(config.guidance),
        "ss_training_base": base_name,
        "ss_gradient_checkpointing": str(config.gradient_checkpointing),
        "dev2pro_training_guidance": str(config.guidance),
        "dev2pro_base_model": base_name,
        "dev2pro_base_fingerprint": run_memo.base_fingerprint(model),
    }
    ranks = distributed.current()
    if ranks is not None:
        info["dev2pro_ranks"] = str(ranks.world)
    if config.lr_history:
        info["dev2pro_learning_rates"] = json.dumps(
            json.loads(config.lr_history) + [[config.schedule_start + 1, config.learning_rate, config.lr_schedule]])
    if result.losses:
        info["dev2pro_final_loss"] = f"{result.losses[-1]:.6g}"
    if stopped_early:
        info["dev2pro_stopped_early"] = f"stopped by Stop & save at step {step} of {config.steps}"
    return info


def outputs(model, config: TrainConfig, result: TrainResult, preview_images: list[torch.Tensor],
            stopped_early: bool, node_id: str) -> io.NodeOutput:
    info = lora_info(model, config, result, stopped_early)
    lora = TrainedLoRA(result.weights.to_kohya(), info, origin=node_id)
    step = result.state.step if result.state else config.steps
    title = f"step {step}/{config.steps} at guidance {config.guidance}" + (", stopped early" if stopped_early else "")
    curve = pil_to_image(draw_loss_curve(result.losses, title)) if result.losses else torch.zeros(1, 64, 64, 3)
    previews = torch.cat(preview_images) if preview_images else torch.zeros(1, 64, 64, 3)
    if result.state is not None:
        result.state.info.update(info)
    return io.NodeOutput(lora, curve, previews, result.state)


def save_rescue(node_id: str, model, config: TrainConfig, result: TrainResult, name: str, why: str) -> str:
    """Write ``result``'s adapter and state under models/loras/dev2pro-rescue/ and list the file on trainer
    ``node_id``'s run (the panel); returns the path (ValueError if it cannot be written)."""
    info = lora_info(model, config, result, stopped_early=False)
    info["dev2pro_stopped_early"] = why
    result.state.info.update(info)
    path = write_lora(result.weights.to_kohya(), info, RESCUE_PREFIX + name, result.state)
    RUNS.saved(node_id, rescue_name(path))
    return path


def rescue(node: str, live, model, config: TrainConfig, error: NonFiniteLoss | distributed.PeerFailed,
           input_name: str, what: str, fix: str) -> ValueError:
    """Save the last good adapter and its state (rank 0 only), and say where, in the message and on the panel, so
    a NaN or a failed rank never costs the run."""
    good = error.result
    trained = good is not None and good.state is not None and good.state.step > 0
    where = ""
    if trained and distributed.is_main():
        try:
            path = save_rescue(live.node, model, config, good, f"step_{good.state.step:05d}", str(error))
            where = (f" The adapter after step {good.state.step}, the last good one, and its training state are saved "
                     f"as {path}; continue from it with Load Training State and Continue Training, whose "
                     "learning_rate input sets a lower rate for the steps it adds.")
        except ValueError as e:  # the failure stays the message; the failed rescue is said after it
            why = e.__cause__.cause if isinstance(e.__cause__, WriteFailed) else str(e)
            where = (f" The adapter after step {good.state.step}, the last good one, could not be saved to "
                     f"models/loras/{RESCUE_PREFIX} ({why}).")
    elif trained:
        where = " Rank 0 saves the adapter of the last good step."
    return node_error(node, input_name, f"{what}{where} {fix}")


def per_device_batch(batch_size: int) -> int:
    ranks = distributed.current()
    return batch_size if ranks is None else ranks.rows(batch_size)


def training_guidance(model) -> float:
    guidance = model.model_options.get(GUIDANCE_OPTION)
    if guidance is None:
        log.info("Dev2ProTrainLoRA: no Dev2ProTrainingGuidance on the model; training at guidance %s",
                 DEFAULT_TRAINING_GUIDANCE)
        return DEFAULT_TRAINING_GUIDANCE
    return guidance


OUTPUTS = [
    io.LoraModel.Output(display_name="lora", tooltip="The trained adapter (kohya keys). Works with Dev2ProSaveLoRA, "
                        "Dev2ProApplyLoRA and ComfyUI's Load/Save LoRA nodes."),
    io.Image.Output(display_name="loss_curve", tooltip="Loss per step and its moving average, over the whole run."),
    io.Image.Output(display_name="previews", tooltip="Every preview image of this node, in order (a black 64x64 "
                    "image when no previews are connected)."),
    TrainingStateType.Output(display_name="training_state", tooltip="Adapter, optimizer and step: continue with "
                             "Continue Training, or save it beside the LoRA with Save LoRA."),
]
# Train LoRA's settings inputs, in widget order (saved workflows list widget values in this order)
TRAIN_INPUTS = ("steps", "learning_rate", "rank", "alpha", "seed", "gradient_checkpointing", "batch_size",
                "gradient_accumulation", "optimizer", "lr_schedule", "warmup_steps", "max_grad_norm",
                "timestep_sampling", "loss", "caption_dropout", "blocks_to_swap")
STOP_AT_TOOLTIP = ("Stop after this step of the run and hand over, to chain 'train -> preview -> continue' in one "
                   "graph. 0 runs to the end.")


def stop_at_input(optional: bool):
    return io.Int.Input("stop_at_step", default=0, min=0, max=MAX_STEPS, optional=optional, tooltip=STOP_AT_TOOLTIP)


def previews_input():
    return PreviewSettings.Input("previews", optional=True, tooltip="From Training Previews: sample on Flux-dev every "
                                 "N steps.")


class _TrainingNode(io.ComfyNode):
    @classmethod
    def fingerprint_inputs(cls, **constants):
        """Changes after this run was ended by Stop & save, so queuing again retrains instead of reusing its
        partial adapter."""
        return _StoppedEarly.counts.get(_StoppedEarly.key(cls.NODE, constants), 0)


class Dev2ProTrainLoRA(_TrainingNode):
    NODE = "Dev2ProTrainLoRA"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=cls.NODE,
            display_name="Train Flux LoRA (Dev2Pro)",
            category=CATEGORY,
            description="Trains a LoRA on the double and single blocks of a Flux transformer with the rectified-"
            "flow velocity loss, at the guidance set by Dev2ProTrainingGuidance (1.0 when none is set). "
            "The input MODEL is left exactly as it was. The panel's Stop & save ends training after the "
            "current step and passes the adapter so far on; Cancel stops the graph and keeps that adapter in "
            "models/loras/dev2pro-rescue/.",
            inputs=[
                io.Model.Input("model", tooltip="Flux-dev2pro from Dev2ProLoadModel, through Dev2ProTrainingGuidance."),
                Dataset.Input("dataset", tooltip="From Dataset from Folder or Dataset from Latents."),
                *[setting_input(name) for name in TRAIN_INPUTS[:-1]],
                stop_at_input(optional=True),
                setting_input("blocks_to_swap"),
                previews_input(),
                AdvancedSettings.Input("advanced", optional=True,
                                       tooltip="From Advanced Training Settings: timestep and loss details, weight decay."),
            ],
            outputs=OUTPUTS,
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def execute(cls, model, dataset: TrainingDataset, stop_at_step=0, previews=None, advanced=None,
                **settings) -> io.NodeOutput:
        settings = dict(settings, guidance=training_guidance(model),
                        batch_size=distributed.global_batch(settings.get("batch_size", default("batch_size"))))
        config = TrainConfig(**settings, **(advanced or {}))
        try:
            config.validate()
        except SettingError as e:
            where = f"advanced: {e.input_name}" if e.input_name in (advanced or {}) else e.input_name
            raise node_error("Dev2ProTrainLoRA", where, str(e)) from e
        return run_training(cls, model, dataset, config, None, stop_at_step,
                            previews)


class Dev2ProContinueTraining(_TrainingNode):
    NODE = "Dev2ProContinueTraining"

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id=cls.NODE,
            display_name="Continue Training (Dev2Pro)",
            category=CATEGORY,
            description="Carries a training run on from its state (from Train LoRA or Load Training State) with the "
            "same settings: N then M steps give exactly the adapter of N+M uninterrupted steps.",
            inputs=[
                TrainingStateType.Input("training_state", tooltip="From Train LoRA, Continue Training or Load "
                                        "Training State."),
                io.Model.Input("model", tooltip="The same training base (Flux-dev2pro through Training Guidance)."),
                Dataset.Input("dataset", tooltip="The dataset to go on with, normally the run's own."),
                setting_input("steps", default=0, min=0,
                              tooltip="Total steps of the run. 0 keeps the run's own; more extends it (with a "
                             "decaying schedule, that stretches the schedule)."),
                stop_at_input(optional=False),
                previews_input(),
                setting_input("learning_rate", default=0.0, min=0.0, optional=True, tooltip="A new learning rate for the steps this node adds, e.g. half "
                               "the run's after a NaN stop. 0 keeps the run's own rate and schedule."),
                setting_input("lr_schedule", options=["keep", *LR_SCHEDULES], default="keep",
                              tooltip="A new schedule for the steps this node adds (it starts at this node's step, "
                               "without warmup). keep: the run's own."),
                io.Boolean.Input("allow_other_base", default=False, optional=True,
                                 tooltip="Continue on a MODEL whose weights differ from the one the state was "
                                 "trained on (a merge or another fine-tune). Off: that is refused."),
            ],
            outputs=OUTPUTS,
            hidden=[io.Hidden.unique_id, io.Hidden.prompt],
        )

    @classmethod
    def execute(cls, training_state: TrainingState, model, dataset, steps, stop_at_step, previews=None,
                learning_rate=0.0, lr_schedule="keep", allow_other_base=False) -> io.NodeOutput:
        config = training_state.config
        trained_on = training_state.info.get("dev2pro_base_fingerprint")
        if trained_on and not allow_other_base and trained_on != run_memo.base_fingerprint(model):
            raise node_error("Dev2ProContinueTraining", "model", "the training state was trained on "
                             f"'{training_state.info.get('dev2pro_base_model', 'another model')}', and this MODEL's "
                             "weights differ from that one's. Connect the base it was trained on, or turn on "
                             "allow_other_base to continue on this one on purpose.")
        guidance = training_guidance(model)
        if guidance != config.guidance:
            raise node_error("Dev2ProContinueTraining", "model", f"the run trained at guidance {config.guidance}, this "
                             f"model is set to {guidance}; use the same Training Guidance value.")
        if steps:
            config = dataclasses.replace(config, steps=steps)
        if learning_rate or lr_schedule != "keep":
            config = config.with_new_rate(training_state.step, learning_rate or None,
                                          None if lr_schedule == "keep" else lr_schedule)
        if training_state.step >= config.steps:
            log.info("Dev2ProContinueTraining: the run is already at step %d of %d; raise 'steps' to train more",
                     training_state.step, config.steps)
        return run_training(cls, model, dataset, config, training_state,
                            stop_at_step, previews)


class Dev2ProTrainAdvanced(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProTrainAdvanced",
            display_name="Advanced Training Settings (Dev2Pro)",
            category=CATEGORY,
            description="Details of timestep sampling, the Huber loss, weight decay and compilation for Train LoRA.",
            inputs=[
                *[setting_input(setting.name) for setting in on_node("advanced")],
            ],
            outputs=[AdvancedSettings.Output(display_name="advanced", tooltip="For Train LoRA's 'advanced' input.")],
        )

    @classmethod
    def execute(cls, **settings) -> io.NodeOutput:
        return io.NodeOutput({setting.name: settings.get(setting.name, setting.default)
                              for setting in on_node("advanced")})
