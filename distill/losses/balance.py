"""Loss balancing across distillation terms (language KD, one term per vision teacher, ...).

Every balancer is an nn.Module built by `build_balancer(strategy, terms, **opts)` with

    total, weights = balancer(losses)      # pure: sum_t w_t L_t with the current weights
    balancer.update(losses, norms)         # once per applied optimizer step

`losses` maps each term name to a scalar loss (with graph); `weights` maps term name -> float for
logging as `weight/<term>`. `update` takes the step's mean raw losses and the weighted gradient
norms G_t = ||d(w_t L_t)/d trunk|| that `TrunkTaps` read off the step's own backward, both as
[T] tensors in `terms` order and identical on every rank. A skipped step (non-finite loss) calls
no `update`, so balancer state only ever sees applied steps. State lives in parameters/buffers and
is saved with the model.

- static:      total = sum_t w_t L_t with fixed weights.
- ema:         w_t = base_t / EMA(L_t), bias-corrected, so every weighted loss sits near 1. This
               balances loss *values*, not gradients: a term whose loss is small but steep (e.g.
               a cosine on standardised features) still pulls hardest on the trunk.
- uncertainty: Kendall et al. 2018, total = sum_t exp(-s_t) L_t + s_t with learned log-variances
               s_t (parameters: give them to the optimizer).
- gradnorm:    Chen et al. 2018, learned weights (sum = number of terms) moved by their own
               multiplicative update so that each term's gradient norm on the trunk tracks
               mean_norm * r_t^alpha; alpha = 0 equalises the norms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn


class TrunkTaps:
    """Per-term gradient norms on the shared trunk, read off the training backward itself.

    The model calls `taps(term, x)` where the consumer of `term` reads the trunk's output `x` (see
    the student's `branch_hook`); each call returns a view of `x` with a gradient hook, so the
    backward of the total loss leaves, per term, ||d(total)/d x|| restricted to that consumer's
    branch: the weighted norm G_t = ||w_t dL_t/dx||, at no extra backward. ZeRO-3 re-wraps module
    outputs, which breaks `autograd.grad` against a returned activation; a hook on the branch
    itself sees the same gradient at every stage.
    """

    def __init__(self):
        self.squares: dict[str, Tensor] = {}

    def __call__(self, term: str, x: Tensor) -> Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return x
        y = x.view_as(x)
        y.register_hook(lambda g, t=term: self._add(t, g))
        return y

    def _add(self, term: str, grad: Tensor) -> None:
        sq = grad.detach().float().pow(2).sum()
        self.squares[term] = self.squares[term] + sq if term in self.squares else sq

    def pop(self, terms: Sequence[str], expected: Sequence[str], scale: float = 1.0) -> Tensor:
        """The norms of the last backward [T] in `terms` order (divided by the backward's loss
        `scale`), and reset.

        A term in `expected` (its loss had a graph) whose branch got no gradient raises: it is not
        upstream of the trunk, and a silent 0 would turn gradnorm into static weighting.
        """
        missing = [t for t in expected if t not in self.squares]
        if missing:
            raise RuntimeError(f"terms {missing} reached no trunk branch in the backward; the model must call "
                               "branch_hook(term, x) where each term's consumer reads the shared trunk")
        zero = next(iter(self.squares.values())).new_zeros(()) if self.squares else torch.zeros(())
        norms = torch.stack([self.squares.get(t, zero).sqrt() for t in terms]) / scale
        self.squares = {}
        return norms


def gradnorm_ratios(norms: Mapping[str, float], reference: str | float | None = None) -> dict[str, float]:
    """Each norm divided by a reference: a term name, a number, or (None) the mean of the norms.

    Logged as `gradnorm_ratio/<term>` against the language term; 1 means the term pulls on the
    trunk as hard as the reference.
    """
    if isinstance(reference, str):
        if reference not in norms:
            raise KeyError(f"reference term {reference!r} not among {sorted(norms)}")
        ref = norms[reference]
    elif reference is None:
        ref = sum(norms.values()) / max(len(norms), 1)
    else:
        ref = float(reference)
    return {t: (n / ref if ref > 0 else math.inf if n > 0 else 1.0) for t, n in norms.items()}


def distributed_mean(x: Tensor) -> Tensor:
    """Average over data-parallel ranks (on x's device) so that every rank sees the same value."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def _check_terms(terms: Sequence[str]) -> list[str]:
    terms = list(terms)
    if not terms or len(set(terms)) != len(terms):
        raise ValueError(f"balancer terms must be distinct and non-empty, got {terms}")
    return terms


def _stack(terms: list[str], losses: Mapping[str, Tensor]) -> Tensor:
    if set(losses) != set(terms):
        raise KeyError(f"losses have terms {sorted(losses)}, the balancer was built for {sorted(terms)}")
    for t in terms:
        if losses[t].numel() != 1:
            raise ValueError(f"loss {t!r} must be a scalar, got shape {tuple(losses[t].shape)}")
    return torch.stack([losses[t].reshape(()).float() for t in terms])


def _base_weights(terms: list[str], weights: Mapping[str, float] | None) -> list[float]:
    weights = dict(weights or {})
    unknown = set(weights) - set(terms)
    if unknown:
        raise KeyError(f"weights given for unknown terms {sorted(unknown)}; terms are {terms}")
    return [float(weights.get(t, 1.0)) for t in terms]


def _check_finite(terms: list[str], values: Tensor, what: str) -> None:
    if not torch.isfinite(values).all():
        bad = [t for t, v in zip(terms, values.tolist(), strict=True) if not math.isfinite(v)]
        raise ValueError(f"non-finite {what} for terms {bad}; refusing to update the balancer")


def _weighted(terms: list[str], w: Tensor, values: Tensor) -> tuple[Tensor, dict[str, float]]:
    w = w.to(values.device)
    return (w * values).sum(), dict(zip(terms, w.tolist(), strict=True))


class StaticBalancer(nn.Module):
    def __init__(self, terms: Sequence[str], weights: Mapping[str, float] | None = None):
        super().__init__()
        self.terms = _check_terms(terms)
        self.register_buffer("weights", torch.tensor(_base_weights(self.terms, weights)))

    def forward(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return _weighted(self.terms, self.weights, _stack(self.terms, losses))

    def update(self, losses: Tensor, norms: Tensor | None = None) -> None:
        pass


class EMABalancer(nn.Module):
    """w_t = base_t / (avg_t / (1 - decay^n) + eps): the EMA of the step-mean loss, bias-corrected,
    so the second step already divides by the first step's loss. The first step uses `base`."""

    def __init__(self, terms: Sequence[str], decay: float = 0.99, eps: float = 1e-8,
                 weights: Mapping[str, float] | None = None):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.terms = _check_terms(terms)
        self.decay, self.eps = decay, eps
        self.register_buffer("base", torch.tensor(_base_weights(self.terms, weights)))
        self.register_buffer("avg", torch.zeros(len(self.terms)))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def forward(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        values = _stack(self.terms, losses)
        if self.steps == 0:  # before any update: plain base weights
            return _weighted(self.terms, self.base, values)
        w = self.base / (self.avg / (1 - self.decay ** self.steps.item()) + self.eps)
        return _weighted(self.terms, w, values)

    @torch.no_grad()
    def update(self, losses: Tensor, norms: Tensor | None = None) -> None:
        losses = losses.detach().float().to(self.avg.device)
        _check_finite(self.terms, losses, "loss")
        self.avg.mul_(self.decay).add_((1 - self.decay) * losses)
        self.steps += 1


class UncertaintyBalancer(nn.Module):
    """Kendall et al. 2018: total = sum_t exp(-s_t) L_t + s_t, s_t = log-variance (learned).

    `log_vars` is an nn.Parameter: it must reach the optimizer (keep the balancer inside the
    model the engine wraps), without weight decay. Logged weight: exp(-s_t).
    """

    def __init__(self, terms: Sequence[str], init_log_var: float = 0.0):
        super().__init__()
        self.terms = _check_terms(terms)
        self.log_vars = nn.Parameter(torch.full((len(self.terms),), float(init_log_var)))

    def forward(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        values = _stack(self.terms, losses)
        s = self.log_vars.float().to(values.device)
        total = (torch.exp(-s) * values + s).sum()
        return total, dict(zip(self.terms, torch.exp(-s.detach()).tolist(), strict=True))

    def update(self, losses: Tensor, norms: Tensor | None = None) -> None:
        pass  # learned by the optimizer


class GradNormBalancer(nn.Module):
    """GradNorm (Chen et al. 2018) with weights w = T * softmax(log_w): positive, summing to the
    number of terms T.

    Each applied step, from the weighted norms G_t = w_t g_t of that step's backward:
    r_t = (L_t/L_t(0)) / mean_t(L/L(0)), target_t = mean(G) * r_t^alpha, then
        log_w_t -= lr * (log G_t - log target_t)
    i.e. w_t <- w_t * (target_t / G_t)^lr, renormalised: one gradient step on
    1/2 sum_t (log G_t - log target_t)^2 with the target held constant, the paper's L_grad taken in
    log space so that it does not care that norms differ by orders of magnitude. lr in (0, 1]
    (1 jumps to the target at once; smaller values average the per-batch noise). alpha = 0 asks for
    equal norms; larger alpha pulls harder towards equal training rates. The weights apply from the
    next step on; log_w is a buffer, not a parameter.
    """

    def __init__(self, terms: Sequence[str], alpha: float = 0.0, lr: float = 0.2):
        super().__init__()
        if not 0.0 < lr <= 1.0:
            raise ValueError(f"gradnorm lr must be in (0, 1], got {lr}")
        self.terms = _check_terms(terms)
        self.alpha, self.lr = alpha, lr
        self.register_buffer("log_w", torch.zeros(len(self.terms)))
        self.register_buffer("initial", torch.zeros(len(self.terms)))  # L_t at the first step
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def weights(self) -> Tensor:
        return len(self.terms) * torch.softmax(self.log_w, 0)

    def forward(self, losses: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, float]]:
        return _weighted(self.terms, self.weights(), _stack(self.terms, losses))

    @torch.no_grad()
    def update(self, losses: Tensor, norms: Tensor | None = None) -> None:
        if norms is None:
            raise ValueError("gradnorm needs the step's gradient norms on the trunk (TrunkTaps)")
        current = losses.detach().float().to(self.log_w.device)
        norms = norms.detach().float().to(self.log_w.device)
        _check_finite(self.terms, current, "loss")
        _check_finite(self.terms, norms, "gradient norm")
        if self.steps == 0:
            self.initial.copy_(current.clamp_min(1e-12))
        self.steps += 1
        rate = current / self.initial
        live = norms > 0  # terms that reached the trunk this step
        if live.any():
            rate = rate / rate[live].mean()
            target = norms[live].mean() * rate.clamp_min(1e-12) ** self.alpha
            step = norms.clamp_min(1e-30).log() - target.clamp_min(1e-30).log()
            self.log_w -= self.lr * torch.where(live, step, 0.0)


BALANCERS = {"static": StaticBalancer, "ema": EMABalancer, "uncertainty": UncertaintyBalancer,
             "gradnorm": GradNormBalancer}
STRATEGIES = tuple(BALANCERS)


def build_balancer(strategy: str, terms: Sequence[str], **opts) -> nn.Module:
    """One of STRATEGIES over `terms`; `opts` go to the balancer (e.g. weights, decay, alpha, lr)."""
    if strategy not in BALANCERS:
        raise ValueError(f"unknown balancing strategy {strategy!r}; expected one of {STRATEGIES}")
    try:
        return BALANCERS[strategy](terms, **opts)
    except TypeError as e:
        raise TypeError(f"bad options for the {strategy!r} balancer: {e}") from None
