"""Pretrained-decoder initialisation, PEFT LoRA trainable set, and the merge round trip."""

import pytest
import torch
from transformers import AutoModel, LlamaConfig, LlamaForCausalLM

import student

TARGETS = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
           "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}  # (in, out) in the tiny preset


def _tiny_llama(path, tie, hidden=64):
    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=512,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=tie)
    llama = LlamaForCausalLM(cfg).eval()
    llama.save_pretrained(path)
    return llama


def _lora_student(make_config, path, **overrides):
    config = make_config(**student.decoder_config_kwargs(path), decoder_init_path=str(path), use_lora=True,
                         **overrides)
    torch.manual_seed(0)
    return student.build_student(config).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_decoder_initialised_from_llama_reproduces_its_logits(make_config, tmp_path, tie):
    llama = _tiny_llama(tmp_path, tie)
    model = _lora_student(make_config, tmp_path)
    assert model.config.tie_word_embeddings == tie
    ids = torch.randint(0, 256, (2, 9))
    with torch.no_grad():
        hidden, _ = model.forward_decoder(model.decoder.embed_tokens(ids))
        assert torch.allclose(model.logits_from_hidden(hidden), llama(ids).logits, atol=1e-5)


def test_exactly_lora_vision_merger_mtp_and_heads_are_trainable(make_config, tmp_path):
    _tiny_llama(tmp_path, tie=False)
    model = _lora_student(make_config, tmp_path, lora_r=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    lora_names = {n for n in trainable if "lora_" in n}
    assert len(lora_names) == 2 * len(TARGETS) * 2  # layers x targets x (A, B)
    trained_parts = ("vision.", "merger.", "mtp.", "teacher_heads.", "image_token_embedding")
    for name, _ in model.named_parameters():
        expected = "lora_" in name or name.startswith(trained_parts)
        assert (name in trainable) == expected, name
    lora_count = 2 * sum(4 * (i + o) for i, o in TARGETS.values())
    other = sum(p.numel() for part in (model.vision, model.merger, model.mtp, model.teacher_heads)
                for p in part.parameters()) + model.image_token_embedding.numel()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora_count + other


def test_lora_save_load_keeps_weights_and_trainable_set(make_config, tmp_path, batch):
    _tiny_llama(tmp_path / "llama", tie=False)
    model = _lora_student(make_config, tmp_path / "llama")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.save_pretrained(tmp_path / "student")
    loaded = AutoModel.from_pretrained(tmp_path / "student")
    pixels, ids, mask = batch
    with torch.no_grad():
        assert torch.equal(loaded(pixels, ids, mask).logits, model(pixels, ids, mask).logits)
    assert ({n for n, p in loaded.named_parameters() if p.requires_grad}
            == {n for n, p in model.named_parameters() if p.requires_grad})


def test_merge_and_unload_round_trip(make_config, tmp_path, batch):
    _tiny_llama(tmp_path / "llama", tie=True)
    model = _lora_student(make_config, tmp_path / "llama")
    pixels, ids, mask = batch
    with torch.no_grad():
        base_logits = model(pixels, ids, mask).logits
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
        lora_out = model(pixels, ids, mask)
    assert not torch.allclose(lora_out.logits, base_logits, atol=1e-3)  # the adapters matter

    merged = model.merge_and_unload()
    assert not merged.config.use_lora and model.config.use_lora
    assert not any("lora_" in n or "base_layer" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        out = merged(pixels, ids, mask)
    assert torch.allclose(out.logits, lora_out.logits, atol=1e-5)
    for a, b in zip(out.mtp_logits, lora_out.mtp_logits, strict=True):
        assert torch.allclose(a, b, atol=1e-5)

    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModel.from_pretrained(tmp_path / "merged")
    assert not reloaded.config.use_lora
    with torch.no_grad():
        assert torch.equal(reloaded(pixels, ids, mask).logits, out.logits)


def test_mismatched_decoder_folder_is_refused(make_config, tmp_path):
    _tiny_llama(tmp_path, tie=False, hidden=32)
    config = make_config(decoder_init_path=str(tmp_path), use_lora=True)  # tiny preset: hidden 64
    with pytest.raises(ValueError, match="hidden_size: folder 32 vs student 64"):
        student.build_student(config)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        student.build_student(make_config(decoder_init_path=str(tmp_path / "missing")))


def test_merge_without_lora_is_an_error(make_model):
    with pytest.raises(ValueError, match="no LoRA"):
        make_model().merge_and_unload()
