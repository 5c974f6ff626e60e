"""Vocabulary benchmark: the student on the teacher's vocabulary, on a trimmed one, and with a tokenizer of
its own, on the same shards.

    python bench/vocab.py [--config configs/default.yaml] [--steps 100] [--time-steps 6]
                          [--variants teacher trimmed xtoken] [--out docs/results/vocab.json] [key=value ...]

Needs the config's shards (`mmtp collect`). Per variant: parameters and the embedding's share; the median
time of a joint trainer step (language + vision terms, the variants interleaved step by step so that
drift of this noisy machine hits all alike) and its ratio to the teacher-vocabulary step; then `--steps`
joint steps of training (one stage, from scratch) and the test-split evaluation: teacher agreement and KL
(a cross-tokenizer student: on its 1:1-aligned positions), perplexity (per student token, so only
comparable between the same tokenizer's students). Prints one JSON object and writes it to `--out`.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.env import apply_env_defaults  # noqa: E402

apply_env_defaults()

import torch  # noqa: E402

from data.shards import atomic_write_json  # noqa: E402
from distill.config import load_config, shards_path, teacher_configs  # noqa: E402
from distill.eval import evaluate_run  # noqa: E402
from distill.train import DistillRecipe  # noqa: E402

VARIANTS = {"teacher": [], "trimmed": ["student.vocab=trimmed"], "xtoken": ["student.tokenizer=captions"]}
METRICS = ("eval/agreement/main", "eval/kl/main", "eval/agreement/mtp1", "eval/perplexity", "eval/aligned_fraction",
           "eval/teacher_top1_in_vocab", "eval/unknown_token_rate", "eval/grounded_acc", "mtp/acceptance_at_1")


def parameters(recipe: DistillRecipe) -> dict:
    model = recipe.engine.module.student
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight.numel()
    return {"vocab_size": recipe.student_config.vocab_size, "parameters": total, "embedding_parameters": embedding,
            "embedding_share": round(embedding / total, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--steps", type=int, default=100, help="training steps per variant (0: timing only)")
    p.add_argument("--time-steps", type=int, default=6)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--work", default="outputs/bench_vocab")
    p.add_argument("--out", default="docs/results/vocab.json")
    p.add_argument("--evaluate-only", action="store_true",
                   help="evaluate the students an earlier run trained in --work again, into --out's rows")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    work = Path(args.work).resolve()
    shards = load_config(args.config, args.overrides).output_dir

    def config(name: str, phase: str):
        return load_config(args.config, [
            f"shards_dir={shards}", *args.overrides, *VARIANTS[name], "train.stages=[]", "train.progress=false",
            f"train.max_steps={max(args.steps, 1)}", f"train.checkpoint_every={max(args.steps, 1)}",
            f"output_dir={work / phase / name}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
            "evaluate.baseline=null", "evaluate.probe=false"])

    def evaluate(name: str) -> dict:
        cfg = config(name, "trained")
        dirs = {t.name: shards_path(cfg, "targets", t.name) for t in teacher_configs(cfg)}
        metrics = evaluate_run(cfg, dirs)["metrics"]
        return {k: round(metrics[k], 4) for k in METRICS if k in metrics}

    if args.evaluate_only:
        result = json.loads(Path(args.out).read_text())
        for name in args.variants:
            result["variants"][name].update(evaluate(name))
        result["evaluated_again"] = " ".join(["python bench/vocab.py", *sys.argv[1:]])
        print(json.dumps(result, indent=1))
        atomic_write_json(Path(args.out), result)
        return

    # timing: every variant's recipe built first, then one trainer step of each in turn
    recipes = {}
    for name in args.variants:
        recipes[name] = r = DistillRecipe(config(name, "timing"))
        r.setup()
    batches = {n: [b for _, b in zip(range(args.time_steps + 1), r.micro_batches(), strict=False)]
               for n, r in recipes.items()}
    times = {n: [] for n in recipes}
    for i in range(args.time_steps + 1):
        for name, r in recipes.items():
            start = time.perf_counter()
            r.train_step(iter([batches[name][i]]))
            if i:  # the first step of each is its warm-up
                times[name].append(time.perf_counter() - start)
    rows = {}
    for name, r in recipes.items():
        step = statistics.median(times[name])
        rows[name] = {**parameters(r), "step_s": round(step, 4)}
    base = rows.get("teacher", {}).get("step_s")
    for row in rows.values():
        if base:
            row["speedup_vs_teacher_vocab"] = round(base / row["step_s"], 3)
    del recipes, batches

    for name in args.variants if args.steps > 0 else []:
        cfg = config(name, "trained")
        start = time.perf_counter()
        r = DistillRecipe(cfg)
        r.setup()
        r.train()
        rows[name]["train_s"] = round(time.perf_counter() - start, 1)
        rows[name].update(evaluate(name))
        print(json.dumps({name: rows[name]}), flush=True)

    result = {"command": " ".join(["python bench/vocab.py", *sys.argv[1:]]), "config": args.config,
              "date": time.strftime("%Y-%m-%d"), "threads": torch.get_num_threads(), "train_steps": args.steps,
              "time_steps": args.time_steps, "micro_batch_size": load_config(args.config).train.micro_batch_size,
              "variants": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        atomic_write_json(Path(args.out), result)


if __name__ == "__main__":
    main()
