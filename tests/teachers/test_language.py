import shutil

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import teachers.language as language
from data.identity import file_sha256
from teachers import TeacherSourceError, load_teacher, peek_vocab_size
from teachers.language import HFCausalLMTeacher
from teachers.tiny import ensure_tiny_teacher

CAPTIONS = [
    "a handwritten digit seven.",
    "two red circles and a small green square at the top.",
    "a photo of a pair of trousers.",
    "three",
]


def config(source, **overrides):
    return dict(dict(name="lm", kind="hf_causal_lm", source=str(source), top_k=8), **overrides)


def reference_logprobs(lm, row):
    """log-softmax of the teacher model run alone on one row, in float64."""
    with torch.no_grad():
        logits = lm.model(input_ids=torch.tensor([row])).logits[0].double()
    return torch.log_softmax(logits, dim=-1)


def test_topk_logprobs_are_the_log_softmax_at_the_top_ids(lm):
    rows, _ = lm.encode(CAPTIONS)
    targets = lm.soft_targets(rows)
    for row, t in zip(rows, targets, strict=True):
        L, k = len(row), lm.cfg.top_k
        assert t["topk_ids"].shape == (L, k) and t["topk_ids"].dtype == np.int32
        assert t["topk_logprobs"].shape == (L, k) and t["topk_logprobs"].dtype == np.float32
        assert t["tail_logprob"].shape == (L,) and t["tail_logprob"].dtype == np.float32
        assert (t["token_ids"] == np.array(row)).all()
        ref = reference_logprobs(lm, row).numpy()
        ids = t["topk_ids"]
        np.testing.assert_allclose(t["topk_logprobs"], np.take_along_axis(ref, ids, 1), atol=1e-5)
        assert (np.diff(t["topk_logprobs"], axis=1) <= 0).all()  # sorted descending
        # the top-k are really the k most likely: nothing outside beats the k-th
        outside = ref.copy()
        np.put_along_axis(outside, ids, -np.inf, 1)
        assert (outside.max(1) <= t["topk_logprobs"][:, -1] + 1e-6).all()
        # top-k plus the tail bucket is the whole distribution
        buckets = np.concatenate([t["topk_logprobs"], t["tail_logprob"][:, None]], axis=1).astype(np.float64)
        np.testing.assert_allclose(np.logaddexp.reduce(buckets, axis=1), 0.0, atol=1e-5)
        tail_ref = np.log(np.exp(outside).sum(1))
        np.testing.assert_allclose(t["tail_logprob"], tail_ref, rtol=1e-5, atol=1e-6)


def test_tail_is_stable_when_the_top_k_holds_almost_all_mass(llama_dir, cache_dir):
    lm = HFCausalLMTeacher(config(llama_dir), cache_dir)
    with torch.no_grad():
        lm.model.lm_head.weight.mul_(300.0)  # very peaked: the tail mass underflows 1 - sum(p)
    rows, _ = lm.encode(CAPTIONS[:2])
    for row, t in zip(rows, lm.soft_targets(rows), strict=True):
        ref = reference_logprobs(lm, row)
        outside = ref.scatter(-1, torch.from_numpy(t["topk_ids"]).long(), float("-inf"))
        tail_ref = torch.logsumexp(outside, dim=-1).numpy()
        assert np.isfinite(t["tail_logprob"]).all()
        assert (tail_ref < -20).any()  # the case naive log(1 - sum p) gets wrong in float32
        np.testing.assert_allclose(t["tail_logprob"], tail_ref, rtol=1e-4)


def test_top_k_equal_to_vocab_gives_minus_inf_tail(llama_dir, cache_dir):
    lm = HFCausalLMTeacher(config(llama_dir, top_k=512), cache_dir)
    assert lm.vocab_size == 512
    rows, _ = lm.encode(CAPTIONS[:2])
    for t in lm.soft_targets(rows):
        assert not np.isnan(t["tail_logprob"]).any() and not np.isnan(t["topk_logprobs"]).any()
        assert np.isneginf(t["tail_logprob"]).all()
        np.testing.assert_allclose(np.logaddexp.reduce(t["topk_logprobs"].astype(np.float64), axis=1), 0, atol=1e-5)
    with pytest.raises(ValueError, match="top_k=513"):
        HFCausalLMTeacher(config(llama_dir, top_k=513), cache_dir)


def test_targets_do_not_depend_on_batching_or_padding(lm):
    rows, _ = lm.encode(CAPTIONS)
    assert len({len(r) for r in rows}) > 1  # the batch really is padded
    batched = lm.soft_targets(rows)
    for row, b in zip(rows, batched, strict=True):
        alone = lm.soft_targets([row])[0]
        assert (alone["topk_ids"] == b["topk_ids"]).all()
        np.testing.assert_allclose(alone["topk_logprobs"], b["topk_logprobs"], atol=1e-5)
        np.testing.assert_allclose(alone["tail_logprob"], b["tail_logprob"], atol=1e-5)


