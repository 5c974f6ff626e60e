"""`generate()` through GenerationMixin: the cached step agrees with the plain forward and greedy_generate in
every decoding mode, MTP self-speculative decoding is a generate option with greedy's tokens, bad input is
refused, and the processor lays prompts out as the training captions."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

import student
from student.pixels import image_tensor
from teachers.tiny import make_tiny_tokenizer

BOS, EOS = 2, 3


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    config = student.load_preset("tiny", initializer_range=0.2, bos_token_id=BOS, eos_token_id=EOS, **overrides)
    return student.CogViTMTPForDistillation(config).eval()


def inputs(batch=2, prompt=4, seed=1, side=28):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, side, side, generator=g), torch.randint(4, 256, (batch, prompt), generator=g)


def test_greedy_generate_equals_greedy_generate_loop():
    model = tiny()
    px, ids = inputs()
    ref = model.greedy_generate(px, ids, max_new_tokens=12)
    out = model.generate(ids, pixel_values=px, max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert out.shape == (2, 16)
    assert torch.equal(out, ref)
    assert len(set(out[:, 4:].flatten().tolist())) > 3  # a non-degenerate sequence, so equality means something


def test_default_prompt_is_bos_and_eos_stops_like_greedy():
    model = tiny()
    px, _ = inputs()
    bos = torch.full((2, 1), BOS)
    free = model.generate(pixel_values=px, max_new_tokens=10, eos_token_id=None)
    assert torch.equal(free, model.greedy_generate(px, bos, max_new_tokens=10))
    eos = int(free[0, 4])  # make row 0's fourth new token the stop token
    out = model.generate(pixel_values=px, max_new_tokens=10, eos_token_id=eos, pad_token_id=eos)
    ref = model.greedy_generate(px, bos, max_new_tokens=10, eos_token_id=eos)
    assert torch.equal(out, ref[:, :out.shape[1]])
    assert int(out[0, 4]) == eos and (out[0, 4:] == eos).all()


@pytest.mark.parametrize("mode", [dict(do_sample=False), dict(num_beams=3, do_sample=False),
                                  dict(do_sample=True, top_k=20, temperature=0.8)])
def test_cached_steps_match_the_uncached_forward(mode):
    """With use_cache=False, generate re-runs the plain `forward` over image + all tokens at every step."""
    model = tiny()
    px, ids = inputs()
    out = {}
    for use_cache in (True, False):
        torch.manual_seed(7)
        out[use_cache] = model.generate(ids, pixel_values=px, max_new_tokens=8, use_cache=use_cache,
                                        eos_token_id=None, **mode)
    assert out[True].shape == (2, 12)
    assert torch.equal(out[True], out[False])


def test_generation_step_logits_equal_forward_logits():
    from transformers import DynamicCache
    model = tiny()
    px, ids = inputs()
    with torch.no_grad():
        full = model(px, ids).logits[:, -ids.shape[1]:]
        cache = DynamicCache(config=model.config)
        first = model(pixel_values=px, input_ids=ids[:, :2], past_key_values=cache).logits
        rest = model(input_ids=ids[:, 2:], past_key_values=cache).logits
    assert cache.get_seq_length() == model.config.num_image_tokens(28, 28) + ids.shape[1]
    torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("depth", [True, 1])
def test_mtp_speculative_option_equals_greedy(depth):
    model = tiny(mtp_depth=2)
    px, ids = inputs(batch=3)
    greedy = model.generate(ids, pixel_values=px, max_new_tokens=14, eos_token_id=None)
    spec = model.generate(ids, pixel_values=px, max_new_tokens=14, eos_token_id=None, mtp_speculative=depth)
    assert torch.equal(spec, greedy)
    eos = int(greedy[1, 7])  # rows stop at different lengths: finished rows are padded like greedy's
    greedy = model.generate(ids, pixel_values=px, max_new_tokens=14, eos_token_id=eos)
    spec = model.generate(ids, pixel_values=px, max_new_tokens=14, eos_token_id=eos, mtp_speculative=depth)
    assert torch.equal(spec, greedy)


def test_bad_generation_input_is_refused():
    model = tiny()
    px, ids = inputs()
    with pytest.raises(ValueError, match="pixel_values"):
        model.generate(ids, max_new_tokens=3)
    mask = torch.ones_like(ids)
    mask[1, -1] = 0
    with pytest.raises(ValueError, match="padded"):
        model.generate(ids, pixel_values=px, attention_mask=mask, max_new_tokens=3)
    with pytest.raises(ValueError, match="greedily"):
        model.generate(ids, pixel_values=px, max_new_tokens=3, do_sample=True, mtp_speculative=True)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate(ids, pixel_values=px, max_new_tokens=600, eos_token_id=None)


def test_processor_matches_training_layout_and_pixels():
    tok = make_tiny_tokenizer(["a red circle", "three blue squares"] * 20, vocab_size=280)
    image_processor = student.CogViTMTPImageProcessor.for_size(28)
    processor = student.CogViTMTPProcessor(image_processor, tok)
    rgb = (np.random.default_rng(0).random((40, 30, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    batch = processor(images=[Image.open(io.BytesIO(buf.getvalue()))] * 2, text=["a red circle", "a red"])
    assert torch.equal(batch["pixel_values"][0], image_tensor(buf.getvalue(), 28))  # the training pixels, exactly
    words = tok(["a red circle", "a red"], add_special_tokens=False)["input_ids"]
    bos = tok.bos_token_id
    assert batch["input_ids"][0].tolist() == [bos] + words[0]
    assert batch["attention_mask"][1].tolist() == [1] * (1 + len(words[1])) + [0] * (len(words[0]) - len(words[1]))
    only_image = processor(images=Image.open(io.BytesIO(buf.getvalue())))
    assert only_image["input_ids"].tolist() == [[bos]] and "attention_mask" not in only_image
