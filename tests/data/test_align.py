"""Cross-tokenizer alignment (data/align.py): vocab map, offset groups, teacher targets at student positions."""

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from data.align import Group, align, encode_row, student_targets, vocab_map
from distill.losses import SparseTargets, language_kd_loss, uld_loss
from teachers.tiny import make_tiny_tokenizer, tiny_corpus

CAPTIONS = [*tiny_corpus(12, seed=3), "a bluecat sits, doesn't it?", "two  spaces\n", "un café 🐱 là", ""]


@pytest.fixture(scope="module")
def tokenizers():
    teacher = make_tiny_tokenizer(tiny_corpus(600, seed=0), vocab_size=512)
    student = make_tiny_tokenizer(tiny_corpus(300, seed=7), vocab_size=300)
    assert len(teacher) == 512 and len(student) == 300
    return teacher, student


def test_vocab_map_pairs_share_their_surface_and_absent_tokens_map_to_minus_one(tokenizers):
    teacher, student = tokenizers
    m = vocab_map(teacher, student)
    assert m.dtype == np.int64 and m.shape == (len(teacher),)
    mapped = m[m >= 0]
    assert len(np.unique(mapped)) == len(mapped) and mapped.max() < len(student)  # injective, in range
    specials = set(teacher.all_special_ids)
    student_vocab = student.get_vocab()
    absent = 0
    for t_id, token in enumerate(teacher.convert_ids_to_tokens(list(range(len(teacher))))):
        if t_id in specials:
            continue
        if token in student_vocab:  # both byte-level: equal token strings are equal bytes
            s_id = int(m[t_id])
            assert student.convert_ids_to_tokens(s_id) == token
        else:
            assert m[t_id] == -1, token
            absent += 1
    assert absent > 100  # the larger teacher vocab has many merges the student lacks
    for role in ("bos", "eos", "pad", "unk"):
        assert m[getattr(teacher, f"{role}_token_id")] == getattr(student, f"{role}_token_id")


def test_vocab_map_maps_specials_by_role_not_by_text(tokenizers):
    teacher, student = tokenizers
    # a GPT-2 style student: "<s>" is its eos and there is no bos; "</s>" stays a special without a role
    gpt2_like = PreTrainedTokenizerFast(tokenizer_object=student.backend_tokenizer, eos_token="<s>",
                                        pad_token="<pad>", unk_token="<unk>")
    assert gpt2_like.bos_token_id is None and gpt2_like.eos_token_id == student.convert_tokens_to_ids("<s>")
    m = vocab_map(teacher, gpt2_like)
    assert m[teacher.eos_token_id] == gpt2_like.eos_token_id
    assert m[teacher.bos_token_id] == -1  # same text "<s>" as the student's eos, but another role
    assert student.convert_tokens_to_ids("</s>") not in m  # a student special without a role is no target
    assert len(vocab_map(teacher, student, teacher_vocab_size=520)) == 520


def test_vocab_map_stays_injective_with_duplicate_surfaces_and_respects_the_student_width(tokenizers):
    teacher, student = tokenizers
    copy = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(teacher.backend_tokenizer.to_str()),
                                   bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    copy.add_tokens([" the"])  # an added token with the surface of the vocab token "Ġthe"
    m = vocab_map(copy, student)
    the = teacher.convert_tokens_to_ids("Ġthe")
    assert len(m) == len(teacher) + 1 and m[the] == student.convert_tokens_to_ids("Ġthe") and m[-1] == -1
    narrow = vocab_map(teacher, student, student_vocab_size=100)
    assert narrow.max() < 100 and (narrow >= 0).sum() == 100


def test_hand_written_groups():
    # "a bluecat is here": teacher a|Ġbluec|at|Ġis|Ġhere, student a|Ġblue|cat|Ġis|Ġhe|re
    teacher = [(0, 1), (1, 7), (7, 9), (9, 12), (12, 17)]
    student = [(0, 1), (1, 6), (6, 9), (9, 12), (12, 15), (15, 17)]
    assert align(teacher, student, 17) == [Group(0, 1, 0, 1, 0, 1), Group(1, 3, 1, 3, 1, 9),
                                           Group(3, 4, 3, 4, 9, 12), Group(4, 5, 4, 6, 12, 17)]
    # "a 🐱": the teacher splits the emoji's bytes into two tokens with the same character span
    assert align([(0, 1), (1, 2), (2, 3), (2, 3)], [(0, 1), (1, 3), (2, 3)], 3) == [
        Group(0, 1, 0, 1, 0, 1), Group(1, 4, 1, 3, 1, 3)]
    # overlapping offsets (a token ends inside a character its successor starts with): no boundary there
    assert align([(0, 2), (1, 3)], [(0, 2), (2, 3)], 3) == [Group(0, 2, 0, 2, 0, 3)]
    # offsets with the leading space trimmed on one side only still align " cat"
    assert align([(0, 1), (2, 5)], [(0, 1), (1, 5)], 5) == [Group(0, 1, 0, 1, 0, 1), Group(1, 2, 1, 2, 1, 5)]
    assert align([], [], 0) == []


