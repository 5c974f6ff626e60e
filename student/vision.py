"""CogViT-style vision tower, 2x2 patch merger and RADIO-style teacher adaptor heads."""

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Block, RMSNorm, rope_2d_cos_sin


def sample_image_mask(batch: int, grid_h: int, grid_w: int, ratio: float, device=None, generator=None):
    """Random bool mask [batch, grid_h, grid_w]: exactly round(ratio * patches) True per sample (at least one
    when ratio > 0)."""
    num_patches = grid_h * grid_w
    num_masked = max(1, round(ratio * num_patches)) if ratio > 0 else 0
    scores = torch.rand(batch, num_patches, device=device, generator=generator)
    ranks = scores.argsort(dim=1).argsort(dim=1)
    return (ranks < num_masked).view(batch, grid_h, grid_w)


class VisionTower(nn.Module):
    """Conv patch embedding -> (optional mask token) -> [summary tokens | patches] -> pre-norm blocks with
    2D RoPE and QK-norm -> RMSNorm.

    There is no absolute position table: positions enter only through the 2D rotary embedding, so any
    resolution and aspect ratio works. The learned summary (CLS-like) tokens, one per name in
    `summary_names(config)` as RADIO has one per teacher, sit before the patches and are not rotated.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        dim = config.vision_hidden_size
        self.patch_embed = nn.Conv2d(config.num_channels, dim, config.patch_size, stride=config.patch_size)
        self.mask_token = nn.Parameter(torch.zeros(dim))
        self.summary_tokens = nn.Parameter(torch.zeros(len(summary_names(config)), dim))
        self.layers = nn.ModuleList(
            Block(dim, config.vision_num_attention_heads, config.vision_intermediate_size, qk_norm=True,
                  rope_2d=True, eps=config.rms_norm_eps)
            for _ in range(config.vision_num_hidden_layers)
        )
        self.norm = RMSNorm(dim, config.rms_norm_eps)

    def forward(self, pixel_values, image_mask=None):
        """pixel_values [B, C, H, W]; image_mask [B, Ph, Pw] bool (True = replace by the mask token).
        Returns the normed patch tokens [B, Ph * Pw, D] (row-major), the normed summary tokens [B, n, D]
        and the grid (Ph, Pw)."""
        x = self.patch_embed(pixel_values)  # [B, D, Ph, Pw]
        grid_h, grid_w = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)
        if image_mask is not None:
            keep = ~image_mask.reshape(x.shape[0], -1, 1)
            x = torch.where(keep, x, self.mask_token.to(x.dtype))
        n = self.summary_tokens.shape[0]
        x = torch.cat([self.summary_tokens.to(x.dtype).expand(x.shape[0], -1, -1), x], dim=1)
        head_dim = self.config.vision_hidden_size // self.config.vision_num_attention_heads
        cos, sin = rope_2d_cos_sin(grid_h, grid_w, head_dim, self.config.vision_rope_theta, x.device)
        cos = torch.cat([cos.new_ones(n, head_dim), cos])  # summary tokens: identity rotation
        sin = torch.cat([sin.new_zeros(n, head_dim), sin])
        for layer in self.layers:
            x, _ = layer(x, cos=cos, sin=sin)
        x = self.norm(x)
        return x[:, n:], x[:, :n], (grid_h, grid_w)


def summary_names(config) -> list[str]:
    """Names of the tower's summary tokens: `image` (the student's own, for contrastive training and
    probes), then one per vision teacher in sorted order (a saved config.json sorts its keys)."""
    return ["image", *sorted(config.teachers)]


class PatchMerger(nn.Module):
    """Concatenate each s x s block of neighbouring patches (s = spatial_merge_size) and project with a
    2-layer MLP into the LM width. Merged tokens are in row-major order over the merged grid."""

    def __init__(self, config):
        super().__init__()
        self.size = config.spatial_merge_size
        self.fc1 = nn.Linear(config.vision_hidden_size * self.size**2, config.hidden_size)
        self.fc2 = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, grid):
        b, _, d = x.shape
        (gh, gw), s = grid, self.size
        x = x.view(b, gh // s, s, gw // s, s, d).permute(0, 1, 3, 2, 4, 5).reshape(b, (gh // s) * (gw // s), s * s * d)
        return self.fc2(F.gelu(self.fc1(x)))


def mlp(dim_in, hidden, dim_out):
    return nn.Sequential(nn.Linear(dim_in, hidden), nn.GELU(), nn.Linear(hidden, dim_out))


def resample_grid(tokens, grid, target):
    """Bilinear resample of patch tokens [B, Ph * Pw, D] from `grid` to `target` (h, w) -> [B, h * w, D]."""
    if tuple(grid) == tuple(target):
        return tokens
    b, _, d = tokens.shape
    x = tokens.transpose(1, 2).reshape(b, d, *grid)
    x = F.interpolate(x, size=tuple(target), mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)


def pool_mask(mask, target):
    """The masked fraction of each cell of a `target` (h, w) grid over a patch mask [B, Ph, Pw] ->
    [B, h * w] float in [0, 1]: adaptive area pooling, exact when the grids divide (a teacher cell over
    2 x 2 student patches of which one is masked gets 0.25), overlap-averaged otherwise."""
    x = mask[:, None].float()
    if tuple(mask.shape[-2:]) != tuple(target):
        x = F.adaptive_avg_pool2d(x, tuple(target))
    return x.flatten(1)


class TeacherHead(nn.Module):
    """Adaptor for one teacher (RADIO): an MLP from the teacher's own student summary token to the teacher's
    summary, and an MLP from the student patch tokens, resampled to the teacher's grid, to the teacher's
    patch features."""

    def __init__(self, dim, hidden, summary_dim, feature_dim, grid):
        super().__init__()
        self.grid = tuple(grid)
        self.summary = mlp(dim, hidden, summary_dim)
        self.features = mlp(dim, hidden, feature_dim)

    def forward(self, summary, tokens, grid):
        return {"summary": self.summary(summary), "features": self.features(resample_grid(tokens, grid, self.grid))}


class ContrastiveHead(nn.Module):
    """SigLIP-style image-text head: linear projections of the tower's `image` summary token and of the
    pooled caption into one `contrastive_dim` space (L2-normalised), with SigLIP's learned logit scale and
    bias (initialised at log 10 and -10, as in the paper)."""

    def __init__(self, config):
        super().__init__()
        self.image = nn.Linear(config.vision_hidden_size, config.contrastive_dim, bias=False)
        self.text = nn.Linear(config.hidden_size, config.contrastive_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor([2.302585]))  # 1-d: DeepSpeed cannot broadcast 0-d
        self.logit_bias = nn.Parameter(torch.tensor([-10.0]))

    def forward(self, image_summary, caption):
        return F.normalize(self.image(image_summary), dim=-1), F.normalize(self.text(caption), dim=-1)
