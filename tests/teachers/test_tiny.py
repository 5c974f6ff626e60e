import threading

from data.identity import weights_digest
from teachers.tiny import ensure_tiny_teacher, make_tiny_tokenizer


def test_tiny_teacher_is_deterministic_and_built_once(tmp_path):
    a = ensure_tiny_teacher("vit", tmp_path / "a")
    b = ensure_tiny_teacher("vit", tmp_path / "b")
    assert weights_digest(a) == weights_digest(b)  # same seed and settings, two caches
    assert ensure_tiny_teacher("vit", tmp_path / "a", seed=1) != a
    assert weights_digest(ensure_tiny_teacher("vit", tmp_path / "a", seed=1)) != weights_digest(a)
    assert ensure_tiny_teacher("vit", tmp_path / "a", hidden_size=48) not in (a,)
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_teacher("vit", tmp_path / "a") == a
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime  # reused, not rebuilt


def test_concurrent_creators_share_one_folder(tmp_path):
    results, errors = [], []

    def build():
        try:
            results.append(ensure_tiny_teacher("clip", tmp_path))
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(set(results)) == 1
    assert [p.name for p in (tmp_path / "tiny").iterdir()] == [results[0].name]  # no temp dirs left
    assert (results[0] / "model.safetensors").is_file()


def test_tiny_tokenizer_round_trips():
    corpus = ["a handwritten digit seven.", "two red circles at the top.", "a photo of a shirt."] * 20
    tok = make_tiny_tokenizer(corpus, vocab_size=300)
    assert len(tok) <= 300
    assert [tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id] == [0, 1, 2, 3]
    for text in ["a handwritten digit seven.", "Zebra café 42!"]:  # unseen words and bytes too
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids and tok.decode(ids) == text
    assert len(tok("a handwritten digit seven.")["input_ids"]) < len("a handwritten digit seven.")  # merges learned