@pytest.mark.parametrize("text", CAPTIONS)
def test_groups_cover_the_text_and_one_to_one_groups_have_equal_spans(tokenizers, text):
    teacher, student = tokenizers
    (t_ids, t_off), (s_ids, s_off) = encode_row(teacher, text), encode_row(student, text)
    assert (t_off[0] == 0).all() and (t_off[-1] == len(text)).all() and t_ids[0] == teacher.bos_token_id
    groups = align(t_off[1:-1], s_off[1:-1], len(text))
    if not text:
        assert groups == []
        return
    assert groups[0].start == 0 and groups[-1].end == len(text)
    assert groups[0].t_start == 0 and groups[0].s_start == 0
    assert groups[-1].t_stop == len(t_ids) - 2 and groups[-1].s_stop == len(s_ids) - 2
    for a, b in zip(groups, groups[1:], strict=False):
        assert a.end == b.start and a.t_stop == b.t_start and a.s_stop == b.s_start
    for g in groups:
        assert g.start < g.end and g.t_start < g.t_stop and g.s_start < g.s_stop
        span = text[g.start:g.end]
        assert teacher.decode(t_ids[1 + g.t_start:1 + g.t_stop].tolist()) == span
        assert student.decode(s_ids[1 + g.s_start:1 + g.s_stop].tolist()) == span
        if g.one_to_one:
            assert tuple(t_off[1 + g.t_start]) == tuple(s_off[1 + g.s_start]) == (g.start, g.end)


def test_exact_and_approx_positions_of_a_hand_written_row():
    # teacher [bos] a|Ġbluec|at|Ġis|Ġhere [eos]; student [bos] a|Ġblue|cat|Ġis|Ġhe|re [eos]
    t_ids = np.array([2, 10, 11, 12, 13, 14, 3])
    t_off = np.array([(0, 0), (0, 1), (1, 7), (7, 9), (9, 12), (12, 17), (17, 17)])
    s_ids = np.array([2, 20, 21, 22, 23, 24, 25, 3])
    s_off = np.array([(0, 0), (0, 1), (1, 6), (6, 9), (9, 12), (12, 15), (15, 17), (17, 17)])
    id_map = np.full(16, -1)
    id_map[[2, 3, 10, 13]] = [2, 3, 20, 23]
    k = 2
    row = {"token_ids": t_ids, "topk_ids": np.tile([10, 15], (7, 1)), "topk_logprobs": np.full((7, k), -1.5),
           "tail_logprob": np.arange(7.0)}
    out = student_targets(row, t_ids, t_off, s_ids, s_off, id_map)
    assert out["teacher_position"].tolist() == [0, 1, -1, 3, 4, -1, 5, -1]
    assert out["exact"].tolist() == [True, False, False, True, False, False, True, False]
    assert out["approx"].tolist() == [False, True, False, False, True, False, False, False]
    assert out["topk_ids"][0].tolist() == [20, -1] and (out["topk_ids"][2] == -1).all()
    assert out["tail_logprob"].tolist() == [0, 1, 0, 3, 4, 0, 5, 0]
    id_map[13] = -1  # "Ġis" outside the student vocab: its 1:1 group is no longer exact
    out = student_targets(row, t_ids, t_off, s_ids, s_off, id_map)
    assert not out["exact"][3] and out["approx"][3]
    cut = {key: value[:4] for key, value in row.items()}  # teacher row truncated to 4 tokens
    out = student_targets(cut, t_ids, t_off, s_ids, s_off, id_map)
    assert out["teacher_position"].tolist() == [0, 1, -1, 3, -1, -1, -1, -1]
    with pytest.raises(ValueError, match="prefix"):
        student_targets(dict(row, token_ids=t_ids[::-1]), t_ids, t_off, s_ids, s_off, id_map)


def dense_case(tokenizer, text, seed, k=24):
    """The teacher row of `text` from random dense logits, and those dense log-probs [L, V]."""
    ids, _ = encode_row(tokenizer, text)
    g = torch.Generator().manual_seed(seed)
    logp = (torch.randn(len(ids), len(tokenizer), generator=g, dtype=torch.float64) * 3).log_softmax(-1)
    top, top_ids = logp.topk(k, -1)
    tail = logp.scatter(-1, top_ids, -torch.inf).logsumexp(-1)
    row = {"token_ids": ids.astype(np.int32), "topk_ids": top_ids.int().numpy(),
           "topk_logprobs": top.float().numpy(), "tail_logprob": tail.float().numpy()}
    return row, logp


