"""`generate()` for the student through transformers' `GenerationMixin`.

The image is given as `pixel_values`, the prompt as `input_ids` (default: one bos token per image, the way
captions start in training). `generate` first runs the vision tower and the decoder over
`[image tokens | prompt]` (the prefill), then one cached decoder step per new token, with every decoding mode
of transformers (greedy, sampling, beam search, `max_new_tokens`, `eos_token_id`, logits processors). The
KV cache is transformers' `DynamicCache`, so beam search reorders it like any other model's.

`generate(..., mtp_speculative=True)` decodes greedily with the model's own MTP modules as drafters
(`speculative.speculative_generate`; a batch runs in the same forwards, `speculative_batch`, except with tree
drafting, `config.draft_top_k` > 1, whose rows run one by one): the same tokens as greedy `generate`, fewer
decoder forwards.

Prompts in a batch must have the same length (no padding): the image tokens come first, so a left-padded
prompt would shift every position. Generate padded prompts one by one.
"""

import copy
import functools

import torch
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .decoder import KVCache
from .speculative import greedy_tokens, speculative_generate
from .speculative_batch import speculative_generate_batch


def generation_forward(forward):
    """Wraps the model's `forward`: a call with `past_key_values` (what `generate` makes) runs one cached step
    of the language path (`CogViTMTPGenerationMixin.generation_step`); any other call is the plain `forward`."""

    @functools.wraps(forward)
    def wrapper(self, *args, past_key_values=None, use_cache=None, **kwargs):
        if past_key_values is not None:
            return self.generation_step(*args, past_key_values=past_key_values, **kwargs)
        return forward(self, *args, **kwargs)

    return wrapper


