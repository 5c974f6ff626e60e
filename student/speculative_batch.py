"""MTP self-speculative decoding for a batch of prompts of equal length (greedy, chain drafting).

The rounds are those of `speculative.py` (draft with the MTP depths, verify with one decoder forward, roll
back), run for every row in the same forwards. Rows accept different numbers of drafts, so each row has its
own lengths:
- Caches: `RaggedLayer`, a static layer (`decoder.StaticLayer`) whose rows write at their own lengths
  (`starts` [B]); a forward returns the keys up to the longest row, and the mask hides the rest.
- Positions: row b's q inputs of a forward sit at starts[b]..starts[b]+q-1 (its RoPE positions); a query
  sees the keys at or before its own position. Everything below a row's length is verified, so this causal
  mask with per-row offsets is the whole rule: a row's stale entries (rejected drafts, or padding) all lie
  beyond its length.
- The MTP depths recompute, per row, the positions from their cache's length up to L-1, a span that depends
  on what the row accepted last round: the spans are padded to the longest (the padding's outputs are
  written past the row's valid entries, where nothing reads them before they are rewritten).
- Rows that finished (eos or `max_new_tokens`) stay in the batch, computed but ignored: their lengths stop.
- Each round drafts min(depth, the most room any running row has) tokens; a row with less room accepts at
  most its own room, as it would alone.
So every row gets exactly the tokens, drafts and stats that `speculative_generate` gives it alone (up to float
rounding at exact logit ties); the rows share each forward, which is where a batch saves time.

Tree drafting (`top_k` > 1) is batch size 1 only: `speculative_generate_batch` refuses it and
`generate(..., mtp_speculative=...)` runs such rows one by one.
"""

import torch

from .decoder import KVCache, StaticLayer
from .layers import rope_cos_sin
from .speculative import _argmax_rows, _prefix, _prepare, _summarize, accept_drafts, count_drafts, greedy_tokens


class RaggedLayer(StaticLayer):
    """A static cache layer whose rows have their own lengths: set `starts` ([B] tensor) and `width` (their
    max, an int) before a forward; `update` writes row b's q new positions from starts[b] on and returns the
    keys and values of positions 0..width+q-1 of every row (the caller's mask hides a row's positions past its
    own). Buffers start at zero: masked keys get weight 0, which must not meet a NaN (0 * NaN = NaN)."""

    starts = None
    width = 0

    def update(self, k, v):
        b, h, q, d = k.shape
        end = self.width + q
        if end > self.max_length:
            raise ValueError(f"static KV cache of {self.max_length} positions is full (needs {end})")
        if self.keys is None:
            self.keys = k.new_zeros(b, h, self.max_length, d)
            self.values = v.new_zeros(b, h, self.max_length, d)
        if self.starts is None:  # a plain forward from position 0 (the prefill)
            self.starts = torch.zeros(b, dtype=torch.long, device=k.device)
        index = (self.starts[:, None] + torch.arange(q, device=k.device))[:, None, :, None].expand(b, h, q, d)
        self.keys.scatter_(2, index, k)
        self.values.scatter_(2, index, v)
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]


def ragged_cache(num_layers: int, max_length: int) -> KVCache:
    return KVCache(num_layers, layers=[RaggedLayer(max_length) for _ in range(num_layers)])


