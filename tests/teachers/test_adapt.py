"""In-format scoring and teacher correction (cross-fitted LoRA adapters) on a tiny random teacher."""

import json
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

import teachers.adapt as adapt_mod
from data.samples import build_samples
from teachers.adapt import adapt_teacher, fold_of, read_captions
from teachers.language import HFCausalLMTeacher
from teachers.registry import AdaptConfig, teacher_config

CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
CAPTIONS = ["a handwritten digit seven.", "two red circles and a small green square at the top."]


def config(source, **overrides):
    return dict(dict(name="lm", kind="hf_causal_lm", source=str(source), top_k=8), **overrides)


@pytest.fixture(scope="module")
def chat_dir(llama_dir, tmp_path_factory):
    """The tiny teacher with a chat template in its tokenizer."""
    folder = tmp_path_factory.mktemp("chat") / "lm"
    shutil.copytree(llama_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = CHAT
    tok.save_pretrained(folder)
    return folder


def full_forward_logprobs(teacher, row):
    """log-softmax of one stored row's positions from a plain forward over prompt + caption (no cache)."""
    full = teacher.scored_inputs([row])[0]
    with torch.no_grad():
        logits = teacher.model(input_ids=torch.tensor([full])).logits[0].double()
    p = len(teacher.prompt_ids)
    return torch.log_softmax(logits[p - 1: p - 1 + len(row)], -1).numpy()


@pytest.mark.parametrize("fmt", ["chat", "prefix"])
def test_in_format_targets_equal_a_full_forward_over_prompt_and_caption(chat_dir, cache_dir, fmt):
    t = HFCausalLMTeacher(config(chat_dir, prompt_format=fmt, instruction="Describe the picture.",
                                 prefix="Caption: "), cache_dir)
    assert t.prompt_format == fmt and len(t.prompt_ids) > 3
    if fmt == "chat":
        text = t.tokenizer.decode(t.prompt_ids)
        assert text.startswith("<s>user\nDescribe the picture.</s>") and text.endswith("<s>assistant\n")
    rows, _ = t.encode(CAPTIONS)
    for row, target in zip(rows, t.soft_targets(rows), strict=True):
        ref = full_forward_logprobs(t, row)
        assert (target["token_ids"] == np.array(row)).all() and row[0] == t.bos_id and row[-1] == t.eos_id
        np.testing.assert_allclose(target["topk_logprobs"], np.take_along_axis(ref, target["topk_ids"], 1), atol=1e-4)
        following = np.take_along_axis(ref[:-1], np.array(row[1:])[:, None], 1)[:, 0]
        np.testing.assert_allclose(target["token_logprob"][:-1], following, atol=1e-4)
        assert np.isnan(target["token_logprob"][-1])


def test_the_prompt_is_part_of_the_identity(chat_dir, cache_dir):
    a = HFCausalLMTeacher(config(chat_dir), cache_dir).identity()
    b = HFCausalLMTeacher(config(chat_dir, instruction="Say it."), cache_dir).identity()
    assert a["prompt"]["format"] == "chat" and a["prompt"]["ids"] != b["prompt"]["ids"]
    bare = HFCausalLMTeacher(config(chat_dir, prompt_format="prefix"), cache_dir)
    assert bare.prompt_ids == [bare.bos_id]  # an empty prefix: the caption as a bare document


def test_chat_format_without_a_template_is_refused(llama_dir, cache_dir):
    with pytest.raises(ValueError, match="no chat template"):
        HFCausalLMTeacher(config(llama_dir, prompt_format="chat"), cache_dir)
    with pytest.raises(ValueError, match="prompt_format"):
        teacher_config(config(llama_dir, prompt_format="dialogue"))
    with pytest.raises(ValueError, match=r"unknown adapt key\(s\) \['rnak'\]"):
        teacher_config(config(llama_dir, adapt={"rnak": 4}))
    with pytest.raises(ValueError, match="folds must be an integer >= 2"):
        teacher_config(config(llama_dir, adapt={"folds": 1}))


def test_folds_are_stable_and_balanced():
    ids = [f"digits-{i:05d}" for i in range(2000)]
    folds = [fold_of(i, 2) for i in ids]
    assert folds == [fold_of(i, 2) for i in ids]
    assert 900 < Counter(folds)[0] < 1100


@pytest.fixture(scope="module")
def samples_dir(tmp_path_factory):
    data = {"sources": [{"kind": "digits", "limit": 120}], "image_size": 16, "shard_rows": 64,
            "val_fraction": 0.2, "test_fraction": 0.2, "max_caption_chars": 512, "max_bad_fraction": 0.01}
    folder = tmp_path_factory.mktemp("adapt") / "samples"
    build_samples(data, folder, seed=0, progress=False)
    return folder


SETTINGS = AdaptConfig(folds=2, rank=4, layers=None, lr=1e-2, batch_size=8, max_steps=12, eval_every=4, patience=5,
                       val_rows=16)


@pytest.fixture(scope="module")
def fitted(llama_dir, cache_dir, samples_dir, tmp_path_factory):
    teacher = HFCausalLMTeacher(config(llama_dir), cache_dir)
    seen = []
    encode = teacher.encode
    teacher.encode = lambda captions: (seen.extend(captions), encode(captions))[1]
    fits = []
    fit = adapt_mod.fit_fold

    def spy(teacher_, train, val, adapt, fold, *rest):
        fits.append((fold, [tuple(r) for r in train]))
        return fit(teacher_, train, val, adapt, fold, *rest)

    adapt_mod.fit_fold = spy
    try:
        info = adapt_teacher(teacher, samples_dir, SETTINGS, tmp_path_factory.mktemp("cache"), progress=False)
    finally:
        adapt_mod.fit_fold = fit
    return teacher, info, seen, fits


def test_adapters_are_cross_fitted_on_the_train_split_only(fitted, samples_dir):
    teacher, info, seen, fits = fitted
    captions = read_captions(samples_dir, {"train", "val", "test"})
    test = {c for _, c in captions["test"]}
    assert not test & set(seen) - {c for _, c in captions["train"] + captions["val"]}  # no test-only caption read
    for fold, rows in fits:  # adapter k never trained on a train row of fold k
        own = {tuple(teacher.encode([c])[0][0]) for i, c in captions["train"] if fold_of(i, 2) == fold}
        others = [c for i, c in captions["train"] if fold_of(i, 2) != fold]
        assert len(rows) == len(others) == info["adapters"][fold]["train_rows"]
        assert not own & set(rows) - {tuple(teacher.encode([c])[0][0]) for c in others}
    assert [a["fold"] for a in info["adapters"]] == [0, 1] and not info["cached"]
    for a in info["adapters"]:  # early stopping keeps the best val perplexity, never worse than the start
        assert a["val_perplexity_after"] < a["val_perplexity_before"]


def test_a_second_run_reuses_the_cached_adapters(fitted, llama_dir, cache_dir, samples_dir):
    teacher, info, _, _ = fitted
    calls = []
    fit = adapt_mod.fit_fold
    adapt_mod.fit_fold = lambda *a, **k: calls.append(a) or fit(*a, **k)
    try:
        again = adapt_teacher(teacher, samples_dir, SETTINGS, info["folder"].rsplit("/adapters/", 1)[0],
                              progress=False)
    finally:
        adapt_mod.fit_fold = fit
    assert again["cached"] and again["folder"] == info["folder"] and not calls
    assert json.loads((adapt_mod.Path(info["folder"]) / "adapters.json").read_text())["adapters"][0]["digest"] == \
        info["adapters"][0]["digest"]


def test_a_corrected_teacher_scores_each_row_with_its_folds_adapter(fitted, llama_dir, cache_dir, samples_dir):
    _, info, _, _ = fitted
    teacher = HFCausalLMTeacher(config(llama_dir, adapters=info["folder"]), cache_dir)
    ident = teacher.identity()
    assert [a["digest"] for a in ident["adapt"]["adapters"]] == [a["digest"] for a in info["adapters"]]
    captions = read_captions(samples_dir, {"train"})["train"][:12]
    samples = [{"id": i, "caption": c} for i, c in captions]
    rows = teacher.rows(samples)
    for fold in (0, 1):
        model = AutoModelForCausalLM.from_pretrained(llama_dir)
        model = PeftModel.from_pretrained(model, f"{info['folder']}/fold-{fold}").eval()
        for s, row in zip(samples, rows, strict=True):
            full = teacher.scored_inputs([row["token_ids"].tolist()])[0]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([full])).logits[0]
            p = len(teacher.prompt_ids)
            ref = torch.log_softmax(logits[p - 1: p - 1 + len(row["token_ids"])].double(), -1).numpy()
            got = np.take_along_axis(ref, row["topk_ids"], 1)
            same = np.allclose(row["topk_logprobs"], got, atol=1e-4)
            assert same == (fold_of(s["id"], 2) == fold)


def test_a_tampered_adapter_is_refused(fitted, llama_dir, cache_dir, tmp_path):
    _, info, _, _ = fitted
    copy = tmp_path / "adapters"
    shutil.copytree(info["folder"], copy)
    with open(copy / "fold-1" / "adapter_model.safetensors", "ab") as f:
        f.write(b"\0")
    with pytest.raises(ValueError, match="adapter digest"):
        HFCausalLMTeacher(config(llama_dir, adapters=str(copy)), cache_dir)
