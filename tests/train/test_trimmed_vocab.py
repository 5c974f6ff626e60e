"""student.vocab=trimmed: the student's vocabulary is the training captions' teacher tokens + specials +
unknown; batches, evaluation, the processor and generate() go through the saved map."""

import pytest
import torch
from transformers import AutoModel, AutoProcessor

import student  # noqa: F401  (registers the Auto classes)
from data.dataset import collate
from data.vocab import UNKNOWN, TokenMap, caption_token_ids
from distill.config import shards_path
from distill.eval import evaluate_student, load_eval_data, mtp_figures
from distill.train import DistillRecipe
from tests.conftest import linked_config


def test_token_map_moves_a_batch_into_the_student_ids():
    tm = TokenMap([7, 3, 9, UNKNOWN], teacher_vocab_size=12)
    batch = {"input_ids": torch.tensor([[7, 3, 5, 9]]), "labels": torch.tensor([[7, 3, 5, -100]]),
             "attention_mask": torch.ones(1, 4, dtype=torch.long),
             "lang": {"topk_ids": torch.tensor([[[3, 5], [9, 7], [11, 3], [7, 9]]])}}
    out = tm.batch(batch)
    assert out["input_ids"].tolist() == [[0, 1, 3, 2]]  # 5 is not in the vocabulary: the unknown token
    assert out["labels"].tolist() == [[0, 1, 3, -100]]
    assert out["lang"]["topk_ids"].tolist() == [[[1, -1], [2, 0], [-1, 1], [0, 2]]]  # -1: folds into the tail
    assert out["lang"]["teacher_vocab_size"] == 12
    assert tm.teacher_ids_of(torch.tensor([0, 3])).tolist() == [7, UNKNOWN]
    assert tm.unknown_fraction(batch) == (1, 4)
    with pytest.raises(ValueError, match="distinct"):
        TokenMap([7, 7, UNKNOWN], 12)
    with pytest.raises(ValueError, match="exactly one unknown"):
        TokenMap([7, 3], 12)


@pytest.fixture(scope="module")
def trimmed(tiny_collected, tmp_path_factory):
    cfg = linked_config(tiny_collected, tmp_path_factory.mktemp("trimmed"), "student.vocab=trimmed",
                        "train.max_steps=4")
    recipe = DistillRecipe(cfg)
    recipe.setup()
    recipe.summary = recipe.train()
    return recipe


def test_trimmed_student_trains_on_its_own_vocabulary(trimmed):
    r = trimmed
    config = r.student_config
    teacher_vocab = r.dataset.targets[r.dataset.language]["producer"]["vocab_size"]
    ids = config.teacher_token_ids
    assert config.vocab_size == len(ids) < teacher_vocab and config.teacher_vocab_size == teacher_vocab
    assert set(caption_token_ids(r.dataset)) <= set(ids) and ids[-1] == UNKNOWN
    assert config.draft_vocab is None and config.eos_token_id == ids.index(r.pad_id)
    assert all(torch.isfinite(torch.tensor(h["loss/language"])) for h in r.history)
    # a training batch holds only student ids, and some teacher top-k tokens fold into the tail
    batch = r.token_map.batch(collate([r.dataset[i] for i in range(8)], r.pad_id))
    assert batch["input_ids"].max() < config.vocab_size and (batch["lang"]["topk_ids"] < config.vocab_size).all()
    assert (batch["lang"]["topk_ids"][batch["lang"]["mask"]] == -1).any()
    exported = AutoModel.from_pretrained(r.summary["student_dir"])
    assert exported.config.teacher_token_ids == ids
    assert exported.get_input_embeddings().weight.shape[0] == len(ids)


def test_evaluation_and_decoding_go_through_the_map(trimmed):
    r = trimmed
    cfg = r.cfg
    folder = r.summary["student_dir"]
    dirs = {n: shards_path(cfg, "targets", n) for n in r.dataset.targets}
    test, _, stds = load_eval_data(shards_path(cfg, "samples"), dirs, cfg.student.image_size, False,
                                   cfg.loss.standardize)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    model = AutoModel.from_pretrained(folder).eval()
    metrics = evaluate_student(model, test, None, processor.tokenizer, stds=stds, pad_id=r.pad_id, batch_size=16)
    assert 0.0 <= metrics["eval/unknown_token_rate"] < 0.5
    # agreement is bounded by the positions whose teacher top-1 the trimmed vocabulary has
    assert metrics["eval/agreement/main"] <= metrics["eval/teacher_top1_in_vocab"] <= 1.0
    assert all(torch.isfinite(torch.tensor(metrics[k])) for k in ("eval/kl/main", "eval/perplexity"))
    figures = mtp_figures(model, test, 8, 2, 4)  # speculative == greedy, checked inside
    assert figures["mtp/tau"] >= 1.0

    caption = "a red circle above a blue square"
    teacher_ids = processor.tokenizer(caption, add_special_tokens=False)["input_ids"]
    inputs = processor(text=caption)
    tm = TokenMap.from_config(model.config)
    assert inputs["input_ids"][0, 1:].tolist() == tm.student_ids(torch.tensor(teacher_ids)).tolist()
    if all(t in model.config.teacher_token_ids for t in teacher_ids):
        assert processor.decode(inputs["input_ids"][0, 1:]) == caption
    image = test[0]["pixel_values"][None]
    out = model.generate(pixel_values=image, input_ids=inputs["input_ids"][:, :3], max_new_tokens=4)
    assert out.max() < model.config.vocab_size
    assert isinstance(processor.batch_decode(out)[0], str)


def test_trimmed_refuses_an_explicit_vocab_size(train_cfg):
    with pytest.raises(ValueError, match="leave student.vocab_size"):
        DistillRecipe(train_cfg("student.vocab=trimmed", "student.vocab_size=512")).setup()
