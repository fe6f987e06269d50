"""ComfyUI nodes of dev2pro-lora: thin translations from node inputs to calls of ``core``."""
from .dataset_nodes import Dev2ProDatasetFromLatents
from .lora_nodes import Dev2ProApplyLoRA, Dev2ProSaveLoRA
from .model_nodes import Dev2ProLoadModel, Dev2ProTrainingGuidance
from .train_nodes import Dev2ProTrainLoRA

NODES = [
    Dev2ProLoadModel,
    Dev2ProTrainingGuidance,
    Dev2ProDatasetFromLatents,
    Dev2ProTrainLoRA,
    Dev2ProSaveLoRA,
    Dev2ProApplyLoRA,
]
