"""Batched MTP self-speculative decoding: every row gets greedy's tokens and the drafts and stats it gets alone,
while the rows accept different numbers of drafts in the same forwards."""

import pytest
import torch
from test_speculative import never_accepting, silence, tiny

from student import speculative_generate
from student.speculative_batch import speculative_generate_batch

ROW_KEYS = ("tokens_per_round", "drafts", "proposed", "accepted", "new_tokens", "main_forwards", "acceptance")


def batch_case(b, vocab, seed, prompt_len, size=(28, 28), low=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (b, prompt_len), generator=g) if prompt_len else None
    return torch.randn(b, 3, *size, generator=g), ids


def row(ids, b):
    return None if ids is None else ids[b:b + 1]


def alone(model, pixels, ids, n, eos=None, **kwargs):
    """Per row: (greedy tokens of the row alone, speculative stats of the row alone)."""
    out = []
    for b in range(pixels.shape[0]):
        with torch.no_grad():
            greedy = model.greedy_generate(pixels[b:b + 1], row(ids, b), max_new_tokens=n, eos_token_id=eos)[0]
        out.append((greedy, speculative_generate(model, pixels[b:b + 1], row(ids, b), n, eos, **kwargs)[1]))
    return out


def check(model, pixels, ids, n, eos=None, **kwargs):
    """Runs the batch; asserts each row equals its greedy run alone (then eos-filled) and its stats equal its
    speculative run alone, and the batch totals add up. Returns the batch stats."""
    tokens, stats = speculative_generate_batch(model, pixels, ids, max_new_tokens=n, eos_token_id=eos, **kwargs)
    with torch.no_grad():
        assert torch.equal(tokens, model.greedy_generate(pixels, ids, max_new_tokens=n, eos_token_id=eos))
    width = tokens.shape[1]
    for b, (greedy, single) in enumerate(alone(model, pixels, ids, n, eos, **kwargs)):
        assert torch.equal(tokens[b, :len(greedy)], greedy)
        assert len(greedy) == width or (eos is not None and (tokens[b, len(greedy):] == eos).all())
        for key in ROW_KEYS:
            assert stats["rows"][b][key] == single[key], (b, key)
    rows = stats["rows"]
    assert stats["batch"] == pixels.shape[0] and stats["new_tokens"] == sum(r["new_tokens"] for r in rows)
    assert stats["main_forwards"] == 1 + max(r["verify_forwards"] for r in rows) == 1 + stats["verify_forwards"]
    assert stats["tokens_per_forward"] == stats["new_tokens"] / (pixels.shape[0] * stats["main_forwards"])
    for key in ("proposed", "accepted"):
        assert stats[key] == [sum(r[key][k] for r in rows) for k in range(stats["depth"])]
    return stats


def ragged_rounds(stats):
    """Rounds in which the running rows emitted different numbers of tokens."""
    per_row = [r["tokens_per_round"] for r in stats["rows"]]
    return sum(len({r[i] for r in per_row if i < len(r)}) > 1 for i in range(max(map(len, per_row))))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_rows_match_greedy_alone_with_ragged_acceptance(depth):
    # Tiny vocabs make random drafts agree often, so the rows of a round accept different numbers of drafts.
    ragged, lengths = 0, set()
    for vocab, seed in [(2, 0), (4, 1), (8, 2), (256, 3)]:
        model = tiny(depth, vocab=vocab, seed=seed)
        for prompt_len, size in [(0, (14, 14)), (3, (28, 28)), (5, (14, 28))]:
            pixels, ids = batch_case(4, vocab, seed + prompt_len, prompt_len, size)
            for n in (1, 2, 16):
                stats = check(model, pixels, ids, n)
                ragged += ragged_rounds(stats)
                lengths.update(m for r in stats["rows"] for m in r["tokens_per_round"])
    assert ragged > 5 and set(range(1, depth + 2)) <= lengths


