"""The staged recipe: each stage trains its own terms and parameters, is a child MLflow run of the
training run, and a resume continues the stage and both MLflow runs where they stopped."""

import shutil
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

import student
from distill.config import load_config
from distill.train import DistillRecipe, resolve_stages

STAGES = ("train.stages=[{name: vision, steps: 3, losses: [vision], trainable: [vision, heads], micro_batch_size: 16},"
          " {name: contrastive, steps: 2, losses: [vision, contrastive], lr: 2.0e-3},"
          " {name: joint, steps: 3, losses: [language, vision]}]")
COMMON = [STAGES, "train.checkpoint_every=2", "train.keep_checkpoints=3"]


def run(cfg) -> DistillRecipe:
    recipe = DistillRecipe(cfg)
    recipe.setup()
    recipe.summary = recipe.train()
    return recipe


def weights(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if k.startswith(prefix)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stages_resolve_from_the_loss_switches():
    cfg = load_config("configs/tiny.yaml", [STAGES])
    stages = resolve_stages(cfg, has_vision_teachers=True)
    assert [(s.name, s.start, s.steps, s.terms) for s in stages] == [
        ("vision", 0, 3, ("vision",)), ("contrastive", 3, 2, ("vision", "contrastive")),
        ("joint", 5, 3, ("language", "vision"))]
    assert stages[0].parts == ("vision", "heads") and stages[0].micro_batch_size == 16
    # `all`, less what no term reaches: the contrastive stage cannot train the merger or the MTP modules
    assert stages[1].parts == ("vision", "heads", "decoder", "contrastive") and stages[1].lr == 2e-3
    # the CE-only switches drop the vision-only stage and the teacher and contrastive terms elsewhere
    ce = load_config("configs/tiny.yaml", [STAGES, "loss.vision=false", "loss.contrastive=false"])
    assert [(s.name, s.start, s.terms) for s in resolve_stages(ce, True)] == [("joint", 0, ("language",))]
    # no stages: one `joint` stage of max_steps, language and vision (the single-stage recipe)
    plain = resolve_stages(load_config("configs/tiny.yaml", ["train.max_steps=7"]), True)
    assert [(s.name, s.steps, s.terms) for s in plain] == [("joint", 7, ("language", "vision"))]
    assert resolve_stages(load_config("configs/tiny.yaml", ["train.max_steps=null"]), True)[0].steps == 100
    # with stages, max_steps caps the recipe: the stage reaching it is cut short, later ones dropped
    capped = resolve_stages(load_config("configs/tiny.yaml", [STAGES, "train.max_steps=4"]), True)
    assert [(s.name, s.start, s.steps) for s in capped] == [("vision", 0, 3), ("contrastive", 3, 1)]


def test_staged_recipe_trains_each_stage_on_its_terms_and_parts(train_cfg):
    r = run(train_cfg(*COMMON))
    out = Path(r.cfg.output_dir)
    assert [h["stage"] for h in r.history] == ["vision"] * 3 + ["contrastive"] * 2 + ["joint"] * 3
    assert [h["step"] for h in r.history] == list(range(1, 9))
    by_stage = {h["stage"]: set(h) for h in r.history}
    assert "loss/language" not in by_stage["vision"] and "loss/contrastive" not in by_stage["vision"]
    assert {"loss/contrastive", "contrastive/accuracy", "weight/contrastive"} <= by_stage["contrastive"]
    assert "loss/language" in by_stage["joint"] and "loss/contrastive" not in by_stage["joint"]
    contrastive = [h["loss/contrastive"] for h in r.history if h["stage"] == "contrastive"]
    assert all(torch.isfinite(torch.tensor(contrastive)))

    vision, con, final = out / "stages" / "vision", out / "stages" / "contrastive", out / "student"
    torch.manual_seed(r.cfg.seed)
    init = student.build_student(r.student_config).state_dict()
    # frozen parts are exactly the previous stage's (the vision stage's decoder is the initial one)
    assert same(weights(vision, "decoder."), {k: v for k, v in init.items() if k.startswith("decoder.")})
    assert not same(weights(vision, "vision."), {k: v for k, v in init.items() if k.startswith("vision.")})
    assert same(weights(vision, "merger."), weights(con, "merger."))
    assert same(weights(vision, "mtp."), weights(con, "mtp."))
    assert not same(weights(vision, "vision."), weights(con, "vision."))
    assert not same(weights(vision, "contrastive."), weights(con, "contrastive."))
    assert not same(weights(vision, "decoder."), weights(con, "decoder."))  # the caption side trains it
    assert not same(weights(con, "merger."), weights(final, "merger."))
    assert (final / "tokenizer.json").exists() and (vision / "tokenizer.json").exists()

    mlflow.set_tracking_uri(r.cfg.tracking.uri)
    client = MlflowClient()
    train_id = r.summary["mlflow_run_id"]
    children = client.search_runs([client.get_run(train_id).info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{train_id}'")
    assert sorted(c.info.run_name for c in children) == ["stage/contrastive", "stage/joint", "stage/vision"]
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "loss/total")]
        stage = child.info.run_name.split("/")[1]
        assert steps == [h["step"] for h in r.history if h["stage"] == stage]
        assert child.info.status == "FINISHED" and child.data.params["stage.terms"]
    assert [m.step for m in client.get_metric_history(train_id, "loss/total")] == list(range(1, 9))


def test_resume_continues_the_stage_and_its_mlflow_runs(train_cfg):
    full = run(train_cfg(*COMMON))
    ckpt = Path(full.cfg.output_dir) / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000005", "step-00000007", "step-00000008"]
    shutil.rmtree(ckpt / "step-00000008")  # died after step 7, in the joint stage
    resumed = run(train_cfg(*COMMON, "train.resume=true"))
    assert [(h["step"], h["stage"]) for h in resumed.history] == [(8, "joint")]
    assert resumed.history[0]["loss/total"] == full.history[-1]["loss/total"]
    assert resumed.summary["mlflow_run_id"] == full.summary["mlflow_run_id"]
    assert resumed.run_ids == full.run_ids  # the same training and stage runs continue
    client = MlflowClient(tracking_uri=full.cfg.tracking.uri)
    joint = client.get_run(full.run_ids["joint"])
    assert joint.info.status == "FINISHED"
    assert sorted({m.step for m in client.get_metric_history(joint.info.run_id, "loss/total")}) == [6, 7, 8]


def test_a_failing_stage_ends_its_runs_failed(train_cfg, monkeypatch):
    recipe = DistillRecipe(train_cfg(*COMMON))
    recipe.setup()
    calls = []
    step = recipe.train_step

    def boom(batches):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("injected failure")
        return step(batches)
    monkeypatch.setattr(recipe, "train_step", boom)
    with pytest.raises(RuntimeError, match="injected failure"):
        recipe.train()
    client = MlflowClient(tracking_uri=recipe.cfg.tracking.uri)
    assert client.get_run(recipe.run_ids["train"]).info.status == "FAILED"
    assert client.get_run(recipe.run_ids["contrastive"]).info.status == "FAILED"
    assert client.get_run(recipe.run_ids["vision"]).info.status == "FINISHED"


def test_a_fresh_run_refuses_an_output_dir_with_checkpoints(train_cfg):
    from distill.train import CheckpointsExistError
    run(train_cfg("train.max_steps=2"))
    with pytest.raises(CheckpointsExistError, match=r"up to step 2.*train\.resume=true.*new output_dir"):
        DistillRecipe(train_cfg("train.max_steps=2")).setup()


def test_the_student_drafts_from_the_training_captions_vocabulary(train_cfg):
    r = run(train_cfg("train.max_steps=1"))
    config = student.CogViTMTPConfig.from_pretrained(r.summary["student_dir"])
    train_ids = {int(t) for i in range(len(r.dataset)) for t in r.dataset[i]["input_ids"]}
    assert config.draft_vocab == sorted(train_ids) and len(train_ids) < config.vocab_size


@pytest.mark.slow
def test_a_drafter_stage_trains_the_mtp_modules_alone_on_the_main_heads_tokens(train_cfg):
    stages = ("train.stages=[{name: joint, steps: 2, losses: [language]},"
              " {name: drafters, steps: 8, losses: [drafter], trainable: [all], lr: 1.0e-2, warmup_steps: 0}]")
    r = run(train_cfg(stages, "train.checkpoint_every=10"))
    # `all`, less what the stage's terms can't reach
    assert [s.parts for s in r.stages] == [("vision", "merger", "decoder", "mtp"), ("mtp",)]
    drafts = [h for h in r.history if h["stage"] == "drafters"]
    assert {"loss/drafter", "drafter/match1", "drafter/covered1", "drafter/match2"} <= set(drafts[0])
    assert "loss/language" not in drafts[0]
    assert drafts[-1]["loss/drafter"] < drafts[0]["loss/drafter"]  # the drafters learn the main head's tokens
    out = Path(r.cfg.output_dir)
    joint, final = out / "stages" / "joint", out / "student"
    for frozen in ("vision.", "merger.", "decoder.", "teacher_heads."):
        assert same(weights(joint, frozen), weights(final, frozen)), frozen
    assert not same(weights(joint, "mtp."), weights(final, "mtp."))
    with pytest.raises(ValueError, match="drafter term .* runs alone"):
        resolve_stages(load_config("configs/tiny.yaml", ["train.stages=[{name: both, losses: [language, drafter]}]"]),
                       True)
