"""The image-aware language teacher (kind hf_vlm) on tiny random image-text-to-text models of two families,
LLaVA (CLIP vision + Llama) and Idefics3 (SigLIP-style vision + Llama), built from configs in a temp folder."""

import io

import huggingface_hub.constants
import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from data.shards import load_manifest, read_shard, write_shard
from data.targets import decode_language_row
from teachers import TeacherSourceError, load_teacher, peek_vocab_size
from teachers.collect import collect_shard, finalize_targets
from teachers.contract import LanguageTeacher
from teachers.tiny import make_tiny_tokenizer, tiny_corpus
from teachers.vlm import HFVLMTeacher

CAPTIONS = ["a red square.", "two small green circles at the top of the picture.", "three"]
LLAVA_CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{% for c in m['content'] %}{% if c['type'] == 'image' %}"
              "<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}</s>\n{% endfor %}"
              "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
IDEFICS3_CHAT = ("<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
                 "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
                 "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
                 "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
                 "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}")
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, tie_word_embeddings=False)
VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64)


def text_config(tok):
    return LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id, **TEXT)


def tokenizer(specials):
    tok = make_tiny_tokenizer(tiny_corpus(500, 0), 384)
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def build_llava():
    tok = tokenizer(["<image>"])
    proc = LlavaProcessor(CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size=32), tok, patch_size=8,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_CHAT)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(projection_dim=32, **VISION), text_config=text_config(tok),
                      image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1)
    return proc, LlavaForConditionalGeneration(cfg)


def build_idefics3():
    tok = tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"])
    # split into 32-pixel tiles + a global view: images of other shapes give prompts of other lengths
    images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                                       do_image_splitting=True)
    proc = Idefics3Processor(images, tok, image_seq_len=4, chat_template=IDEFICS3_CHAT)  # (32/8)^2 / 2^2 tokens
    cfg = Idefics3Config(vision_config=Idefics3VisionConfig(**VISION), text_config=text_config(proc.tokenizer),
                         image_token_id=proc.tokenizer.convert_tokens_to_ids("<image>"), scale_factor=2)
    return proc, Idefics3ForConditionalGeneration(cfg)


FAMILIES = {"llava": build_llava, "idefics3": build_idefics3}


