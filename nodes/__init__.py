"""ComfyUI nodes of dev2pro-lora: thin translations from node inputs to calls of ``core``."""
from .dataset_nodes import Dev2ProDataset, Dev2ProDatasetFromLatents
from .guidance_nodes import Dev2ProGuidanceResponse
from .lora_nodes import Dev2ProApplyLoRA, Dev2ProLoadLoRA, Dev2ProLoadTrainingState, Dev2ProSaveLoRA
from .model_nodes import Dev2ProLoadModel, Dev2ProTrainingGuidance
from .preview_nodes import Dev2ProPreviewSettings
from .train_nodes import Dev2ProContinueTraining, Dev2ProTrainAdvanced, Dev2ProTrainLoRA

NODES = [
    Dev2ProLoadModel,
    Dev2ProTrainingGuidance,
    Dev2ProDataset,
    Dev2ProDatasetFromLatents,
    Dev2ProTrainLoRA,
    Dev2ProContinueTraining,
    Dev2ProTrainAdvanced,
    Dev2ProPreviewSettings,
    Dev2ProSaveLoRA,
    Dev2ProLoadTrainingState,
    Dev2ProLoadLoRA,
    Dev2ProApplyLoRA,
    Dev2ProGuidanceResponse,
]
