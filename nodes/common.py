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
