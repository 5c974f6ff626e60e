"""MTP self-speculative decoding: same tokens as greedy decoding, consistent drafts, and honest stats."""

import pytest
import torch

import student
from student import speculative_generate


def tiny(depth, vocab=256, seed=0):
    torch.manual_seed(seed)
    config = student.load_preset("tiny", vocab_size=vocab, mtp_depth=depth, initializer_range=0.2)
    return student.CogViTMTPForDistillation(config).eval()


@torch.no_grad()
def silence(model):
    """Zero output norms: every head's logits are exactly 0."""
    model.decoder.norm.weight.zero_()
    for m in model.mtp:
        m.norm.weight.zero_()


@torch.no_grad()
def never_accepting(depth, seed=2):
    """Zero MTP output norms: every draft is token 0. Token 0's embedding (= lm_head row, tied) is zero, so its
    main-head logit is exactly 0 while some other token scores above 0: the main head never picks it."""
    model = tiny(depth, seed=seed)
    model.decoder.embed_tokens.weight[0].zero_()
    for m in model.mtp:
        m.norm.weight.zero_()
    return model


def cases(n, vocab, seed, low=0):
    """n (pixel_values [1, 3, H, W], prompt ids [1, T] or None) with varied image sizes and prompt lengths."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(28, 28), (14, 14), (28, 56), (14, 28)]  # 4, 1, 8, 2 image tokens
    out = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        t = int(torch.randint(0, 6, (1,), generator=g))
        ids = torch.randint(low, vocab, (1, t), generator=g) if t else None
        out.append((torch.randn(1, 3, h, w, generator=g), ids))
    return out


def six_token_cases(depth, seeds, case_seed):
    """(model, pixel_values, prompt ids, prompt length) over tiny 6-token models: their outputs hit every token."""
    for seed in seeds:
        model = tiny(depth, vocab=6, seed=seed)
        for pixels, ids in cases(6, 6, seed=case_seed + seed):
            yield model, pixels, ids, 0 if ids is None else ids.shape[1]


def greedy(model, pixels, ids, n, eos=None):
    with torch.no_grad():
        return model.greedy_generate(pixels, ids, max_new_tokens=n, eos_token_id=eos)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_matches_greedy_and_covers_every_acceptance_length(depth):
    # Tiny vocabs make random drafts agree often, so rounds end with every number of accepted drafts.
    seen = set()
    for vocab, seed in [(v, s) for v in (2, 4) for s in range(3)]:
        model = tiny(depth, vocab=vocab, seed=seed)
        for pixels, ids in cases(6, vocab, seed):
            for n in (1, 2, 16):
                tokens, stats = speculative_generate(model, pixels, ids, max_new_tokens=n)
                assert torch.equal(tokens, greedy(model, pixels, ids, n))
                assert stats["new_tokens"] == n
                assert sum(stats["tokens_per_round"]) == n - 1
                assert stats["main_forwards"] == 1 + len(stats["tokens_per_round"])
                assert all(1 <= m <= depth + 1 for m in stats["tokens_per_round"])
                seen.update(m for m in stats["tokens_per_round"])
    assert set(range(1, depth + 2)) <= seen  # 1..D+1 tokens from a round all happened


@pytest.mark.parametrize("depth", [1, 3])
def test_matches_greedy_with_a_random_vocab(depth):
    model = tiny(depth, vocab=256, seed=depth)
    for pixels, ids in cases(8, 256, seed=10 + depth):
        tokens, _ = speculative_generate(model, pixels, ids, max_new_tokens=12)
        assert torch.equal(tokens, greedy(model, pixels, ids, 12))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_eos_stops_at_the_same_token_as_greedy(depth):
    hits = 0
    for model, pixels, ids, prompt_len in six_token_cases(depth, range(2), 20):
        free = greedy(model, pixels, ids, 10)[0, prompt_len:]
        for eos in free.unique().tolist():  # every token the free run emits, at first or later steps
            tokens, stats = speculative_generate(model, pixels, ids, max_new_tokens=10, eos_token_id=eos)
            expected = greedy(model, pixels, ids, 10, eos=eos)
            assert torch.equal(tokens, expected)
            assert tokens[0, -1] == eos and stats["new_tokens"] == (free == eos).nonzero()[0, 0] + 1
            hits += 1
        # the config's eos is the default, as in greedy_generate
        model.config.eos_token_id = int(free[-1])
        assert torch.equal(speculative_generate(model, pixels, ids, max_new_tokens=10)[0],
                           greedy(model, pixels, ids, 10))
        model.config.eos_token_id = None
    assert hits > 10


@pytest.mark.parametrize("depth", [2, 3])
def test_no_draft_after_an_accepted_eos_counts_as_proposed(depth):
    # Nothing after eos is emitted, so once d_j = eos is accepted the later drafts of the round were no candidates:
    # counting them as rejected would understate the acceptance of the deeper depths.
    after_eos = 0
    for model, pixels, ids, prompt_len in six_token_cases(depth, range(3), 30):
        for eos in range(6):
            tokens, stats = speculative_generate(model, pixels, ids, max_new_tokens=12, eos_token_id=eos)
            out, pos = tokens[0, prompt_len:].tolist(), 1
            proposed, accepted = [0] * depth, [0] * depth
            for (_, drafts), n in zip(stats["drafts"], stats["tokens_per_round"], strict=True):
                emitted, pos = out[pos:pos + n], pos + n  # the accepted drafts, then the main head's token
                pairs = zip(drafts, emitted, strict=False)
                a = next((j for j, (d, e) in enumerate(pairs) if d != e), min(len(drafts), n))
                after_eos += eos in drafts[:a] and a < len(drafts)
                for k in range(1, len(drafts) + 1):
                    proposed[k - 1] += a >= k - 1 and eos not in drafts[:k - 1]
                    accepted[k - 1] += a >= k
            assert stats["proposed"] == proposed and stats["accepted"] == accepted
    assert after_eos > 0  # the case happened: an accepted eos draft with later drafts in its round


@pytest.mark.parametrize("depth,top_k", [(2, 1), (3, 1), (2, 3), (3, 2)])
def test_drafts_equal_one_full_forward_over_verified_tokens_and_earlier_drafts(depth, top_k):
    # The draft of depth k in a round starting at L is what model.forward gives at position L-1 over
    # [x_0..x_L, d_1..d_{k-1}]: checks that every MTP cache and hidden state is fed consistently (with a
    # tree also after a sibling was accepted, whose cache entries and hidden state move).
    model = tiny(depth, vocab=6, seed=4)
    hits = 0
    for pixels, ids in cases(4, 6, seed=5):
        tokens, stats = speculative_generate(model, pixels, ids, max_new_tokens=12, top_k=top_k)
        hits += stats["sibling_accepted"]
        n_img = model.encode_image(pixels)[2].shape[1]
        assert stats["drafts"]
        for length, drafts in stats["drafts"]:
            verified = tokens[:, :length + 1 - n_img]  # caption tokens up to x_L
            assert verified.shape[1] >= 1
            seq = torch.cat([verified, torch.tensor([drafts[:-1]], dtype=torch.long)], dim=1)
            with torch.no_grad():
                out = model(pixels, seq)
            for k, d in enumerate(drafts, start=1):
                logits = out.mtp_logits[k - 1][0, length - 1]
                assert logits[d] >= logits.max() - 1e-5, (length, k)
    assert (hits > 0) == (top_k > 1)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_forced_all_accept(depth):
    # Zero output norms: every head's logits are exactly 0, so every head picks token 0 (argmax takes the first).
    model = tiny(depth, seed=1)
    silence(model)
    for pixels, ids in cases(3, 256, seed=6):
        tokens, stats = speculative_generate(model, pixels, ids, max_new_tokens=11)
        assert torch.equal(tokens, greedy(model, pixels, ids, 11))
        rounds = stats["tokens_per_round"]
        assert rounds[:-1] == [depth + 1] * (len(rounds) - 1) and 1 <= rounds[-1] <= depth + 1
        assert len(rounds) == -(-10 // (depth + 1))  # ceil(10 / (D+1)) verification forwards
        assert stats["accepted"] == stats["proposed"] and stats["acceptance"] == [1.0] * depth
        assert stats["proposed"] == [sum(len(d) >= k for _, d in stats["drafts"]) for k in range(1, depth + 1)]
        assert stats["proposed"][0] >= len(rounds) - 1  # only the last round may have no room to draft
        assert stats["tokens_per_forward"] == 11 / (1 + len(rounds))


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_forced_all_reject(depth):
    model = never_accepting(depth)
    for pixels, ids in cases(4, 256, seed=7, low=1):
        tokens, stats = speculative_generate(model, pixels, ids, max_new_tokens=9)
        expected = greedy(model, pixels, ids, 9)
        assert torch.equal(tokens, expected)
        assert not (expected == 0).any()
        assert stats["tokens_per_round"] == [1] * 8 and stats["main_forwards"] == 9
        assert stats["tokens_per_forward"] == 1.0 and stats["tau"] == 1.0
        # the last round has room for its own token only, so it drafts nothing
        assert stats["proposed"] == [7] + [0] * (depth - 1) and stats["accepted"] == [0] * depth
        assert stats["acceptance"] == [0.0] + [None] * (depth - 1)
        assert all(d == [0] * min(depth, 7 - i) for i, (_, d) in enumerate(stats["drafts"]))


def test_fewer_depths_and_depth_zero():
    model = tiny(3, vocab=6, seed=3)
    for pixels, ids in cases(4, 6, seed=8):
        expected = greedy(model, pixels, ids, 8)
        for depth in (0, 1, 2):
            tokens, stats = speculative_generate(model, pixels, ids, max_new_tokens=8, depth=depth)
            assert torch.equal(tokens, expected)
            assert len(stats["proposed"]) == depth and all(len(d) <= depth for _, d in stats["drafts"])
        assert speculative_generate(model, pixels, ids, max_new_tokens=8, depth=0)[1]["main_forwards"] == 8


def test_bad_input_is_refused():
    model = tiny(2)
    pixels = torch.randn(2, 3, 28, 28)
    with pytest.raises(ValueError, match="batch size 1"):
        speculative_generate(model, pixels, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="depth=3"):
        speculative_generate(model, pixels[:1], depth=3)
    with pytest.raises(ValueError, match="max_new_tokens=0"):
        speculative_generate(model, pixels[:1], max_new_tokens=0)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        speculative_generate(model, pixels[:1], max_new_tokens=600)
    with pytest.raises(ValueError, match="vocab"):
        speculative_generate(model, pixels[:1], torch.tensor([[256]]))


def test_static_cache_matches_the_dynamic_one_and_rolls_back():
    model = tiny(1, vocab=256, seed=5)
    pixels, ids = torch.randn(1, 3, 28, 28), torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        _, _, image_embeds = model.encode_image(pixels)
        n = image_embeds.shape[1]
        embeds = torch.cat([image_embeds, model.decoder.embed_tokens(ids)], dim=1)
        full, _ = model.forward_decoder(embeds, num_image_tokens=n)
        cache = student.KVCache(len(model.decoder.layers), max_length=embeds.shape[1])
        a, _ = model.forward_decoder(embeds[:, :n + 2], num_image_tokens=n, cache=cache)
        b, _ = model.forward_decoder(embeds[:, n + 2:], cache=cache)
        assert cache.length == embeds.shape[1]
        assert torch.allclose(torch.cat([a, b], 1), full, atol=1e-5)
        cache.crop(n + 2)  # roll back, then overwrite the same positions in place
        assert cache.length == n + 2
        again, _ = model.forward_decoder(embeds[:, n + 2:], cache=cache)
        assert torch.allclose(again, b, atol=1e-6)
        with pytest.raises(ValueError, match="full"):
            model.forward_decoder(embeds[:, :1], cache=cache)


@pytest.mark.parametrize("depth", [1, 3])
def test_a_draft_vocab_keeps_the_output_and_drafts_only_from_it(depth):
    model = tiny(depth, vocab=16, seed=6)
    vocab = [1, 3, 4, 7, 8, 12]
    for pixels, ids in cases(6, 16, seed=30 + depth):
        tokens, stats = speculative_generate(model, pixels, ids, max_new_tokens=12, draft_vocab=vocab)
        assert torch.equal(tokens, greedy(model, pixels, ids, 12))
        assert stats["draft_vocab_size"] == len(vocab)
        assert all(d in vocab for _, drafts in stats["drafts"] for d in drafts)
    model.config.draft_vocab = vocab  # the config's list is the default
    tokens, stats = speculative_generate(model, pixels, ids, max_new_tokens=12)
    assert stats["draft_vocab_size"] == len(vocab) and torch.equal(tokens, greedy(model, pixels, ids, 12))
    assert speculative_generate(model, pixels, ids, max_new_tokens=12, draft_vocab=None)[1]["draft_vocab_size"] == 16


@pytest.mark.parametrize("depth", [2, 3])
def test_draft_vocab_drafts_are_the_restricted_argmax_of_a_full_forward(depth):
    model = tiny(depth, vocab=16, seed=7)
    vocab = torch.tensor([0, 2, 5, 6, 9, 11, 15])
    for pixels, ids in cases(3, 16, seed=40):
        tokens, stats = speculative_generate(model, pixels, ids, max_new_tokens=10, draft_vocab=vocab)
        n_img = model.encode_image(pixels)[2].shape[1]
        for length, drafts in stats["drafts"]:
            seq = torch.cat([tokens[:, :length + 1 - n_img], torch.tensor([drafts[:-1]], dtype=torch.long)], 1)
            with torch.no_grad():
                out = model(pixels, seq)
            for k, d in enumerate(drafts, start=1):
                logits = out.mtp_logits[k - 1][0, length - 1, vocab]
                assert logits[(vocab == d).nonzero()[0, 0]] >= logits.max() - 1e-5, (length, k)


@pytest.mark.parametrize("depth", [1, 2])
def test_draft_vocab_forced_accept_and_reject(depth):
    # Zero output norms: every logit is 0, so the main head picks token 0 and a draft the vocab's first id.
    model = tiny(depth, seed=8)
    silence(model)
    pixels, ids = cases(1, 256, seed=9)[0]
    expected = greedy(model, pixels, ids, 10)
    tokens, stats = speculative_generate(model, pixels, ids, max_new_tokens=10, draft_vocab=[0, 5, 9])
    assert torch.equal(tokens, expected) and stats["acceptance"] == [1.0] * depth
    assert stats["tokens_per_round"][:-1] == [depth + 1] * (len(stats["tokens_per_round"]) - 1)
    tokens, stats = speculative_generate(model, pixels, ids, max_new_tokens=10, draft_vocab=[5, 9])
    assert torch.equal(tokens, expected) and stats["accepted"] == [0] * depth
    assert stats["tokens_per_round"] == [1] * 9


def test_bad_draft_vocab_is_refused():
    model = tiny(1)
    pixels = torch.randn(1, 3, 28, 28)
    for bad in ([], [256], [-1], [[1, 2]]):
        with pytest.raises(ValueError, match="draft_vocab"):
            speculative_generate(model, pixels, draft_vocab=bad)
    with pytest.raises(ValueError, match="draft_vocab"):
        student.load_preset("tiny", vocab_size=256, draft_vocab=[3, 256])
    config = student.load_preset("tiny", vocab_size=256, draft_vocab=[3, 7])
    assert student.CogViTMTPConfig.from_dict(config.to_dict()).draft_vocab == [3, 7]


def test_greedy_tokens_are_the_argmax_of_the_main_logits():
    model = tiny(1, vocab=256, seed=9)
    for shape in ((1, 1), (1, 4), (3, 1), (2, 5)):
        hidden = torch.randn(*shape, model.config.hidden_size)
        with torch.no_grad():
            expected = model.logits_from_hidden(hidden).argmax(-1)
        assert torch.equal(student.speculative.greedy_tokens(model, hidden), expected)


def test_head_scores_measures_each_layout_once_and_both_agree():
    spec = student.speculative
    weight = torch.randn(300, 16)
    for n in (1, 2, 3, 5):
        x = torch.randn(n, 16)
        expected = x @ weight.T
        for layout in (spec._by_rows, spec._by_columns):
            assert layout(weight, x).shape == (n, 300)
            assert torch.allclose(layout(weight, x), expected, atol=1e-5)
        key = (n, 300, 16, torch.float32, torch.get_num_threads())
        spec._LAYOUTS.pop(key, None)
        assert torch.allclose(spec.head_scores(weight, x), expected, atol=1e-5)
        chosen = spec._LAYOUTS[key]
        assert chosen in (spec._by_rows, spec._by_columns)
        spec._LAYOUTS[key] = spec._by_columns  # a cached choice is used as it stands, not measured again
        assert torch.equal(spec.head_scores(weight, x), spec._by_columns(weight, x))
        spec._LAYOUTS[key] = chosen
        assert torch.equal(spec._argmax_rows(weight, x), expected.argmax(1))
    tied = torch.zeros(2, 16)  # all scores equal: the first index, as argmax gives
    assert spec._argmax_rows(weight, tied).tolist() == [0, 0]


@pytest.mark.parametrize("depth,top_k", [(1, 2), (2, 2), (3, 3)])
def test_tree_drafting_matches_greedy_and_accepts_siblings(depth, top_k):
    # Tiny vocabs: the top-1 draft is often wrong while a sibling is right, so sibling acceptance happens.
    sibling_hits = 0
    for vocab, seed in [(4, 0), (4, 1), (8, 2)]:
        model = tiny(depth, vocab=vocab, seed=seed)
        for pixels, ids in cases(5, vocab, seed):
            for n in (2, 13):
                expected = greedy(model, pixels, ids, n)
                tokens, stats = speculative_generate(model, pixels, ids, max_new_tokens=n, top_k=top_k)
                assert torch.equal(tokens, expected)
                assert stats["new_tokens"] == n and sum(stats["tokens_per_round"]) == n - 1
                assert all(1 <= m <= depth + 1 for m in stats["tokens_per_round"])
                assert stats["main_forwards"] == 1 + len(stats["tokens_per_round"])
                sibling_hits += stats["sibling_accepted"]
        model.config.draft_top_k = top_k  # the config's value is the default
        pixels, ids = cases(1, vocab, seed)[0]
        assert speculative_generate(model, pixels, ids, max_new_tokens=6)[1]["top_k"] == min(top_k, vocab)
    assert sibling_hits > 0


def test_tree_drafting_with_eos_and_a_draft_vocab():
    model = tiny(2, vocab=6, seed=11)
    for pixels, ids in cases(4, 6, seed=12):
        free = greedy(model, pixels, ids, 10)[0, -10:]
        for eos in free.unique().tolist():
            tokens, _ = speculative_generate(model, pixels, ids, max_new_tokens=10, eos_token_id=eos, top_k=2,
                                             draft_vocab=[0, 1, 3, 5])
            assert torch.equal(tokens, greedy(model, pixels, ids, 10, eos=eos))
    with pytest.raises(ValueError, match="top_k=0"):
        speculative_generate(model, pixels, ids, top_k=0)
