"""Building blocks shared by the vision tower, the decoder and the MTP modules.

Module names follow transformers' Llama (`self_attn.q_proj`, `mlp.gate_proj`, `input_layernorm`, ...) so that
a pretrained Llama-family decoder loads by a prefix rename and PEFT targets the usual projection names.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ---------------------------------------------------------------- rotary embeddings


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float):
    """cos/sin of shape [*positions.shape, dim] for the rotate-half RoPE convention (as in Llama)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=positions.device).float() / dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """1D RoPE. x: [B, H, S, D]; cos/sin: [S, D] or [B, S, D]."""
    if cos.dim() == 3:
        cos, sin = cos[:, None], sin[:, None]
    return (x * cos + rotate_half(x) * sin).to(x.dtype)


def rope_2d_cos_sin(grid_h: int, grid_w: int, head_dim: int, theta: float, device=None):
    """cos/sin [grid_h * grid_w, head_dim] for patches in row-major order: the first half of each head is
    rotated by the patch row, the second half by the patch column."""
    rows = torch.arange(grid_h, device=device).repeat_interleave(grid_w)
    cols = torch.arange(grid_w, device=device).repeat(grid_h)
    cos_r, sin_r = rope_cos_sin(rows, head_dim // 2, theta)
    cos_c, sin_c = rope_cos_sin(cols, head_dim // 2, theta)
    return torch.cat([cos_r, cos_c], dim=-1), torch.cat([sin_r, sin_c], dim=-1)


def apply_rope_2d(x, cos, sin):
    """2D RoPE: rotate each half of the head dim separately (rows, then columns). Scores q.k then depend
    only on the (row, col) offset between two patches."""
    half = x.shape[-1] // 2
    cos_r, cos_c = cos[..., :half], cos[..., half:]
    sin_r, sin_c = sin[..., :half], sin[..., half:]
    return torch.cat([apply_rope(x[..., :half], cos_r, sin_r), apply_rope(x[..., half:], cos_c, sin_c)], dim=-1)


# ---------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head attention with optional GQA, optional QK-norm and 1D or 2D RoPE.

    `past_key_value` is a `(k, v)` pair of earlier positions ([B, H_kv, S_past, D]) or a preallocated
    `decoder.StaticLayer` (written in place); the call returns the output and the `(k, v)` of every position
    so callers can keep a KV cache.
    """

    def __init__(self, dim, num_heads, num_kv_heads=None, qk_norm=False, rope_2d=False, eps=1e-5):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads or num_heads
        self.head_dim = dim // num_heads
        self.rope_2d = rope_2d
        self.q_proj = nn.Linear(dim, num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * self.head_dim, dim, bias=False)
        # QK-norm: RMSNorm over each head's q and k vectors (keeps attention logits bounded).
        self.q_norm = RMSNorm(self.head_dim, eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, eps) if qk_norm else None

    def forward(self, x, cos, sin, attn_mask=None, past_key_value=None):
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        rope = apply_rope_2d if self.rope_2d else apply_rope
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if isinstance(past_key_value, tuple):
            k = torch.cat([past_key_value[0], k], dim=2)
            v = torch.cat([past_key_value[1], v], dim=2)
        elif past_key_value is not None:  # a preallocated cache layer (decoder.StaticLayer) writes in place
            k, v = past_key_value.update(k, v)
        present = (k, v)
        if self.num_kv_heads != self.num_heads:  # GQA: query head h uses kv head h // n_rep
            n_rep = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1)), present


class Block(GradientCheckpointingLayer):
    """Pre-norm transformer block: x + Attn(RMSNorm(x)), then x + SwiGLU(RMSNorm(x))."""

    def __init__(self, dim, num_heads, intermediate_size, num_kv_heads=None, qk_norm=False, rope_2d=False,
                 eps=1e-5):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, eps)
        self.self_attn = Attention(dim, num_heads, num_kv_heads, qk_norm, rope_2d, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.mlp = SwiGLU(dim, intermediate_size)

    def forward(self, x, cos=None, sin=None, attn_mask=None, past_key_values=None):
        # `past_key_values` (this layer's (k, v)) keeps transformers' name: under gradient checkpointing in
        # training the checkpoint wrapper drops it, as a cache is useless there.
        h, present = self.self_attn(self.input_layernorm(x), cos, sin, attn_mask, past_key_values)
        x = x + h
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


def attention_mask(q_len, past_len, num_image_tokens, bidirectional_image, key_padding=None, device=None):
    """Boolean mask [B|1, 1, q_len, past_len + q_len], True = may attend.

    Causal over the whole sequence; with `bidirectional_image` the first `num_image_tokens` positions also
    see each other. `key_padding` [B, past_len + q_len] (True = real token) hides padded keys.
    """
    q_pos = torch.arange(past_len, past_len + q_len, device=device)[:, None]
    k_pos = torch.arange(past_len + q_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if bidirectional_image and num_image_tokens > 0:
        allowed = allowed | ((q_pos < num_image_tokens) & (k_pos < num_image_tokens))
    allowed = allowed[None, None]
    if key_padding is not None:
        allowed = allowed & key_padding.bool()[:, None, None, :]
    return allowed