@pytest.mark.parametrize("depth", [1, 3])
def test_eos_ends_rows_at_different_steps(depth):
    model = tiny(depth, vocab=6, seed=5)
    staggered = 0
    for seed in range(3):
        pixels, ids = batch_case(4, 6, 20 + seed, 2)
        free = speculative_generate_batch(model, pixels, ids, max_new_tokens=12, eos_token_id=None)[0][:, 2:]
        for eos in free.unique().tolist():
            stats = check(model, pixels, ids, 12, eos=eos)
            ends = {r["new_tokens"] for r in stats["rows"]}
            staggered += len(ends) > 1
    assert staggered > 3


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_forced_all_accept(depth):
    # Zero output norms: every head picks token 0, so every draft is accepted.
    model = tiny(depth, seed=1)
    silence(model)
    pixels, ids = batch_case(3, 256, 6, 4)
    stats = check(model, pixels, ids, 11)
    rounds = -(-10 // (depth + 1))  # ceil(10 / (D+1)) verification forwards for every row
    assert stats["main_forwards"] == 1 + rounds and stats["tokens_per_forward"] == 11 / (1 + rounds)
    assert stats["acceptance"] == [1.0] * depth
    for r in stats["rows"]:
        assert r["tokens_per_round"][:-1] == [depth + 1] * (rounds - 1) and r["accepted"] == r["proposed"]


@pytest.mark.parametrize("depth", [1, 3])
def test_forced_all_reject(depth):
    model = never_accepting(depth)  # every draft is token 0, which the main head never picks
    pixels, ids = batch_case(4, 256, 7, 3, low=1)
    stats = check(model, pixels, ids, 9)
    assert stats["main_forwards"] == 9 and stats["tokens_per_forward"] == 1.0
    assert stats["accepted"] == [0] * depth and stats["proposed"] == [4 * 7] + [0] * (depth - 1)
    assert all(r["tokens_per_round"] == [1] * 8 for r in stats["rows"])


@pytest.mark.parametrize("depth", [1, 3])
def test_draft_vocab(depth):
    model = tiny(depth, vocab=6, seed=7)
    vocab = [0, 2, 3, 5]
    ragged = 0
    for seed in range(3):
        pixels, ids = batch_case(4, 6, 30 + seed, 2)
        stats = check(model, pixels, ids, 12, draft_vocab=vocab)
        assert stats["draft_vocab_size"] == len(vocab)
        assert all(d in vocab for r in stats["rows"] for _, drafts in r["drafts"] for d in drafts)
        ragged += ragged_rounds(stats)
    assert ragged > 0


def test_batch_of_one_and_fewer_depths():
    model = tiny(3, vocab=4, seed=8)
    pixels, ids = batch_case(3, 4, 9, 2)
    check(model, pixels[:1], row(ids, 0), 10)
    for depth in (0, 1, 2):
        stats = check(model, pixels, ids, 10, depth=depth)
        assert len(stats["proposed"]) == depth
    assert speculative_generate_batch(model, pixels, ids, 10, depth=0)[1]["main_forwards"] == 10


def test_generate_uses_the_batch_and_runs_tree_rows_one_by_one():
    model = tiny(2, vocab=8, seed=10)
    pixels, ids = batch_case(3, 8, 11, 2)
    greedy = model.generate(ids, pixel_values=pixels, max_new_tokens=12)
    assert torch.equal(model.generate(ids, pixel_values=pixels, max_new_tokens=12, mtp_speculative=True), greedy)
    model.config.draft_top_k = 2
    assert torch.equal(model.generate(ids, pixel_values=pixels, max_new_tokens=12, mtp_speculative=True), greedy)


def test_bad_input_is_refused():
    model = tiny(2)
    pixels, ids = batch_case(2, 256, 0, 3)
    with pytest.raises(ValueError, match="top_k=2"):
        speculative_generate_batch(model, pixels, ids, top_k=2)
    mask = torch.ones_like(ids)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="one length"):
        speculative_generate_batch(model, pixels, ids, attention_mask=mask)
    with pytest.raises(ValueError, match="depth=3"):
        speculative_generate_batch(model, pixels, ids, depth=3)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        speculative_generate_batch(model, pixels, ids, max_new_tokens=600)
    with pytest.raises(ValueError, match="input_ids"):
        speculative_generate_batch(model, pixels, ids[:1])
