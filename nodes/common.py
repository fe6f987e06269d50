"""What every node of the pack shares: its category and the custom socket types."""
from comfy_api.latest import io

CATEGORY = "Dev2Pro LoRA"
Dataset = io.Custom("DEV2PRO_DATASET")
TrainingStateType = io.Custom("DEV2PRO_TRAINING_STATE")
PreviewSettings = io.Custom("DEV2PRO_PREVIEWS")
AdvancedSettings = io.Custom("DEV2PRO_ADVANCED")

# Keys this pack keeps in a ModelPatcher's model_options (deep-copied by clone(), so they follow the MODEL).
MODEL_NAME_OPTION = "dev2pro_model_name"


def node_error(node: str, input_name: str, message: str) -> ValueError:
    return ValueError(f"{node} ({input_name}): {message}")


def setting_input(name: str, **overrides):
    """The node input of a training setting (core/settings.py), with ``overrides`` where a node means it otherwise
    (Continue Training's 0 = keep the run's own rate)."""
    from ..core.settings import SETTINGS

    s = SETTINGS[name]
    options = dict(default=s.default, tooltip=s.help, optional=s.optional)
    if s.kind == "int":
        options.update(min=int(s.min), max=int(s.max))
        if name == "seed":
            options["control_after_generate"] = True
        make = io.Int.Input
    elif s.kind == "float":
        options.update(min=s.min, max=s.max, step=s.step, round=s.round)
        make = io.Float.Input
    elif s.kind == "bool":
        make = io.Boolean.Input
    else:
        options["options"] = list(s.options)
        make = io.Combo.Input
    options.update(overrides)
    return make(name, **options)