class CogViTMTPGenerationMixin(GenerationMixin):
    """What `GenerationMixin` needs from the student (a cached step that returns `logits` and the cache), and
    the project's own `greedy_generate` on the student's `KVCache`, the reference of speculative decoding."""

    @torch.no_grad()
    def greedy_generate(self, pixel_values, input_ids=None, max_new_tokens: int = 32, eos_token_id=None,
                        attention_mask=None):
        """Greedy decoding with a KV cache: image + prompt -> text. Prompts in a batch must have the same
        length (no padding). Returns [B, T_prompt + n_new] (prompt then new tokens); after a sequence emits
        `eos_token_id` (default `config.eos_token_id`) it is filled with eos, and decoding stops once all are
        done."""
        batch = pixel_values.shape[0]
        if input_ids is None:
            input_ids = torch.zeros(batch, 0, dtype=torch.long, device=pixel_values.device)
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("greedy_generate: prompts must not be padded (attention_mask has zeros); "
                             "generate padded prompts one by one")
        if input_ids.shape[1] > 0:
            self._check_text(input_ids, None, batch)
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        _, _, image_embeds = self.encode_image(pixel_values)
        n_img = image_embeds.shape[1]
        if n_img + input_ids.shape[1] + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"{n_img} image + {input_ids.shape[1]} prompt + {max_new_tokens} new tokens exceed "
                             f"max_position_embeddings={self.config.max_position_embeddings}")
        text_embeds = self.decoder.embed_tokens(input_ids)
        embeds = torch.cat([image_embeds.to(text_embeds.dtype), text_embeds], dim=1)
        cache = KVCache(len(self.decoder.layers), max_length=embeds.shape[1] + max_new_tokens)  # preallocated
        hidden, cache = self.forward_decoder(embeds, num_image_tokens=n_img, cache=cache)
        finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        for step in range(max_new_tokens):
            token = greedy_tokens(self, hidden[:, -1:])  # [B, 1]: argmax of logits_from_hidden
            if eos is not None:
                token = token.masked_fill(finished[:, None], eos)
                finished |= token[:, 0] == eos
            new_tokens.append(token)
            if step == max_new_tokens - 1 or bool(finished.all()):
                break
            hidden, cache = self.forward_decoder(self.decoder.embed_tokens(token), cache=cache)
        return torch.cat([input_ids, *new_tokens], dim=1)

    def generation_step(self, pixel_values=None, input_ids=None, attention_mask=None,
                        past_key_values: Cache | None = None, return_dict: bool = True, **kwargs):
        """One decoding forward. With an empty cache (the prefill) `pixel_values` [B, C, H, W] are encoded and
        `[image tokens | input_ids]` fills the cache; afterwards `input_ids` [B, q] are the next tokens.
        Returns `CausalLMOutputWithPast`: `logits` [B, q, V] at the positions of `input_ids` (position t predicts
        the token after `input_ids[:, t]`; an empty prompt gives the last image position's logits [B, 1, V])."""
        unknown = [k for k, v in kwargs.items() if v is not None and v is not False]
        if unknown:
            raise ValueError(f"generation_step does not support {unknown}")
        cache = past_key_values
        past = cache.get_seq_length()
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("generate: prompts must not be padded (attention_mask has zeros); "
                             "generate padded prompts one by one")
        embed = self.decoder.embed_tokens
        n_img = 0
        if past == 0:
            if pixel_values is None:
                raise ValueError("generate needs the image as pixel_values")
            batch = pixel_values.shape[0]
            if input_ids is None:
                input_ids = torch.zeros(batch, 0, dtype=torch.long, device=pixel_values.device)
            if input_ids.shape[1]:
                self._check_text(input_ids, None, batch)
            _, _, image_embeds = self.encode_image(pixel_values)
            n_img = image_embeds.shape[1]
            text = embed(input_ids)
            embeds = torch.cat([image_embeds.to(text.dtype), text], dim=1)
        else:
            embeds = embed(input_ids)
        if past + embeds.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {past + embeds.shape[1]} tokens exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")
        # The decoder's own KVCache views the DynamicCache's tensors; the new keys and values go back by `update`.
        layers = [(cache.layers[i].keys, cache.layers[i].values) if past else None
                  for i in range(len(self.decoder.layers))]
        kv = KVCache(len(layers), num_image_tokens=n_img, layers=layers)
        hidden, kv = self.forward_decoder(embeds, num_image_tokens=n_img, cache=kv)
        for i, (k, v) in enumerate(kv.layers):
            cache.update(k[:, :, past:], v[:, :, past:], i)
        keep = max(input_ids.shape[1], 1)
        logits = self.logits_from_hidden(hidden[:, -keep:])
        out = CausalLMOutputWithPast(logits=logits, past_key_values=cache)
        return out if return_dict else out.to_tuple()

    def generate(self, inputs=None, pixel_values=None, mtp_speculative: bool | int = False, **kwargs):
        """`GenerationMixin.generate` with the prompt as `inputs`/`input_ids` and the image as `pixel_values`.
        `mtp_speculative=True` (or the number of MTP depths to draft with) decodes greedily with MTP
        self-speculative decoding: the tokens equal those of greedy `generate`; it needs greedy settings (no
        sampling, one beam). A batch decodes in the same forwards (rows one by one with tree drafting)."""
        input_ids = kwargs.pop("input_ids", None) if inputs is None else inputs
        if pixel_values is None:
            raise ValueError("generate needs the image as pixel_values")
        if not mtp_speculative:
            return super().generate(input_ids, pixel_values=pixel_values, **kwargs)
        depth = self.config.mtp_depth if mtp_speculative is True else int(mtp_speculative)
        return self._speculative_generate(input_ids, pixel_values, depth, **kwargs)

    @torch.no_grad()
    def _speculative_generate(self, input_ids, pixel_values, depth, generation_config=None, attention_mask=None,
                              **kwargs):
        config = copy.deepcopy(generation_config or self.generation_config)
        unused = config.update(**kwargs)
        if unused:
            raise ValueError(f"generate(mtp_speculative=...) does not support {sorted(unused)}")
        if config.do_sample or (config.num_beams or 1) != 1 or (config.num_return_sequences or 1) != 1:
            raise ValueError("mtp_speculative decodes greedily: use do_sample=False, num_beams=1 and "
                             "num_return_sequences=1")
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("generate: prompts must not be padded; generate padded prompts one by one")
        batch = pixel_values.shape[0]
        if input_ids is None:
            if config.bos_token_id is None:
                raise ValueError("generate: give input_ids or set bos_token_id")
            input_ids = torch.full((batch, 1), config.bos_token_id, dtype=torch.long, device=pixel_values.device)
        eos = config.eos_token_id
        if isinstance(eos, (list, tuple)):
            if len(eos) > 1:
                raise ValueError(f"mtp_speculative supports one eos token, got {eos}")
            eos = eos[0] if eos else None
        max_new = config.max_new_tokens
        if max_new is None:
            max_new = config.max_length - input_ids.shape[1]
        pad = config.pad_token_id if config.pad_token_id is not None else eos
        if batch > 1 and self.config.draft_top_k == 1:
            tokens, stats = speculative_generate_batch(self, pixel_values, input_ids, max_new_tokens=max_new,
                                                       eos_token_id=eos, depth=depth)
            rows = [tokens[b, :input_ids.shape[1] + s["new_tokens"]] for b, s in enumerate(stats["rows"])]
        else:  # tree drafting is batch size 1 only
            rows = [speculative_generate(self, pixel_values[i:i + 1], input_ids[i:i + 1], max_new_tokens=max_new,
                                         eos_token_id=eos, depth=depth)[0][0] for i in range(batch)]
        width = max(r.shape[0] for r in rows)
        if any(r.shape[0] < width for r in rows) and pad is None:
            raise ValueError("generate: rows of different lengths need a pad_token_id or an eos_token_id")
        return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[0]), value=pad if pad is not None else 0)
                            for r in rows])
