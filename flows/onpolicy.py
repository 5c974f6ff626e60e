"""Prefect flow `onpolicy-distill`: rounds of on-policy distillation (GKD) after a pipeline run.

Round r lives in output_dir/onpolicy/round-<r>:
1. generate-continuations: the previous round's student (round 1: output_dir/student) continues the caption
   prefixes of `onpolicy.prompts` train rows -> samples/ (no generation and no teacher when onpolicy.mix=0);
2. score-continuations: the language teacher scores them with the collection code -> targets/<teacher>/;
3. distill-student (subflow): training resumes from the previous student on the offline shards with the
   continuations mixed in at onpolicy.mix -> student/;
4. evaluate-round: the evaluation metrics plus eval/onpolicy_kl, the teacher's KL to the student on the student's
   own continuations of `onpolicy.eval_prompts` test prompts (eval_onpolicy/).
Each round is a child MLflow run of one `onpolicy` parent. A killed loop resumes where it stopped: state.json keeps
the run ids, round.json marks a finished round, continuations are reused when their student and settings match,
finished target shards by their sidecars, and training resumes from its checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
from prefect import flow, task
from prefect.runtime import flow_run

from data.shards import atomic_write_json, load_manifest, run_lock
from distill import tracking
from distill.config import ConfigError, Vocab, from_dict, output_path, shards_path, teacher_configs, to_container
from distill.eval import evaluate_run
from distill.train.onpolicy import ORIGIN, generations, onpolicy_kl, round_config
from flows.adapt import with_adapters
from flows.artifacts import link_mlflow_run
from flows.targets import collect_options, collect_teacher, graft_of
from flows.train import distill_student
from teachers.collect import collect_shard, finalize_targets

CURVES = ("eval/onpolicy_kl", "eval/onpolicy_agreement", "eval/kl/main", "eval/agreement/main", "eval/perplexity")


@task(name="generate-continuations", task_run_name="{split}/round-{round_}")
def generate_task(config: dict, student_dir: str, folder: str, split: str, n: int, round_: int) -> dict:
    cfg = from_dict(config)
    manifest = generations(cfg, Path(student_dir), Path(folder) / "samples", split=split, n=n, round_=round_,
                           seed=cfg.seed * 1000 + round_ if split == "train" else cfg.seed)
    return {"rows": manifest["rows"], "empty": sum(manifest["rows_skipped"].values())}


@task(name="score-continuations", task_run_name="{folder}")
def score_task(config: dict, folder: str) -> dict:
    """The language teacher's targets for the continuations in `folder` (finished shards are reused)."""
    cfg = from_dict(config)
    folder, name = Path(folder), cfg.teachers.language.name
    tcfg, teacher, producer = collect_teacher(cfg, name)
    samples = load_manifest(folder / "samples")
    entries = [collect_shard(teacher, folder / "samples" / s["file"], folder / "targets" / name,
                             producer_digest=producer, batch_size=cfg.collect.batch_size,
                             compression=cfg.collect.compression, progress=cfg.collect.progress)
               for s in samples["shards"]]
    finalize_targets(teacher, folder / "targets" / name, samples, entries, config_digest=producer,
                     collect_options=collect_options(cfg, tcfg), origin=ORIGIN)
    return {"teacher_forwards": sum(e["forwards"] for e in entries),
            "rows_scored": sum(e["rows"] for e in entries),  # the budget: every scored row, reused or not
            "shards_reused": sum(e["skipped"] for e in entries)}


@task(name="onpolicy-kl", task_run_name="{folder}")
def onpolicy_kl_task(config: dict, student_dir: str, folder: str) -> dict:
    """eval/onpolicy_kl of `student_dir`: its continuations of test prompts, scored by the teacher."""
    cfg = from_dict(config)
    generate_task.fn(config, student_dir, folder, "test", cfg.onpolicy.eval_prompts, 0)
    scored = score_task.fn(config, folder)
    kl = onpolicy_kl(Path(student_dir), Path(folder), cfg.teachers.language.name, cfg.onpolicy.prompt_tokens,
                     cfg.student.image_size, cfg.evaluate.batch_size)
    return {**kl, "eval/onpolicy_teacher_forwards": scored["teacher_forwards"]}


@task(name="evaluate-round")
def evaluate_task(config: dict) -> dict:
    cfg = from_dict(config)
    return evaluate_run(cfg, {t.name: shards_path(cfg, "targets", t.name) for t in teacher_configs(cfg)})["metrics"]


