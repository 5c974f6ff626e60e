"""Loss balancers on a toy problem: a shared linear trunk, two heads, one loss 1000x the other."""

import math

import pytest
import torch
from torch import nn

from distill.losses import STRATEGIES, TrunkTaps, build_balancer, gradnorm_ratios

TERMS = ["small", "big"]


class Toy(nn.Module):
    """A shared trunk read by two heads; `taps` (TrunkTaps) sees each head's branch of the trunk."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(16, 1), nn.Linear(16, 1)])
        # identical start, so both tasks begin at the same loss (GradNorm's r_t uses L_t(0))
        self.heads[1].load_state_dict(self.heads[0].state_dict())
        self.taps = TrunkTaps()

    def forward(self, x, y):
        h = self.trunk(x)
        pairs = zip(TERMS, self.heads, y.unbind(-1), strict=True)
        mse = [((head(self.taps(term, h)).squeeze(-1) - t) ** 2).mean() for term, head, t in pairs]
        return {"small": mse[0], "big": 1000.0 * mse[1]}


def make_batch(g, coef, n=64):
    """Both tasks regress the same function with their own noise, so they are equally hard and
    differ only in scale (the 1000x); a balanced trunk gradient then means a norm ratio near 1."""
    x = torch.randn(n, 8, generator=g)
    y = torch.tanh(x @ coef) + 0.3 * torch.randn(n, 2, generator=g)
    return x, y


def train(strategy, steps=300, seed=0, **opts):
    """Train with the balancer; returns it, the last weights and the big/small ratio of the weighted
    gradient norms on the trunk over the last 20 steps."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed + 1)
    coef = torch.randn(8, 1, generator=g)
    model = Toy()
    balancer = build_balancer(strategy, TERMS, **opts)
    opt = torch.optim.Adam([*model.parameters(), *balancer.parameters()], lr=1e-2)
    tail = torch.zeros(2)
    for step in range(steps):
        losses = model(*make_batch(g, coef))
        total, weights = balancer(losses)
        opt.zero_grad()
        total.backward()
        opt.step()
        norms = model.taps.pop(TERMS, TERMS)
        balancer.update(torch.stack([losses[t].detach() for t in TERMS]), norms)
        if step >= steps - 20:
            tail += norms
    return balancer, weights, float(tail[1] / tail[0])


def test_static_leaves_big_loss_dominant():
    _, weights, ratio = train("static")
    assert weights == {"small": 1.0, "big": 1.0}
    assert ratio > 50


@pytest.mark.parametrize("strategy,opts", [("ema", {}), ("gradnorm", {}), ("gradnorm", {"alpha": 0.5})])
def test_ema_and_gradnorm_balance_gradient_norms(strategy, opts):
    # Equally hard tasks that differ only in scale: balancing the loss values also balances the
    # gradients here (on the real objective it does not: docs/losses.md).
    balancer, weights, ratio = train(strategy, **opts)
    assert 0.5 <= ratio <= 2.0, ratio
    assert weights["big"] < weights["small"] / 100
    if strategy == "gradnorm":
        assert math.isclose(sum(weights.values()), len(TERMS), rel_tol=1e-5)


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
    """With fixed raw gradient norms the update settles where G_b / G_a = (r_b / r_a)^alpha."""
    balancer = build_balancer("gradnorm", ["a", "b"], alpha=alpha, lr=0.5)
    raw = torch.tensor([1.0, 2000.0])  # ||dL_t/d trunk|| of each term
    balancer.update(torch.tensor([4.0, 4000.0]), balancer.weights() * raw)  # L(0)
    for _ in range(60):
        balancer.update(torch.tensor([4.0, 8000.0]), balancer.weights() * raw)  # r_b / r_a = 2
    norms = balancer.weights() * raw
    assert float(norms[1] / norms[0]) == pytest.approx(2.0**alpha, rel=1e-3)
    assert float(balancer.weights().sum()) == pytest.approx(2.0)


