"""Training benchmark: the shard loader's cost and DeepSpeed's overhead, as ratios from one run.

    python bench/train.py [--config configs/default.yaml] [--steps 8] [key=value ...]

Needs the config's shards (run `mmtp collect` first). Prints one JSON object:
- loader_ratio: a ZeRO step fed by the shard loader (memory-mapped read, PNG decode, collate,
  standardisation) ÷ the same step on the same batches already in memory (goal ≤ 1.05);
- zero2_ratio: a DeepSpeed ZeRO-2 step ÷ a plain PyTorch AdamW step (same model, same batches,
  same clipping) (goal ≤ 1.20 on CPU);
- gradnorm_ratio: a full trainer step with gradnorm balancing and the per-term gradient norms on
  the vision tower measured (`DistillRecipe.train_step`) ÷ the same step with static weights and
  no measurement (goal ≤ 1.15);
- language_loss: the language loss alone, from the heads' post-norm states of a real batch to the
  gradients w.r.t. those states and the output weight, with the chunked head (distill/losses/chunked.py,
  `--chunk-size` positions a time; default loss.chunk_size, or 256 when that is 0) ÷ the dense
  logits of every head: `memory_ratio` of the peak bytes (goal ≤ 0.25) and `time_ratio` (goal ≤ 1);
  `chunked_step_ratio`: a full trainer step (static weights, unmeasured) chunked ÷ dense (goal ≤ 1;
  null when the first stage has no language term: pass `train.stages=[]` for the joint stage).
Peak bytes: on the CPU, the torch profiler's allocation and free events (`profile_memory`) summed in
time order from the start of the measured call, whose maximum is the most memory that torch tensors
allocated by the call held at once (inputs and parameters made before it are not counted); on CUDA,
`torch.cuda.max_memory_allocated` above the memory allocated at the start.
Timings are medians over `--steps` steps, the variants interleaved step by step so that
drift of this noisy machine hits all of them alike.
"""

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.env import apply_env_defaults  # noqa: E402

apply_env_defaults()

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from data.devices import to_device  # noqa: E402
from distill.config import load_config  # noqa: E402
from distill.losses import build_balancer, chunked_language_loss  # noqa: E402
from distill.train import DistillRecipe  # noqa: E402
from distill.train.stages import LANGUAGE  # noqa: E402


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def peak_bytes(fn, device: torch.device) -> int:
    """The most bytes that tensors allocated by `fn()` held at once (see the module docstring)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate(n for _, n in events), default=0)


def language_loss(objective, batch, chunk_size: int):
    """A function running the language loss forward and backward from `batch`'s head states: dense logits
    (chunk_size 0) or the chunked head."""
    with torch.no_grad():
        dtype = next(objective.student.parameters()).dtype
        out = objective.student(batch["pixel_values"].to(dtype), batch["input_ids"], batch["attention_mask"],
                                text_logits_only=True, head_states=True)
    states = [h.detach().requires_grad_() for h in out.head_states]
    weight = objective.student.get_output_embeddings().weight.detach().requires_grad_()
    spec, lang, labels = objective.language, batch["lang"], batch["labels"]

    def run():
        for x in (weight, *states):
            x.grad = None
        if chunk_size:
            loss = chunked_language_loss(spec, states, weight, lang, labels, chunk_size)["loss"]
        else:
            logits = [F.linear(h, weight) for h in states]
            loss = spec(logits[0], lang, labels, logits[1:])["loss"]
        loss.backward()
    return run


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--chunk-size", type=int, default=0, help="the chunked head's positions a chunk (0: the config's)")
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
    chunk = args.chunk_size or cfg.loss.chunk_size or 256
    loss_runs = {c: language_loss(engine.module, to_device(in_memory[0], engine.device), c) for c in (0, chunk)}
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

    def trainer_step(batch, balanced, chunk_size=cfg.loss.chunk_size):
        objective.balancer, objective.measure = (gradnorm, True) if balanced else (static, False)
        objective.chunk_size = chunk_size
        recipe.train_step(iter([batch]))
        objective.chunk_size = cfg.loss.chunk_size

    language = LANGUAGE in objective.terms
    objective.measure = False
    zero_step(in_memory[0])  # warm-up of every path
    plain_step(in_memory[0])
    trainer_step(in_memory[0], True)
    for run in loss_runs.values():
        run()
    if language:
        trainer_step(in_memory[0], False, chunk)
    peak = {c: peak_bytes(run, engine.device) for c, run in loss_runs.items()}
    times = {k: [] for k in ("loader", "memory", "plain", "gradnorm", "static", "loss_dense", "loss_chunked",
                             "step_dense", "step_chunked")}
    for batch in in_memory:
        objective.balancer, objective.measure = static, False
        times["loader"].append(timed(lambda: zero_step(next(loader))))
        times["memory"].append(timed(lambda b=batch: zero_step(b)))
        times["plain"].append(timed(lambda b=batch: plain_step(b)))
        times["gradnorm"].append(timed(lambda b=batch: trainer_step(b, True)))
        times["static"].append(timed(lambda b=batch: trainer_step(b, False)))
        times["loss_dense"].append(timed(loss_runs[0]))
        times["loss_chunked"].append(timed(loss_runs[chunk]))
        if language:
            times["step_dense"].append(timed(lambda b=batch: trainer_step(b, False, 0)))
            times["step_chunked"].append(timed(lambda b=batch: trainer_step(b, False, chunk)))
    loader_s, memory_s, plain_s, gradnorm_s, static_s, dense_s, chunked_s, step_dense_s, step_chunked_s = (
        statistics.median(t) if t else None for t in times.values())
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
        "language_loss": {
            "positions": int(in_memory[0]["input_ids"].numel()), "heads": len(objective.language.mtp_weights) + 1,
            "vocab": engine.module.student.config.vocab_size, "chunk_size": chunk,
            "peak_mb": {"dense": round(peak[0] / 2**20, 1), "chunked": round(peak[chunk] / 2**20, 1)},
            "loss_s": {"dense": round(dense_s, 4), "chunked": round(chunked_s, 4)},
            "memory_ratio": round(peak[chunk] / peak[0], 3),
            "time_ratio": round(chunked_s / dense_s, 3),
            "step_s": {"dense": step_dense_s and round(step_dense_s, 4),
                       "chunked": step_chunked_s and round(step_chunked_s, 4)},
            "chunked_step_ratio": step_dense_s and round(step_chunked_s / step_dense_s, 3),
        },
    }, indent=1))


if __name__ == "__main__":
    main()
