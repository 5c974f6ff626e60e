"""Loss balancers on a toy problem: a shared linear trunk, two heads, one loss 1000x the other."""

import math

import pytest
import torch
from torch import nn

from distill.balance import STRATEGIES, build_balancer, gradient_norms, gradnorm_ratios

TERMS = ["small", "big"]


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(16, 1), nn.Linear(16, 1)])
        # identical start, so both tasks begin at the same loss (GradNorm's r_t uses L_t(0))
        self.heads[1].load_state_dict(self.heads[0].state_dict())

    def forward(self, x, y):
        h = self.trunk(x)
        pairs = zip(self.heads, y.unbind(-1), strict=True)
        mse = [((head(h).squeeze(-1) - t) ** 2).mean() for head, t in pairs]
        return h, {"small": mse[0], "big": 1000.0 * mse[1]}


def make_batch(g, coef, n=64):
    """Both tasks regress the same function with their own noise, so they are equally hard and
    differ only in scale (the 1000x); a balanced trunk gradient then means a norm ratio near 1."""
    x = torch.randn(n, 8, generator=g)
    y = torch.tanh(x @ coef) + 0.3 * torch.randn(n, 2, generator=g)
    return x, y


def mean_norm_ratio(model, g, coef, weights, shared_kind, batches=20):
    """big/small ratio of weighted-loss gradient norms on the shared trunk (its output activation
    or its parameters), on training-size batches, norms summed over a few batches."""
    total = dict.fromkeys(TERMS, 0.0)
    for _ in range(batches):
        h, losses = model(*make_batch(g, coef))
        shared = h if shared_kind == "activation" else list(model.trunk.parameters())
        for t, n in gradient_norms(losses, shared, weights).items():
            total[t] += n
    return total["big"] / total["small"]


def train(strategy, steps=300, shared_kind="activation", seed=0, **opts):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    coef = torch.randn(8, 1, generator=g)
    model = Toy()
    balancer = build_balancer(strategy, TERMS, **opts)
    opt = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=1e-2)
    for _ in range(steps):
        h, losses = model(*make_batch(g, coef))
        shared = h if shared_kind == "activation" else list(model.trunk.parameters())
        total, weights = balancer(losses, shared)
        opt.zero_grad()
        total.backward()
        opt.step()
    return balancer, weights, mean_norm_ratio(model, g, coef, weights, shared_kind)


def test_static_leaves_big_loss_dominant():
    _, weights, ratio = train("static")
    assert weights == {"small": 1.0, "big": 1.0}
    assert ratio > 50


@pytest.mark.parametrize("strategy,opts", [("ema", {}), ("ema", {"shared_kind": "params"}), ("gradnorm", {}),
                                           ("gradnorm", {"alpha": 0.5, "shared_kind": "params"})])
def test_ema_and_gradnorm_balance_gradient_norms(strategy, opts):
    balancer, weights, ratio = train(strategy, **opts)
    assert 0.5 <= ratio <= 2.0, ratio
    assert weights["big"] < weights["small"] / 100
    if strategy == "gradnorm":
        assert math.isclose(sum(weights.values()), len(TERMS), rel_tol=1e-5)
        assert set(balancer.last_grad_norms) == set(TERMS)


def test_uncertainty_learns_log_variances():
    balancer, weights, _ = train("uncertainty")
    s = dict(zip(TERMS, balancer.log_vars.detach().tolist(), strict=True))
    assert abs(s["small"]) > 0.1 and abs(s["big"]) > 0.1  # both moved from 0
    assert s["big"] > s["small"] + 2
    _, weights = balancer({"small": torch.tensor(1.0), "big": torch.tensor(1.0)})
    assert weights["big"] < weights["small"]
    assert weights == pytest.approx({t: math.exp(-v) for t, v in s.items()})


@pytest.mark.parametrize("alpha", [0.0, 1.5])
def test_gradnorm_fixed_point(alpha):
    """With fixed gradients the update settles where G_b / G_a = (r_b / r_a)^alpha."""
    x = torch.ones(4, requires_grad=True)
    balancer = build_balancer("gradnorm", ["a", "b"], alpha=alpha, lr=0.5)
    balancer({"a": x.sum(), "b": 1000 * x.sum()}, x)  # L(0) = 4, 4000
    for _ in range(60):
        _, weights = balancer({"a": x.sum(), "b": 2000 * x.sum()}, x)  # r_b / r_a = 2
    norms = gradient_norms({"a": x.sum(), "b": 2000 * x.sum()}, x, weights)
    assert norms == pytest.approx(balancer.last_grad_norms, rel=1e-4)
    assert norms["b"] / norms["a"] == pytest.approx(2.0**alpha, rel=1e-3)
    assert sum(weights.values()) == pytest.approx(2.0)


