"""Training benchmark: the shard loader's cost and DeepSpeed's overhead, as ratios from one run.

    python bench/train.py [--config configs/default.yaml] [--steps 8] [key=value ...]

Needs the config's shards (run `mmtp collect` first). Prints one JSON object:
- loader_ratio: a ZeRO step fed by the shard loader (memory-mapped read, PNG decode, collate,
  standardisation) ÷ the same step on the same batches already in memory (goal ≤ 1.05);
- zero2_ratio: a DeepSpeed ZeRO-2 step ÷ a plain PyTorch AdamW step (same model, same batches,
  same clipping) (goal ≤ 1.20 on CPU);
- gradnorm_ratio: a full trainer step with gradnorm balancing and the per-term gradient norms on
  the vision tower measured (`DistillRecipe.train_step`) ÷ the same step with static weights and
  no measurement (goal ≤ 1.15).
Timings are medians over `--steps` steps, the three variants interleaved step by step so that
drift of this noisy machine hits all of them alike.
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.env import apply_env_defaults  # noqa: E402

apply_env_defaults()

import torch  # noqa: E402

from distill.balance import build_balancer  # noqa: E402
from distill.config import load_config  # noqa: E402
from distill.recipe import DistillRecipe  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, ["train.zero_stage=2", "train.progress=false", "train.grad_accum=1",
                                    "loss.balance=gradnorm", *args.overrides])
    recipe = DistillRecipe(cfg)
    recipe.setup()
    engine = recipe.engine
    plain = copy.deepcopy(engine.module)
    plain.measure = False
    opt = torch.optim.AdamW([q for q in plain.parameters() if q.requires_grad], lr=cfg.train.lr,
                            betas=(0.9, 0.95), weight_decay=cfg.train.weight_decay)
    in_memory = [b for _, b in zip(range(args.steps), recipe.micro_batches(), strict=False)]
    recipe.epoch, recipe.position = 0, 0
    loader = recipe.micro_batches()  # the same batches again, read from the shards step by step

    def zero_step(batch):
        loss, _ = engine(batch)
        engine.backward(loss)
        engine.step()

    def plain_step(batch):
        loss, _ = plain(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    objective = engine.module
    gradnorm, static = objective.balancer, build_balancer("static", objective.terms)

    def trainer_step(batch, balanced):
        objective.balancer, objective.measure = (gradnorm, True) if balanced else (static, False)
        recipe.train_step(iter([batch]))

    objective.measure = False
    zero_step(in_memory[0])  # warm-up of every path
    plain_step(in_memory[0])
    trainer_step(in_memory[0], True)
    times = {k: [] for k in ("loader", "memory", "plain", "gradnorm", "static")}
    for batch in in_memory:
        objective.balancer, objective.measure = static, False
        times["loader"].append(timed(lambda: zero_step(next(loader))))
        times["memory"].append(timed(lambda b=batch: zero_step(b)))
        times["plain"].append(timed(lambda b=batch: plain_step(b)))
        times["gradnorm"].append(timed(lambda b=batch: trainer_step(b, True)))
        times["static"].append(timed(lambda b=batch: trainer_step(b, False)))
    loader_s, memory_s, plain_s, gradnorm_s, static_s = (statistics.median(t) for t in times.values())
    print(json.dumps({
        "config": args.config, "preset": cfg.student.preset, "micro_batch_size": cfg.train.micro_batch_size,
        "steps": args.steps, "threads": torch.get_num_threads(),
        "step_s": {"zero2_loader": round(loader_s, 4), "zero2_in_memory": round(memory_s, 4),
                   "plain_adamw_in_memory": round(plain_s, 4), "trainer_gradnorm_measured": round(gradnorm_s, 4),
                   "trainer_static_unmeasured": round(static_s, 4)},
        "loader_ratio": round(loader_s / memory_s, 3),
        "zero2_ratio": round(memory_s / plain_s, 3),
        "gradnorm_ratio": round(gradnorm_s / static_s, 3),
        "samples_per_s": round(cfg.train.micro_batch_size / loader_s, 2),
    }, indent=1))


if __name__ == "__main__":
    main()
