"""Drafter self-distillation: MTP depth k learns the main head's greedy token k positions on."""

import pytest
import torch

import student
from distill.losses import drafter_loss, greedy_captions


def heads(b=2, t=6, d=8, v=11, depth=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(v, d, generator=g)
    states = [torch.randn(b, t, d, generator=g, requires_grad=True) for _ in range(depth + 1)]
    return states, weight


def test_targets_are_the_main_heads_greedy_tokens_k_positions_on():
    states, weight = heads()
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # row 1 has 4 tokens
    # drafters that copy the main head's state k positions on draft exactly its greedy tokens
    perfect = [states[0]] + [torch.cat([states[0][:, k:], states[0][:, :k]], 1).detach().requires_grad_()
                             for k in (1, 2)]
    out = drafter_loss(perfect, weight, mask)
    assert out["drafter/match1"] == 1 and out["drafter/match2"] == 1
    worse = drafter_loss(states, weight, mask)
    assert worse["loss"] > out["loss"] and worse["drafter/match1"] < 1
    # only the drafters' states get a gradient; the main head's tokens are fixed targets
    worse["loss"].backward()
    assert states[0].grad is None and states[1].grad.abs().sum() > 0
    # a padded position or one past a caption's last token is never a target: changing it changes nothing
    states2 = [s.detach().clone() for s in states]
    states2[1][1, 3:] = 100.0  # row 1: position 3 predicts past the caption's end, 4 and 5 are padding
    states2[2][1, 2:] = 100.0
    assert torch.allclose(drafter_loss(states2, weight, mask)["loss"], worse["loss"])


def test_a_draft_vocabulary_scores_its_rows_only_and_skips_targets_outside_it():
    states, weight = heads()
    mask = torch.ones(2, 6, dtype=torch.long)
    greedy = (states[0] @ weight.T).argmax(-1)
    vocab = sorted({int(x) for x in greedy[:, 1:5].reshape(-1)})  # the targets of depth 1 (row ends excluded)
    out = drafter_loss(states, weight, mask, vocab)
    assert out["drafter/covered1"] == 1
    # depth 2's targets are greedy[:, 2:5]: all in the vocabulary too
    missing = [i for i in range(weight.shape[0]) if i not in vocab][:3]
    narrow = drafter_loss(states, weight, mask, [vocab[0], *missing])
    assert 0 <= narrow["drafter/covered1"] < 1
    # reference: depth k at t < 5 - k (t + k is not the last position) against greedy[t + k], over the draft rows
    rows, index = weight[vocab], torch.tensor([vocab.index(int(x)) if int(x) in vocab else -1 for x in range(11)])
    ce = [torch.nn.functional.cross_entropy((states[k][:, :5 - k] @ rows.T).reshape(-1, len(vocab)),
                                            index[greedy[:, k:5]].reshape(-1)) for k in (1, 2)]
    assert torch.allclose(out["loss"], (ce[0] + ce[1]) / 2, atol=1e-6)


def test_the_greedy_targets_are_the_same_in_chunks(monkeypatch):
    """The main head's argmax is taken a few positions at a time (no [B, T, V] logits at once): the same loss."""
    import distill.losses.drafters
    states, weight = heads(b=3, t=7)
    mask = torch.ones(3, 7, dtype=torch.long)
    whole = drafter_loss(states, weight, mask)
    monkeypatch.setattr(distill.losses.drafters, "GREEDY_CHUNK", 4)  # 21 positions: 6 chunks, the last one short
    chunked = drafter_loss(states, weight, mask)
    assert whole.keys() == chunked.keys() and all(torch.equal(whole[k], chunked[k]) for k in whole)


def test_a_student_without_mtp_depths_is_refused():
    states, weight = heads(depth=0)
    with pytest.raises(ValueError, match="mtp_depth = 0"):
        drafter_loss(states, weight, torch.ones(2, 6))


def test_the_drafters_learn_from_the_students_own_greedy_captions():
    torch.manual_seed(0)
    model = student.CogViTMTPForDistillation(student.load_preset("tiny", initializer_range=0.2, mtp_depth=2))
    g = torch.Generator().manual_seed(1)
    pixels, captions = torch.randn(3, 3, 28, 28, generator=g), torch.randint(8, 256, (3, 6), generator=g)
    mask = torch.ones(3, 6, dtype=torch.long)
    mask[2, 4:] = 0  # the shortest caption has 4 tokens: prompts of at most 3
    with torch.no_grad():  # eos = row 0's second new token after a 3-token prompt, so rows end at different steps
        model.config.eos_token_id = int(model.eval().greedy_generate(pixels[:1], captions[:1, :3], 2)[0, 4])
    model.train()
    torch.manual_seed(5)
    ids, got = greedy_captions(model, pixels, captions, mask, max_prompt_tokens=8)
    torch.manual_seed(5)
    p = min(int(torch.randint(1, 9, ())), 3)
    assert model.training  # restored
    with torch.no_grad():
        want = model.eval().greedy_generate(pixels, captions[:, :p], 6 - p)
    assert torch.equal(ids, want) and torch.equal(ids[:, :p], captions[:, :p]) and ids.shape[1] <= 6
    eos = model.config.eos_token_id
    for r in range(3):  # a row's mask covers its tokens up to its first generated eos, nothing after
        new, n = ids[r, p:].tolist(), int(got[r].sum())
        assert n == p + (new.index(eos) + 1 if eos in new else len(new))
        assert got[r, :n].all() and not got[r, n:].any()
    assert got.sum(1).tolist() != [ids.shape[1]] * 3  # some row stopped early