def save_tiny_vlm(family: str, folder):
    """A tiny random VLM of `family` (seed 0) with its processor, saved to `folder`; also used by
    tests/train/test_vlm_pipeline.py."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        proc, model = FAMILIES[family]()
    model.save_pretrained(folder)
    proc.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def vlm_dir(request, tmp_path_factory):
    return save_tiny_vlm(request.param, tmp_path_factory.mktemp("vlm") / request.param)


def config(source, **overrides):
    return dict(dict(name="vlm", kind="hf_vlm", source=str(source), top_k=8), **overrides)


@pytest.fixture(scope="module")
def vlm(vlm_dir, cache_dir):
    return HFVLMTeacher(config(vlm_dir), cache_dir)


def image(seed, size=(36, 44)):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8))


def png(seed):
    buf = io.BytesIO()
    image(seed).save(buf, format="PNG")
    return buf.getvalue()


def reference_logprobs(t, row, img):
    """log-softmax at the stored positions of a plain forward over one sample's whole processed input
    (image + prompt + caption), float64; also the full input ids."""
    enc = t.processor.apply_chat_template(t._chat(img), add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt")
    p = enc["input_ids"].shape[1]
    enc["input_ids"] = torch.cat([enc["input_ids"], torch.tensor([row[1:]])], 1)
    enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    with torch.no_grad():
        logits = t.model(**enc).logits[0].double()
    return torch.log_softmax(logits[p - 1: p - 1 + len(row)], -1).numpy(), enc["input_ids"][0].tolist()


def test_targets_equal_a_plain_forward_over_image_prompt_and_caption(vlm):
    rows, _ = vlm.encode(CAPTIONS)
    images = [image(0), image(1, (20, 90)), image(2)]
    assert len({len(r) for r in rows}) > 1  # the batch really is padded
    for row, img, t in zip(rows, images, vlm.soft_targets(rows, images), strict=True):
        ref, full = reference_logprobs(vlm, row, img)
        assert (t["token_ids"] == np.array(row)).all() and row[0] == vlm.bos_id and row[-1] == vlm.eos_id
        assert vlm.tokenizer.decode(row[1:-1]) in CAPTIONS
        assert len(full) > len(row) + 4 and full[-len(row) + 1:] == row[1:]  # prompt + image tokens + caption
        assert not vlm.image_token_ids & set(full[-len(row) + 1:])
        np.testing.assert_allclose(t["topk_logprobs"], np.take_along_axis(ref, t["topk_ids"], 1), atol=1e-5)
        np.testing.assert_allclose(t["token_logprob"][:-1], ref[np.arange(len(row) - 1), row[1:]], atol=1e-5)
        assert np.isnan(t["token_logprob"][-1])
        assert (np.diff(t["topk_logprobs"], axis=1) <= 0).all()  # sorted descending
        outside = ref.copy()
        np.put_along_axis(outside, t["topk_ids"], -np.inf, 1)
        assert (outside.max(1) <= t["topk_logprobs"][:, -1] + 1e-6).all()  # really the top k
        buckets = np.concatenate([t["topk_logprobs"], t["tail_logprob"][:, None]], 1).astype(np.float64)
        np.testing.assert_allclose(np.logaddexp.reduce(buckets, axis=1), 0.0, atol=1e-5)


def test_left_padding_by_the_processor_gives_the_same_targets(vlm):
    rows, _ = vlm.encode(CAPTIONS)
    images = [image(0), image(1, (20, 90)), image(2)]
    if "idefics3" in str(vlm.location):  # image splitting: the prompts differ in length, so they are padded
        assert len(set(vlm.inputs(rows, images)[1])) > 1
    right = vlm.soft_targets(rows, images)
    side = vlm.tokenizer.padding_side
    vlm.tokenizer.padding_side = "left"
    try:
        left = vlm.soft_targets(rows, images)
    finally:
        vlm.tokenizer.padding_side = side
    for a, b in zip(right, left, strict=True):
        np.testing.assert_allclose(a["topk_logprobs"], b["topk_logprobs"], atol=1e-5)


def test_the_image_matters(vlm):
    rows, _ = vlm.encode([CAPTIONS[1]] * 2)
    a, b = vlm.soft_targets(rows, [image(0), image(7)])
    assert not np.allclose(a["topk_logprobs"], b["topk_logprobs"], atol=1e-4)
    same = vlm.soft_targets(rows[:1], [image(0)])[0]
    np.testing.assert_allclose(a["topk_logprobs"], same["topk_logprobs"], atol=1e-5)


def test_rows_from_samples_and_the_language_contract(vlm):
    assert isinstance(vlm, LanguageTeacher)
    samples = [{"id": f"s{i}", "caption": c, "image": png(i)} for i, c in enumerate(CAPTIONS)]
    rows = vlm.rows(samples)
    want = vlm.soft_targets(vlm.encode(CAPTIONS)[0], [image(i) for i in range(3)])
    for r, w in zip(rows, want, strict=True):
        assert r["truncated"] is False and r["topk_ids"].dtype == np.int32
        np.testing.assert_allclose(r["topk_logprobs"], w["topk_logprobs"], atol=1e-6)
    with pytest.raises(ValueError, match="image token"):
        vlm.rows([{"id": "x", "caption": "an <image> inside", "image": png(0)}])


def test_truncation_vocab_and_load_settings(vlm_dir, cache_dir, vlm):
    short = HFVLMTeacher(config(vlm_dir, max_tokens=4), cache_dir)
    rows = short.rows([{"id": "s", "caption": CAPTIONS[1], "image": png(0)}])
    assert len(rows[0]["token_ids"]) == 4 and rows[0]["truncated"] is True
    assert vlm.vocab_size == vlm.model.config.get_text_config().vocab_size == len(vlm.tokenizer)
    assert peek_vocab_size(config(vlm_dir), cache_dir) == vlm.vocab_size
    assert vlm.cfg.trust_remote_code is False
    assert load_teacher(config(vlm_dir), cache_dir).cfg.kind == "hf_vlm"
    with pytest.raises(ValueError, match="chat format only"):
        HFVLMTeacher(config(vlm_dir, prompt_format="prefix"), cache_dir)


def test_identity_changes_with_the_instruction(vlm_dir, cache_dir, vlm):
    ident = vlm.identity()
    assert ident["kind"] == "hf_vlm" and ident["top_k"] == 8 and ident["processor_digest"]
    assert "<image>" in ident["prompt"]["text"] and ident["prompt"]["instruction"] in ident["prompt"]["text"]
    assert HFVLMTeacher(config(vlm_dir), cache_dir).identity() == ident
    other = HFVLMTeacher(config(vlm_dir, instruction="Say what you see."), cache_dir).identity()
    assert other["prompt"] != ident["prompt"]
    assert {k: v for k, v in other.items() if k != "prompt"} == {k: v for k, v in ident.items() if k != "prompt"}


def test_hub_id_offline_gives_a_clear_error(monkeypatch, cache_dir):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = config("no-such-owner/no-such-vlm")
    with pytest.raises(TeacherSourceError, match=r"no-such-owner/no-such-vlm.*offline.*local folder"):
        HFVLMTeacher(cfg, cache_dir)
    with pytest.raises(TeacherSourceError, match="offline"):
        peek_vocab_size(cfg, cache_dir)


def test_collect_shard_writes_a_language_shard(vlm, tmp_path):
    n = 5
    table = pa.table({"id": [f"s{i:03d}" for i in range(n)], "image": [png(i) for i in range(n)],
                      "caption": [f"a picture number {i} of a red square." for i in range(n)]})
    src = tmp_path / "samples" / "shard-00000.arrow"
    src.parent.mkdir()
    write_shard(src, table)
    out = tmp_path / "targets"
    entry = collect_shard(vlm, src, out, producer_digest="t", batch_size=2, progress=False, prefetch=False)
    assert entry["rows"] == n and entry["forwards"] == 3
    shard = read_shard(out / "shard-00000.arrow")
    want = vlm.rows(read_shard(src).to_pylist())
    for i, w in enumerate(want):
        d = decode_language_row(shard, i)
        assert (d["token_ids"] == w["token_ids"]).all()
        assert (np.sort(d["topk_ids"], 1) == np.sort(w["topk_ids"], 1)).all()
    samples_manifest = {"shards": [{"file": "shard-00000.arrow", "rows": n, "id_first": "s000"}], "config_digest": "c"}
    finalize_targets(vlm, out, samples_manifest, [entry], config_digest="t", collect_options={})
    manifest = load_manifest(out)
    assert manifest["modality"] == "language" and manifest["producer"]["kind"] == "hf_vlm"
    assert (out / "tokenizer" / "tokenizer.json").is_file()
