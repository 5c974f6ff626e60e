"""Tiny student models for the student tests."""

import pytest
import torch

import student

VOCAB = 256
# Tiny preset: patch 7, so a 28x28 image is a 4x4 patch grid -> 2x2 = 4 merged image tokens.
TEACHERS = {"sig": {"summary_dim": 12, "feature_dim": 20, "grid": [4, 4]},
            "dino": {"summary_dim": 8, "feature_dim": 16, "grid": [8, 8]}}


@pytest.fixture
def make_config():
    def make(**overrides):
        return student.load_preset("tiny", **{"teachers": TEACHERS, **overrides})
    return make


@pytest.fixture
def make_model(make_config):
    """A factory of tiny students in eval mode, seeded for reproducibility."""
    def make(seed=0, **overrides):
        torch.manual_seed(seed)
        return student.CogViTMTPForDistillation(make_config(**overrides)).eval()
    return make


@pytest.fixture
def batch():
    """pixel_values [2, 3, 28, 28], input_ids [2, 8], attention_mask with the second row right-padded."""
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(2, 3, 28, 28, generator=g)
    ids = torch.randint(0, VOCAB, (2, 8), generator=g)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    return pixels, ids, mask
