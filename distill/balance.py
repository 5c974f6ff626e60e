"""Loss balancing across distillation terms (language KD, one term per vision teacher, ...).

Every balancer is an nn.Module built by `build_balancer(strategy, terms, **opts)` with

    total, weights = balancer(losses, shared=None)

`losses` maps each term name to a scalar loss (with graph); `weights` maps term name -> float for
logging as `weight/<term>`. State lives in parameters/buffers, so it is saved with the model.

- static:      total = sum_t w_t L_t with fixed weights.
- ema:         w_t = base_t / EMA(L_t), bias-corrected, so every weighted loss sits near 1.
- uncertainty: Kendall et al. 2018, total = sum_t exp(-s_t) L_t + s_t with learned log-variances
               s_t (parameters: give them to the optimizer).
- gradnorm:    Chen et al. 2018, learned weights (sum = number of terms) moved by their own
               multiplicative update so that each term's gradient norm on `shared` tracks
               mean_norm * r_t^alpha.

`shared` is what gradient norms are measured against: parameters of the shared trunk, or better
the trunk's output activation (see docs/losses.md for why).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

STRATEGIES = ("static", "ema", "uncertainty", "gradnorm")


def _as_list(shared: Tensor | Sequence[Tensor]) -> list[Tensor]:
    return [shared] if isinstance(shared, Tensor) else list(shared)


def _grad_norm(loss: Tensor, shared: list[Tensor]) -> Tensor:
    """||d loss / d shared|| over all shared tensors, as a detached 0-dim tensor."""
    if not loss.requires_grad:
        return loss.new_zeros((), dtype=torch.float32)
    grads = torch.autograd.grad(loss, shared, retain_graph=True, allow_unused=True)
    sq = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    return torch.stack(sq).sum().sqrt() if sq else loss.new_zeros((), dtype=torch.float32)


def gradient_norms(losses: Mapping[str, Tensor], shared: Tensor | Sequence[Tensor],
                   weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """Norm of d(w_t L_t)/d shared for each term (w_t = 1 when `weights` is None).

    `shared` is one tensor or a list: trunk parameters or a trunk output activation. The graph is
    kept (retain_graph), so call this before the backward pass of the total loss.
    """
    shared = _as_list(shared)
    if not shared:
        raise ValueError("gradient_norms needs at least one shared tensor")
    norms = torch.stack([_grad_norm(loss, shared) for loss in losses.values()])
    weights = weights or {}
    return {t: abs(float(weights.get(t, 1.0))) * n for t, n in zip(losses, norms.tolist(), strict=True)}


def gradnorm_ratios(norms: Mapping[str, float], reference: str | float | None = None) -> dict[str, float]:
    """Each norm divided by a reference: a term name, a number, or (None) the mean of the norms.

    Logged as `gradnorm_ratio/<term>`; 1 means the term pulls on the trunk as hard as the reference.
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


def _distributed_mean(x: Tensor) -> Tensor:
    """Average over data-parallel ranks so that every rank keeps identical balancer state."""
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


class StaticBalancer(nn.Module):
    def __init__(self, terms: Sequence[str], weights: Mapping[str, float] | None = None):
        super().__init__()
        self.terms = _check_terms(terms)
        self.register_buffer("weights", torch.tensor(_base_weights(self.terms, weights)))

    def forward(self, losses: Mapping[str, Tensor], shared=None) -> tuple[Tensor, dict[str, float]]:
        values = _stack(self.terms, losses)
        w = self.weights.to(values.device)
        return (w * values).sum(), dict(zip(self.terms, w.tolist(), strict=True))


class EMABalancer(nn.Module):
    """w_t = base_t / (avg_t / (1 - decay^n) + eps): the EMA of the detached loss, bias-corrected,
    so the first step already divides by the loss itself (no warm-up bias towards 0)."""

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

    def forward(self, losses: Mapping[str, Tensor], shared=None) -> tuple[Tensor, dict[str, float]]:
        values = _stack(self.terms, losses)
        if self.training:
            current = _distributed_mean(values.detach()).to(self.avg.device)
            if not torch.isfinite(current).all():
                bad = [t for t, v in zip(self.terms, current.tolist(), strict=True) if not math.isfinite(v)]
                raise ValueError(f"non-finite loss for terms {bad}; refusing to update the EMA")
            self.avg.mul_(self.decay).add_((1 - self.decay) * current)
            self.steps += 1
        if self.steps == 0:  # eval before any training step: plain base weights
            w = self.base
        else:
            w = self.base / (self.avg / (1 - self.decay ** self.steps.item()) + self.eps)
        w = w.to(values.device)
        return (w * values).sum(), dict(zip(self.terms, w.tolist(), strict=True))


