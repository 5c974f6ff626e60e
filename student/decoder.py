"""Llama-style decoder, DeepSeek-V3-style MTP modules, the KV cache (dynamic or preallocated) and the MTP label
helpers."""

from dataclasses import dataclass, field

import torch
from torch import nn

from .layers import Block, RMSNorm

IGNORE_INDEX = -100


class StaticLayer:
    """Preallocated keys and values of one layer, [B, H_kv, max_length, head_dim]; the first `length` positions
    are valid. `update` writes new positions in place (no growing concatenation); `KVCache.crop` only moves
    `length` back. The buffers are allocated on the first update (batch, heads, dtype and device come from it)."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.length = 0
        self.keys = self.values = None

    def update(self, k, v):
        """Append k, v [B, H_kv, q, head_dim]; returns the keys and values of every cached position (views)."""
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise ValueError(f"static KV cache of {self.max_length} positions is full (needs {end})")
        if self.keys is None:
            self.keys = k.new_empty(*k.shape[:2], self.max_length, k.shape[3])
            self.values = v.new_empty(*v.shape[:2], self.max_length, v.shape[3])
        self.keys[:, :, self.length:end] = k
        self.values[:, :, self.length:end] = v
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


@dataclass
class KVCache:
    """The KV cache of one stack (the decoder, or one MTP module, whose cache has a single layer).

    Dynamic (default): `layers[i]` is None until layer i has seen a token, then a `(key, value)` pair of shape
    [B, H_kv, S_cached, head_dim] that grows by concatenation. Static (`max_length` given): `layers[i]` is a
    `StaticLayer` with preallocated buffers for `max_length` positions, written in place (what greedy and
    speculative decoding use). `num_image_tokens` records how many cached positions are image tokens (they
    decide the image-attention rule). `crop(n)` drops everything after the first n positions, e.g. to roll
    back rejected draft tokens in speculative decoding.
    """

    num_layers: int
    num_image_tokens: int = 0
    layers: list = field(default_factory=list)
    max_length: int | None = None

    def __post_init__(self):
        if not self.layers:
            self.layers = [None if self.max_length is None else StaticLayer(self.max_length)
                           for _ in range(self.num_layers)]

    @property
    def length(self) -> int:
        first = self.layers[0]
        if isinstance(first, StaticLayer):
            return first.length
        return 0 if first is None else first[0].shape[2]

    def crop(self, n: int) -> None:
        for i, kv in enumerate(self.layers):
            if isinstance(kv, StaticLayer):
                kv.length = min(kv.length, n)
            elif kv is not None:
                self.layers[i] = (kv[0][:, :, :n], kv[1][:, :, :n])

    def move(self, src: int, dst: int) -> None:
        """Copy position `src`'s keys and values to position `dst` in every (static) layer: tree verification
        keeps an accepted sibling's entries at the position of the path it extends."""
        for kv in self.layers:
            kv.keys[:, :, dst] = kv.keys[:, :, src]
            kv.values[:, :, dst] = kv.values[:, :, src]

    def store(self, i: int, present) -> None:
        """Keep layer i's `(key, value)` after a forward (a static layer has already written itself)."""
        if not isinstance(self.layers[i], StaticLayer):
            self.layers[i] = present


class Decoder(nn.Module):
    """Token embedding + Llama blocks + final RMSNorm. Names match transformers' `LlamaModel`."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Block(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                  num_kv_heads=config.num_key_value_heads, eps=config.rms_norm_eps)
            for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, attn_mask, cache: KVCache | None = None):
        """x: input embeddings [B, S, d]. Returns the last block's output (before `norm`)."""
        for i, layer in enumerate(self.layers):
            past = cache.layers[i] if cache is not None else None
            x, present = layer(x, cos=cos, sin=sin, attn_mask=attn_mask, past_key_values=past)
            if cache is not None:
                cache.store(i, present)
        return x


class MTPModule(nn.Module):
    """One MTP depth k: h^k = Block(Linear([RMSNorm(h^{k-1}_i) ; RMSNorm(Emb(token_{i+k}))])).

    `norm` is this depth's output norm; the output head (and the embedding) are the decoder's, shared.
    """

    def __init__(self, config):
        super().__init__()
        d = config.hidden_size
        self.hidden_norm = RMSNorm(d, config.rms_norm_eps)
        self.token_norm = RMSNorm(d, config.rms_norm_eps)
        self.proj = nn.Linear(2 * d, d, bias=False)
        self.block = Block(d, config.num_attention_heads, config.intermediate_size,
                           num_kv_heads=config.num_key_value_heads, eps=config.rms_norm_eps)
        self.norm = RMSNorm(d, config.rms_norm_eps)

    def forward(self, hidden, token_embeds, cos, sin, attn_mask, cache: KVCache | None = None):
        x = self.proj(torch.cat([self.hidden_norm(hidden), self.token_norm(token_embeds)], dim=-1))
        x, present = self.block(x, cos=cos, sin=sin, attn_mask=attn_mask,
                                past_key_values=cache.layers[0] if cache is not None else None)
        if cache is not None:
            cache.store(0, present)
        return x


def shift_left(x, k: int, fill=0):
    """Position i of the result holds x[:, i + k]; the last k positions hold `fill`."""
    if k == 0:
        return x
    pad = torch.full_like(x[:, :k], fill)
    return torch.cat([x[:, k:], pad], dim=1) if k < x.shape[1] else torch.full_like(x, fill)


def full_sequence_labels(labels, num_image_tokens: int, attention_mask=None):
    """Caption-aligned labels [B, T] -> labels over the whole sequence [B, N_img + T]: image positions and
    padded positions (attention_mask == 0) become IGNORE_INDEX."""
    labels = labels.long()
    if attention_mask is not None:
        labels = labels.masked_fill(attention_mask == 0, IGNORE_INDEX)
    image = labels.new_full((labels.shape[0], num_image_tokens), IGNORE_INDEX)
    return torch.cat([image, labels], dim=1)


def shift_labels(labels, num_image_tokens: int, offset: int, attention_mask=None):
    """Targets [B, N_img + T] for a head that predicts `offset` tokens ahead: entry i is the token at
    sequence position i + offset, or IGNORE_INDEX when that position is an image token, padding, or past
    the end. `labels` are caption-aligned ([B, T], usually `input_ids`, IGNORE_INDEX allowed)."""
    full = full_sequence_labels(labels, num_image_tokens, attention_mask)
    return shift_left(full, offset, IGNORE_INDEX)


def mtp_labels(labels, num_image_tokens: int, depth: int, attention_mask=None):
    """Per-depth MTP targets: a tuple of `depth` tensors [B, N_img + T]; element k-1 (depth k) holds at
    position i the token at i + 1 + k. Targets on image positions are IGNORE_INDEX (the MMTP rule)."""
    return tuple(shift_labels(labels, num_image_tokens, 1 + k, attention_mask) for k in range(1, depth + 1))