@flow(name="onpolicy-distill", log_prints=True)
def onpolicy_distill(config: dict) -> dict:
    if graft_of(config) is not None:
        raise ConfigError("config key 'teachers.language.adapt.vision': on-policy rounds score the student's own "
                          "continuations, which have no stored vision features, so a grafted teacher cannot score "
                          "them; use a text-only correction or an hf_vlm teacher")
    config = with_adapters(config)  # a corrected teacher scores the continuations with its cached adapters
    cfg = from_dict(config)
    if cfg.teachers.language is None:
        raise ValueError("on-policy rounds need a language teacher (teachers.language)")
    if cfg.student.vocab != Vocab.teacher or cfg.student.tokenizer is not None:
        raise ValueError("on-policy rounds support students with the language teacher's tokenizer and vocabulary "
                         "(student.vocab=teacher, student.tokenizer=null)")
    root, start = output_path(cfg, ORIGIN), output_path(cfg, "student")
    if not (start / "model.safetensors").is_file():
        raise FileNotFoundError(f"{start}: no trained student to start the rounds from; run `mmtp pipeline` (make "
                                "distill) with this config first")
    root.mkdir(parents=True, exist_ok=True)
    state_path = root / "state.json"
    state = json.loads(state_path.read_text()) if state_path.is_file() else {"rounds": {}}
    op = cfg.onpolicy
    with run_lock(root), tracking.stage_run(cfg, ORIGIN, flow_run_id=flow_run.id,
                                            run_id=state.get("parent_run_id")) as parent:
        state["parent_run_id"] = parent.info.run_id
        atomic_write_json(state_path, state)
        if "start" not in state and op.eval_prompts > 0:  # the starting student's on-policy KL
            state["start"] = onpolicy_kl_task(config, str(start), str(root / "start" / "eval_onpolicy"))
            atomic_write_json(state_path, state)
        previous, results = start, []
        for r in range(1, op.rounds + 1):
            folder = root / f"round-{r}"
            done = folder / "round.json"
            if not done.is_file():
                run_round(cfg, r, folder, previous, state, state_path)
            results.append(json.loads(done.read_text()))
            previous = folder / "student"
        # curves over the rounds (step = round, 0 = the starting student), then the last round's figures
        for r, metrics in enumerate([state.get("start", {})] + [x["metrics"] for x in results]):
            mlflow.log_metrics({k: v for k, v in metrics.items() if k in CURVES}, step=r)
        mlflow.log_metrics({**(results[-1]["metrics"] if results else {}),
                            "onpolicy/rows_scored": sum(x["rows_scored"] for x in results)})
    link_mlflow_run(cfg, ORIGIN, state["parent_run_id"])
    summary = {"mlflow_run_id": state["parent_run_id"], "student_dir": str(previous), "rounds": results,
               "start": state.get("start", {})}
    for x in results:
        print(f"round {x['round']}: eval/onpolicy_kl {x['metrics'].get('eval/onpolicy_kl', float('nan')):.4f}, "
              f"eval/kl/main {x['metrics'].get('eval/kl/main', float('nan')):.4f}, "
              f"teacher forwards {x['teacher_forwards']}; student in {x['student_dir']}")
    return summary


def run_round(cfg, r: int, folder: Path, previous: Path, state: dict, state_path: Path) -> None:
    """One round inside its MLflow run (a child of the active `onpolicy` run); writes round.json at the end."""
    op, config = cfg.onpolicy, to_container(cfg)
    mixed = op.mix > 0
    round_cfg = round_config(cfg, folder, previous, folder if mixed else None)
    round_dict = to_container(round_cfg)
    with tracking.stage_run(round_cfg, f"round-{r}", state["parent_run_id"], {"mmtp.onpolicy_round": str(r)},
                            flow_run.id, run_id=state["rounds"].get(str(r))) as run:
        state["rounds"][str(r)] = run.info.run_id
        atomic_write_json(state_path, state)
        generated = scored = {}
        if mixed:
            generated = generate_task(config, str(previous), str(folder), "train", op.prompts, r)
            scored = score_task(config, str(folder))
        summary = distill_student(round_dict, run.info.run_id)
        metrics = evaluate_task(round_dict)
        if op.eval_prompts > 0:
            metrics.update(onpolicy_kl_task(config, summary["student_dir"], str(folder / "eval_onpolicy")))
        counts = {"onpolicy/teacher_forwards": scored.get("teacher_forwards", 0),
                  "onpolicy/rows_scored": scored.get("rows_scored", 0),
                  "onpolicy/shards_reused": scored.get("shards_reused", 0),
                  "onpolicy/empty_continuations": generated.get("empty", 0)}
        mlflow.log_metrics({**metrics, **counts})
        atomic_write_json(folder / "round.json", {
            "round": r, "metrics": metrics, "teacher_forwards": counts["onpolicy/teacher_forwards"],
            "rows_scored": counts["onpolicy/rows_scored"], "shards_reused": counts["onpolicy/shards_reused"],
            "student_dir": summary["student_dir"], "mlflow_run_id": run.info.run_id,
            "train_run_id": summary["mlflow_run_id"]})


def run_onpolicy(cfg) -> dict:
    return onpolicy_distill(to_container(cfg))
