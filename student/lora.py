"""Pretrained-decoder initialisation and PEFT LoRA for the student's decoder.

LoRA is injected in place (`peft.inject_adapter_in_model`) into `model.decoder`, so the student stays a
`CogViTMTPForDistillation`: `save_pretrained` writes base and LoRA weights together, and `from_pretrained`
rebuilds the same structure from `config.use_lora`. `merged_state_dict` folds the LoRA deltas back into the
base weights for export.
"""

import json
from pathlib import Path

import torch
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file

ADAPTER = "default"
FROZEN_PREFIXES = ("decoder.", "lm_head.")


def inject_lora(model) -> None:
    cfg = model.config
    lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=list(cfg.lora_target_modules), bias="none")
    inject_adapter_in_model(lora, model.decoder, adapter_name=ADAPTER)


def mark_lora_trainable(model) -> None:
    """Train LoRA, the vision tower, the merger, the MTP modules (with the `<|image|>` embedding) and the
    teacher heads; freeze the decoder's base weights, embedding, norms and the output head."""
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name or not name.startswith(FROZEN_PREFIXES)


def merged_state_dict(model) -> dict:
    """State dict of the same model without LoRA: W = W_base + scale * B @ A, LoRA keys dropped."""
    deltas = {name: module.get_delta_weight(ADAPTER) for name, module in model.named_modules()
              if isinstance(module, LoraLayer)}
    merged = {}
    for key, value in model.state_dict().items():
        if "lora_" in key:
            continue
        if ".base_layer." in key:
            module_name, param = key.split(".base_layer.")
            key = f"{module_name}.{param}"
            if param == "weight":
                value = value + deltas[module_name].to(value.dtype)
        merged[key] = value
    return merged


# ---------------------------------------------------------------- pretrained decoder


def _read_config(path: Path) -> dict:
    file = path / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"decoder_init_path {path}: no config.json")
    return json.loads(file.read_text())


def decoder_config_kwargs(path) -> dict:
    """CogViTMTPConfig kwargs (decoder dims, vocab, special ids) read from a Llama-family folder's
    config.json, so that `load_preset(name, **decoder_config_kwargs(path), decoder_init_path=path)` fits."""
    path = Path(path)
    src = _read_config(path)
    if src.get("model_type") != "llama":
        raise ValueError(f"decoder_init_path {path}: model_type {src.get('model_type')!r} is not 'llama'")
    for key, ok in (("attention_bias", False), ("mlp_bias", False), ("hidden_act", "silu")):
        if src.get(key, ok) != ok:
            raise ValueError(f"decoder_init_path {path}: {key}={src[key]!r} is not supported (need {ok!r})")
    rope = src.get("rope_parameters") or src.get("rope_scaling") or {}
    if rope.get("rope_type", "default") != "default":
        raise ValueError(f"decoder_init_path {path}: rope_type {rope.get('rope_type')!r} is not supported")
    heads = src["num_attention_heads"]
    if src.get("head_dim") not in (None, src["hidden_size"] // heads):
        raise ValueError(f"decoder_init_path {path}: head_dim={src['head_dim']} != hidden_size / heads")
    kwargs = {
        "vocab_size": src["vocab_size"],
        "hidden_size": src["hidden_size"],
        "num_hidden_layers": src["num_hidden_layers"],
        "num_attention_heads": heads,
        "num_key_value_heads": src.get("num_key_value_heads") or heads,
        "intermediate_size": src["intermediate_size"],
        "rms_norm_eps": src.get("rms_norm_eps", 1e-6),
        "rope_theta": rope.get("rope_theta", src.get("rope_theta", 10000.0)),
        "max_position_embeddings": src.get("max_position_embeddings", 2048),
        "tie_word_embeddings": src.get("tie_word_embeddings", False),
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if isinstance(src.get(key), int):
            kwargs[key] = src[key]
    return kwargs


def _read_weights(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise FileNotFoundError(f"decoder_init_path {path}: no model.safetensors (or index); convert the "
                                "checkpoint to safetensors first")
    weights = {}
    for f in files:
        weights.update(load_file(str(path / f)))
    return weights


@torch.no_grad()
def load_pretrained_decoder(model, path) -> None:
    """Copy a Llama-family causal LM's weights into `model.decoder` (and `lm_head`): `model.X` -> `decoder.X`.
    Raises when a dim of the folder's config differs from `model.config` or a decoder weight is missing."""
    path = Path(path)
    expected = decoder_config_kwargs(path)
    mismatched = {k: (v, getattr(model.config, k)) for k, v in expected.items()
                  if k not in ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
                               "tie_word_embeddings")
                  and v != getattr(model.config, k)}
    if mismatched:
        detail = ", ".join(f"{k}: folder {a} vs student {b}" for k, (a, b) in mismatched.items())
        raise ValueError(f"decoder_init_path {path} does not fit the student config ({detail})")

    params = dict(model.named_parameters())
    tied = model.config.tie_word_embeddings
    weights = _read_weights(path)
    if "lm_head.weight" not in weights and not tied:  # source ties its head to the embedding
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    loaded = set()
    for key, value in weights.items():
        if key == "lm_head.weight":
            if tied:
                continue
            name = key
        elif key.startswith("model.") and "rotary_emb" not in key:
            name = "decoder." + key[len("model."):]
        else:
            continue
        if name not in params:  # LoRA wraps the projection: its base weight moved to `.base_layer.`
            name = name.replace(".weight", ".base_layer.weight")
        if name not in params:
            raise ValueError(f"decoder_init_path {path}: weight {key!r} has no place in the student")
        if params[name].shape != value.shape:
            raise ValueError(f"decoder_init_path {path}: {key!r} has shape {tuple(value.shape)}, "
                             f"student {name!r} has {tuple(params[name].shape)}")
        params[name].copy_(value.to(params[name].dtype))
        loaded.add(name)
    missing = [n for n in params if n.startswith(FROZEN_PREFIXES) and "lora_" not in n and n not in loaded
               and not (tied and n == "lm_head.weight")]
    if missing:
        raise ValueError(f"decoder_init_path {path}: no weights for {missing[:5]} ({len(missing)} in all)")
