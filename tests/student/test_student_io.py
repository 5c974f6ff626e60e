"""Save/load round trips, gradient checkpointing, and KV-cached generation."""

import torch
from transformers import AutoConfig, AutoModel

import student


def _same_outputs(a, b, pixels, ids, mask):
    with torch.no_grad():
        x, y = a(pixels, ids, mask), b(pixels, ids, mask)
    assert torch.equal(x.logits, y.logits)
    assert all(torch.equal(p, q) for p, q in zip(x.mtp_logits, y.mtp_logits, strict=True))
    for name in x.teacher_outputs:
        for key in ("summary", "features"):
            assert torch.equal(x.teacher_outputs[name][key], y.teacher_outputs[name][key])


def test_save_load_round_trip(make_model, batch, tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = student.CogViTMTPForDistillation.from_pretrained(tmp_path)
    _same_outputs(model, loaded, *batch)
    assert loaded.config.teachers == model.config.teachers
    assert loaded.lm_head.weight is loaded.decoder.embed_tokens.weight  # tied embeddings stay tied

    auto = AutoModel.from_pretrained(tmp_path)
    assert type(auto) is student.CogViTMTPForDistillation
    assert AutoConfig.from_pretrained(tmp_path).model_type == "cogvit_mtp"
    _same_outputs(model, auto, *batch)


def test_untied_round_trip(make_model, batch, tmp_path):
    model = make_model(tie_word_embeddings=False)
    assert model.lm_head.weight is not model.decoder.embed_tokens.weight
    model.save_pretrained(tmp_path)
    _same_outputs(model, AutoModel.from_pretrained(tmp_path), *batch)


def _grads(model, pixels, ids, mask):
    model.zero_grad()
    out = model(pixels, ids, mask, labels=ids)
    teacher = sum(o["features"].pow(2).mean() + o["summary"].pow(2).mean() for o in out.teacher_outputs.values())
    (out.loss + teacher).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_gives_the_same_grads(make_model, batch):
    model = make_model()
    model.train()
    reference = _grads(model, *batch)

    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    calls = []
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False):
            func = module._gradient_checkpointing_func
            module._gradient_checkpointing_func = lambda *a, f=func, **k: calls.append(1) or f(*a, **k)
    checkpointed = _grads(model, *batch)
    assert len(calls) == 2 + 2 + 2  # vision blocks, decoder blocks, MTP blocks
    assert checkpointed.keys() == reference.keys() and len(reference) > 50
    for name, grad in reference.items():
        assert torch.allclose(checkpointed[name], grad, atol=1e-6, rtol=1e-5), name


def test_greedy_generate_matches_uncached_decoding(make_model, batch):
    model = make_model()
    pixels, ids, _ = batch
    prompt = ids[:, :3]
    generated = model.greedy_generate(pixels, prompt, max_new_tokens=6)
    assert generated.shape == (2, 9) and torch.equal(generated[:, :3], prompt)
    # reference: recompute the full forward for every new token
    seq = prompt
    with torch.no_grad():
        for _ in range(6):
            nxt = model(pixels, seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(generated, seq)


def test_greedy_generate_eos_and_image_only_prompt(make_model, batch):
    model = make_model()
    pixels, ids, _ = batch
    first = model.greedy_generate(pixels, max_new_tokens=1)
    with torch.no_grad():
        out = model(pixels, ids)
    # with no prompt, the first token is predicted at the last image position
    assert torch.equal(first[:, 0], out.logits[:, out.num_image_tokens - 1].argmax(-1))
    eos = int(first[0, 0])
    gen = model.greedy_generate(pixels, max_new_tokens=5, eos_token_id=eos)
    assert (gen[0] == eos).all()  # a finished sequence is filled with eos
    row = gen[1].tolist()
    if eos in row:
        assert set(row[row.index(eos):]) == {eos}
    else:
        assert len(row) == 5


def test_incremental_decoder_and_mtp_caches_match_full_pass(make_model, batch):
    model = make_model()
    pixels, ids, _ = batch
    with torch.no_grad():
        _, _, image_embeds = model.encode_image(pixels)
        n = image_embeds.shape[1]
        embeds = torch.cat([image_embeds, model.decoder.embed_tokens(ids)], dim=1)
        full, _ = model.forward_decoder(embeds, num_image_tokens=n)
        cache = student.KVCache(len(model.decoder.layers))
        part1, cache = model.forward_decoder(embeds[:, : n + 2], num_image_tokens=n, cache=cache)
        part2, cache = model.forward_decoder(embeds[:, n + 2 :], cache=cache)
        assert cache.length == embeds.shape[1]
        assert torch.allclose(torch.cat([part1, part2], 1), full, atol=1e-5)

        tokens = model.mtp_token_embeddings(ids, n)[:, 1:]  # depth 1: the token at i + 1
        h = full[:, :-1]
        mtp_full, _ = model.forward_mtp_depth(1, h, tokens)
        mtp_cache = student.KVCache(1)
        a, mtp_cache = model.forward_mtp_depth(1, h[:, :5], tokens[:, :5], cache=mtp_cache)
        b, mtp_cache = model.forward_mtp_depth(1, h[:, 5:], tokens[:, 5:], cache=mtp_cache)
        assert torch.allclose(torch.cat([a, b], 1), mtp_full, atol=1e-5)
        assert torch.allclose(model.logits_from_hidden(mtp_full, 1), model(pixels, ids).mtp_logits[0][:, :-1],
                              atol=1e-5)
        cache.crop(n + 2)  # roll back to the first part
        assert cache.length == n + 2
        again, _ = model.forward_decoder(embeds[:, n + 2 :], cache=cache)
        assert torch.allclose(again, part2, atol=1e-6)
