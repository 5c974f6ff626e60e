"""The exported student is portable: a fresh Python process, elsewhere, that cannot import this project,
loads it with trust_remote_code=True through the Auto classes and generates the same tokens; with LoRA, the
adapter alone loads with PEFT on the base student."""

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import torch
from PIL import Image

import student
from student.pixels import image_tensor
from student.portable import load_base_student, make_portable, saved_image_size
from teachers.tiny import make_tiny_tokenizer

BOS, EOS = 2, 3

LOADER = textwrap.dedent("""
    import json, sys
    for name in ("student", "data", "distill", "teachers", "flows"):
        sys.modules[name] = None  # the project's packages cannot be imported here
    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor
    folder, case = sys.argv[1], torch.load(sys.argv[2])
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    lm = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    px, ids = case["pixel_values"], case["input_ids"]
    pixels = processor(images=Image.open(case["png"]))["pixel_values"][0]
    print(json.dumps({
        "classes": [type(x).__name__ for x in (config, model, lm, processor, processor.image_processor)],
        "modules": sorted({type(x).__module__.split(".")[0] for x in (config, model, processor)}),
        "greedy": model.generate(ids, pixel_values=px, max_new_tokens=10).tolist(),
        "beam": lm.generate(ids, pixel_values=px, max_new_tokens=6, num_beams=3).tolist(),
        "speculative": lm.generate(ids, pixel_values=px, max_new_tokens=10, mtp_speculative=True).tolist(),
        "processor_ids": processor(images=Image.open(case["png"]), text="a red")["input_ids"].tolist(),
        "pixels_equal": bool(torch.equal(pixels, case["pixels"])),
    }))
""")


def export(tmp_path, name, **overrides):
    """A tiny student saved and made portable, with a tokenizer, as the training export does."""
    tok_dir = tmp_path / "tokenizer"
    if not tok_dir.is_dir():
        make_tiny_tokenizer(["a red circle", "three blue squares", "the digit seven"] * 20,
                            vocab_size=256).save_pretrained(tok_dir)
    torch.manual_seed(0)
    config = student.load_preset("tiny", initializer_range=0.2, bos_token_id=BOS, eos_token_id=EOS,
                                 teachers={"sig": {"summary_dim": 12, "feature_dim": 20, "grid": [4, 4]}},
                                 **overrides)
    model = student.CogViTMTPForDistillation(config).eval()
    if config.use_lora:  # trained-looking LoRA: B != 0, so the adapter changes the outputs
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    folder = tmp_path / name
    model.save_pretrained(folder)
    make_portable(folder, 28, tok_dir)
    return model, folder


def run_elsewhere(tmp_path, folder, model):
    g = torch.Generator().manual_seed(3)
    rgb = (np.random.default_rng(0).random((37, 45, 3)) * 255).astype(np.uint8)
    png = tmp_path / "image.png"
    Image.fromarray(rgb).save(png)
    case = {"pixel_values": torch.randn(2, 3, 28, 28, generator=g), "input_ids": torch.randint(4, 256, (2, 3)),
            "png": str(png), "pixels": image_tensor(png.read_bytes(), 28)}
    torch.save(case, tmp_path / "case.pt")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(exist_ok=True)
    (elsewhere / "loader.py").write_text(LOADER)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    proc = subprocess.run([sys.executable, "loader.py", str(folder), str(tmp_path / "case.pt")], cwd=elsewhere,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    px, ids = case["pixel_values"], case["input_ids"]
    with torch.no_grad():
        want = {"greedy": model.greedy_generate(px, ids, max_new_tokens=10).tolist(),
                "beam": model.generate(ids, pixel_values=px, max_new_tokens=6, num_beams=3).tolist()}
    return got, want


def test_fresh_process_elsewhere_loads_and_generates_the_same_tokens(tmp_path):
    model, folder = export(tmp_path, "student")
    config = json.loads((folder / "config.json").read_text())
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    for code in ("modeling_cogvit_mtp.py", "configuration_cogvit_mtp.py", "generation.py", "speculative.py",
                 "speculative_batch.py", "lora.py", "processing_cogvit_mtp.py", "image_processing_cogvit_mtp.py"):
        assert (folder / code).is_file(), code
    assert saved_image_size(folder) == 28

    got, want = run_elsewhere(tmp_path, folder, model)
    assert got["classes"] == ["CogViTMTPConfig", "CogViTMTPForDistillation", "CogViTMTPForDistillation",
                              "CogViTMTPProcessor", "CogViTMTPImageProcessor"]
    assert got["modules"] == ["transformers_modules"]  # the folder's code, not this repository's
    assert got["greedy"] == want["greedy"]
    assert got["speculative"] == want["greedy"]
    assert got["beam"] == want["beam"]
    assert got["pixels_equal"]  # inference preprocessing == training preprocessing
    tok = make_tiny_tokenizer(["a red circle", "three blue squares", "the digit seven"] * 20, vocab_size=256)
    assert got["processor_ids"] == [[tok.bos_token_id] + tok("a red", add_special_tokens=False)["input_ids"]]


def test_lora_student_is_portable_and_its_adapter_loads_with_peft(tmp_path):
    from peft import PeftModel
    model, folder = export(tmp_path, "lora_student", use_lora=True)
    adapter = folder / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert (adapter / "adapter_model.safetensors").is_file()

    g = torch.Generator().manual_seed(5)
    px, ids = torch.randn(2, 3, 28, 28, generator=g), torch.randint(0, 256, (2, 6), generator=g)
    base = load_base_student(folder).eval()
    assert not base.config.use_lora
    with torch.no_grad():
        want = model(px, ids).logits
        assert (base(px, ids).logits - want).abs().max() > 1e-3  # the adapter matters
        peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
        got = peft_model(pixel_values=px, input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert all("decoder.layers." in n for n, _ in peft_model.named_parameters() if "lora_" in n)

    got, want = run_elsewhere(tmp_path, folder, model)
    assert got["greedy"] == want["greedy"] and got["beam"] == want["beam"]


def test_processor_size_must_fit_the_student(tmp_path):
    import pytest
    _, folder = export(tmp_path, "student")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        make_portable(folder, 30, None)
    png = io.BytesIO()
    Image.new("RGB", (50, 50)).save(png, format="PNG")
    assert student.CogViTMTPImageProcessor.for_size(28).pixels(Image.open(png)).shape == (3, 28, 28)
