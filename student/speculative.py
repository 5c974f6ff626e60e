"""MTP self-speculative decoding (greedy, batch size 1; a batch: speculative_batch.py).

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

Cost (what makes it faster than greedy on a small model, whose output head dominates a forward):
- Cheap drafts: with a draft vocabulary (`config.draft_vocab` or the `draft_vocab` argument, e.g. the token
  ids of the training captions) a draft reads only those rows of the shared output head; verification always
  uses the full head, so the output stays greedy's.
- Preallocated state: the decoder and MTP KV caches are static (`KVCache(max_length=...)`, written in place,
  rolled back by moving a length), and the hidden states h^k and the MTP token inputs live in buffers sized
  for the whole generation: no concatenation grows with the sequence.
- One host sync per round (reading the drafts and the main head's choices to decide acceptance); the drafts
  stay on the device while drafting.
- `greedy_tokens` scores the output head in the faster of two layouts for the number of rows, measured once per
  shape and thread count on first use (`head_scores`): on CPU which of MKL's paths wins depends on the host;
  `greedy_generate` uses it too, so the speed-up compares like with like.

Batch size 1 here: rows accept different numbers of drafts, so a batch needs per-row cache lengths and ragged
position ids in one forward: `speculative_batch.speculative_generate_batch` does that for prompts of one
length (chain drafting only), and `generate(..., mtp_speculative=True)` uses it for a batch (with tree
drafting it runs the rows one by one). Drafts form one chain unless `top_k` > 1 (`config.draft_top_k`): then
each depth's next `top_k - 1` candidates are siblings of its top-1 draft, verified in the same forward with a
tree attention mask; when the chain breaks at depth j and the main head's token is a sibling of depth j, that
sibling and the main head's token after it are accepted (siblings are leaves: deeper drafts follow the top-1
chain only).

Stats (all counts over verification rounds; the first token always comes from the prefill):
- `proposed[k-1]`: rounds where d_k was verified *and* d_1..d_{k-1} were all accepted, none of them eos (so d_k
  could still be accepted: a draft after an accepted eos is never a candidate, as nothing after eos is emitted);
  `accepted[k-1]`: rounds where d_1..d_k were all accepted. `acceptance[k-1]` = accepted / proposed
  (None when never proposed): the conditional acceptance rate of depth k.
- `main_forwards`: decoder forwards including the prefill; `verify_forwards` = main_forwards - 1.
- `tokens_per_forward`: new tokens / main_forwards (greedy decoding has exactly 1.0).
- `tau` (mean accepted length): new tokens from verification rounds / verify_forwards, i.e. mean accepted
  drafts + 1 per round (the last round may be cut by eos or `max_new_tokens`).
- `tokens_per_round`: tokens emitted by each verification round; `drafts`: per round, `(L, [d_1..d_n])` (the
  top-1 chain); `sibling_accepted`: rounds where a tree sibling was accepted (it counts as depth j's accept);
  `top_k` and `draft_vocab_size`: the settings used.
"""

import time

import torch

from .decoder import KVCache
from .layers import rope_cos_sin


