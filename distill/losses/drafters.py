"""Drafter self-distillation: the MTP modules learn to predict the student's own greedy tokens.

Self-speculative decoding accepts a draft only when it equals the main head's greedy token, so what a
drafter should predict is the main head, not the ground-truth caption (Medusa-2 and EAGLE train their
drafters on the target model's outputs for the same reason). With the main model frozen, MTP depth k at
position t is taught the main head's argmax at position t + k (both predict token t + k + 1), over the
student's own greedy captions: each training caption's first 1..N tokens (N = `loss.drafter_prompt_tokens`)
prompt a greedy continuation, so the drafters learn the prefixes they will see at decoding time (a student
that continues "a" with ", the digit ..." is off the training captions after one token). No teacher runs.

The drafts of speculative decoding choose from `config.draft_vocab` (the training captions' token ids)
when the student has one, so the drafter scores only those rows of the shared output head, and a
position whose greedy token lies outside it (which no draft could match) is left out and counted.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


@torch.no_grad()
def greedy_captions(model, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor,
                    max_prompt_tokens: int) -> tuple[Tensor, Tensor]:
    """The model's greedy continuations of the captions' first p tokens, p drawn from 1..`max_prompt_tokens`
    (torch's RNG; capped at the shortest caption less one token), as (input_ids [B, p + n], attention_mask):
    right-padded with eos after each row's first eos, the captions' own ids for the prompt. No longer than the
    batch's captions (p + n = their padded length), so the sequence fits wherever the captions did."""
    shortest = int(attention_mask.sum(1).min())
    p = min(int(torch.randint(1, max_prompt_tokens + 1, ())), max(shortest - 1, 1))
    eos = model.config.eos_token_id
    training = model.training
    model.eval()
    try:
        ids = model.greedy_generate(pixel_values, input_ids[:, :p], input_ids.shape[1] - p, eos_token_id=eos)
    finally:
        model.train(training)
    mask = torch.ones_like(ids)
    if eos is not None:  # keep up to each row's first generated eos
        ended = (ids[:, p:] == eos).long()
        mask[:, p:] = (ended.cumsum(1) - ended) == 0
    return ids, mask


GREEDY_CHUNK = 256  # positions whose full-vocabulary logits exist at once (about 50 MB at V = 49,152)


def drafter_loss(states: Sequence[Tensor], weight: Tensor, attention_mask: Tensor,
                 draft_vocab: Sequence[int] | None = None) -> dict[str, Tensor]:
    """`states` = (main, MTP depth 1..D) post-norm head inputs [B, T, d] at the caption positions (entry t
    aligned with `input_ids[:, t]`, as `forward(..., text_logits_only=True, head_states=True)` gives them);
    `weight` [V, d] the shared output head; `attention_mask` [B, T] (right padding).

    Returns `loss` (mean over depths of the CE of each depth's draft logits against the main head's greedy
    token k positions on) and, per depth k, `drafter/match{k}` (the share of positions whose draft already
    equals that token: the acceptance a round would see if depths 1..k-1 were right) and
    `drafter/covered{k}` (the share of positions whose greedy token is in the draft vocabulary).
    Only the MTP states get a gradient; the main head's tokens are targets."""
    main, *mtp = states
    if not mtp:
        raise ValueError("drafter_loss needs MTP states: the student has mtp_depth = 0")
    mask = attention_mask.bool()
    # a position whose input is the caption's last token predicts past its end: no greedy step goes there
    mask = mask & F.pad(mask[:, 1:], (0, 1), value=False)
    with torch.no_grad():  # [B, T]: the main head's token after t, GREEDY_CHUNK positions' logits at a time
        flat = main.detach().reshape(-1, main.shape[-1])
        greedy = torch.cat([(c @ weight.detach().T).argmax(-1) for c in flat.split(GREEDY_CHUNK)]).view(main.shape[:2])
    rows = weight
    if draft_vocab is not None:
        ids = torch.as_tensor(list(draft_vocab), dtype=torch.long, device=weight.device)
        rows = weight[ids]
        index = torch.full((weight.shape[0],), -1, dtype=torch.long, device=weight.device)
        index[ids] = torch.arange(len(ids), device=weight.device)
        greedy = index[greedy]  # -1: outside the draft vocabulary
    out, losses = {}, []
    for k, state in enumerate(mtp, 1):
        target, valid = greedy[:, k:], mask[:, k:]
        covered = valid & (target >= 0)
        logits = state[:, : state.shape[1] - k] @ rows.T
        picked = logits[covered]
        if picked.numel():
            losses.append(F.cross_entropy(picked, target[covered]))
            out[f"drafter/match{k}"] = (picked.argmax(-1) == target[covered]).float().mean().detach()
        else:  # nothing to learn at this depth in this batch: a zero that keeps the graph
            losses.append(logits.sum() * 0.0)
            out[f"drafter/match{k}"] = logits.new_zeros(())
        out[f"drafter/covered{k}"] = (covered.sum() / valid.sum().clamp_min(1)).float().detach()
    out["loss"] = torch.stack(losses).mean()
    return out
