"""A causal LM's scoring of stored rows after a prompt: the prompt runs once (its key/value cache and its last
position's logits), then every row reads on from it. Shared by collection (teachers/language.py) and teacher
correction (teachers/adapt.py), which trains through it."""

import torch


def run_prompt(model, prompt_ids: list[int], device) -> tuple:
    """(key/value cache, float32 logits of the last position) of the prompt alone, batch 1."""
    out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
    return out.past_key_values, out.logits[0, -1].float()


def rows_after_prompt(model, cache, first: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor,
                      prefix: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 logits [B, L, V] of right-padded stored rows [bos, tokens...] read after a prompt: position 0 is
    the prompt's last position (`first`), the rest run on `cache` (batch 1, repeated here in place), with bos
    standing for the prompt. Differentiable, so teacher correction trains through it.

    `prefix` [B, T, H]: embeddings that run between the prompt and the row (a grafted teacher's image tokens,
    teachers/graft.py); position 0 is then the prefix's last position, so the first caption token sees them."""
    n, p = input_ids.shape[0], cache.get_seq_length()
    if prefix is None and input_ids.shape[1] == 1:
        return first.expand(n, 1, -1)
    cache.batch_repeat_interleave(n)
    if prefix is None:
        full_mask = torch.cat([mask.new_ones(n, p), mask[:, 1:]], 1)
        rest = model(input_ids=input_ids[:, 1:], attention_mask=full_mask, past_key_values=cache,
                     use_cache=True).logits.float()
        return torch.cat([first.expand(n, 1, -1), rest], 1)
    t = prefix.shape[1]
    embeds = model.get_input_embeddings()(input_ids[:, 1:])
    embeds = torch.cat([prefix.to(embeds.dtype), embeds], 1)
    full_mask = torch.cat([mask.new_ones(n, p + t), mask[:, 1:]], 1)
    logits = model(inputs_embeds=embeds, attention_mask=full_mask, past_key_values=cache, use_cache=True).logits
    return logits[:, t - 1:].float()