@torch.no_grad()
def speculative_generate(model, pixel_values, input_ids=None, max_new_tokens: int = 32, eos_token_id=None,
                         depth: int | None = None, draft_vocab="config", top_k: int | None = None):
    """Greedy generation with the model's own MTP modules as drafters. Batch size 1 only.

    `depth` = number of MTP depths used as drafters (default and maximum `config.mtp_depth`; 0 = plain greedy
    decoding with one token per forward). `eos_token_id` defaults to `config.eos_token_id` (None = no eos).
    `draft_vocab`: token ids the drafts choose from (default `config.draft_vocab`; None = the full vocab).
    `top_k`: candidates per depth (default `config.draft_top_k`; 1 = a chain of drafts, more = a tree).
    Returns (tokens [1, T_prompt + n_new], stats): the same tokens as `model.greedy_generate` with the same
    arguments; see the module docstring for the stats.
    """
    if pixel_values.dim() != 4 or pixel_values.shape[0] != 1:
        raise ValueError(f"speculative_generate supports batch size 1 only; got pixel_values of shape "
                         f"{tuple(pixel_values.shape)}: use speculative_batch.speculative_generate_batch")
    config = model.config
    input_ids, depth, eos, draft_ids, draft_head, top_k = _prepare(model, pixel_values, input_ids, max_new_tokens,
                                                                   eos_token_id, depth, draft_vocab, top_k)
    device = pixel_values.device
    image_embeds, prompt_len, total = _prefix(model, pixel_values, input_ids, max_new_tokens)
    n_img = image_embeds.shape[1]

    # Prefill: the decoder over image + prompt; its last position gives the first new token.
    embed = model.decoder.embed_tokens
    text = embed(input_ids)
    cache = KVCache(len(model.decoder.layers), max_length=total + depth * (top_k - 1))  # + a tree's siblings
    h0, cache = model.forward_decoder(torch.cat([image_embeds.to(text.dtype), text], dim=1),
                                      num_image_tokens=n_img, cache=cache)
    token = greedy_tokens(model, h0[:, -1:])  # [1, 1]
    new = [int(token)]
    # hidden[k, i] = h^k at position i, valid below the length of its stack's cache (the decoder's for k = 0,
    # depth k's for k >= 1); entries beyond hold this round's draft-fed values or stale ones, rewritten later.
    hidden = h0.new_empty(depth + 1, total, h0.shape[-1])
    hidden[0, :prompt_len] = h0[0]
    # tok[:, j]: the MTP token input of position j (the <|image|> embedding at image positions): verified up to
    # x_L, then this round's drafts.
    tok = text.new_empty(1, total + depth, text.shape[-1])
    tok[:, :prompt_len + 1] = model.mtp_token_embeddings(torch.cat([input_ids, token], dim=1), n_img)
    head_dim = config.hidden_size // config.num_attention_heads
    mtp_caches = [KVCache(1, max_length=total) for _ in range(depth)]
    # RoPE and the causal mask of every position, for the MTP depths (cheaper than building them per call)
    mtp_inputs = (*rope_cos_sin(torch.arange(total, device=device), head_dim, config.rope_theta),
                  torch.ones(total, total, dtype=torch.bool, device=device).tril())
    fed = torch.empty(1, depth + 1, dtype=torch.long, device=device)  # [x_L, d_1..d_n] of a round
    siblings = torch.empty(depth, top_k - 1, dtype=torch.long, device=device) if top_k > 1 else None
    trees = {}  # n -> (position offsets, attention mask among the nodes) of a tree with n depths

    stats = {"depth": depth, "draft_vocab_size": config.vocab_size if draft_ids is None else len(draft_ids),
             "proposed": [0] * depth, "accepted": [0] * depth, "main_forwards": 1, "tokens_per_round": [],
             "drafts": [], "top_k": top_k, "sibling_accepted": 0}
    while len(new) < max_new_tokens and not (eos is not None and new[-1] == eos):
        length = cache.length  # L: position of the last verified token, not yet in the decoder cache
        n_draft = min(depth, max_new_tokens - len(new) - 1)
        fed[0, 0] = new[-1]
        _draft(model, n_draft, length, hidden, mtp_caches, tok, fed, siblings, draft_ids, draft_head, mtp_inputs)

        # Verify x_L and the drafts with one decoder forward; one host sync reads the drafts and the choices.
        tree = siblings is not None and n_draft > 0
        nodes = fed[:, :n_draft + 1]
        if tree:  # nodes [x_L, d_1..d_n, siblings of depth 1, ..., siblings of depth n]
            nodes = torch.cat([nodes, siblings[:n_draft].reshape(1, -1)], dim=1)
            if n_draft not in trees:
                trees[n_draft] = _tree(n_draft, top_k, device)
            offsets, mask = trees[n_draft]
            cos, sin = rope_cos_sin(length + offsets, head_dim, config.rope_theta)
            cached = torch.ones(mask.shape[0], length, dtype=torch.bool, device=device)
            h_new = model.decoder(embed(nodes), cos, sin, torch.cat([cached, mask], 1)[None, None], cache)
        else:
            h_new, cache = model.forward_decoder(embed(nodes), cache=cache)
        hidden[0, length:length + n_draft + 1] = h_new[0, :n_draft + 1]
        stats["main_forwards"] += 1
        choice = greedy_tokens(model, h_new)[0]  # the main head's token after each node
        read = torch.cat([nodes[0, 1:], choice]).tolist()
        q = nodes.shape[1]
        drafts, cands, choice = read[:n_draft], read[n_draft:q - 1], read[q - 1:]
        n_acc, ended = accept_drafts(drafts, choice, eos)
        hit = None  # node index of the accepted sibling, where the chain broke at a depth whose sibling was right
        if tree and n_acc < n_draft and not ended:
            row = cands[n_acc * (top_k - 1):(n_acc + 1) * (top_k - 1)]
            if choice[n_acc] in row:
                hit = n_draft + 1 + n_acc * (top_k - 1) + row.index(choice[n_acc])
        count_drafts(stats, n_acc, n_draft, ended, hit is not None)
        stats["drafts"].append((length, drafts))

        emitted = drafts[:n_acc] + [choice[n_acc]]
        if hit is not None:  # the sibling is the main head's token; the main head after it gives one more
            emitted.append(choice[hit])
            stats["sibling_accepted"] += 1
            cache.move(length + hit, length + n_acc + 1)
            hidden[0, length + n_acc + 1] = h_new[0, hit]
            n_acc += 1
        if eos is not None and eos in emitted:
            emitted = emitted[:emitted.index(eos) + 1]
        emitted = emitted[:max_new_tokens - len(new)]
        new += emitted
        stats["tokens_per_round"].append(len(emitted))

        # Keep positions 0..L+a: x_L and the accepted drafts are now verified.
        cache.crop(length + n_acc + 1)
        tok[:, length + 1:length + 1 + len(emitted)] = embed(torch.tensor([emitted], device=device))

    tokens = torch.cat([input_ids, torch.tensor([new], dtype=input_ids.dtype, device=device)], dim=1)
    return tokens, _summarize(stats, len(new))