def test_position_j_depends_only_on_tokens_up_to_j(lm):
    row, _ = lm.encode(["a photo of a pair of trousers."])
    row = row[0]
    changed = list(row)
    changed[4] = (changed[4] + 7) % lm.vocab_size
    a, b = lm.soft_targets([row, changed])
    np.testing.assert_allclose(a["topk_logprobs"][:4], b["topk_logprobs"][:4], atol=1e-5)
    assert not np.allclose(a["topk_logprobs"][4], b["topk_logprobs"][4], atol=1e-3)


def test_encode_adds_bos_eos_and_truncates(llama_dir, cache_dir, lm):
    tok = lm.tokenizer
    rows, truncated = lm.encode(CAPTIONS)
    assert truncated == 0
    for caption, row in zip(CAPTIONS, rows, strict=True):
        assert row[0] == tok.convert_tokens_to_ids("<s>") and row[-1] == tok.convert_tokens_to_ids("</s>")
        assert tok.decode(row[1:-1]) == caption
    short = HFCausalLMTeacher(config(llama_dir, max_tokens=6), cache_dir)
    cut, truncated = short.encode(CAPTIONS)
    assert truncated == sum(len(r) > 6 for r in rows) > 0
    assert all(c == r[:6] for c, r in zip(cut, rows, strict=True))
    with pytest.raises(TypeError, match="caption 1"):
        lm.encode(["ok", None])
    with pytest.raises(ValueError, match="outside"):
        lm.soft_targets([[1, lm.vocab_size]])


def test_peek_vocab_size_needs_no_weights(llama_dir, cache_dir, lm, tmp_path):
    no_weights = tmp_path / "no_weights"
    shutil.copytree(llama_dir, no_weights)
    for f in no_weights.glob("*.safetensors"):
        f.unlink()
    assert peek_vocab_size(config(no_weights), cache_dir) == lm.vocab_size == 512
    assert peek_vocab_size(config("tiny-random:llama"), cache_dir) == 512


def test_hub_id_offline_gives_a_clear_error(monkeypatch, cache_dir):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cfg = config("no-such-owner/no-such-model")
    with pytest.raises(TeacherSourceError, match=r"no-such-owner/no-such-model.*offline.*local folder"):
        HFCausalLMTeacher(cfg, cache_dir)
    with pytest.raises(TeacherSourceError, match="offline"):
        peek_vocab_size(cfg, cache_dir)
    with pytest.raises(TeacherSourceError, match="does not exist"):
        HFCausalLMTeacher(config("./no/such/folder"), cache_dir)


def test_identity_digests(llama_dir, cache_dir, lm):
    again = HFCausalLMTeacher(config(llama_dir), cache_dir)
    assert again.identity() == lm.identity()
    ident = lm.identity()
    assert ident["vocab_size"] == 512 and ident["top_k"] == 8 and ident["kind"] == "hf_causal_lm"
    other_weights = HFCausalLMTeacher(config(ensure_tiny_teacher("llama", cache_dir, seed=1)), cache_dir).identity()
    assert other_weights["weights_digest"] != ident["weights_digest"]
    assert other_weights["tokenizer_digest"] == ident["tokenizer_digest"]
    other_vocab = HFCausalLMTeacher(config(ensure_tiny_teacher("llama", cache_dir, vocab_size=384)), cache_dir)
    assert other_vocab.vocab_size == 384
    assert other_vocab.identity()["tokenizer_digest"] != ident["tokenizer_digest"]


