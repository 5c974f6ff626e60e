"""The contrastive term: SigLIP's sigmoid loss against a plain double loop, caption matches, and the
student's image-text path."""

import math

import pytest
import torch
import torch.nn.functional as F

import student
from distill.losses import same_caption, siglip_loss


def reference(image, text, scale, bias, positives):
    """-1/B sum_ij log sigmoid(z_ij (exp(scale) <x_i, y_j> + b)), written out pair by pair."""
    n, total = image.shape[0], 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if positives[i, j] else -1.0
            logit = math.exp(scale) * float(image[i] @ text[j]) + bias
            total += -math.log(1 / (1 + math.exp(-z * logit)))
    return total / n


def test_siglip_loss_matches_the_pairwise_definition():
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    positives = torch.eye(5, dtype=torch.bool)
    positives[1, 3] = positives[3, 1] = True  # two rows with the same caption
    scale, bias = torch.tensor([2.3]), torch.tensor([-1.5])
    out = siglip_loss(image, text, scale, bias, positives)
    assert out["loss"].item() == pytest.approx(reference(image, text, 2.3, -1.5, positives), rel=1e-5)
    default = siglip_loss(image, text, scale, bias)  # the diagonal only
    assert default["loss"].item() == pytest.approx(reference(image, text, 2.3, -1.5, torch.eye(5, dtype=torch.bool)),
                                                   rel=1e-5)


def test_aligned_pairs_score_better_and_accuracy_counts_matches():
    torch.manual_seed(1)
    x = F.normalize(torch.randn(6, 16), dim=-1)
    scale, bias = torch.tensor([math.log(10.0)]), torch.tensor([-10.0])
    aligned = siglip_loss(x, x, scale, bias)
    shuffled = siglip_loss(x, x[torch.tensor([1, 2, 3, 4, 5, 0])], scale, bias)
    assert aligned["loss"] < shuffled["loss"]
    assert aligned["accuracy"].item() == 1.0 and shuffled["accuracy"].item() < 0.5
    with pytest.raises(ValueError, match="must both be"):
        siglip_loss(x, x[:, :8], scale, bias)


def test_same_caption_compares_tokens_over_the_real_length():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 0], [5, 6, 0, 0], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    expect = torch.tensor([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(same_caption(ids, mask), expect)


def test_student_image_text_path():
    config = student.load_preset("tiny", vocab_size=64, contrastive_dim=8, mask_ratio=0.25,
                                 teachers={"t": {"summary_dim": 4, "feature_dim": 4, "grid": [2, 2]}})
    model = student.build_student(config).train()
    px, ids = torch.randn(3, 3, 28, 28), torch.randint(1, 64, (3, 5))
    mask = torch.ones(3, 5, dtype=torch.long)
    mask[0, 3:] = 0
    tapped = {}

    def hook(term, x):
        x = x.view_as(x)
        x.register_hook(lambda g, t=term: tapped.__setitem__(t, float(g.norm())))
        return x
    out = model(px, ids, mask, language=False, contrastive=True, branch_hook=hook)
    image, text = out.image_text_embeds
    assert out.logits is None and image.shape == text.shape == (3, 8)
    torch.testing.assert_close(image.norm(dim=-1), torch.ones(3))
    siglip_loss(image, text, model.contrastive.logit_scale, model.contrastive.logit_bias)["loss"].backward()
    assert tapped.get("contrastive", 0) > 0  # the term reaches the tower through the `image` summary token
    assert model.merger.fc1.weight.grad is None  # no image-text pass through the merger
    # the caption side ignores padding: a padded row embeds like its unpadded caption
    model.eval()
    alone = model.caption_embedding(ids[:1, :3])
    torch.testing.assert_close(model.caption_embedding(ids[:1], mask[:1]), alone, rtol=1e-5, atol=1e-5)
    plain = student.build_student(student.load_preset("tiny", vocab_size=64))
    with pytest.raises(ValueError, match="contrastive_dim"):
        plain(px, ids, mask, contrastive=True)
