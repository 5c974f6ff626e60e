"""The MTP figures of an evaluation: self-speculative decoding against plain greedy decoding on test prompts
(the first caption tokens of test rows), batch 1, every output checked equal to greedy's.

Metrics: `mtp/acceptance_at_{k}`, `mtp/tokens_per_forward` (the prefill counted), `mtp/tau` (mean tokens per
verification round) and `mtp/speedup` (greedy seconds / speculative seconds over the same prompts and so the same
generated tokens, as both give the same output: the ratio of their times per token, same process). Each prompt is
timed `repeats` times per method, the order alternating and the fastest kept, so neither method always runs first.

A figure that cannot be measured is left out, with a one-line reason logged: an acceptance at a depth whose drafts
were never verified; `mtp/tau` and `mtp/speedup` when no prompt was decoded past its prefill (every first token
eos: the two timings are then the same work, and their ratio is noise); `mtp/speedup` when no draft was made, or
when it exceeds what `mtp/tokens_per_forward` allows (each verification costs at least a greedy step, so speculative
decoding cannot gain more than its tokens per forward: a larger ratio is timing noise).

Where the speed-up is timed: every `mmtp` process runs MKL in its strict reproducible mode (`MKL_CBWR`, set in
distill/env.py so that a teacher writes the same shard bytes in any process), and that mode slows MKL's
batch-1 products, greedy decoding's output head most, which flatters the ratio. MKL reads the variable once,
when it loads, so on CPU under `MKL_CBWR` the figures come from a fresh Python process without it
(`mtp_figures_in_child`, `python -m distill.eval.mtp_eval`): MKL's default mode, as a user's own process decodes.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from data.devices import model_on, to_device
from data.vocab import TokenMap
from distill.env import PROJECT_ROOT

log = logging.getLogger(__name__)
NOISE = 0.05  # relative timing noise allowed above the bound `mtp/tokens_per_forward` on `mtp/speedup`


def mtp_prompts(config, dataset, n_prompts: int, prompt_tokens: int, cross=None) -> list[tuple]:
    """Up to `n_prompts` (row id, pixel_values [1, 3, S, S], prompt ids [1, T]) from `dataset`, on the CPU,
    in the student's token ids (`cross`: a student with its own tokenizer, as in `evaluate_student`)."""
    token_map = TokenMap.from_config(config)
    out = []
    for i in range(min(n_prompts, len(dataset))):
        item = dataset[i] if cross is None else cross(dataset[i])
        ids = item["input_ids"][None, :prompt_tokens]
        ids = token_map.student_ids(ids) if token_map is not None else ids
        out.append((item["id"], item["pixel_values"][None], ids))
    return out


def _clock(device: torch.device) -> float:
    if device.type == "cuda":  # kernels run asynchronously: wait for them before reading the clock
        torch.cuda.synchronize(device)
    return time.perf_counter()


def speculative_figures(model, prompts: list[tuple], new_tokens: int, device=None, repeats: int = 2) -> dict:
    """The module's metrics over `prompts` (`mtp_prompts`), in this process, on `device` (default: the
    model's; the model is moved there); the reason for each figure left out is logged. Raises AssertionError when
    an output differs from greedy's."""
    figures, reasons = measure(model, prompts, new_tokens, device, repeats)
    for reason in reasons:
        log.warning(reason)
    return figures