def ragged_inputs(model, cache, starts: list[int], q: int):
    """Point `cache` at the rows' lengths `starts` for a forward of q positions per row. Returns the positions
    [B, q], RoPE cos/sin [B, q, head_dim] and the mask [B, 1, q, max(starts) + q] (a query sees the keys at or
    before its own position)."""
    device = model.lm_head.weight.device
    rows = torch.tensor(starts, device=device)
    for layer in cache.layers:
        layer.starts, layer.width = rows, max(starts)
    pos = rows[:, None] + torch.arange(q, device=device)
    config = model.config
    cos, sin = rope_cos_sin(pos, config.hidden_size // config.num_attention_heads, config.rope_theta)
    mask = torch.arange(max(starts) + q, device=device) <= pos[..., None]
    return pos, cos, sin, mask[:, None]


def _take(buf, pos):
    """buf [B, T, d], pos [B, q] -> buf[b, pos[b, j]]: [B, q, d]."""
    return buf[torch.arange(buf.shape[0], device=buf.device)[:, None], pos]


def _put(buf, pos, values):
    buf[torch.arange(buf.shape[0], device=buf.device)[:, None], pos] = values


@torch.no_grad()
def speculative_generate_batch(model, pixel_values, input_ids=None, max_new_tokens: int = 32, eos_token_id=None,
                               depth: int | None = None, draft_vocab="config", top_k: int | None = None,
                               attention_mask=None):
    """`speculative_generate` for a batch [B, C, H, W] of images with prompts [B, T] of one length (no padding:
    an `attention_mask` with zeros is refused) and a chain of drafts (`top_k` = 1). Arguments as in
    `speculative_generate`. Returns (tokens [B, T + n], stats): the tokens of `model.greedy_generate` on the
    batch (a row that ends early is filled with eos); `stats["rows"]` holds each row's stats, as
    `speculative_generate` gives them for that row alone; the top level counts the batch's forwards:
    `main_forwards` (the prefill included), `verify_forwards`, `new_tokens` (all rows), `tokens_per_forward`
    = new tokens per row per forward (greedy decoding of the batch: 1.0 when no row ends early), and the rows'
    summed `proposed`, `accepted` and their `acceptance`."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("speculative_generate_batch: prompts must have one length (attention_mask has zeros); "
                         "left padding would shift every position after the image tokens: "
                         "generate padded prompts one by one")
    input_ids, depth, eos, draft_ids, draft_head, top_k = _prepare(model, pixel_values, input_ids, max_new_tokens,
                                                                   eos_token_id, depth, draft_vocab, top_k)
    if top_k > 1:
        raise ValueError(f"speculative_generate_batch drafts a chain only (top_k=1), got top_k={top_k}: run tree "
                         "drafting row by row with speculative_generate")
    batch, device = pixel_values.shape[0], pixel_values.device
    image_embeds, prompt_len, total = _prefix(model, pixel_values, input_ids, max_new_tokens)
    n_img = image_embeds.shape[1]
    # Positions a row can reach: its drafts past `total`, and the padding of the MTP spans (up to depth + 1
    # past a row's length L).
    size = total + 2 * depth + 2

    embed = model.decoder.embed_tokens
    text = embed(input_ids)
    cache = ragged_cache(len(model.decoder.layers), size)
    h0, _ = model.forward_decoder(torch.cat([image_embeds.to(text.dtype), text], dim=1), num_image_tokens=n_img,
                                  cache=cache)
    first = greedy_tokens(model, h0[:, -1:])  # [B, 1]
    new = [[t] for t in first[:, 0].tolist()]
    # As in speculative.py, per row: hidden[k][b, i] = h^k at position i; tok[b, j] = MTP token input at j.
    hidden = h0.new_zeros(depth + 1, batch, size, h0.shape[-1])
    hidden[0, :, :prompt_len] = h0
    tok = text.new_zeros(batch, size + depth, text.shape[-1])
    tok[:, :prompt_len + 1] = model.mtp_token_embeddings(torch.cat([input_ids, first], dim=1), n_img)
    mtp_caches = [ragged_cache(1, size) for _ in range(depth)]
    mtp_lens = [[0] * batch for _ in range(depth)]  # each depth's cache length per row
    lens = [prompt_len] * batch  # L per row: the decoder cache's length, the position of the last verified token
    fed = torch.empty(batch, depth + 1, dtype=torch.long, device=device)  # [x_L, d_1..d_n] per row
    rows = [{"depth": depth, "draft_vocab_size": model.config.vocab_size if draft_ids is None else len(draft_ids),
             "proposed": [0] * depth, "accepted": [0] * depth, "main_forwards": 1, "tokens_per_round": [],
             "drafts": [], "top_k": 1, "sibling_accepted": 0} for _ in range(batch)]
    main_forwards = 1

    def running(b):
        return len(new[b]) < max_new_tokens and not (eos is not None and new[b][-1] == eos)

    while any(running(b) for b in range(batch)):
        active = [b for b in range(batch) if running(b)]
        room = [max_new_tokens - len(new[b]) - 1 for b in range(batch)]  # drafts a row can still use
        n_draft = min(depth, max(room[b] for b in active))
        fed[:, 0] = torch.tensor([r[-1] for r in new], device=device)
        _draft_rows(model, n_draft, lens, hidden, mtp_caches, mtp_lens, tok, fed, draft_ids, draft_head)

        pos, cos, sin, mask = ragged_inputs(model, cache, lens, n_draft + 1)
        h_new = model.decoder(embed(fed[:, :n_draft + 1]), cos, sin, mask, cache)
        _put(hidden[0], pos, h_new)
        main_forwards += 1
        read = torch.cat([fed[:, 1:n_draft + 1], greedy_tokens(model, h_new)], dim=1).tolist()  # one host sync
        put_rows, put_pos, put_tok = [], [], []
        for b in active:
            n_row = min(n_draft, room[b])
            drafts, choice = read[b][:n_row], read[b][n_draft:]
            n_acc, ended = accept_drafts(drafts, choice, eos)
            stats = rows[b]
            count_drafts(stats, n_acc, n_row, ended)
            stats["drafts"].append((lens[b], drafts))
            emitted = drafts[:n_acc] + [choice[n_acc]]
            if eos is not None and eos in emitted:
                emitted = emitted[:emitted.index(eos) + 1]
            emitted = emitted[:max_new_tokens - len(new[b])]
            new[b] += emitted
            stats["tokens_per_round"].append(len(emitted))
            stats["main_forwards"] += 1
            put_rows += [b] * len(emitted)
            put_pos += range(lens[b] + 1, lens[b] + 1 + len(emitted))
            put_tok += emitted
            lens[b] += n_acc + 1  # keep positions 0..L+a: x_L and the accepted drafts are now verified
        tok[put_rows, put_pos] = embed(torch.tensor(put_tok, device=device))

    width = max(len(r) for r in new)
    out = input_ids.new_full((batch, width), eos if eos is not None else 0)
    for b, r in enumerate(new):
        out[b, :len(r)] = torch.tensor(r, dtype=out.dtype)
    rows = [_summarize(stats, len(r)) for stats, r in zip(rows, new, strict=True)]
    n_new = sum(len(r) for r in new)
    proposed = [sum(s["proposed"][k] for s in rows) for k in range(depth)]
    accepted = [sum(s["accepted"][k] for s in rows) for k in range(depth)]
    stats = {"batch": batch, "depth": depth, "draft_vocab_size": rows[0]["draft_vocab_size"], "top_k": 1,
             "main_forwards": main_forwards, "verify_forwards": main_forwards - 1, "new_tokens": n_new,
             "tokens_per_forward": n_new / (batch * main_forwards), "proposed": proposed, "accepted": accepted,
             "acceptance": [a / p if p else None for a, p in zip(accepted, proposed, strict=True)], "rows": rows}
    return torch.cat([input_ids, out], dim=1), stats


def _draft_rows(model, n_draft, lens, hidden, mtp_caches, mtp_lens, tok, fed, draft_ids, draft_head):
    """`speculative._draft` for every row: depth k runs, per row, from its cache's length up to L-1 (the spans
    padded to the longest), writes the drafts d_k to `fed[:, k]` and crops each row's cache to the positions
    whose inputs are verified, L-k+1."""
    rows = torch.arange(len(lens), device=fed.device)
    last = torch.tensor(lens, device=fed.device) - 1  # position L-1 of each row
    for k in range(1, n_draft + 1):
        cache, starts = mtp_caches[k - 1], mtp_lens[k - 1]
        q = max(length - start for length, start in zip(lens, starts, strict=True))
        pos, cos, sin, mask = ragged_inputs(model, cache, starts, q)
        # Inputs: h^{k-1} and the tokens x_{i+k} (verified up to x_L, then d_1..d_{k-1}) at each row's positions.
        out = model.mtp[k - 1](_take(hidden[k - 1], pos), _take(tok, pos + k), cos, sin, mask, cache)
        _put(hidden[k], pos, out)
        # Each row's output at L-1 (a finished row may have an empty span: clamp, it is ignored anyway).
        x = model.mtp[k - 1].norm(out[rows, (last - cache.layers[0].starts).clamp(min=0)])
        draft = _argmax_rows(draft_head, x)
        fed[:, k] = draft if draft_ids is None else draft_ids[draft]
        if k < n_draft:
            tok[rows, last + 1 + k] = model.decoder.embed_tokens(fed[:, k])
        mtp_lens[k - 1] = [max(length - k + 1, 0) for length in lens]