def test_ema_bias_correction_and_updates_only_on_update():
    balancer = build_balancer("ema", TERMS, decay=0.9)
    losses = {"small": torch.tensor(2.0), "big": torch.tensor(500.0)}
    total, weights = balancer(losses)
    assert weights == {"small": 1.0, "big": 1.0} and total.item() == pytest.approx(502.0)  # no update yet
    balancer.update(torch.tensor([2.0, 500.0]))
    _, weights = balancer(losses)
    # one update, bias-corrected: divides by the loss itself, so every weighted loss is 1
    assert weights["small"] == pytest.approx(0.5) and weights["big"] == pytest.approx(1 / 500)
    assert balancer(losses)[1] == weights  # forward alone changes nothing
    balancer.update(torch.tensor([2.0, 1000.0]))
    # avg = 0.9 * (0.1 * 500) + 0.1 * 1000 = 145, bias-corrected by 1 - 0.9^2
    assert 1 / balancer(losses)[1]["big"] == pytest.approx(145 / 0.19, rel=1e-5)
    assert set(balancer.state_dict()) == {"base", "avg", "steps"}
    with pytest.raises(ValueError, match="non-finite"):
        balancer.update(torch.tensor([float("nan"), 1.0]))


def test_ema_tracks_running_mean():
    balancer = build_balancer("ema", ["a"], decay=0.5)
    for v in [4.0, 2.0, 8.0]:
        balancer.update(torch.tensor([v]))
    _, w = balancer({"a": torch.tensor(1.0)})
    # bias-corrected EMA with decay 0.5 of 4, 2, 8: (0.125*4 + 0.25*2 + 0.5*8) / (1 - 0.125)
    expect = (0.5**2 * 0.5 * 4 + 0.5 * 0.5 * 2 + 0.5 * 8) / (1 - 0.5**3)
    assert 1 / w["a"] == pytest.approx(expect, rel=1e-5)


def test_taps_and_ratios():
    taps = TrunkTaps()
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    total = 0.5 * (taps("a", w) ** 2).sum() + 3 * taps("b", w)[0] + taps("b", w)[1]  # b reads twice
    total.backward()
    norms = dict(zip("ab", taps.pop(["a", "b"], ["a", "b"], scale=0.5).tolist(), strict=True))
    assert norms["a"] == pytest.approx(2 * math.hypot(1, 2))  # 0.5 * 2w, divided by the scale 0.5
    assert norms["b"] == pytest.approx(2 * math.hypot(3, 1))
    assert taps.squares == {}  # reset
    ratios = gradnorm_ratios(norms, "b")
    assert ratios["b"] == 1.0 and ratios["a"] == pytest.approx(norms["a"] / norms["b"])
    assert gradnorm_ratios({"a": 1.0, "b": 3.0}) == {"a": 0.5, "b": 1.5}
    assert gradnorm_ratios({"a": 2.0}, 4.0) == {"a": 0.5}
    with pytest.raises(KeyError, match="zz"):
        gradnorm_ratios(norms, "zz")
    with torch.no_grad():  # no graph, no hook
        assert taps("a", w) is w


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
    with pytest.raises(ValueError, match="gradient norms"):
        build_balancer("gradnorm", TERMS).update(torch.tensor([1.0, 1.0]))
    gn = build_balancer("gradnorm", TERMS)
    total, weights = gn({"small": torch.tensor(1.0), "big": torch.tensor(3.0)})
    assert total.item() == pytest.approx(4.0) and weights == {"small": 1.0, "big": 1.0}
    # a term that did not reach the trunk this step (norm 0) keeps the update finite
    gn = build_balancer("gradnorm", ["a", "b", "c"])
    for _ in range(5):
        gn.update(torch.tensor([3.0, 30.0, 2.0]), gn.weights() * torch.tensor([3.0, 30.0, 0.0]))
    weights = gn.weights().tolist()
    assert all(math.isfinite(v) for v in weights) and weights[0] > weights[1]
