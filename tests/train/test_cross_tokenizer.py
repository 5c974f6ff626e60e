"""student.tokenizer: a student with its own tokenizer (configs/tiny_xtoken.yaml) distils from the tiny teacher's
shards through data/student_tokenizer.py: the sparse KD on 1:1-aligned positions, ULD on the others; its
tokenizer ships with the exported student, and evaluation goes through the same transform."""

from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoProcessor, AutoTokenizer

import student  # noqa: F401  (registers the Auto classes)
from data.dataset import DistillDataset, ManifestMismatchError
from data.student_tokenizer import CrossTokenizer, build_tokenizer, split_captions
from distill.config import ConfigError, load_config, shards_path
from distill.eval import evaluate_run, evaluate_student, folder_cross, load_eval_data, mtp_figures
from distill.losses import SparseTargets, language_kd_loss
from distill.train import STUDENT_TOKENIZER, DistillRecipe, StudentVocab
from tests.conftest import PROJECT_ROOT, TINY, linked_config

XTOKEN = PROJECT_ROOT / "configs" / "tiny_xtoken.yaml"


def test_items_move_into_the_student_tokens_and_collate_carries_both_masks(tiny_collected):
    cfg, collected = tiny_collected
    target_dirs = {n: Path(d) for n, d in collected["targets"].items()}
    dataset = DistillDataset(shards_path(cfg, "samples"), target_dirs, "train",
                             transform=student.image_transform(cfg.student.image_size))
    captions = split_captions(dataset)
    assert len(captions) == len(dataset) and captions[0] == dataset[0]["caption"]
    student_tok = build_tokenizer("captions", captions, 300)
    again = build_tokenizer("captions", captions, 300)  # deterministic: every rank and a resume build the same
    assert student_tok.backend_tokenizer.to_str() == again.backend_tokenizer.to_str()
    teacher_tok = AutoTokenizer.from_pretrained(str(target_dirs["lm"] / "tokenizer"))
    cross = CrossTokenizer(teacher_tok, student_tok, 512)
    batch = StudentVocab(len(cross), cross.pad_id, cross=cross).collate([dataset[i] for i in range(16)])
    lang = batch["lang"]
    assert batch["input_ids"].max() < len(student_tok) == 300 and lang["teacher_vocab_size"] == 512
    assert not (lang["mask"] & lang["approx"]).any() and lang["mask"].any() and lang["approx"].any()
    has_next = torch.zeros_like(lang["mask"])
    has_next[:, :-1] = batch["attention_mask"][:, 1:].bool()  # targets only where a next caption token follows
    assert not ((lang["mask"] | lang["approx"]) & ~has_next).any() and (lang["topk_ids"][lang["mask"]] < 300).all()
    assert batch["input_ids"][0, 0] == cross.special_ids["bos_token_id"]
    assert student_tok.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()][1:-1]) == dataset[0]["caption"]
    logits = torch.randn(*batch["input_ids"].shape, 300)
    assert torch.isfinite(language_kd_loss(logits, SparseTargets.from_mapping(lang)))
    with pytest.raises(ValueError, match="at least 261"):
        build_tokenizer("captions", captions, 200)
    with pytest.raises(FileNotFoundError, match="neither null"):
        build_tokenizer("/no/such/tokenizer", captions, 300)


def test_config_refuses_a_student_tokenizer_with_a_trimmed_or_fixed_vocabulary():
    with pytest.raises(ConfigError, match="student.vocab=trimmed"):
        load_config([TINY, XTOKEN], ["student.vocab=trimmed"])
    with pytest.raises(ConfigError, match="leave student.vocab_size null"):
        load_config([TINY, XTOKEN], ["student.vocab_size=300"])


def test_a_vocab_mismatch_without_alignment_is_refused_naming_both_sizes(train_cfg):
    with pytest.raises(ManifestMismatchError, match=r"teacher vocab 512 != student vocab 300.*student.tokenizer"):
        DistillRecipe(train_cfg("student.vocab_size=300")).setup()


@pytest.fixture(scope="module")
def xtoken(tiny_collected, tmp_path_factory):
    root = tmp_path_factory.mktemp("xtoken")
    cfg = linked_config(tiny_collected, root, f"shards_dir={root / 'run'}", "train.max_steps=4",
                        "evaluate.probe=false", "evaluate.mtp_prompts=2", configs=(TINY, XTOKEN))
    recipe = DistillRecipe(cfg)
    recipe.setup()
    recipe.summary = recipe.train()
    return recipe


