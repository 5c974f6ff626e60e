"""CogViT-style multimodal multi-token-prediction (MMTP) student for distillation.

Sequence layout: [merged image tokens (N_img) | caption tokens (T)], S = N_img + T. Positions below are
sequence positions; `input_ids[:, t]` sits at position N_img + t.
"""

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_cogvit_mtp import CogViTMTPConfig
from .decoder import IGNORE_INDEX, Decoder, KVCache, MTPModule, shift_labels, shift_left
from .generation import CogViTMTPGenerationMixin, generation_forward
from .layers import attention_mask as build_attention_mask
from .layers import rope_cos_sin
from .lora import inject_lora, load_pretrained_decoder, mark_lora_trainable, merged_state_dict
from .vision import (
    ContrastiveHead,
    PatchMerger,
    TeacherHead,
    VisionTower,
    pool_mask,
    sample_image_mask,
    summary_names,
)


@dataclass
class CogViTMTPOutput(ModelOutput):
    """Output of [`CogViTMTPForDistillation.forward`]. S = N_img + T; V = vocab size.

    Args:
        loss: `lm_loss + mtp_loss_weight * mean(mtp_losses)` when `labels` are given.
        lm_loss: next-token cross-entropy over caption targets.
        mtp_losses: one cross-entropy per MTP depth.
        logits: [B, S, V]; position i predicts the token at i + 1. `logits[:, num_image_tokens - 1 + t]`
            predicts `input_ids[:, t]`; `logits[:, num_image_tokens:]` are the caption positions, aligned with
            `input_ids` (entry t predicts `input_ids[:, t + 1]`, as a causal LM teacher's logits).
        mtp_logits: tuple of D tensors [B, S, V]; depth k (1-based) at position i predicts the token at i+1+k.
        last_hidden_state: decoder output after the final norm [B, S, d] (what `lm_head` reads).
        mtp_hidden_states: tuple of D tensors [B, S, d], each MTP module's block output (before its norm).
        head_states: with `forward(..., head_states=True)` (instead of `logits` and `mtp_logits`), the main head's
            and then each MTP depth's post-norm states, what `lm_head` would read, at the positions `logits` would
            have: D + 1 tensors [B, T or S, d] (distill/losses/chunked.py computes the loss from them in chunks).
        image_embeds: merged image tokens fed to the decoder [B, N_img, d].
        vision_hidden_states: vision tower patch tokens of the clean image [B, Ph * Pw, Dv] (row-major grid).
        vision_summary: the tower's summary tokens of the clean image [B, n, Dv], named by
            `summary_names(config)` (`image`, then one per teacher).
        teacher_outputs: `{teacher: {"summary": [B, Ds], "features": [B, Gh * Gw, Df]}}` from the adaptor heads,
            on the masked view when there is a mask (masked-image distillation), else on the clean image.
        image_mask: [B, Ph, Pw] bool, the patches replaced by the mask token in the teachers' view (None when
            no masking).
        mask: `{teacher: [B, Gh * Gw] float}`, the masked fraction of each teacher grid cell (area-pooled
            `image_mask`; None when no masking).
        image_text_embeds: `(image [B, C], caption [B, C])`, L2-normalised, from the contrastive head (only
            when `forward(..., contrastive=True)`).
        num_image_tokens: N_img.
    """

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    mtp_losses: tuple | None = None
    logits: torch.FloatTensor | None = None
    mtp_logits: tuple | None = None
    last_hidden_state: torch.FloatTensor | None = None
    mtp_hidden_states: tuple | None = None
    head_states: tuple | None = None
    image_embeds: torch.FloatTensor | None = None
    vision_hidden_states: torch.FloatTensor | None = None
    vision_summary: torch.FloatTensor | None = None
    teacher_outputs: dict | None = None
    image_mask: torch.BoolTensor | None = None
    mask: dict | None = None
    image_text_embeds: tuple | None = None
    num_image_tokens: int | None = None


def cross_entropy(logits, targets):
    """Mean CE over targets != IGNORE_INDEX (0 with a graph when there is none)."""
    valid = targets != IGNORE_INDEX
    if not valid.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid].float(), targets[valid])