def test_exact_positions_carry_the_dense_teacher_mass_and_the_sparse_kd_is_exact(tokenizers):
    teacher, student = tokenizers
    m = vocab_map(teacher, student)
    inverse = {int(s): t for t, s in enumerate(m) if s >= 0}
    counts = {"exact": 0, "approx": 0, "folded": 0}
    for n, text in enumerate(CAPTIONS):
        row, logp = dense_case(teacher, text, seed=n)
        (t_ids, t_off), (s_ids, s_off) = encode_row(teacher, text), encode_row(student, text)
        out = student_targets(row, t_ids, t_off, s_ids, s_off, m)
        exact, approx, pos = out["exact"], out["approx"], out["teacher_position"]
        assert not (exact & approx).any() and ((pos >= 0) == (exact | approx)).all()
        assert ((out["topk_ids"] == -1).all(-1) | exact | approx).all()
        counts["exact"] += int(exact.sum())
        counts["approx"] += int(approx.sum())
        for i in np.flatnonzero(exact | approx):
            j = pos[i]
            assert s_off[i + 1, 0] == t_off[j + 1, 0]  # both predict what follows the same text
            if exact[i]:
                assert m[t_ids[j + 1]] == s_ids[i + 1] and tuple(s_off[i + 1]) == tuple(t_off[j + 1])
        # buckets: each mapped top-k token's student id carries the dense teacher mass of that token,
        # and tail + folded columns carry the rest
        p = logp.exp().numpy()
        for i in np.flatnonzero(exact):
            j, ids, lp = pos[i], out["topk_ids"][i], out["topk_logprobs"][i].astype(np.float64)
            keep = ids >= 0
            dense = p[j, [inverse[int(s)] for s in ids[keep]]]
            np.testing.assert_allclose(np.exp(lp[keep]), dense, rtol=1e-5)
            rest = np.exp(out["tail_logprob"][i]) + np.exp(lp[~keep]).sum()
            np.testing.assert_allclose(rest, 1 - dense.sum(), rtol=1e-5, atol=1e-7)
            counts["folded"] += int((~keep).sum())
        # end to end: the sparse KD at exact positions equals a dense bucket KL
        g = torch.Generator().manual_seed(100 + n)
        z = torch.randn(1, len(s_ids), len(student), generator=g, dtype=torch.float64)
        targets = SparseTargets(torch.from_numpy(out["topk_ids"])[None], torch.from_numpy(out["topk_logprobs"])[None],
                                torch.from_numpy(out["tail_logprob"])[None], torch.from_numpy(exact)[None],
                                teacher_vocab_size=len(teacher))
        sparse = language_kd_loss(z.float(), targets, "forward_kl", reduction="none")[0].double()
        q = z[0].softmax(-1).numpy()
        for i in range(len(s_ids)):
            if not exact[i]:
                assert sparse[i] == 0
                continue
            ids = out["topk_ids"][i]
            pb = p[pos[i], [inverse[int(s)] for s in ids[ids >= 0]]]
            qb = q[i, ids[ids >= 0]]
            pb, qb = np.append(pb, 1 - pb.sum()), np.append(qb, 1 - qb.sum())
            assert abs(sparse[i].item() - (pb * np.log(pb / qb)).sum()) < 1e-5
        if approx.any():  # and the ULD loss takes the approx positions
            approx_targets = SparseTargets(targets.topk_ids, targets.topk_logprobs, targets.tail_logprob,
                                           torch.from_numpy(approx)[None])
            assert torch.isfinite(uld_loss(z.float(), approx_targets)) and uld_loss(z.float(), approx_targets) > 0
    assert counts["exact"] > 50 and counts["approx"] > 20 and counts["folded"] > 50, counts


def test_truncated_teacher_rows_mask_the_positions_they_lack(tokenizers):
    teacher, student = tokenizers
    m = vocab_map(teacher, student)
    text = CAPTIONS[1]
    row, _ = dense_case(teacher, text, seed=7)
    (t_ids, t_off), (s_ids, s_off) = encode_row(teacher, text), encode_row(student, text)
    full = student_targets(row, t_ids, t_off, s_ids, s_off, m)
    cut = student_targets({key: v[:6] for key, v in row.items()}, t_ids, t_off, s_ids, s_off, m)
    keep = (full["teacher_position"] >= 0) & (full["teacher_position"] < 6)
    assert keep.sum() < (full["teacher_position"] >= 0).sum()
    assert (cut["exact"] == full["exact"] & keep).all() and (cut["approx"] == full["approx"] & keep).all()
    for key in ("topk_ids", "topk_logprobs", "tail_logprob"):
        np.testing.assert_array_equal(cut[key][keep], full[key][keep])
    assert (cut["topk_ids"][~keep] == -1).all() and (cut["teacher_position"][~keep] == -1).all()
