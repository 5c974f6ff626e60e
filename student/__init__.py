"""CogViT-style multimodal multi-token-prediction (MMTP) student, registered with transformers' Auto classes.

After `import student`, `AutoConfig`/`AutoModel.from_pretrained(folder)` load saved students; elsewhere
`trust_remote_code=True` loads them from the code saved in the folder (docs/student.md, "Portable student").
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForCausalLM

from .configuration_cogvit_mtp import CogViTMTPConfig, load_preset
from .decoder import IGNORE_INDEX, KVCache, mtp_labels, shift_labels
from .image_processing_cogvit_mtp import CogViTMTPImageProcessor
from .lora import decoder_config_kwargs
from .modeling_cogvit_mtp import CogViTMTPForDistillation, CogViTMTPOutput, build_student
from .pixels import image_tensor, image_transform
from .processing_cogvit_mtp import CogViTMTPProcessor
from .speculative import speculative_generate
from .vision import sample_image_mask, summary_names

AutoConfig.register(CogViTMTPConfig.model_type, CogViTMTPConfig, exist_ok=True)
AutoModel.register(CogViTMTPConfig, CogViTMTPForDistillation, exist_ok=True)
AutoModelForCausalLM.register(CogViTMTPConfig, CogViTMTPForDistillation, exist_ok=True)
AutoImageProcessor.register(CogViTMTPConfig, CogViTMTPImageProcessor, exist_ok=True)
# A saved student carries its own code and `auto_map`: `trust_remote_code=True` loads it without this package.
CogViTMTPConfig.register_for_auto_class()
CogViTMTPForDistillation.register_for_auto_class("AutoModel")
CogViTMTPImageProcessor.register_for_auto_class("AutoImageProcessor")
CogViTMTPProcessor.register_for_auto_class("AutoProcessor")

__all__ = [
    "IGNORE_INDEX",
    "CogViTMTPConfig",
    "CogViTMTPForDistillation",
    "CogViTMTPImageProcessor",
    "CogViTMTPOutput",
    "CogViTMTPProcessor",
    "KVCache",
    "build_student",
    "decoder_config_kwargs",
    "image_tensor",
    "image_transform",
    "load_preset",
    "mtp_labels",
    "sample_image_mask",
    "shift_labels",
    "speculative_generate",
    "summary_names",
]
