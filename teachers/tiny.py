"""Tiny random teachers for tests and configs/tiny.yaml.

A source "tiny-random:<arch>" materialises, once and deterministically from a fixed seed, a tiny
random HF model folder under cache_dir/tiny/<arch>-<hash of settings>, saved with save_pretrained
(safetensors). The teachers then load it through the same path as any local folder.
The language one carries a byte-level BPE tokenizer trained offline on data.sources.caption_corpus.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    Dinov2WithRegistersConfig,
    Dinov2WithRegistersModel,
    LlamaConfig,
    LlamaForCausalLM,
    SiglipVisionConfig,
    SiglipVisionModel,
    ViTConfig,
    ViTModel,
)

from data.bpe import SPECIAL_TOKENS, make_bpe_tokenizer  # noqa: F401  (re-exported)
from data.identity import json_sha256

make_tiny_tokenizer = make_bpe_tokenizer  # the tiny teachers' tokenizer: a BPE trained on their corpus

VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
              num_attention_heads=4, intermediate_size=64)
# arch -> (model class, config class, default config kwargs)
ARCHS = {
    "llama": (LlamaForCausalLM, LlamaConfig, dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)),
    "vit": (ViTModel, ViTConfig, VISION),
    "clip": (CLIPVisionModel, CLIPVisionConfig, VISION),
    "siglip": (SiglipVisionModel, SiglipVisionConfig, VISION),
    "dinov2": (Dinov2Model, Dinov2Config, VISION),
    "dinov2_registers": (Dinov2WithRegistersModel, Dinov2WithRegistersConfig,
                         dict(VISION, num_register_tokens=4)),
}
TOKENIZER_DEFAULTS = dict(vocab_size=512, corpus_size=2000, corpus_seed=0)


def tiny_corpus(n: int, seed: int) -> list[str]:
    from data.sources import caption_corpus

    return caption_corpus(n, seed=seed)


def ensure_tiny_teacher(arch: str, cache_dir, seed: int = 0, **sizes) -> Path:
    """The folder of a tiny random `arch` model, built on first use.

    `sizes` override the config defaults in ARCHS (and, for llama, vocab_size / corpus_size /
    corpus_seed of the tokenizer). The folder name hashes all settings (and the corpus), so
    different settings never share a folder. Safe against a concurrent creator.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown tiny-random arch {arch!r}; known: {sorted(ARCHS)}")
    model_cls, config_cls, defaults = ARCHS[arch]
    settings = dict(defaults, **sizes)
    corpus = None
    if arch == "llama":
        tok_settings = {k: settings.pop(k, v) for k, v in TOKENIZER_DEFAULTS.items()}
        corpus = tiny_corpus(tok_settings["corpus_size"], tok_settings["corpus_seed"])
        settings["tokenizer"] = tok_settings
    key = json_sha256({"arch": arch, "seed": seed, "settings": settings, "corpus": corpus})[:12]
    root = Path(cache_dir).expanduser() / "tiny"
    folder = root / f"{arch}-{key}"
    if folder.is_dir():
        return folder

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{arch}-{key}-"))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private
    try:
        config_kwargs = {k: v for k, v in settings.items() if k != "tokenizer"}
        if arch == "llama":
            tokenizer = make_tiny_tokenizer(corpus, settings["tokenizer"]["vocab_size"])
            config_kwargs.update(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            tokenizer.save_pretrained(tmp)
        if arch == "clip":
            size = config_kwargs["image_size"]
            CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size=size).save_pretrained(tmp)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_cls(config_cls(**config_kwargs))
        model.save_pretrained(tmp)
        (tmp / "tiny_settings.json").write_text(json.dumps({"arch": arch, "seed": seed, **settings}, indent=1))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():  # a concurrent creator may have won the race; otherwise a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
