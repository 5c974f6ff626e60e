"""The exported student folder's finishing touches: processor, tokenizer, LoRA adapter (student.portable)
and the model card (README.md), written from the run's config and shard manifests, and rewritten with the
evaluation table once the student is evaluated."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors import safe_open

from data.shards import MANIFEST
from data.student_tokenizer import STUDENT_TOKENIZER
from distill.config.load import output_path, shards_path, teacher_configs
from distill.eval.report import REFERENCE, verdict
from student.portable import ADAPTER_DIR, make_portable

CARD = "README.md"


def finish_student(cfg, folder) -> None:
    """Make `folder` (the exported student) portable, with the student's tokenizer (the language teacher's,
    or its own: output_dir/student_tokenizer), and write its model card."""
    folder = Path(folder)
    language = cfg.teachers.language
    tokenizer = shards_path(cfg, "targets", language.name, "tokenizer") if language else None
    if cfg.student.tokenizer is not None:
        tokenizer = output_path(cfg, STUDENT_TOKENIZER)
        if not tokenizer.is_dir():
            raise FileNotFoundError(f"{tokenizer}: the student's tokenizer (student.tokenizer="
                                    f"{cfg.student.tokenizer}) is missing; training writes it")
    make_portable(folder, cfg.student.image_size, tokenizer if tokenizer and tokenizer.is_dir() else None)
    write_card(cfg, folder)


def write_card(cfg, folder, metrics: dict | None = None, baseline: dict | None = None,
               model_name: str | None = None) -> Path:
    folder = Path(folder)
    path = folder / CARD
    tmp = path.with_name(CARD + ".tmp")
    tmp.write_text(model_card(cfg, folder, metrics, baseline, model_name))
    os.replace(tmp, path)
    return path


def _manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def parameter_count(folder: Path) -> int:
    total = 0
    for file in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                shape = f.get_slice(key).get_shape()
                n = 1
                for d in shape:
                    n *= d
                total += n
    return total


def model_card(cfg, folder: Path, metrics: dict | None = None, baseline: dict | None = None,
               model_name: str | None = None) -> str:
    """README.md of the student folder: a Hub model card with YAML metadata."""
    config = json.loads((folder / "config.json").read_text())
    name = model_name or cfg.tracking.registered_model or cfg.tracking.experiment
    params = parameter_count(folder)
    lines = ["---", "library_name: transformers", "pipeline_tag: image-to-text",
             "tags: [mmtp-distill, knowledge-distillation, multi-token-prediction, custom_code]", "---", "",
             f"# {name}: a distilled CogViT MMTP student", "",
             "A small multimodal multi-token-prediction (MMTP) student distilled by mmtp-distill from the teachers "
             "below: a CogViT-style vision tower, a 2x2 patch merger into a Llama-style decoder, and "
             f"{config['mtp_depth']} MTP module(s) that also predict tokens t+2 .. t+{1 + config['mtp_depth']}.", "",
             "## Architecture", "",
             "| | |", "|---|---|",
             f"| parameters | {params:,} ({params / 1e6:.2f} M) |",
             f"| image size | {cfg.student.image_size} x {cfg.student.image_size} px, patch {config['patch_size']}, "
             f"{config['spatial_merge_size']}x{config['spatial_merge_size']} merge "
             f"-> {_image_tokens(cfg, config)} image tokens |",
             f"| vision tower | {config['vision_num_hidden_layers']} layers, width {config['vision_hidden_size']}, "
             f"{config['vision_num_attention_heads']} heads |",
             f"| decoder | {config['num_hidden_layers']} layers, width {config['hidden_size']}, "
             f"{config['num_attention_heads']} heads ({config['num_key_value_heads']} KV), "
             f"vocab {config['vocab_size']} |",
             f"| MTP depth | {config['mtp_depth']} |",
             f"| teacher adaptor heads | {', '.join(config['teachers']) or 'none'} |"]
    if config.get("use_lora"):
        lines.append(f"| LoRA | r={config['lora_r']}, alpha={config['lora_alpha']} on the decoder; adapter in "
                     f"`{ADAPTER_DIR}/` |")
    lines += _teachers_and_data(cfg)
    lines += ["## Evaluation", ""] + _eval_table(metrics, baseline) + [""]
    lines += ["## Intended use and limits", "",
              "A research artefact: image captioning and image features at the scale of its training data, and a "
              "testbed for multi-token prediction (self-speculative decoding with its MTP heads). It knows only "
              "what its teachers said about its training images; it is not a general-purpose captioner, "
              "has had no safety tuning, and inherits the biases and errors of its teachers.", "",
              "## How to load", "",
              "The model's code ships in this folder, so loading it needs `trust_remote_code=True` (read the "
              "`*.py` files first). It needs `torch`, `transformers`, `peft` and `pillow`.", "",
              "```python",
              "from transformers import AutoModelForCausalLM, AutoProcessor",
              "from PIL import Image", "",
              "model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()",
              "processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)",
              "inputs = processor(images=Image.open(\"photo.png\"))  # prompt: [bos]; or text=\"a caption prefix\"",
              "tokens = model.generate(**inputs, max_new_tokens=32)  # or num_beams=3, do_sample=True, ...",
              "tokens = model.generate(**inputs, max_new_tokens=32, mtp_speculative=True)  # same tokens, faster",
              "print(processor.batch_decode(tokens, skip_special_tokens=True))",
              "```"]
    if config.get("use_lora"):
        lines += ["", "The LoRA adapter alone, on the base student:", "", "```python",
                  "from peft import PeftModel",
                  "from transformers import AutoModel", "",
                  "base = AutoModel.from_pretrained(path, trust_remote_code=True, use_lora=False,",
                  "                                 key_mapping={r\"\\.base_layer\\.\": \".\"})",
                  f"model = PeftModel.from_pretrained(base, f\"{{path}}/{ADAPTER_DIR}\")", "```"]
    return "\n".join(lines) + "\n"


def _teachers_and_data(cfg) -> list[str]:
    """The card's teacher table (from the target manifests) and its data section (from the samples manifest)."""
    lines = ["", "## Teachers", "", "| teacher | role | kind | source | weights sha256 |", "|---|---|---|---|---|"]
    for t in teacher_configs(cfg):
        producer = (_manifest(shards_path(cfg, "targets", t.name)) or {}).get("producer", {})
        role = "language" if cfg.teachers.language is not None and t.name == cfg.teachers.language.name else "vision"
        digest = producer.get("weights_digest")
        lines.append(f"| {t.name} | {role} | {producer.get('kind', t.kind)} | {producer.get('source', '')} | "
                     f"{f'`{digest}`' if digest else 'n/a'} |")
    samples = _manifest(shards_path(cfg, "samples")) or {}
    sources = ", ".join(s["kind"] for s in samples.get("config", {}).get("sources", [])) or "n/a"
    splits = samples.get("splits") or {}
    lines += ["", "## Data", "",
              f"Sources: {sources}; {samples.get('rows', 'n/a')} samples "
              f"(manifest digest `{samples.get('config_digest', 'n/a')}`).",
              "Splits: " + (", ".join(f"{k} {v}" for k, v in sorted(splits.items())) or "n/a") + ". "
              "The student trains on `train`; the evaluation below is on `test`.", ""]
    return lines


def _image_tokens(cfg, config) -> int:
    side = config["patch_size"] * config["spatial_merge_size"]
    return (cfg.student.image_size // side) ** 2


def _eval_table(metrics: dict | None, baseline: dict | None) -> list[str]:
    if not metrics:
        return ["Not evaluated yet (`mmtp evaluate` rewrites this card with the test-split metrics)."]
    if not baseline:
        return ["| metric | student |", "|---|---|"] + [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]
    rows = ["| metric | student | CE-only baseline | KD helps? |", "|---|---|---|---|"]
    for k, v in sorted(metrics.items()):
        if k in baseline:
            rows.append(f"| {k} | {v:.4f} | {baseline[k]:.4f} | {verdict(k, v, baseline[k])} |")
        elif not REFERENCE.match(k):
            rows.append(f"| {k} | {v:.4f} | | |")
    return rows