class UncertaintyBalancer(nn.Module):
    """Kendall et al. 2018: total = sum_t exp(-s_t) L_t + s_t, s_t = log-variance (learned).

    `log_vars` is an nn.Parameter: it must reach the optimizer (keep the balancer inside the
    model the engine wraps, or add its parameters to the optimizer). Logged weight: exp(-s_t).
    """

    def __init__(self, terms: Sequence[str], init_log_var: float = 0.0):
        super().__init__()
        self.terms = _check_terms(terms)
        self.log_vars = nn.Parameter(torch.full((len(self.terms),), float(init_log_var)))

    def forward(self, losses: Mapping[str, Tensor], shared=None) -> tuple[Tensor, dict[str, float]]:
        values = _stack(self.terms, losses)
        s = self.log_vars.float().to(values.device)
        total = (torch.exp(-s) * values + s).sum()
        return total, dict(zip(self.terms, torch.exp(-s.detach()).tolist(), strict=True))


class GradNormBalancer(nn.Module):
    """GradNorm (Chen et al. 2018) with weights w = T * softmax(log_w): positive, summing to the
    number of terms T.

    Each training step: g_t = ||dL_t/d shared|| (w_t is a scalar, so the weighted norm is
    G_t = w_t g_t), r_t = (L_t/L_t(0)) / mean_t(L/L(0)), target_t = mean(G) * r_t^alpha. Then
        log_w_t -= lr * (log G_t - log target_t)
    i.e. w_t <- w_t * (target_t / G_t)^lr, renormalised: one gradient step on
    1/2 sum_t (log G_t - log target_t)^2 with the target held constant, the paper's L_grad taken in
    log space so that it does not care that norms differ by orders of magnitude. lr in (0, 1]
    (1 jumps to the target at once; smaller values average the per-batch noise). Larger alpha
    pulls harder towards equal training rates. The returned total uses the weights before the
    update, detached: the model is trained on sum_t w_t L_t and log_w is a buffer, not a parameter.
    """

    def __init__(self, terms: Sequence[str], alpha: float = 1.5, lr: float = 0.1):
        super().__init__()
        if not 0.0 < lr <= 1.0:
            raise ValueError(f"gradnorm lr must be in (0, 1], got {lr}")
        self.terms = _check_terms(terms)
        self.alpha, self.lr = alpha, lr
        self.register_buffer("log_w", torch.zeros(len(self.terms)))
        self.register_buffer("initial", torch.zeros(len(self.terms)))  # L_t at the first step
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.last_grad_norms: dict[str, float] = {}  # G_t = w_t g_t of the last step, for logging

    def weights(self) -> Tensor:
        return len(self.terms) * torch.softmax(self.log_w, 0)

    def forward(self, losses: Mapping[str, Tensor], shared: Tensor | Sequence[Tensor] | None = None
                ) -> tuple[Tensor, dict[str, float]]:
        values = _stack(self.terms, losses)
        w = self.weights()
        total = (w.to(values.device) * values).sum()
        logged = dict(zip(self.terms, w.tolist(), strict=True))
        if not self.training:
            return total, logged
        if shared is None:
            raise ValueError("gradnorm needs `shared` (trunk activation or parameters) in training")
        shared = _as_list(shared)
        g = torch.stack([_grad_norm(losses[t], shared) for t in self.terms]).to(self.log_w.device)
        current = values.detach().to(self.log_w.device)
        g, current = _distributed_mean(torch.stack([g, current])).unbind(0)
        if self.steps == 0:
            self.initial.copy_(current.clamp_min(1e-12))
        self.steps += 1
        norms = w * g
        rate = current / self.initial
        live = (norms > 0) & torch.isfinite(norms) & torch.isfinite(rate)  # terms that reach `shared`
        if live.any():
            rate = rate / rate[live].mean()
            target = norms[live].mean() * rate.clamp_min(1e-12) ** self.alpha
            step = norms.clamp_min(1e-30).log() - target.clamp_min(1e-30).log()
            self.log_w -= self.lr * torch.where(live, step, 0.0)
        self.last_grad_norms = dict(zip(self.terms, norms.tolist(), strict=True))
        return total, logged


def build_balancer(strategy: str, terms: Sequence[str], **opts) -> nn.Module:
    """One of STRATEGIES over `terms`; `opts` go to the balancer (e.g. weights, decay, alpha, lr)."""
    classes = {"static": StaticBalancer, "ema": EMABalancer,
               "uncertainty": UncertaintyBalancer, "gradnorm": GradNormBalancer}
    if strategy not in classes:
        raise ValueError(f"unknown balancing strategy {strategy!r}; expected one of {STRATEGIES}")
    try:
        return classes[strategy](terms, **opts)
    except TypeError as e:
        raise TypeError(f"bad options for the {strategy!r} balancer: {e}") from None
