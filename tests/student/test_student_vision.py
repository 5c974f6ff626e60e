"""Vision tower: 2D RoPE, QK-norm, masked-image mode and the teacher heads."""

import torch

import student
from student.layers import apply_rope_2d, rope_2d_cos_sin
from tests.student.conftest import TEACHERS


def test_rope_2d_scores_depend_only_on_relative_offset():
    grid_h, grid_w, head_dim = 5, 6, 16
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(head_dim, generator=g), torch.randn(head_dim, generator=g)
    cos, sin = rope_2d_cos_sin(grid_h, grid_w, head_dim, 100.0)
    p = grid_h * grid_w
    # The same q (and k) content at every patch, rotated by its own (row, col).
    q_rot = apply_rope_2d(q.expand(1, 1, p, head_dim), cos, sin)[0, 0]
    k_rot = apply_rope_2d(k.expand(1, 1, p, head_dim), cos, sin)[0, 0]
    scores = q_rot @ k_rot.T  # [query patch, key patch]
    by_offset = {}
    for i in range(p):
        for j in range(p):
            offset = (j // grid_w - i // grid_w, j % grid_w - i % grid_w)
            by_offset.setdefault(offset, []).append(scores[i, j])
    for offset, values in by_offset.items():
        values = torch.stack(values)
        assert (values - values[0]).abs().max() < 1e-4, offset
    # ... and the score does change with the offset, separately along rows and columns.
    assert abs(by_offset[(0, 0)][0] - by_offset[(1, 0)][0]) > 1e-3
    assert abs(by_offset[(0, 0)][0] - by_offset[(0, 1)][0]) > 1e-3
    assert abs(by_offset[(1, 2)][0] - by_offset[(2, 1)][0]) > 1e-3


def test_tower_uses_patch_positions(make_model):
    # With no position table, only RoPE makes the tower position-aware: swapping two patches must not
    # just swap their outputs.
    model = make_model()
    pixels = torch.randn(1, 3, 28, 28)
    swapped = pixels.clone()
    swapped[..., 0:7, 0:7], swapped[..., 21:28, 21:28] = pixels[..., 21:28, 21:28], pixels[..., 0:7, 0:7]
    with torch.no_grad():
        out, _, _ = model.vision(pixels)
        out_swapped, _, _ = model.vision(swapped)
    perm = list(range(16))
    perm[0], perm[15] = 15, 0
    assert not torch.allclose(out_swapped[:, perm], out, atol=1e-3)


def test_qk_norm_makes_attention_invariant_to_q_k_scale(make_model):
    model = make_model(rms_norm_eps=1e-12)
    pixels = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        reference, _, _ = model.vision(pixels)
        for layer in model.vision.layers:
            layer.self_attn.q_proj.weight.mul_(100.0)
            layer.self_attn.k_proj.weight.mul_(30.0)
        scaled, _, _ = model.vision(pixels)
        assert torch.allclose(scaled, reference, atol=1e-4)
        # Control: the same scaling on v (not normed) does change the output.
        model.vision.layers[0].self_attn.v_proj.weight.mul_(100.0)
        changed, _, _ = model.vision(pixels)
    assert not torch.allclose(changed, reference, atol=1e-2)


def _tower_input(model, pixels, image_mask):
    seen = {}
    hook = model.vision.layers[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        out = model(pixels, torch.zeros(pixels.shape[0], 3, dtype=torch.long), image_mask=image_mask)
    hook.remove()
    return seen["x"], out


N_SUMMARY = 3  # image + sig + dino summary tokens before the patches


def test_masked_patches_become_the_mask_token(make_model):
    model = make_model()
    pixels = torch.randn(1, 3, 28, 28)
    image_mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    image_mask[0, 1, 2] = True  # patch (row 1, col 2) = pixels [7:14, 14:21], flat index 6
    x, out = _tower_input(model, pixels, image_mask)
    assert x.shape[0] == 2  # the clean view (row 0) and the teachers' masked view (row 1), one tower batch
    assert torch.equal(x[1, N_SUMMARY + 6], model.vision.mask_token.detach())
    assert not torch.equal(x[0, N_SUMMARY + 6], model.vision.mask_token.detach())
    assert torch.equal(out.image_mask, image_mask)

    other = pixels.clone()
    other[..., 7:14, 14:21] += 5.0  # change only the masked patch
    x_other, _ = _tower_input(model, other, image_mask)
    assert torch.equal(x_other[1], x[1])

    other[..., 0:7, 0:7] += 5.0  # control: an unmasked patch does change the tower input
    x_changed, _ = _tower_input(model, other, image_mask)
    assert not torch.allclose(x_changed[1, N_SUMMARY], x[1, N_SUMMARY])


def test_without_teacher_heads_the_tower_runs_the_clean_view_alone(make_model):
    """A training step with no vision term (`teacher_heads=False`) draws no mask and passes the tower once;
    with the heads, training mode draws a mask and the tower takes both views."""
    model = make_model(mask_ratio=0.5).train()
    pixels, ids = torch.randn(2, 3, 28, 28), torch.zeros(2, 3, dtype=torch.long)
    sizes = []
    hook = model.vision.layers[0].register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    plain = model(pixels, ids, teacher_heads=False, text_logits_only=True)
    both = model(pixels, ids, text_logits_only=True)
    hook.remove()
    assert sizes == [2, 4]
    assert plain.teacher_outputs == {} and plain.image_mask is None and plain.mask is None
    assert set(both.teacher_outputs) == {"sig", "dino"} and both.image_mask is not None
    assert plain.logits.shape == both.logits.shape


def test_language_reads_the_clean_image(make_model):
    # Masked-image distillation hides patches from the teacher heads only: captions see the whole image.
    model = make_model()
    pixels, ids = torch.randn(2, 3, 28, 28), torch.zeros(2, 3, dtype=torch.long)
    image_mask = student.sample_image_mask(2, 4, 4, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        clean, masked = model(pixels, ids), model(pixels, ids, image_mask=image_mask)
    assert torch.allclose(masked.logits, clean.logits, atol=1e-6)
    assert torch.allclose(masked.vision_hidden_states, clean.vision_hidden_states, atol=1e-6)
    assert not torch.allclose(masked.teacher_outputs["sig"]["features"], clean.teacher_outputs["sig"]["features"],
                              atol=1e-4)
    vision_only = model(pixels, image_mask=image_mask)  # no captions: the tower and heads only
    assert vision_only.logits is None
    assert torch.allclose(vision_only.teacher_outputs["sig"]["features"], masked.teacher_outputs["sig"]["features"],
                          atol=1e-6)


def test_mask_is_pooled_to_each_teacher_grid(make_model):
    model = make_model(teachers={**TEACHERS, "coarse": {"summary_dim": 4, "feature_dim": 4, "grid": [2, 2]}})
    image_mask = student.sample_image_mask(2, 4, 4, 0.5, generator=torch.Generator().manual_seed(0))
    _, out = _tower_input(model, torch.randn(2, 3, 28, 28), image_mask)
    assert torch.equal(out.mask["sig"], image_mask.flatten(1).float())  # same 4x4 grid
    upsampled = image_mask.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # 8x8: 2x2 per patch
    assert torch.equal(out.mask["dino"], upsampled.flatten(1).float())
    # 2x2 teacher cells over 2x2 student patches each: the masked fraction, not one patch's bit.
    fraction = image_mask.float().view(2, 2, 2, 2, 2).mean((2, 4)).flatten(1)
    assert torch.equal(out.mask["coarse"], fraction)
    assert set(fraction.unique().tolist()) - {0.0, 1.0}  # some cells are partly masked


def test_branch_hook_sees_each_consumer(make_model):
    model = make_model()
    seen = []
    model(torch.randn(2, 3, 28, 28), torch.zeros(2, 3, dtype=torch.long),
          branch_hook=lambda term, x: seen.append((term, tuple(x.shape))) or x)
    assert sorted(seen) == sorted([("dino", (2, 32)), ("dino", (2, 16, 32)), ("sig", (2, 32)), ("sig", (2, 16, 32)),
                                   ("language", (2, 16, 32))])


def test_random_mask_in_training_only(make_model):
    model = make_model(mask_ratio=0.25)
    pixels, ids = torch.randn(3, 3, 28, 28), torch.zeros(3, 4, dtype=torch.long)
    model.train()
    out = model(pixels, ids)
    assert out.image_mask.shape == (3, 4, 4)
    assert out.image_mask.flatten(1).sum(1).tolist() == [4, 4, 4]
    assert out.mask["sig"].shape == (3, 16) and out.mask["dino"].shape == (3, 64)
    model.eval()
    assert model(pixels, ids).image_mask is None


def test_sample_image_mask_counts():
    mask = student.sample_image_mask(5, 3, 7, 0.4)
    assert mask.dtype == torch.bool and mask.shape == (5, 3, 7)
    assert mask.flatten(1).sum(1).tolist() == [round(0.4 * 21)] * 5
    assert not student.sample_image_mask(2, 2, 2, 0.0).any()


def test_teacher_heads_read_their_own_summary_token(make_model):
    model = make_model()
    names = student.summary_names(model.config)
    assert names == ["image", "dino", "sig"]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 28, 28), torch.zeros(2, 3, dtype=torch.long))
        head = model.teacher_heads["sig"]
        assert torch.allclose(out.teacher_outputs["sig"]["summary"], head.summary(out.vision_summary[:, 2]))
        dino = model.teacher_heads["dino"].summary(out.vision_summary[:, 1])
        assert torch.allclose(out.teacher_outputs["dino"]["summary"], dino)
        # Same grid as the student: no resampling, the MLP applies patch by patch.
        assert torch.allclose(out.teacher_outputs["sig"]["features"], head.features(out.vision_hidden_states))
        features = model.image_features(torch.randn(2, 3, 28, 28))
    assert features.shape == (2, 4 * 32)  # mean patch + 3 summary tokens