@pytest.mark.slow
def test_a_student_with_its_own_tokenizer_trains_with_kd_and_uld(xtoken):
    r = xtoken
    config = r.student_config
    assert config.vocab_size == 300 != r.dataset.targets["lm"]["producer"]["vocab_size"]
    assert config.teacher_token_ids is None and max(config.draft_vocab) < 300
    assert config.eos_token_id == config.pad_token_id == r.vocab.cross.student.eos_token_id == r.pad_id
    for h in r.history:
        for key in ("loss/language", "loss/lang_kd", "loss/lang_uld", "loss/lang_uld/mtp1", "loss/lang_uld/mtp2"):
            assert torch.isfinite(torch.tensor(h[key])), key
    assert any(h["loss/lang_uld"] > 0 for h in r.history)


@pytest.mark.slow
def test_the_exported_student_reads_its_own_tokenizer_and_evaluates_through_it(xtoken):
    r = xtoken
    cfg, folder = r.cfg, r.summary["student_dir"]
    assert (Path(cfg.output_dir) / STUDENT_TOKENIZER).is_dir()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    own = r.vocab.cross.student
    assert len(processor.tokenizer) == 300 and processor.tokenizer.backend_tokenizer.to_str() == \
        own.backend_tokenizer.to_str()
    caption = "a red circle above a blue square"
    inputs = processor(text=caption)
    assert inputs["input_ids"][0].tolist() == [own.bos_token_id] + own(caption, add_special_tokens=False)["input_ids"]
    assert processor.decode(inputs["input_ids"][0, 1:]) == caption

    dirs = {n: shards_path(cfg, "targets", n) for n in r.dataset.targets}
    teacher_tok = AutoTokenizer.from_pretrained(str(dirs["lm"] / "tokenizer"))
    teacher_copy = Path(cfg.output_dir) / "teacher_tokenizer_copy"  # a folder with the teacher's: no transform
    teacher_tok.save_pretrained(str(teacher_copy))
    assert folder_cross(teacher_copy, teacher_tok, 512) is None
    cross = folder_cross(folder, teacher_tok, 512)
    assert cross is not None and len(cross) == 300
    test, _, stds = load_eval_data(shards_path(cfg, "samples"), dirs, cfg.student.image_size, False,
                                   cfg.loss.standardize)
    model = AutoModel.from_pretrained(folder).eval()
    metrics = evaluate_student(model, test, None, None, stds=stds, batch_size=16, cross=cross)
    for key in ("eval/kl/main", "eval/agreement/main", "eval/kl/mtp1", "eval/perplexity"):
        assert torch.isfinite(torch.tensor(metrics[key])), key
    assert 0 < metrics["eval/aligned_fraction"] <= 1 and metrics.get("eval/grounded_tokens", 0) > 0
    assert mtp_figures(model, test, 2, 3, 4, cross=cross)["mtp/tau"] >= 1.0  # speculative == greedy inside
    out = model.generate(pixel_values=test[0]["pixel_values"][None], input_ids=inputs["input_ids"][:, :3],
                         max_new_tokens=4)
    assert out.max() < 300 and isinstance(processor.batch_decode(out)[0], str)

    report = evaluate_run(cfg, dirs)  # finds the student's own tokenizer in its folder
    assert 0 < report["metrics"]["eval/aligned_fraction"] <= 1
    assert report["metrics"]["eval/kl/main"] == pytest.approx(metrics["eval/kl/main"], rel=1e-4)


@pytest.mark.slow
def test_the_tiny_xtoken_config_runs_the_whole_pipeline(prefect_harness, tiny_collected, tmp_path):
    """configs/tiny_xtoken.yaml through the Prefect pipeline (collect reuses the session's shards)."""
    import mlflow

    from flows.pipeline import run_pipeline
    cfg = linked_config(tiny_collected, tmp_path, f"shards_dir={tmp_path / 'run'}", "train.max_steps=3",
                        "evaluate.probe=false", "evaluate.mtp_prompts=2", configs=(TINY, XTOKEN))
    result = run_pipeline(cfg)
    metrics = mlflow.MlflowClient(cfg.tracking.uri).get_run(result["evaluate_run_id"]).data.metrics
    assert 0.0 < metrics["eval/aligned_fraction"] <= 1.0 and "eval/kl/main" in metrics
    assert len(AutoTokenizer.from_pretrained(result["student_dir"])) == 300
