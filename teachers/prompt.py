"""A causal LM's scoring of stored rows after a prompt: the prompt runs once (its key/value cache and its last
position's logits), then every row reads on from it. Shared by collection (teachers/language.py) and teacher
correction (teachers/adapt.py), which trains through it."""

import torch


def run_prompt(model, prompt_ids: list[int], device) -> tuple:
    """(key/value cache, float32 logits of the last position) of the prompt alone, batch 1."""
    out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True)
    return out.past_key_values, out.logits[0, -1].float()


def rows_after_prompt(model, cache, first: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Float32 logits [B, L, V] of right-padded stored rows [bos, tokens...] read after a prompt: position 0 is
    the prompt's last position (`first`), the rest run on `cache` (batch 1, repeated here in place), with bos
    standing for the prompt. Differentiable, so teacher correction trains through it."""
    n, p = input_ids.shape[0], cache.get_seq_length()
    logits = first.expand(n, 1, -1)
    if input_ids.shape[1] > 1:
        cache.batch_repeat_interleave(n)
        full_mask = torch.cat([mask.new_ones(n, p), mask[:, 1:]], 1)
        rest = model(input_ids=input_ids[:, 1:], attention_mask=full_mask, past_key_values=cache,
                     use_cache=True).logits.float()
        logits = torch.cat([logits, rest], 1)
    return logits
