"""Teacher feature standardisation from statistics gathered at collection time.

- `zscore`: per dimension, (x - mean) / std.
- `phis` (PHI-S, Ranzinger et al. 2024): y = R U^T (x - mean) / sqrt(mean(eigvals)), with U the
  covariance eigenvectors and R an orthogonal matrix that spreads the variance evenly, so every
  output dimension has variance exactly 1 while the geometry is kept up to one scalar. R is the
  normalised Sylvester-Hadamard matrix when D is a power of two (as in the paper); for any other D
  it is a deterministic product of D-1 Givens rotations that equalises the diagonal exactly (the
  Schur-Horn construction), so the output keeps the teacher's D (no padding).

The statistics come from `data.featurestats.FeatureStatsAccumulator`, run at collection time and stored beside
the shards; `standardizers` reads them back and `standardize_batch` applies them to a batch, in fp32, before
the engine (training) or the student (evaluation): a data transform, so it lives here, beside the statistics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from data.shards import ShardError, sha256_file

MODES = ("zscore", "phis")


def hadamard(n: int) -> Tensor:
    """Normalised Sylvester-Hadamard matrix (orthogonal, entries +-1/sqrt(n)); n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester-Hadamard needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def equalizing_rotation(eigvals: Tensor) -> Tensor:
    """Orthogonal R [D, D] with diag(R diag(eigvals) R^T) = mean(eigvals) in every entry.

    Greedy Givens rotations: pair the open index with the largest diagonal value with the one with
    the smallest (they straddle the mean, since the open values average to it), and rotate in
    their plane so that the first becomes exactly the mean; it is then closed. D-1 steps.
    """
    lam = eigvals.detach().double().cpu().numpy()
    n = lam.shape[0]
    target = lam.mean()
    m = np.diag(lam)
    r = np.eye(n)
    open_ = np.ones(n, dtype=bool)
    for _ in range(n - 1):
        d = np.where(open_, np.diag(m), np.nan)
        i, j = int(np.nanargmax(d)), int(np.nanargmin(d))
        if d[i] - d[j] <= 1e-13 * max(abs(target), 1e-300):
            break
        a, b, c = m[i, i], m[j, j], m[i, j]
        # Rotating rows (i, j) by angle phi/2 gives new m_ii = (a+b)/2 + rad*cos(phi + psi).
        rad, psi = np.hypot((a - b) / 2, c), np.arctan2(c, (a - b) / 2)
        phi = np.arccos(np.clip((target - (a + b) / 2) / rad, -1.0, 1.0)) - psi
        cs, sn = np.cos(phi / 2), np.sin(phi / 2)
        g = np.array([[cs, -sn], [sn, cs]])
        m[[i, j], :] = g @ m[[i, j], :]
        m[:, [i, j]] = m[:, [i, j]] @ g.T
        r[[i, j], :] = g @ r[[i, j], :]
        open_[i] = False
    return torch.from_numpy(r)


def phis_rotation(eigvals: Tensor) -> Tensor:
    """The R of PHI-S: Hadamard for power-of-two D, else the exact equalising rotation."""
    n = eigvals.shape[0]
    return hadamard(n) if n & (n - 1) == 0 else equalizing_rotation(eigvals)


