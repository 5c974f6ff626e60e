"""The model card of the exported student: written from the run's config and shard manifests, rewritten with
the evaluation table; the folder is finished with its processor and tokenizer."""

import json
from pathlib import Path

import torch

import student
from distill.config import load_config
from distill.export import finish_student, parameter_count, write_card
from teachers.tiny import make_tiny_tokenizer

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
DIGESTS = {"lm": "a" * 64, "vit": "b" * 64, "clip": "c" * 64}


def fake_run(tmp_path, **student_overrides):
    """A tiny config whose output_dir holds the shard manifests the card reads, and an exported student."""
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'out'}", f"tracking.uri=sqlite:///{tmp_path / 'm.db'}",
                             "tracking.registered_model=digits-captioner"])
    out = Path(cfg.output_dir)
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "manifest.json").write_text(json.dumps({
        "rows": 144, "config_digest": "d" * 64, "splits": {"train": 116, "val": 14, "test": 14},
        "config": {"sources": [{"kind": "digits"}, {"kind": "scenes"}]}}))
    for name, digest in DIGESTS.items():
        (out / "targets" / name).mkdir(parents=True)
        kind = "hf_causal_lm" if name == "lm" else "hf_vision"
        (out / "targets" / name / "manifest.json").write_text(json.dumps({
            "producer": {"name": name, "kind": kind, "source": f"tiny-random:{name}", "weights_digest": digest}}))
    make_tiny_tokenizer(["a red circle"] * 20, vocab_size=256).save_pretrained(out / "targets" / "lm" / "tokenizer")
    torch.manual_seed(0)
    config = student.load_preset("tiny", bos_token_id=2, eos_token_id=3, **student_overrides)
    folder = out / "student"
    student.CogViTMTPForDistillation(config).save_pretrained(folder)
    return cfg, folder


def test_card_from_the_run_then_with_the_evaluation(tmp_path):
    cfg, folder = fake_run(tmp_path)
    finish_student(cfg, folder)
    assert (folder / "processor_config.json").is_file() and (folder / "tokenizer.json").is_file()
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n")
    assert "# digits-captioner:" in card
    model = student.CogViTMTPForDistillation.from_pretrained(folder)
    assert f"| parameters | {sum(p.numel() for p in model.parameters()):,} " in card
    assert parameter_count(folder) == sum(p.numel() for p in model.parameters())
    for name, digest in DIGESTS.items():
        assert f"| {name} | {'language' if name == 'lm' else 'vision'} |" in card and f"`{digest}`" in card
    assert "Sources: digits, scenes; 144 samples" in card and "test 14, train 116, val 14" in card
    assert "Not evaluated yet" in card
    assert "trust_remote_code=True" in card and "adapter" not in card

    metrics = {"eval/agreement/main": 0.61, "eval/kl/main": 0.9, "eval/probe/pixels": 0.5}
    baseline = {"eval/agreement/main": 0.55, "eval/kl/main": 0.8, "eval/probe/pixels": 0.5}
    write_card(cfg, folder, metrics, baseline, "digits-captioner")
    card = (folder / "README.md").read_text()
    assert "| eval/agreement/main | 0.6100 | 0.5500 | yes |" in card
    assert "| eval/kl/main | 0.9000 | 0.8000 | **no** |" in card  # lower is better for KL
    assert "| eval/probe/pixels | 0.5000 | 0.5000 | reference |" in card
    assert "Not evaluated yet" not in card


def test_lora_card_says_how_to_load_the_adapter(tmp_path):
    cfg, folder = fake_run(tmp_path, use_lora=True)
    finish_student(cfg, folder)
    card = (folder / "README.md").read_text()
    assert "PeftModel.from_pretrained(base" in card and "adapter in `adapter/`" in card
    assert (folder / "adapter" / "adapter_config.json").is_file()