def test_ema_bias_correction_first_step():
    balancer = build_balancer("ema", TERMS, decay=0.9)
    losses = {"small": torch.tensor(2.0), "big": torch.tensor(500.0)}
    total, weights = balancer(losses)
    # the first step divides by the loss itself: every weighted loss is 1
    assert weights["small"] == pytest.approx(0.5) and weights["big"] == pytest.approx(1 / 500)
    assert total.item() == pytest.approx(2.0)
    _, weights = balancer(losses | {"big": torch.tensor(1000.0)})
    # avg = 0.9 * (0.1 * 500) + 0.1 * 1000 = 145, bias-corrected by 1 - 0.9^2
    assert 1 / weights["big"] == pytest.approx(145 / 0.19, rel=1e-5)
    balancer.eval()  # no update in eval mode
    assert balancer(losses)[1] == weights
    state = balancer.state_dict()
    assert set(state) == {"base", "avg", "steps"}
    with pytest.raises(ValueError, match="non-finite"):
        balancer.train()({"small": torch.tensor(float("nan")), "big": torch.tensor(1.0)})


def test_ema_tracks_running_mean():
    balancer = build_balancer("ema", ["a"], decay=0.5)
    values = [4.0, 2.0, 8.0]
    for v in values:
        _, w = balancer({"a": torch.tensor(v)})
    # bias-corrected EMA with decay 0.5 of 4, 2, 8: (0.125*4 + 0.25*2 + 0.5*8) / (1 - 0.125)
    expect = (0.5**2 * 0.5 * 4 + 0.5 * 0.5 * 2 + 0.5 * 8) / (1 - 0.5**3)
    assert 1 / w["a"] == pytest.approx(expect, rel=1e-5)


def test_gradient_norms_and_ratios():
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    losses = {"a": (w**2).sum(), "b": 3 * w[0], "c": torch.tensor(1.0)}  # c does not touch w
    norms = gradient_norms(losses, [w], {"a": 0.5})
    assert norms["a"] == pytest.approx(0.5 * math.hypot(2, 4))
    assert norms["b"] == pytest.approx(3.0) and norms["c"] == 0.0
    assert w.grad is None  # autograd.grad does not accumulate into .grad
    ratios = gradnorm_ratios(norms, "b")
    assert ratios["b"] == 1.0 and ratios["a"] == pytest.approx(norms["a"] / 3)
    mean = gradnorm_ratios({"a": 1.0, "b": 3.0})
    assert mean == {"a": 0.5, "b": 1.5}
    assert gradnorm_ratios({"a": 2.0}, 4.0) == {"a": 0.5}
    with pytest.raises(KeyError, match="zz"):
        gradnorm_ratios(norms, "zz")


def test_build_and_bad_input():
    assert set(STRATEGIES) == {"static", "ema", "uncertainty", "gradnorm"}
    with pytest.raises(ValueError, match="strategy"):
        build_balancer("softmax", TERMS)
    with pytest.raises(TypeError, match="gradnorm"):
        build_balancer("gradnorm", TERMS, decay=0.9)
    with pytest.raises(KeyError, match="unknown terms"):
        build_balancer("static", TERMS, weights={"other": 2.0})
    static = build_balancer("static", TERMS, weights={"big": 0.001})
    total, weights = static({"small": torch.tensor(2.0), "big": torch.tensor(1000.0)})
    assert total.item() == pytest.approx(3.0) and weights == pytest.approx({"small": 1.0, "big": 0.001})
    with pytest.raises(KeyError, match="built for"):
        static({"small": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="scalar"):
        static({"small": torch.ones(2), "big": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="shared"):
        build_balancer("gradnorm", TERMS)({"small": torch.tensor(1.0), "big": torch.tensor(1.0)})
    # in eval mode gradnorm just applies its weights
    gn = build_balancer("gradnorm", TERMS).eval()
    total, weights = gn({"small": torch.tensor(1.0), "big": torch.tensor(3.0)})
    assert total.item() == pytest.approx(4.0) and weights == {"small": 1.0, "big": 1.0}
    # a term that does not reach `shared` keeps the update finite
    x = torch.ones(3, requires_grad=True)
    gn = build_balancer("gradnorm", ["a", "b", "c"])
    for _ in range(5):
        _, weights = gn({"a": x.sum(), "b": 10 * x.sum(), "c": torch.tensor(2.0)}, x)
    assert all(math.isfinite(v) for v in weights.values()) and weights["a"] > weights["b"]
