"""MTP self-speculative decoding (greedy, batch size 1).

Sequence positions as in the model: `[N_img image tokens | prompt | generated]`; x_j is the token at position j.
MTP depth k at position i reads h^{k-1}_i (h^0 = decoder output before its final norm) and the embedding of
x_{i+k}, and predicts x_{i+1+k}.

One round, with x_0..x_L verified (x_L not yet fed to the decoder, whose cache holds positions 0..L-1):
1. Draft: depth k at position L-1 proposes d_k for position L+k (k = 1..n). Depth k's causal block also
   needs positions L-k+1..L-1, whose token inputs x_{L+1}..x_{L+k-1} are not verified yet: the drafts
   d_1..d_{k-1} stand in for them, so the drafts are exactly what one full forward over
   `[x_0..x_L, d_1..d_{n-1}]` would give at position L-1.
2. Verify: one decoder forward over `[x_L, d_1..d_n]` (positions L..L+n). The main head at L+j proposes
   p_j for position L+j+1. Accept d_1..d_a while d_j == p_{j-1}, then add p_a: a+1 new tokens.
3. Roll back: the decoder cache keeps positions 0..L+a (all verified). Depth k's cache keeps the positions
   whose inputs were all verified before this round, 0..L-k; the next round recomputes depth k from there on
   (from the stored h^{k-1}), so rejected drafts never linger in any cache.

Every emitted token is the main head's greedy choice given the verified prefix, so the output equals
`model.greedy_generate` (up to float rounding of a multi-token vs one-token forward, which only matters at
exact logit ties).

Stats (all counts over verification rounds; the first token always comes from the prefill):
- `proposed[k-1]`: rounds where d_k was verified *and* d_1..d_{k-1} were all accepted (so d_k could still be
  accepted); `accepted[k-1]`: rounds where d_1..d_k were all accepted. `acceptance[k-1]` = accepted / proposed
  (None when never proposed): the conditional acceptance rate of depth k.
- `main_forwards`: decoder forwards including the prefill; `verify_forwards` = main_forwards - 1.
- `tokens_per_forward`: new tokens / main_forwards (greedy decoding has exactly 1.0).
- `tau` (mean accepted length): new tokens from verification rounds / verify_forwards, i.e. mean accepted
  drafts + 1 per round (the last round may be cut by eos or `max_new_tokens`).
- `tokens_per_round`: tokens emitted by each verification round; `drafts`: per round, `(L, [d_1..d_n])`.
"""

import torch

from .decoder import KVCache


