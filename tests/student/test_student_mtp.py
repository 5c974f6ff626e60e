"""Decoder and MTP causality, MTP target alignment, the MMTP image rule and the losses."""

import pytest
import torch
import torch.nn.functional as F

import student

IGNORE = -100


@pytest.mark.parametrize("image_attention", ["bidirectional", "causal"])
def test_decoder_and_every_mtp_depth_are_causal(make_model, batch, image_attention):
    model = make_model(image_attention=image_attention, mtp_depth=3)
    pixels, ids, _ = batch
    with torch.no_grad():
        ref = model(pixels, ids)
        n = ref.num_image_tokens
        assert n == 4
        for t in (0, 3, ids.shape[1] - 1):  # perturb caption token t, at sequence position n + t
            changed = ids.clone()
            changed[:, t] = (changed[:, t] + 1) % 256
            out = model(pixels, changed)
            j = n + t
            # main head: position i sees tokens <= i
            assert torch.equal(out.logits[:, :j], ref.logits[:, :j])
            assert not torch.allclose(out.logits[:, j], ref.logits[:, j])
            # depth k at position i sees tokens <= i + k (and predicts i + 1 + k)
            for k, (lg, lg_ref) in enumerate(zip(out.mtp_logits, ref.mtp_logits, strict=True), start=1):
                assert torch.equal(lg[:, : j - k], lg_ref[:, : j - k]), (t, k)
                assert not torch.allclose(lg[:, j - k], lg_ref[:, j - k]), (t, k)


def _manual_targets(ids, mask, n_img, offset):
    """Target of sequence position i for a head `offset` tokens ahead, by plain indexing."""
    b, t = ids.shape
    out = torch.full((b, n_img + t), IGNORE)
    for row in range(b):
        for i in range(n_img + t):
            pos = i + offset - n_img  # caption index of the target
            if 0 <= pos < t and mask[row, pos]:
                out[row, i] = ids[row, pos]
    return out


def test_mtp_labels_alignment(batch):
    _, ids, mask = batch
    labels = student.mtp_labels(ids, 4, 3, attention_mask=mask)
    assert len(labels) == 3
    for k, lab in enumerate(labels, start=1):
        assert torch.equal(lab, _manual_targets(ids, mask, 4, 1 + k))  # depth k: token i + 1 + k
        # image targets are masked: depth k at position i < 4 - 1 - k targets an image position
        assert (lab[:, : 4 - 1 - k] == IGNORE).all()
    assert torch.equal(student.shift_labels(ids, 4, 1, mask), _manual_targets(ids, mask, 4, 1))
    # depth 1 at the position of caption token 0 is trained on caption token 2
    assert labels[0][0, 4] == ids[0, 2]


def _manual_ce(logits, targets):
    terms = [F.cross_entropy(logits[b, i][None], targets[b, i][None])
             for b in range(targets.shape[0]) for i in range(targets.shape[1]) if targets[b, i] != IGNORE]
    return torch.stack(terms).mean()


def test_losses_match_manual_cross_entropy(make_model, batch):
    model = make_model()
    pixels, ids, mask = batch
    with torch.no_grad():
        out = model(pixels, ids, mask, labels=ids)
    n = out.num_image_tokens
    assert torch.allclose(out.lm_loss, _manual_ce(out.logits, _manual_targets(ids, mask, n, 1)), atol=1e-5)
    assert len(out.mtp_losses) == 2
    for k, (loss, lg) in enumerate(zip(out.mtp_losses, out.mtp_logits, strict=True), start=1):
        assert torch.allclose(loss, _manual_ce(lg, _manual_targets(ids, mask, n, 1 + k)), atol=1e-5)
    expected = out.lm_loss + model.config.mtp_loss_weight * (out.mtp_losses[0] + out.mtp_losses[1]) / 2
    assert torch.allclose(out.loss, expected)


def _mtp_token_inputs(model, pixels, ids):
    seen = {}
    hooks = [mod.token_norm.register_forward_pre_hook(lambda m, args, k=k: seen.__setitem__(k, args[0]))
             for k, mod in enumerate(model.mtp, start=1)]
    with torch.no_grad():
        out = model(pixels, ids)
    for h in hooks:
        h.remove()
    return seen, out


def test_mtp_inputs_at_image_positions_are_the_image_embedding(make_model, batch):
    model = make_model()
    pixels, ids, _ = batch
    seen_a, out_a = _mtp_token_inputs(model, pixels, ids)
    seen_b, out_b = _mtp_token_inputs(model, pixels + 3.0 * torch.randn_like(pixels), ids)
    assert not torch.allclose(out_a.image_embeds, out_b.image_embeds)  # the image did change
    n, s = out_a.num_image_tokens, out_a.logits.shape[1]
    image_emb = model.image_token_embedding.detach()
    text_emb = model.decoder.embed_tokens.weight.detach()[ids]
    for k in (1, 2):
        a, b = seen_a[k], seen_b[k]
        # position i carries the token at i + k: the <|image|> embedding while that is an image position
        assert torch.equal(a[:, : n - k], b[:, : n - k])
        assert torch.equal(a[:, : n - k], image_emb.expand_as(a[:, : n - k]))
        assert torch.equal(a[:, n - k : s - k], text_emb)
        assert torch.equal(a[:, n - k : s - k], b[:, n - k : s - k])


def test_text_logits_only_equal_the_caption_slice_of_the_full_logits():
    import torch

    import student
    cfg = student.load_preset("tiny", vocab_size=64, mtp_depth=2)
    torch.manual_seed(0)
    model = student.build_student(cfg).eval()
    px, ids = torch.randn(2, 3, 28, 28), torch.randint(0, 64, (2, 5))
    full = model(px, ids)
    text = model(px, ids, text_logits_only=True)
    n = full.num_image_tokens
    torch.testing.assert_close(text.logits, full.logits[:, n:])
    for a, b in zip(text.mtp_logits, full.mtp_logits, strict=True):
        torch.testing.assert_close(a, b[:, n:])
