"""Vision feature KD, feature standardisation (z-score, PHI-S) and the statistics accumulator."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.featurestats import FeatureStatsAccumulator
from data.standardize import FeatureStandardizer, equalizing_rotation, hadamard
from distill.losses import vision_kd_loss


def anisotropic_gaussian(n, dim, seed, sample_seed=0):
    """Correlated features with variances spread over 4 decades and a non-zero mean. `seed` fixes
    the distribution, `sample_seed` the draw."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))
    scales = torch.logspace(-2, 2, dim, dtype=torch.float64).sqrt()
    mean = torch.randn(dim, generator=g, dtype=torch.float64) * 5
    g.manual_seed(1000 + sample_seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64) * scales @ q.T + mean


def test_accumulator_matches_numpy_and_merges():
    x = anisotropic_gaussian(3000, 7, seed=0)
    whole = FeatureStatsAccumulator().update(x[:1000]).update(x[1000:].reshape(100, 20, 7))  # any [..., D]
    a = FeatureStatsAccumulator().update(x[:1234])
    b = FeatureStatsAccumulator().update(x[1234:2000]).update(x[2000:])
    merged = a.merge(b).merge(FeatureStatsAccumulator())  # merging an empty one is a no-op
    s, m = whole.finalize(), merged.finalize()
    assert s.count == m.count == 3000
    assert torch.allclose(s.mean, m.mean, rtol=1e-12, atol=1e-12)
    assert torch.allclose(s.cov, m.cov, rtol=1e-10, atol=1e-10)
    xn = x.numpy()
    assert np.allclose(s.mean.numpy(), xn.mean(0), atol=1e-10)
    assert np.allclose(s.cov.numpy(), np.cov(xn, rowvar=False), rtol=1e-8, atol=1e-9)
    assert np.allclose(s.std.numpy(), xn.std(0, ddof=1), rtol=1e-8)
    restored = FeatureStatsAccumulator.from_state_dict(whole.state_dict()).finalize()
    assert torch.equal(restored.cov, s.cov)
    with pytest.raises(ValueError, match="dim"):
        whole.update(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStatsAccumulator().update(x[:1]).finalize()


@pytest.mark.parametrize("dim", [16, 12, 7])  # power of two (Hadamard) and not (Givens)
def test_phis_equalises_variance_and_keeps_geometry(dim):
    x = anisotropic_gaussian(20000, dim, seed=dim)
    stats = FeatureStatsAccumulator().update(x).finalize()
    std = FeatureStandardizer.from_stats(stats.mean, cov=stats.cov, mode="phis")
    y = std(x.float()).double()
    var = y.var(0)
    assert torch.allclose(var, torch.ones(dim, dtype=torch.float64), atol=1e-4)  # same data: exact
    assert y.mean(0).abs().max() < 1e-4
    # Unlike z-score, PHI-S is a rotation plus one scale: distance ratios are kept.
    d_in = torch.cdist(x[:50], x[50:100])
    d_out = torch.cdist(y[:50], y[50:100])
    ratio = d_out / d_in
    assert (ratio.max() - ratio.min()) / ratio.mean() < 1e-4
    # The covariance is not the identity (it is not whitening), only its diagonal is equal.
    cov = torch.cov(y.T)
    assert (cov - torch.diag(cov.diagonal())).abs().max() > 0.05
    # Held-out data from the same distribution: variances still ~1.
    held = std(anisotropic_gaussian(20000, dim, seed=dim, sample_seed=1).float())
    assert torch.allclose(held.double().var(0), torch.ones(dim, dtype=torch.float64), atol=0.05)


def test_zscore_gives_unit_variance_per_dim():
    x = anisotropic_gaussian(20000, 9, seed=3)
    stats = FeatureStatsAccumulator().update(x).finalize()
    for std in (FeatureStandardizer.from_stats(stats.mean, std=stats.std, mode="zscore"),
                FeatureStandardizer.from_stats(stats.mean, cov=stats.cov, mode="zscore")):
        y = std(x.half()).double()  # fp16 input is computed in fp32
        assert torch.allclose(y.var(0), torch.ones(9, dtype=torch.float64), atol=5e-3)
        assert y.mean(0).abs().max() < 5e-3


def test_phis_from_eigendecomposition_and_state_dict():
    x = anisotropic_gaussian(5000, 12, seed=4)
    stats = FeatureStatsAccumulator().update(x).finalize()
    eigvals, eigvecs = torch.linalg.eigh(stats.cov)
    a = FeatureStandardizer.from_stats(stats.mean, cov=stats.cov)
    b = FeatureStandardizer.from_stats(stats.mean, eigvals=eigvals, eigvecs=eigvecs)
    assert torch.allclose(a(x.float()), b(x.float()), atol=1e-4)
    assert set(a.state_dict()) == {"mean", "scale", "rotation"}


@pytest.mark.parametrize("dim", [3, 5, 12, 33])
def test_equalizing_rotation(dim):
    lam = torch.linspace(0.01, 10.0, dim, dtype=torch.float64) ** 2
    r = equalizing_rotation(lam)
    assert torch.allclose(r @ r.T, torch.eye(dim, dtype=torch.float64), atol=1e-12)
    diag = (r * lam) @ r.T
    assert torch.allclose(diag.diagonal(), lam.mean().expand(dim), rtol=1e-10)
    h = hadamard(8)
    assert torch.allclose(h @ h.T, torch.eye(8, dtype=torch.float64))
    assert torch.allclose(h.abs(), torch.full((8, 8), 8**-0.5, dtype=torch.float64))


def test_standardizer_bad_input():
    with pytest.raises(ValueError, match="mode"):
        FeatureStandardizer.from_stats(torch.zeros(3), std=torch.ones(3), mode="pca")
    with pytest.raises(ValueError, match="needs"):
        FeatureStandardizer.from_stats(torch.zeros(3), std=torch.ones(3), mode="phis")
    with pytest.raises(ValueError, match="zero variance"):
        FeatureStandardizer.from_stats(torch.zeros(3), cov=torch.zeros(3, 3), mode="phis")
    std = FeatureStandardizer.from_stats(torch.zeros(3), std=torch.ones(3), mode="zscore")
    with pytest.raises(ValueError, match="dim 4"):
        std(torch.zeros(2, 4))


def test_vision_kd_loss_values_and_masked_weight():
    g = torch.Generator().manual_seed(0)
    B, P, D = 2, 5, 8
    s_sum, t_sum = torch.randn(B, D, generator=g), torch.randn(B, D, generator=g)
    s_pat, t_pat = torch.randn(B, P, D, generator=g), torch.randn(B, P, D, generator=g)
    out = vision_kd_loss(s_sum, s_pat, t_sum, t_pat)
    cos_ref = (1 - F.cosine_similarity(s_pat, t_pat, dim=-1)).mean()
    l1_ref = F.smooth_l1_loss(s_pat, t_pat)
    assert abs(out["patches/cos"].item() - cos_ref.item()) < 1e-6
    assert abs(out["patches/smooth_l1"].item() - l1_ref.item()) < 1e-6
    summary = (1 - F.cosine_similarity(s_sum, t_sum, dim=-1)).mean() + F.smooth_l1_loss(s_sum, t_sum)
    assert abs(out["loss"].item() - (summary + cos_ref + l1_ref).item()) < 1e-5

    # masked patches count, with an extra weight
    mask = torch.zeros(B, P, dtype=torch.bool)
    mask[:, :2] = True
    per = (1 - F.cosine_similarity(s_pat, t_pat, dim=-1)) + F.smooth_l1_loss(s_pat, t_pat, reduction="none").mean(-1)
    w = torch.where(mask, 3.0, 1.0)
    masked = vision_kd_loss(None, s_pat, None, t_pat, mask, masked_weight=3.0)
    assert abs(masked["loss"].item() - ((per * w).sum() / w.sum()).item()) < 1e-5
    assert set(masked) == {"loss", "patches/cos", "patches/smooth_l1"}
    same = vision_kd_loss(None, s_pat, None, t_pat, mask, masked_weight=1.0)
    assert abs(same["loss"].item() - per.mean().item()) < 1e-5

    # zero at a perfect match; gradient to the student only
    assert vision_kd_loss(t_sum, t_pat, t_sum, t_pat)["loss"].item() < 1e-6
    s = s_pat.clone().requires_grad_(True)
    t = t_pat.clone().requires_grad_(True)
    vision_kd_loss(None, s.bfloat16(), None, t.half(), mask)["loss"].backward()
    assert t.grad is None and torch.isfinite(s.grad).all()


def test_vision_kd_bad_input():
    x = torch.zeros(2, 4, 8)
    with pytest.raises(ValueError, match="differ in shape"):
        vision_kd_loss(None, x, None, torch.zeros(2, 4, 6))
    with pytest.raises(ValueError, match="patch_mask"):
        vision_kd_loss(None, x, None, x, torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="only one"):
        vision_kd_loss(torch.zeros(2, 8), x, None, x)
    with pytest.raises(ValueError, match="needs"):
        vision_kd_loss(None, None, None, None)