@torch.no_grad()
def speculative_generate(model, pixel_values, input_ids=None, max_new_tokens: int = 32, eos_token_id=None,
                         depth: int | None = None):
    """Greedy generation with the model's own MTP modules as drafters. Batch size 1 only.

    `depth` = number of MTP depths used as drafters (default and maximum `config.mtp_depth`; 0 = plain greedy
    decoding with one token per forward). `eos_token_id` defaults to `config.eos_token_id` (None = no eos).
    Returns (tokens [1, T_prompt + n_new], stats): the same tokens as `model.greedy_generate` with the same
    arguments; see the module docstring for the stats.
    """
    config = model.config
    depth = config.mtp_depth if depth is None else depth
    if not 0 <= depth <= config.mtp_depth:
        raise ValueError(f"depth={depth} must be in [0, mtp_depth={config.mtp_depth}]")
    if pixel_values.dim() != 4 or pixel_values.shape[0] != 1:
        raise ValueError(f"speculative_generate supports batch size 1 only; got pixel_values of shape "
                         f"{tuple(pixel_values.shape)}: generate the rows one by one")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if input_ids is None:
        input_ids = torch.zeros(1, 0, dtype=torch.long, device=pixel_values.device)
    if input_ids.shape[1] > 0:
        model._check_text(input_ids, None, 1)
    eos = config.eos_token_id if eos_token_id is None else eos_token_id

    _, _, image_embeds = model.encode_image(pixel_values)
    n_img = image_embeds.shape[1]
    if n_img + input_ids.shape[1] + max_new_tokens > config.max_position_embeddings:
        raise ValueError(f"{n_img} image + {input_ids.shape[1]} prompt + {max_new_tokens} new tokens exceed "
                         f"max_position_embeddings={config.max_position_embeddings}")

    # Prefill: the decoder over image + prompt; its last position gives the first new token.
    embed = model.decoder.embed_tokens
    text = embed(input_ids)
    cache = KVCache(len(model.decoder.layers))
    h0, cache = model.forward_decoder(torch.cat([image_embeds.to(text.dtype), text], dim=1),
                                      num_image_tokens=n_img, cache=cache)
    token = model.logits_from_hidden(h0[:, -1:]).argmax(-1)  # [1, 1]
    new = [int(token)]
    # MTP token inputs of every verified position (the <|image|> embedding at image positions).
    token_embeds = model.mtp_token_embeddings(torch.cat([input_ids, token], dim=1), n_img)
    # hidden[k]: h^k at the positions whose inputs are all verified (h^0: every position in the decoder cache);
    # mtp_caches[k-1] always covers exactly the positions of hidden[k].
    hidden = [h0] + [h0[:, :0]] * depth
    mtp_caches = [KVCache(1) for _ in range(depth)]

    stats = {"depth": depth, "proposed": [0] * depth, "accepted": [0] * depth, "main_forwards": 1,
             "tokens_per_round": [], "drafts": []}
    while len(new) < max_new_tokens and not (eos is not None and new[-1] == eos):
        length = cache.length  # L: position of the last verified token, not yet in the decoder cache
        n_draft = min(depth, max_new_tokens - len(new) - 1)
        drafts = _draft(model, n_draft, length, hidden, mtp_caches, token_embeds)

        # Verify x_L and the drafts with one decoder forward.
        fed = torch.tensor([[new[-1], *drafts]], device=input_ids.device)
        h_new, cache = model.forward_decoder(embed(fed), cache=cache)
        stats["main_forwards"] += 1
        choice = model.logits_from_hidden(h_new).argmax(-1)[0].tolist()  # p_0..p_n
        n_acc = 0
        while n_acc < n_draft and drafts[n_acc] == choice[n_acc]:
            n_acc += 1
        for k in range(n_acc + (n_acc < n_draft)):  # depths whose draft was verified with all earlier ones right
            stats["proposed"][k] += 1
            stats["accepted"][k] += int(k < n_acc)
        stats["drafts"].append((length, drafts))

        emitted = drafts[:n_acc] + [choice[n_acc]]
        if eos is not None and eos in emitted:
            emitted = emitted[:emitted.index(eos) + 1]
        emitted = emitted[:max_new_tokens - len(new)]
        new += emitted
        stats["tokens_per_round"].append(len(emitted))

        # Keep positions 0..L+a: x_L and the accepted drafts are now verified.
        cache.crop(length + n_acc + 1)
        hidden[0] = torch.cat([hidden[0], h_new[:, :n_acc + 1]], dim=1)
        token_embeds = torch.cat([token_embeds, model.mtp_token_embeddings(
            torch.tensor([emitted], device=input_ids.device), 0)], dim=1)

    tokens = torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype, device=input_ids.device)], dim=1)
    rounds = len(stats["tokens_per_round"])
    stats["new_tokens"] = len(new)
    stats["verify_forwards"] = rounds
    stats["tokens_per_forward"] = len(new) / stats["main_forwards"]
    stats["tau"] = (len(new) - 1) / rounds if rounds else None
    stats["acceptance"] = [a / p if p else None for a, p in zip(stats["accepted"], stats["proposed"], strict=True)]
    return tokens, stats


def _draft(model, n_draft, length, hidden, mtp_caches, token_embeds):
    """Run MTP depths 1..n_draft at the positions each still needs, up to L-1 (L = `length`), and return the
    drafts [d_1..d_n]. Updates `hidden` and `mtp_caches` to the positions with verified inputs only."""
    drafts = []
    prev = hidden[0]  # h^{k-1} at positions 0..L-1 (verified part, then this round's draft-fed part)
    for k in range(1, n_draft + 1):
        start = mtp_caches[k - 1].length
        # Token inputs x_{start+k}..x_{L-1+k}: verified up to x_L, then d_1..d_{k-1}.
        tok = token_embeds
        if drafts:
            tok = torch.cat([tok, model.decoder.embed_tokens(torch.tensor([drafts], device=tok.device))], dim=1)
        out, _ = model.forward_mtp_depth(k, prev[:, start:length], tok[:, start + k:length + k],
                                         cache=mtp_caches[k - 1])
        drafts.append(int(model.logits_from_hidden(out[:, -1:], k).argmax(-1)))
        prev = torch.cat([hidden[k], out], dim=1)
        # Depth k at position i is verified iff x_{i+k} is: i <= L-k. Drop the rest; it is recomputed next round.
        verified = max(length - k + 1, 0)
        mtp_caches[k - 1].crop(verified)
        hidden[k] = prev[:, :verified]
    return drafts