def measure(model, prompts: list[tuple], new_tokens: int, device=None, repeats: int = 2) -> tuple[dict, list[str]]:
    """(figures, reasons): `speculative_figures`'s metrics and a line for each one left out (module docstring)."""
    from student import speculative_generate
    device = model_on(model, device)
    depth = model.config.mtp_depth
    accepted, proposed = [0] * depth, [0] * depth
    produced = forwards = 0
    rounds: list[int] = []
    t_spec = t_greedy = 0.0
    if prompts:  # warm-up, untimed: also lets speculative.head_scores pick the output head's layout per row count
        _, px, ids = to_device(prompts[0], device)
        model.greedy_generate(px, ids, max_new_tokens=new_tokens)
        speculative_generate(model, px, ids, max_new_tokens=new_tokens)
    for prompt in prompts:
        row_id, px, ids = to_device(prompt, device)
        runs = (partial(model.greedy_generate, px, ids, max_new_tokens=new_tokens),
                partial(speculative_generate, model, px, ids, max_new_tokens=new_tokens))
        best, outputs = [float("inf")] * 2, [None, None]
        for r in range(max(repeats, 1)):
            for i in (0, 1) if r % 2 == 0 else (1, 0):  # alternate which runs first: no order bias
                start = _clock(device)
                outputs[i] = runs[i]()
                best[i] = min(best[i], _clock(device) - start)
        greedy, (tokens, stats) = outputs
        t_greedy, t_spec = t_greedy + best[0], t_spec + best[1]
        if not torch.equal(tokens, greedy):
            raise AssertionError(f"speculative decoding differs from greedy on test row {row_id}")
        for k in range(depth):
            accepted[k] += stats["accepted"][k]
            proposed[k] += stats["proposed"][k]
        produced += stats["new_tokens"]
        forwards += stats["main_forwards"]
        rounds += stats["tokens_per_round"]
    if not produced:
        return {}, ["mtp/* absent: no MTP prompt, nothing generated"]
    out = {f"mtp/acceptance_at_{k + 1}": accepted[k] / proposed[k] for k in range(depth) if proposed[k]}
    unmeasured = [f"mtp/acceptance_at_{k + 1}" for k in range(depth) if not proposed[k]]
    reasons = [f"{', '.join(unmeasured)} absent: no draft of that depth was verified"] if unmeasured else []
    out["mtp/tokens_per_forward"] = produced / forwards  # the prefill forward included
    if not rounds:
        return out, reasons + ["mtp/tau, mtp/speedup absent: every prompt ended at its first token (eos), so nothing "
                               "was decoded after the prefill and both timings are the same work"]
    out["mtp/tau"] = sum(rounds) / len(rounds)  # mean tokens per verification round
    speedup = t_greedy / t_spec if t_spec > 0 else float("inf")
    if not proposed[0]:
        reasons.append("mtp/speedup absent: no draft was made (mtp_new_tokens too small), so both timings are "
                       "greedy decoding")
    elif speedup > out["mtp/tokens_per_forward"] * (1 + NOISE):
        reasons.append(f"mtp/speedup absent: timed {speedup:.2f}, above the {out['mtp/tokens_per_forward']:.2f} "
                       "tokens per forward that bound it (a verification costs at least a greedy step): timing noise")
    else:
        out["mtp/speedup"] = speedup  # per-token times of the same tokens: the outputs are equal
    return out, reasons


def mtp_figures(model, dataset, n_prompts: int, prompt_tokens: int, new_tokens: int, device=None,
                cross=None) -> dict:
    """`speculative_figures` on the first `n_prompts` test rows of `dataset`, in this process."""
    return speculative_figures(model, mtp_prompts(model.config, dataset, n_prompts, prompt_tokens, cross),
                               new_tokens, device)


def mtp_figures_in_child(folder: str | Path, prompts: list[tuple], new_tokens: int) -> dict:
    """`speculative_figures` for the student saved in `folder` (loaded in fp32, on the CPU), run in a fresh
    Python process with this one's environment and thread count but without `MKL_CBWR`."""
    folder = Path(folder).expanduser().resolve()  # the child runs at the project root: a relative path would move
    with tempfile.TemporaryDirectory(prefix="mmtp-mtp-eval-") as tmp:
        job, result = Path(tmp) / "job.pt", Path(tmp) / "figures.json"
        torch.save({"folder": str(folder), "prompts": prompts, "new_tokens": new_tokens,
                    "threads": torch.get_num_threads()}, job)
        done = subprocess.run([sys.executable, "-m", "distill.eval.mtp_eval", str(job), str(result)],
                              env=default_mkl_env(), cwd=PROJECT_ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"the MTP timing process for {folder} failed (exit {done.returncode}):\n{tail}")
        got = json.loads(result.read_text())
    for reason in got["reasons"]:
        log.warning(reason)
    return got["figures"]


def default_mkl_env() -> dict[str, str]:
    """This process's environment without `MKL_CBWR`: MKL in its default mode."""
    return {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}


def main(argv: list[str]) -> None:
    """`python -m distill.eval.mtp_eval JOB OUT`: the child's side of `mtp_figures_in_child`."""
    from transformers import AutoModel

    import student  # noqa: F401  (registers the Auto classes)
    job_path, out_path = argv
    job = torch.load(job_path, weights_only=True)
    torch.set_num_threads(job["threads"])
    model = AutoModel.from_pretrained(job["folder"], dtype=torch.float32).eval()
    figures, reasons = measure(model, job["prompts"], job["new_tokens"], "cpu")
    Path(out_path).write_text(json.dumps({"figures": figures, "reasons": reasons}))


if __name__ == "__main__":
    main(sys.argv[1:])
