"""CogViT-style multimodal multi-token-prediction (MMTP) student, registered with transformers' Auto classes.

After `import student`, `AutoConfig`/`AutoModel.from_pretrained(folder)` load saved students.
"""

from transformers import AutoConfig, AutoModel

from .configuration_cogvit_mtp import CogViTMTPConfig, load_preset
from .decoder import IGNORE_INDEX, KVCache, mtp_labels, shift_labels
from .lora import decoder_config_kwargs
from .modeling_cogvit_mtp import CogViTMTPForDistillation, CogViTMTPOutput, build_student
from .speculative import speculative_generate
from .vision import sample_image_mask, summary_names

AutoConfig.register(CogViTMTPConfig.model_type, CogViTMTPConfig, exist_ok=True)
AutoModel.register(CogViTMTPConfig, CogViTMTPForDistillation, exist_ok=True)

__all__ = [
    "IGNORE_INDEX",
    "CogViTMTPConfig",
    "CogViTMTPForDistillation",
    "CogViTMTPOutput",
    "KVCache",
    "build_student",
    "decoder_config_kwargs",
    "load_preset",
    "mtp_labels",
    "sample_image_mask",
    "shift_labels",
    "speculative_generate",
    "summary_names",
]