def _prepare(model, pixel_values, input_ids, max_new_tokens, eos_token_id, depth, draft_vocab, top_k):
    """Check the arguments and resolve their defaults (see `speculative_generate`): returns (input_ids,
    depth, eos, draft ids, draft head, top_k)."""
    config = model.config
    depth = config.mtp_depth if depth is None else depth
    if not 0 <= depth <= config.mtp_depth:
        raise ValueError(f"depth={depth} must be in [0, mtp_depth={config.mtp_depth}]")
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must be [B, C, H, W], got {tuple(pixel_values.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1")
    batch = pixel_values.shape[0]
    if input_ids is None:
        input_ids = torch.zeros(batch, 0, dtype=torch.long, device=pixel_values.device)
    if input_ids.shape[1] > 0:
        model._check_text(input_ids, None, batch)
    eos = config.eos_token_id if eos_token_id is None else eos_token_id
    if isinstance(draft_vocab, str) and draft_vocab == "config":
        draft_vocab = config.draft_vocab
    draft_ids, draft_head = _draft_head(model, draft_vocab)
    top_k = config.draft_top_k if top_k is None else top_k
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be >= 1")
    return input_ids, depth, eos, draft_ids, draft_head, min(top_k, draft_head.shape[0])


def _prefix(model, pixel_values, input_ids, max_new_tokens):
    """(image_embeds [B, N_img, d], prompt length N_img + T, total = prompt length + max_new_tokens), checked
    against `max_position_embeddings`."""
    _, _, image_embeds = model.encode_image(pixel_values)
    n_img = image_embeds.shape[1]
    prompt_len = n_img + input_ids.shape[1]
    if prompt_len + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"{n_img} image + {input_ids.shape[1]} prompt + {max_new_tokens} new tokens exceed "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    return image_embeds, prompt_len, prompt_len + max_new_tokens


def accept_drafts(drafts, choice, eos):
    """(a, ended): d_1..d_a equal the main head's choices p_0..p_{a-1} (`drafts`, `choice` as host lists), and
    whether the chain ended at an accepted eos, after which nothing is emitted, so later drafts were no candidates."""
    n = 0
    while n < len(drafts) and drafts[n] == choice[n]:
        n += 1
        if drafts[n - 1] == eos:
            return n, True
    return n, False


def count_drafts(stats, n_acc, n_draft, ended, sibling=False):
    """Add a round to `stats["proposed"]` / `["accepted"]`: the depths whose draft (or a tree sibling) was verified
    with all earlier drafts right and none of them eos, and of those the ones accepted (see the module docstring)."""
    for k in range(n_acc + (n_acc < n_draft and not ended)):
        stats["proposed"][k] += 1
        stats["accepted"][k] += int(k < n_acc or sibling)


def _summarize(stats, n_new):
    """Add the totals and rates of the module docstring to a run's (or a batch row's) `stats`."""
    rounds = len(stats["tokens_per_round"])
    stats["new_tokens"] = n_new
    stats["verify_forwards"] = rounds
    stats["tokens_per_forward"] = n_new / stats["main_forwards"]
    stats["tau"] = (n_new - 1) / rounds if rounds else None
    stats["acceptance"] = [a / p if p else None for a, p in zip(stats["accepted"], stats["proposed"], strict=True)]
    return stats


def greedy_tokens(model, hidden):
    """The main head's greedy tokens [B, q] at `hidden` [B, q, d] (pre-norm): the argmax of
    `model.logits_from_hidden(hidden)`. Greedy decoding and the verification both use it."""
    b, q, d = hidden.shape
    return _argmax_rows(model.lm_head.weight, model.decoder.norm(hidden).reshape(b * q, d)).view(b, q)


def _argmax_rows(weight, x):
    """argmax over the rows of `weight` [V, d] of `weight @ x_i` for each x_i of `x` [n, d] -> [n] (the first
    of tied maxima, as `argmax`; `max(...).indices` is 2-3x faster than `argmax` on CPU)."""
    return head_scores(weight, x).max(1).indices


_LAYOUTS = {}  # (rows, V, d, dtype, threads) -> the faster of _by_rows / _by_columns, measured on first use


def head_scores(weight, x):
    """Scores `x @ weight.T` [n, V] of `x` [n, d] against the rows of `weight` [V, d], in the layout that is
    faster on this CPU for n rows (same values up to float rounding). On CPU the two layouts run different MKL
    paths and which wins depends on the host: one host ran one row 2-3x slower than a [V, 2] product, another
    ran the [V, n] product 2x slower than the [n, V] one at every n. Each is timed a few times on first use."""
    if x.device.type != "cpu":
        return _by_rows(weight, x)
    key = (x.shape[0], *weight.shape, weight.dtype, torch.get_num_threads())
    if key not in _LAYOUTS:
        _LAYOUTS[key] = min((_by_rows, _by_columns), key=lambda layout: _seconds(layout, weight, x))
    return _LAYOUTS[key](weight, x)


def _by_rows(weight, x):
    return x @ weight.T  # what a one-token nn.Linear runs


def _by_columns(weight, x):
    n = x.shape[0]
    return (weight @ (torch.cat([x, x]) if n == 1 else x).T).T[:n]  # [V, >= 2]: a matrix-matrix product


def _seconds(layout, weight, x, repeats: int = 3) -> float:
    layout(weight, x)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        layout(weight, x)
    return time.perf_counter() - start


def _tree(n, top_k, device):
    """Position offsets [q] from L and the attention mask [q, q] among the q = 1 + n * top_k nodes
    [x_L, d_1..d_n, top_k - 1 siblings of depth 1, ..., of depth n]: d_j sits at L + j and sees x_L, d_1..d_j;
    a sibling of depth j sits at L + j and sees x_L, d_1..d_{j-1} and itself."""
    depth_of = list(range(n + 1)) + [j for j in range(1, n + 1) for _ in range(top_k - 1)]
    q = len(depth_of)
    mask = torch.zeros(q, q, dtype=torch.bool, device=device)
    for i, j in enumerate(depth_of):
        mask[i, :j + (i <= n)] = True  # the chain up to d_j (a sibling: up to d_{j-1})
        mask[i, i] = True
    return torch.tensor(depth_of, device=device), mask


def _draft_head(model, draft_vocab):
    """(ids [V'] or None, the output-head rows [V', d] that the drafts score)."""
    weight = model.lm_head.weight
    if draft_vocab is None:
        return None, weight
    ids = torch.as_tensor(draft_vocab, dtype=torch.long, device=weight.device)
    if ids.dim() != 1 or ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= weight.shape[0]:
        raise ValueError(f"draft_vocab must be a non-empty 1-D list of token ids in [0, {weight.shape[0]})")
    return ids, weight[ids]


def _draft(model, n_draft, length, hidden, mtp_caches, tok, fed, siblings, draft_ids, draft_head, mtp_inputs):
    """Run MTP depths 1..n_draft at the positions each still needs, up to L-1 (L = `length`), and write the
    drafts d_1..d_n to `fed[:, 1:]` and, for a tree, each depth's next best tokens to `siblings[k-1]` (on the
    device: no host sync). Leaves each depth's cache at the positions whose inputs are verified. `mtp_inputs`:
    cos, sin [total, head_dim] and the causal mask [total, total] of every position (`forward_mtp_depth`'s)."""
    cos, sin, causal = mtp_inputs
    for k in range(1, n_draft + 1):
        cache = mtp_caches[k - 1]
        start = cache.length
        mask = None if length - start == 1 else causal[start:length, :length][None, None]  # one query sees all
        # Inputs: h^{k-1} and the tokens x_{start+k}..x_{L-1+k} (verified up to x_L, then d_1..d_{k-1}).
        out = model.mtp[k - 1](hidden[k - 1:k, start:length], tok[:, start + k:length + k], cos[start:length],
                               sin[start:length], mask, cache)
        hidden[k, start:length] = out[0]
        x = model.mtp[k - 1].norm(out[:, -1])
        scores = head_scores(draft_head, x)[0]
        draft = scores.max(0, keepdim=True).indices
        fed[:, k] = draft if draft_ids is None else draft_ids[draft]
        if siblings is not None:
            rest = scores.index_fill(0, draft, float("-inf")).topk(siblings.shape[1]).indices
            siblings[k - 1] = rest if draft_ids is None else draft_ids[rest]
        if k < n_draft:
            tok[:, length + k] = model.decoder.embed_tokens(fed[:, k])
        # Depth k at position i is verified iff x_{i+k} is: i <= L-k. Drop the rest; it is recomputed next round.
        cache.crop(max(length - k + 1, 0))
