"""Make an exported student folder self-contained: what a user of the Hub expects next to the weights.

`save_pretrained` already writes the student's code files and `auto_map` (the classes are registered with
`register_for_auto_class` in `student/__init__.py`). `make_portable` adds the rest:
- `auto_map["AutoModelForCausalLM"]`, so both `AutoModel` and `AutoModelForCausalLM` load it;
- the image processor (`preprocessor_config.json`) and, with a tokenizer, the tokenizer files and the processor
  (`processor_config.json`), so `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` works;
- with LoRA, the decoder's adapter on its own in `adapter/`, as PEFT saves one (`adapter_config.json` +
  `adapter_model.safetensors`); `load_base_student` gives the model it applies to.
"""

import json
import os
import shutil
from pathlib import Path

from peft import LoraConfig
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from .image_processing_cogvit_mtp import CogViTMTPImageProcessor
from .lora import ADAPTER
from .processing_cogvit_mtp import CogViTMTPProcessor

ADAPTER_DIR = "adapter"
MODEL_CLASS = "modeling_cogvit_mtp.CogViTMTPForDistillation"
# A LoRA student's base weights sit under `.base_layer.`; this maps them onto a plain (use_lora=False) student.
BASE_KEY_MAPPING = {r"\.base_layer\.": "."}


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def make_portable(folder, image_size: int, tokenizer_dir=None) -> None:
    """Complete a folder written by `CogViTMTPForDistillation.save_pretrained` (see the module docstring).
    `image_size`: the side the student was trained at; `tokenizer_dir`: the tokenizer the student reads
    (the language teacher's, or the student's own: `student.tokenizer`)."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    if "AutoModel" not in config.get("auto_map", {}):
        raise ValueError(f"{folder}: config.json has no auto_map; save the student after `import student`")
    config["auto_map"]["AutoModelForCausalLM"] = MODEL_CLASS
    _write_json(folder / "config.json", config)
    side = config["patch_size"] * config["spatial_merge_size"]
    if image_size % side:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size * spatial_merge_size = {side}")
    image_processor = CogViTMTPImageProcessor.for_size(image_size)
    if tokenizer_dir is not None:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        CogViTMTPProcessor(image_processor, tokenizer, config.get("teacher_token_ids")).save_pretrained(str(folder))
    image_processor.save_pretrained(str(folder))
    if config.get("use_lora"):
        save_lora_adapter(folder, folder / ADAPTER_DIR)


def save_lora_adapter(folder, adapter_dir) -> Path:
    """Write the LoRA weights of the student saved in `folder` as a PEFT adapter of the base student
    (`load_base_student(folder)`): `PeftModel.from_pretrained(base, adapter_dir)` equals the LoRA student."""
    folder, adapter_dir = Path(folder), Path(adapter_dir)
    config = json.loads((folder / "config.json").read_text())
    if not config.get("use_lora"):
        raise ValueError(f"{folder}: the student has no LoRA (use_lora is false)")
    weights = {}
    for file in sorted(folder.glob("model*.safetensors")):
        weights.update(load_file(str(file)))
    suffix = f".{ADAPTER}.weight"
    # PEFT's saved layout: `base_model.model.<module>.lora_A.weight` (no adapter name).
    adapter = {f"base_model.model.{k[: -len(suffix)]}.weight": v.contiguous() for k, v in weights.items()
               if "lora_" in k and k.endswith(suffix)}
    if not adapter:
        raise ValueError(f"{folder}: use_lora is true but the weights hold no LoRA tensors")
    targets = "|".join(sorted(config["lora_target_modules"]))
    lora = LoraConfig(r=config["lora_r"], lora_alpha=config["lora_alpha"], lora_dropout=config["lora_dropout"],
                      bias="none", target_modules=rf"decoder\.layers\.\d+\.(self_attn|mlp)\.({targets})")
    tmp = adapter_dir.with_name(adapter_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    lora.save_pretrained(str(tmp))
    save_file(adapter, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    shutil.rmtree(adapter_dir, ignore_errors=True)
    os.replace(tmp, adapter_dir)
    return adapter_dir


def load_base_student(folder, **kwargs):
    """The base of a LoRA student's adapter: the student without LoRA, with the base decoder weights."""
    from transformers import AutoModel
    return AutoModel.from_pretrained(str(folder), use_lora=False, key_mapping=BASE_KEY_MAPPING, **kwargs)


def saved_image_size(folder) -> int | None:
    """The side the folder's image processor resizes to (None for a folder saved without one)."""
    path = Path(folder) / "preprocessor_config.json"
    return json.loads(path.read_text())["size"]["height"] if path.is_file() else None
