"""Output shapes for several resolutions and aspect ratios, and clear errors on bad input."""

import pytest
import torch

import student

VOCAB = 256


@pytest.mark.parametrize("patch", [7, 14])
@pytest.mark.parametrize("height,width", [(28, 28), (56, 28), (28, 84)])
def test_output_shapes(make_model, patch, height, width):
    model = make_model(patch_size=patch)
    b, t = 2, 5
    out = model(pixel_values=torch.randn(b, 3, height, width), input_ids=torch.randint(0, VOCAB, (b, t)))
    ph, pw = height // patch, width // patch
    n_img = (ph // 2) * (pw // 2)
    s = n_img + t
    assert out.num_image_tokens == n_img == model.config.num_image_tokens(height, width)
    assert out.logits.shape == (b, s, VOCAB)
    assert len(out.mtp_logits) == model.config.mtp_depth == 2
    assert all(lg.shape == (b, s, VOCAB) for lg in out.mtp_logits)
    assert out.last_hidden_state.shape == (b, s, 64)
    assert all(h.shape == (b, s, 64) for h in out.mtp_hidden_states)
    assert out.image_embeds.shape == (b, n_img, 64)
    assert out.vision_hidden_states.shape == (b, ph * pw, 32)
    assert out.vision_summary.shape == (b, 3, 32)  # image + one summary token per teacher
    assert out.teacher_outputs["sig"]["summary"].shape == (b, 12)
    assert out.teacher_outputs["sig"]["features"].shape == (b, 16, 20)
    assert out.teacher_outputs["dino"]["summary"].shape == (b, 8)
    assert out.teacher_outputs["dino"]["features"].shape == (b, 64, 16)
    assert out.image_mask is None and out.mask is None and out.loss is None
    assert torch.isfinite(out.logits).all()


def test_tuple_output(make_model, batch):
    pixels, ids, mask = batch
    model = make_model()
    out = model(pixels, ids, mask, labels=ids, return_dict=False)
    assert isinstance(out, tuple) and torch.is_tensor(out[0]) and out[0].dim() == 0


def test_bad_inputs_raise(make_model, batch):
    pixels, ids, mask = batch
    model = make_model()
    with pytest.raises(ValueError, match="30x28"):
        model(torch.randn(2, 3, 30, 28), ids)
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3"):
        model(torch.randn(2, 1, 28, 28), ids)
    with pytest.raises(ValueError, match="right padding"):
        model(pixels, ids, torch.tensor([[0] + [1] * 7, [1] * 8]))
    bad_ids = ids.clone()
    bad_ids[0, 0] = VOCAB
    with pytest.raises(ValueError, match=f"{VOCAB}, outside the vocab"):
        model(pixels, bad_ids)
    with pytest.raises(ValueError, match="image_mask has shape"):
        model(pixels, ids, image_mask=torch.zeros(2, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="labels shape"):
        model(pixels, ids, labels=ids[:, :3])


def test_bad_config_raises(make_config):
    with pytest.raises(ValueError, match="divisible by 4"):
        make_config(vision_hidden_size=24, vision_num_attention_heads=4)
    with pytest.raises(ValueError, match="num_key_value_heads=3"):
        make_config(num_key_value_heads=3)
    with pytest.raises(ValueError, match=r"teachers\['x'\] lacks \['grid'\]"):
        make_config(teachers={"x": {"summary_dim": 3, "feature_dim": 4}})
    with pytest.raises(ValueError, match="mask_ratio=1.5"):
        make_config(mask_ratio=1.5)
    with pytest.raises(ValueError, match="image_attention"):
        make_config(image_attention="full")


def test_presets():
    tiny = student.load_preset("tiny")
    assert tiny.model_type == "cogvit_mtp" and tiny.patch_size == 7
    small = student.load_preset("small", mtp_depth=3)
    assert small.mtp_depth == 3 and small.vocab_size == 49152 and small.vision_hidden_size == 192
    assert student.load_preset("base").hidden_size == 576
    with pytest.raises(ValueError, match="unknown student preset 'huge'"):
        student.load_preset("huge")
    with pytest.raises(ValueError, match="not_a_field"):
        student.load_preset("tiny", not_a_field=1)
    n_params = sum(p.numel() for p in student.CogViTMTPForDistillation(tiny).parameters())
    assert 100_000 < n_params < 1_000_000


def test_bfloat16_forward_backward(make_model, batch):
    model = make_model().to(torch.bfloat16).train()
    pixels, ids, mask = batch
    out = model(pixels.to(torch.bfloat16), ids, mask, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.vision.patch_embed.weight.grad is not None


def test_no_mtp_and_no_teachers(make_model, batch):
    model = make_model(mtp_depth=0, teachers={})
    pixels, ids, mask = batch
    out = model(pixels, ids, mask, labels=ids, image_mask=torch.ones(2, 4, 4, dtype=torch.bool))
    assert out.mtp_logits == () and out.mtp_losses == () and torch.equal(out.loss, out.lm_loss)
    assert out.teacher_outputs == {} and out.mask is None and out.image_mask is None  # no heads, no masked view