class CogViTMTPForDistillation(PreTrainedModel, CogViTMTPGenerationMixin):
    config_class = CogViTMTPConfig
    config: CogViTMTPConfig
    base_model_prefix = "student"
    main_input_name = "input_ids"  # what `generate` decodes; the image comes as `pixel_values`
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _no_split_modules = ["Block"]
    _tied_weights_keys = {"lm_head.weight": "decoder.embed_tokens.weight"}

    def __init__(self, config: CogViTMTPConfig):
        super().__init__(config)
        self.vision = VisionTower(config)
        self.merger = PatchMerger(config)
        self.decoder = Decoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.mtp = nn.ModuleList(MTPModule(config) for _ in range(config.mtp_depth))
        # MMTP: at image positions an MTP module's token input is this learned <|image|> embedding.
        self.image_token_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.teacher_heads = nn.ModuleDict({
            name: TeacherHead(config.vision_hidden_size, config.adaptor_hidden_size, spec["summary_dim"],
                              spec["feature_dim"], spec["grid"])
            for name, spec in config.teachers.items()
        })
        self.contrastive = ContrastiveHead(config) if config.contrastive_dim else None
        self.post_init()
        if config.use_lora:  # after post_init, so PEFT's own init (B = 0) is kept
            inject_lora(self)
            mark_lora_trainable(self)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        model = super().from_pretrained(*args, **kwargs)
        if model.config.use_lora:  # loading re-creates the parameters, which resets requires_grad
            mark_lora_trainable(model)
        return model

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, VisionTower):
            init.normal_(module.mask_token, std=std)
            init.normal_(module.summary_tokens, std=std)
        elif isinstance(module, CogViTMTPForDistillation):
            init.normal_(module.image_token_embedding, std=std)

    def get_input_embeddings(self):
        return self.decoder.embed_tokens

    def set_input_embeddings(self, value):
        self.decoder.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    # ------------------------------------------------------------ building blocks (public)

    def encode_image(self, pixel_values, image_mask=None):
        """Vision tower + merger. Returns (vision_hidden_states [B, P, Dv], grid (Ph, Pw), image_embeds)."""
        self._check_pixels(pixel_values)
        hidden, _, grid = self.vision(pixel_values, image_mask)
        return hidden, grid, self.merger(hidden, grid)

    def mtp_token_embeddings(self, input_ids, num_image_tokens: int):
        """Token inputs of the MTP modules at every sequence position [B, N_img + T, d]: the learned
        `<|image|>` embedding at image positions, the shared token embedding at caption positions."""
        text = self.decoder.embed_tokens(input_ids)
        image = self.image_token_embedding.to(text.dtype).expand(text.shape[0], num_image_tokens, -1)
        return torch.cat([image, text], dim=1)

    def _attention_inputs(self, q_len, past_len, num_image_tokens, key_padding, device, bidirectional_image):
        head_dim = self.config.hidden_size // self.config.num_attention_heads
        positions = torch.arange(past_len, past_len + q_len, device=device)
        cos, sin = rope_cos_sin(positions, head_dim, self.config.rope_theta)
        mask = build_attention_mask(q_len, past_len, num_image_tokens, bidirectional_image, key_padding, device)
        return cos, sin, mask

    def forward_decoder(self, inputs_embeds, attention_mask=None, num_image_tokens: int = 0,
                        cache: KVCache | None = None):
        """Run the decoder blocks on `inputs_embeds` [B, q, d] placed after the `cache.length` cached
        positions. Returns (hidden [B, q, d] before the final norm, cache). `attention_mask` [B, past + q]
        marks real tokens (None = all real). Pass a fresh `KVCache(len(model.decoder.layers))` to start
        caching; `num_image_tokens` is read on the first call and stored in the cache. Use
        `logits_from_hidden(hidden)` for the next-token logits and feed `hidden` to `forward_mtp_depth(1, ...)`.
        """
        past = cache.length if cache is not None else 0
        if cache is not None and past == 0:
            cache.num_image_tokens = num_image_tokens
        n_img = cache.num_image_tokens if cache is not None else num_image_tokens
        cos, sin, mask = self._attention_inputs(inputs_embeds.shape[1], past, n_img, attention_mask,
                                                inputs_embeds.device, self.config.image_attention == "bidirectional")
        return self.decoder(inputs_embeds, cos, sin, mask, cache), cache

    def forward_mtp_depth(self, depth: int, hidden, token_embeds, attention_mask=None, cache: KVCache | None = None):
        """MTP module `depth` (1-based). `hidden` is the previous depth's output h^{depth-1} (for depth 1 the
        decoder's pre-norm output); `token_embeds` are the token inputs already aligned: at position i the
        embedding of the token at i + depth (the `<|image|>` embedding where that is an image position, see
        `mtp_token_embeddings`). Cache as in `forward_decoder`, with `KVCache(1)`. Returns (h^depth, cache)."""
        past = cache.length if cache is not None else 0
        # Always causal, also among image positions: depth k's token input at position i is the token at
        # i + k, so a bidirectional image prefix would let the last image positions see caption targets.
        cos, sin, mask = self._attention_inputs(hidden.shape[1], past, 0, attention_mask, hidden.device, False)
        return self.mtp[depth - 1](hidden, token_embeds, cos, sin, mask, cache), cache

    def logits_from_hidden(self, hidden, depth: int = 0):
        """Logits from a pre-norm hidden state: depth 0 = main head, depth k = MTP depth k."""
        norm = self.decoder.norm if depth == 0 else self.mtp[depth - 1].norm
        return self.lm_head(norm(hidden))

    # ------------------------------------------------------------ forward

    def image_features(self, pixel_values):
        """Pooled features of the clean image [B, (n + 1) * Dv], for probes and retrieval: the mean patch
        token, then each summary token (`summary_names(config)` order)."""
        self._check_pixels(pixel_values)
        patches, summary, _ = self.vision(pixel_values)
        return torch.cat([patches.mean(1), summary.flatten(1)], dim=-1)

    def caption_embedding(self, input_ids, attention_mask=None):
        """The caption alone through the decoder (no image tokens), final-normed and mean-pooled over its
        tokens [B, d]: the text side of the contrastive head."""
        mask = None if attention_mask is None else attention_mask.bool()
        hidden, _ = self.forward_decoder(self.decoder.embed_tokens(input_ids), mask)
        hidden = self.decoder.norm(hidden)
        if attention_mask is None:
            return hidden.mean(1)
        m = attention_mask[..., None].to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1)

    @generation_forward
    def forward(self, pixel_values, input_ids=None, attention_mask=None, labels=None, image_mask=None,
                return_dict: bool = True, text_logits_only: bool = False, branch_hook=None, language: bool = True,
                contrastive: bool = False, head_states: bool = False, teacher_heads: bool = True):
        """pixel_values [B, C, H, W] (H, W multiples of patch_size * spatial_merge_size); input_ids [B, T]
        caption tokens (None: the vision part only, no decoder); attention_mask [B, T] (1 = token, right
        padding only); labels [B, T] caption-aligned targets (usually `input_ids`; IGNORE_INDEX = -100
        ignored; padding is ignored anyway); image_mask [B, Ph, Pw] bool patches that the teacher heads' view
        replaces by the mask token. Without `image_mask`, a random one with `config.mask_ratio` is drawn in
        training mode when there are teacher heads.

        The language path (merger, decoder, MTP) always reads the clean image; only the teacher heads read
        the masked view (masked-image distillation). With a mask both views pass the tower as one batch.

        `text_logits_only` computes `logits` and `mtp_logits` at the caption positions only ([B, T, V], entry
        t aligned with `input_ids[:, t]`); with a large vocab the output head dominates training cost, and
        distillation needs no logits at image positions. `branch_hook(term, tensor) -> tensor`, when given,
        is applied to the tower's output where each consumer reads it (`"language"` before the merger, a
        teacher's name before its head, `"contrastive"` before the contrastive head), so a trainer can
        measure what each loss pulls on the shared tower. `language=False` skips the decoder's image-text
        pass (a vision-only or contrastive-only step); `contrastive=True` (needs `input_ids` and a model with
        `contrastive_dim > 0`) returns `image_text_embeds` from the clean image's `image` summary token and
        the caption alone. `head_states` skips `lm_head`: `head_states` replaces `logits` and `mtp_logits` (the
        vocabulary-sized tensors) with the states the head would read. Returns a `CogViTMTPOutput`."""
        if text_logits_only and labels is not None:
            raise ValueError("text_logits_only drops the logits that predict the first caption token; "
                             "compute the loss from the returned logits instead of passing labels")
        if head_states and labels is not None:
            raise ValueError("head_states computes no logits, so no loss from labels; compute it from the states")
        batch = pixel_values.shape[0]
        if contrastive and (self.contrastive is None or input_ids is None):
            raise ValueError("contrastive=True needs input_ids and a model built with contrastive_dim > 0")
        language = language and input_ids is not None
        if input_ids is not None:
            self._check_text(input_ids, attention_mask, batch)
        self._check_pixels(pixel_values)
        p = self.config.patch_size
        grid = (pixel_values.shape[-2] // p, pixel_values.shape[-1] // p)
        heads = self.teacher_heads if teacher_heads else {}
        if not heads:
            image_mask = None
        elif image_mask is None and self.training and self.config.mask_ratio > 0:
            image_mask = sample_image_mask(batch, *grid, self.config.mask_ratio, pixel_values.device)
        if image_mask is not None and tuple(image_mask.shape) != (batch, *grid):
            raise ValueError(f"image_mask has shape {tuple(image_mask.shape)}, expected {(batch, *grid)} "
                             "(batch, patch rows, patch cols)")
        tap = branch_hook or (lambda term, x: x)

        if image_mask is None:
            patches, summary, grid = self.vision(pixel_values)
            masked_patches, masked_summary = patches, summary
        elif not (language or contrastive):
            masked_patches, masked_summary, grid = self.vision(pixel_values, image_mask.bool())
            patches = summary = None
        else:
            views = torch.cat([torch.zeros_like(image_mask, dtype=torch.bool), image_mask.bool()])
            both, both_summary, grid = self.vision(torch.cat([pixel_values, pixel_values]), views)
            patches, masked_patches = both[:batch], both[batch:]
            summary, masked_summary = both_summary[:batch], both_summary[batch:]
        names = summary_names(self.config)
        teacher_outputs = {name: head(tap(name, masked_summary[:, names.index(name)]), tap(name, masked_patches), grid)
                           for name, head in heads.items()}
        mask = None
        if image_mask is not None:
            mask = {name: pool_mask(image_mask.bool(), head.grid) for name, head in heads.items()}
        text = {} if not language else self._language(
            tap("language", patches), grid, input_ids, attention_mask, labels, text_logits_only, head_states)
        if contrastive:
            image_summary = tap("contrastive", summary[:, names.index("image")])
            caption = self.caption_embedding(input_ids, attention_mask)
            text["image_text_embeds"] = self.contrastive(image_summary, caption)
        out = CogViTMTPOutput(vision_hidden_states=patches, vision_summary=summary, teacher_outputs=teacher_outputs,
                              image_mask=image_mask, mask=mask, **text)
        return out if return_dict else out.to_tuple()

    def _language(self, patches, grid, input_ids, attention_mask, labels, text_logits_only, head_states=False) -> dict:
        """The decoder and MTP part of `forward`: its `CogViTMTPOutput` fields."""
        batch = input_ids.shape[0]
        image_embeds = self.merger(patches, grid)
        n_img = image_embeds.shape[1]
        if n_img + input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {n_img} image + {input_ids.shape[1]} text tokens exceeds "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        text_embeds = self.decoder.embed_tokens(input_ids)
        embeds = torch.cat([image_embeds.to(text_embeds.dtype), text_embeds], dim=1)
        key_padding = None
        if attention_mask is not None:
            key_padding = torch.cat([attention_mask.new_ones(batch, n_img), attention_mask], dim=1).bool()

        hidden, _ = self.forward_decoder(embeds, key_padding, n_img)
        last_hidden = self.decoder.norm(hidden)
        first = n_img if text_logits_only else 0
        states = [last_hidden[:, first:]]

        mtp_hidden = []
        if self.config.mtp_depth > 0:
            token_inputs = self.mtp_token_embeddings(input_ids, n_img)
            h = hidden
            for k in range(1, self.config.mtp_depth + 1):
                h, _ = self.forward_mtp_depth(k, h, shift_left(token_inputs, k), key_padding)
                mtp_hidden.append(h)
                states.append(self.mtp[k - 1].norm(h[:, first:]))  # what logits_from_hidden(h, k) feeds lm_head
        if head_states:
            heads = {"head_states": tuple(states)}
        else:
            logits, *mtp_logits = [self.lm_head(s) for s in states]
            heads = {"logits": logits, "mtp_logits": tuple(mtp_logits)}

        out = {**heads, "last_hidden_state": last_hidden,
               "mtp_hidden_states": tuple(mtp_hidden), "image_embeds": image_embeds, "num_image_tokens": n_img}
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
            out["lm_loss"] = cross_entropy(logits, shift_labels(labels, n_img, 1, attention_mask))
            out["mtp_losses"] = tuple(cross_entropy(lg, shift_labels(labels, n_img, 1 + k, attention_mask))
                                      for k, lg in enumerate(mtp_logits, start=1))
            out["loss"] = out["lm_loss"]
            if out["mtp_losses"]:
                out["loss"] = out["lm_loss"] + self.config.mtp_loss_weight * torch.stack(out["mtp_losses"]).mean()
        return out

    # ------------------------------------------------------------ export

    def merge_and_unload(self) -> "CogViTMTPForDistillation":
        """A plain copy of this model with the LoRA deltas merged into the decoder weights
        (`config.use_lora=False`); this model is left unchanged."""
        if not self.config.use_lora:
            raise ValueError("merge_and_unload: this model has no LoRA (config.use_lora is False)")
        config = copy.deepcopy(self.config)
        config.use_lora = False
        plain = type(self)(config)
        plain.load_state_dict(merged_state_dict(self), strict=True)
        return plain.to(device=self.device, dtype=self.dtype)

    # ------------------------------------------------------------ input checks

    def _check_pixels(self, pixel_values):
        c = self.config
        if pixel_values.dim() != 4 or pixel_values.shape[1] != c.num_channels:
            raise ValueError(f"pixel_values must be [B, {c.num_channels}, H, W], got {tuple(pixel_values.shape)}")
        side = c.patch_size * c.spatial_merge_size
        h, w = pixel_values.shape[-2:]
        if h % side or w % side or h == 0 or w == 0:
            raise ValueError(f"image size {h}x{w} is not a positive multiple of patch_size * spatial_merge_size "
                             f"= {side}; resize or pad the images")

    def _check_text(self, input_ids, attention_mask, batch):
        if input_ids.dim() != 2 or input_ids.shape[0] != batch or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B={batch}, T>0], got {tuple(input_ids.shape)}")
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= self.config.vocab_size:
            raise ValueError(f"input_ids hold {lo if lo < 0 else hi}, outside the vocab [0, {self.config.vocab_size})")
        if attention_mask is not None:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                                 f"{tuple(input_ids.shape)}")
            m = attention_mask.long()
            if bool((m[:, 1:] > m[:, :-1]).any()):
                raise ValueError("attention_mask must use right padding (1s then 0s per row)")


def build_student(config: CogViTMTPConfig) -> CogViTMTPForDistillation:
    """A fresh student for training: the model, with the decoder loaded from `config.decoder_init_path` when
    set (into the LoRA base weights when `config.use_lora`). Use `from_pretrained` to resume a saved one."""
    model = CogViTMTPForDistillation(config)
    if config.decoder_init_path:
        load_pretrained_decoder(model, config.decoder_init_path)
    return model