def test_gguf_is_converted_once_then_loaded_from_the_cache(monkeypatch, llama_dir, tmp_path):
    # A stand-in for the real GGUF loaders: a gguf_file load returns the tiny llama.
    gguf_dir = tmp_path / "pkg"
    gguf_dir.mkdir()
    (gguf_dir / "model.gguf").write_bytes(b"GGUF stand-in bytes")
    calls = []
    real_model, real_tok = AutoModelForCausalLM.from_pretrained, AutoTokenizer.from_pretrained

    def fake(real):
        def load(path, *args, gguf_file=None, quantization_config=None, **kwargs):
            if gguf_file is not None:
                calls.append(gguf_file)
                path = llama_dir
            return real(path, *args, **kwargs)
        return load

    monkeypatch.setattr(language.AutoModelForCausalLM, "from_pretrained", fake(real_model))
    monkeypatch.setattr(language.AutoTokenizer, "from_pretrained", fake(real_tok))
    cache = tmp_path / "cache"
    cfg = config(gguf_dir, gguf_file="model.gguf")
    first = HFCausalLMTeacher(cfg, cache)
    assert calls == ["model.gguf", "model.gguf"]  # tokenizer + model, converted once
    second = HFCausalLMTeacher(cfg, cache)
    assert len(calls) == 2  # the second load reads the converted folder
    digest = file_sha256(gguf_dir / "model.gguf")
    assert (cache / f"gguf-{digest[:16]}" / "model.safetensors").is_file()
    assert first.identity()["weights_digest"] == second.identity()["weights_digest"] == digest
    rows, _ = first.encode(CAPTIONS[:2])
    np.testing.assert_allclose(first.forward_logits(rows), second.forward_logits(rows))
    with pytest.raises(TeacherSourceError, match="missing.gguf"):
        HFCausalLMTeacher(config(gguf_dir, gguf_file="missing.gguf"), cache)


def test_trust_remote_code_is_off_by_default_and_warned_about(llama_dir, cache_dir, lm, caplog):
    assert lm.cfg.trust_remote_code is False
    with caplog.at_level("WARNING", logger="teachers.registry"):
        load_teacher(config(llama_dir, trust_remote_code=True), cache_dir)
    assert "trust_remote_code=True" in caplog.text


def bucketed(z, ids, outside, tau):
    """Exactly tempered (k+1)-bucket log-probs from full logits."""
    lp = (z.double() / tau).log_softmax(-1)
    return torch.cat([lp.gather(-1, ids), lp.masked_fill(~outside, float("-inf")).logsumexp(-1, True)], -1)


def test_tempered_tail_is_the_exact_tempered_tail_and_makes_kd_exact(llama_dir, cache_dir, lm):
    from distill.losses import SparseTargets, language_kd_loss

    taus = [2.0, 4.0]
    tempered = HFCausalLMTeacher(config(llama_dir, tail_temperatures=taus), cache_dir)
    assert tempered.identity()["tail_temperatures"] == taus and "tempered_tail" not in lm.soft_targets([[1, 5]])[0]
    rows, _ = tempered.encode(CAPTIONS[:2])
    for row, t in zip(rows, tempered.soft_targets(rows), strict=True):
        logits = tempered.model(input_ids=torch.tensor([row])).logits[0].double().detach()
        ids = torch.from_numpy(t["topk_ids"]).long()
        rest = logits.scatter(-1, ids, float("-inf"))
        for j, tau in enumerate(taus):
            ref = (rest / tau).logsumexp(-1) - (logits.gather(-1, ids) / tau).logsumexp(-1)
            np.testing.assert_allclose(t["tempered_tail"][:, j], ref.numpy(), rtol=1e-5, atol=1e-5)
            # the KD from the stored targets against the dense teacher bucketed at tau: exact
            student = torch.randn(1, len(row), logits.shape[-1], generator=torch.Generator().manual_seed(j))
            stored = [torch.from_numpy(t[n])[None] for n in ("topk_logprobs", "tail_logprob")]
            targets = SparseTargets(ids[None], *stored, torch.ones(1, len(row), dtype=torch.bool),
                                    torch.from_numpy(t["tempered_tail"])[None], tuple(taus))
            sparse = language_kd_loss(student, targets, temperature=tau, reduction="none")[0].double()
            outside = torch.ones_like(logits, dtype=torch.bool).scatter(-1, ids, False)

            p, q = (bucketed(z, ids, outside, tau) for z in (logits, student[0]))
            dense = (p.exp() * (p - q)).sum(-1) * tau**2
            assert (sparse - dense).abs().max() <= 1e-5 * (1 + dense.abs().max())


def test_storage_options_are_checked(llama_dir):
    from teachers.registry import teacher_config

    assert teacher_config(config(llama_dir)).logprob_encoding == "q8_sorted"
    with pytest.raises(ValueError, match="logprob_encoding 'q9' is not one of"):
        teacher_config(config(llama_dir, logprob_encoding="q9"))
    for bad in ([2.0, 2.0], [0.0], [1.0], ["x"]):
        with pytest.raises(ValueError, match="tail_temperatures"):
            teacher_config(config(llama_dir, tail_temperatures=bad))


def test_a_typo_in_the_encoding_fails_at_config_load(tmp_path):
    from distill.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="logprob_encoding"):
        load_config("configs/tiny.yaml", ["teachers.language.logprob_encoding=q9"])
    cfg = load_config("configs/tiny.yaml", ["teachers.language.tail_temperatures=[2.0,4.0]"])
    assert list(cfg.teachers.language.tail_temperatures) == [2.0, 4.0]