class FeatureStandardizer(nn.Module):
    """y = rotation @ (x - mean) / scale, computed in float32 over the last dim.

    zscore: no rotation, `scale` is the per-dim std [D]. phis: `rotation` [D, D], scalar `scale`.
    """

    def __init__(self, mean: Tensor, scale: Tensor, rotation: Tensor | None = None, mode: str = "zscore"):
        super().__init__()
        mode = getattr(mode, "value", mode)  # the config's Standardize enum -> its name
        if mode not in MODES:
            raise ValueError(f"unknown standardisation mode {mode!r}; expected one of {MODES}")
        self.mode = mode
        self.register_buffer("mean", mean.detach().float().clone())
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("rotation", None if rotation is None else rotation.detach().float().clone())

    @classmethod
    def from_stats(cls, mean: Tensor, *, cov: Tensor | None = None, eigvals: Tensor | None = None,
                   eigvecs: Tensor | None = None, std: Tensor | None = None, mode: str = "phis",
                   eps: float = 1e-6) -> FeatureStandardizer:
        """Build from collection statistics.

        zscore needs `std` or `cov` (its diagonal). phis needs `cov` or `eigvals` + `eigvecs`
        (eigenvectors as columns, as torch.linalg.eigh returns them). `eps` floors std values.
        """
        mean = torch.as_tensor(mean, dtype=torch.float64).flatten()
        dim = mean.shape[0]
        if mode == "zscore":
            if std is None:
                if cov is None:
                    raise ValueError("zscore standardisation needs std or cov")
                std = torch.as_tensor(cov, dtype=torch.float64).diagonal().clamp_min(0).sqrt()
            std = torch.as_tensor(std, dtype=torch.float64).flatten()
            if std.shape != (dim,):
                raise ValueError(f"std has shape {tuple(std.shape)}, expected ({dim},)")
            return cls(mean, std.clamp_min(eps), None, "zscore")
        if mode != "phis":
            raise ValueError(f"unknown standardisation mode {mode!r}; expected one of {MODES}")
        if eigvals is None or eigvecs is None:
            if cov is None:
                raise ValueError("phis standardisation needs cov, or eigvals and eigvecs")
            cov = torch.as_tensor(cov, dtype=torch.float64)
            if cov.shape != (dim, dim):
                raise ValueError(f"cov has shape {tuple(cov.shape)}, expected ({dim}, {dim})")
            eigvals, eigvecs = torch.linalg.eigh((cov + cov.T) / 2)
        eigvals = torch.as_tensor(eigvals, dtype=torch.float64).clamp_min(0)
        eigvecs = torch.as_tensor(eigvecs, dtype=torch.float64)
        if eigvals.shape != (dim,) or eigvecs.shape != (dim, dim):
            raise ValueError(f"eigvals {tuple(eigvals.shape)} / eigvecs {tuple(eigvecs.shape)} do not "
                             f"match feature dim {dim}")
        variance = eigvals.mean()
        if variance <= eps**2:
            raise ValueError(f"features have (near) zero variance ({variance.item():.3g}): "
                             "cannot standardise")
        rotation = phis_rotation(eigvals) @ eigvecs.T
        return cls(mean, variance.sqrt(), rotation, "phis")

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.mean.shape[0]:
            raise ValueError(f"features have dim {x.shape[-1]}, the standardiser expects "
                             f"{self.mean.shape[0]}")
        y = x.float() - self.mean
        if self.rotation is not None:
            y = y @ self.rotation.T
        return y / self.scale

    def extra_repr(self) -> str:
        return f"mode={self.mode}, dim={self.mean.shape[0]}"


def standardizers(manifest: dict, folder: str | Path, mode: str) -> dict[str, FeatureStandardizer]:
    """Summary and patch standardisers of one vision teacher, from the stats its collection stored.

    They run on the batch in fp32 before the engine (a data transform), so bf16 training does not
    round the PHI-S rotation.
    """
    path = Path(folder) / manifest["feature_stats"]["file"]
    if not path.exists() or sha256_file(path) != manifest["feature_stats"]["sha256"]:
        raise ShardError(f"{path}: feature statistics missing or not matching the manifest's sha256; "
                         "re-run `mmtp collect`")
    stats = load_file(str(path))
    out = {}
    for part in ("summary", "features"):
        mean = stats[f"{part}_mean"].double()
        extra = {"cov": stats[f"{part}_cov"].double()} if mode == "phis" else {"std": stats[f"{part}_std"].double()}
        out[part] = FeatureStandardizer.from_stats(mean, mode=mode, **extra)
    return out


def standardize_batch(batch: dict, stds: dict[str, dict[str, FeatureStandardizer]]) -> dict:
    """Replace each vision teacher's raw features in `batch` by standardised ones."""
    with torch.no_grad():
        batch["vision"] = {name: {part: stds[name][part](x) for part, x in parts.items()}
                           for name, parts in batch["vision"].items() if name in stds}
    return batch
