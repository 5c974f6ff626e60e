"""The MTP figures of an evaluation: self-speculative decoding against plain greedy decoding on test prompts
(the first caption tokens of test rows), batch 1, every output checked equal to greedy's.

Metrics: `mtp/acceptance_at_{k}`, `mtp/tokens_per_forward` (the prefill counted), `mtp/tau` (mean tokens per
verification round) and `mtp/speedup` (greedy seconds / speculative seconds, same prompts, same process).

Where the speed-up is timed: every `mmtp` process runs MKL in its strict reproducible mode (`MKL_CBWR`, set in
distill/env.py so that a teacher writes the same shard bytes in any process), and that mode slows MKL's
batch-1 products, greedy decoding's output head most, which flatters the ratio. MKL reads the variable once,
when it loads, so on CPU under `MKL_CBWR` the figures come from a fresh Python process without it
(`mtp_figures_in_child`, `python -m distill.mtp_eval`): MKL's default mode, as a user's own process decodes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from data.devices import model_on, to_device
from data.vocab import TokenMap


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


def speculative_figures(model, prompts: list[tuple], new_tokens: int, device=None) -> dict:
    """The module's metrics over `prompts` (`mtp_prompts`), in this process, on `device` (default: the
    model's; the model is moved there). Raises AssertionError when an output differs from greedy's."""
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
        start = _clock(device)
        greedy = model.greedy_generate(px, ids, max_new_tokens=new_tokens)
        t_greedy += _clock(device) - start
        start = _clock(device)
        tokens, stats = speculative_generate(model, px, ids, max_new_tokens=new_tokens)
        t_spec += _clock(device) - start
        if not torch.equal(tokens, greedy):
            raise AssertionError(f"speculative decoding differs from greedy on test row {row_id}")
        for k in range(depth):
            accepted[k] += stats["accepted"][k]
            proposed[k] += stats["proposed"][k]
        produced += stats["new_tokens"]
        forwards += stats["main_forwards"]
        rounds += stats["tokens_per_round"]
    out = {f"mtp/acceptance_at_{k + 1}": accepted[k] / max(proposed[k], 1) for k in range(depth)}
    out["mtp/tokens_per_forward"] = produced / max(forwards, 1)  # the prefill forward included
    out["mtp/tau"] = sum(rounds) / max(len(rounds), 1)  # mean tokens per verification round
    out["mtp/speedup"] = t_greedy / max(t_spec, 1e-9)
    return out


def mtp_figures(model, dataset, n_prompts: int, prompt_tokens: int, new_tokens: int, device=None,
                cross=None) -> dict:
    """`speculative_figures` on the first `n_prompts` test rows of `dataset`, in this process."""
    return speculative_figures(model, mtp_prompts(model.config, dataset, n_prompts, prompt_tokens, cross),
                               new_tokens, device)


def mtp_figures_in_child(folder: str | Path, prompts: list[tuple], new_tokens: int) -> dict:
    """`speculative_figures` for the student saved in `folder` (loaded in fp32, on the CPU), run in a fresh
    Python process with this one's environment and thread count but without `MKL_CBWR`."""
    with tempfile.TemporaryDirectory(prefix="mmtp-mtp-eval-") as tmp:
        job, result = Path(tmp) / "job.pt", Path(tmp) / "figures.json"
        torch.save({"folder": str(folder), "prompts": prompts, "new_tokens": new_tokens,
                    "threads": torch.get_num_threads()}, job)
        done = subprocess.run([sys.executable, "-m", "distill.mtp_eval", str(job), str(result)], env=default_mkl_env(),
                              cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"the MTP timing process for {folder} failed (exit {done.returncode}):\n{tail}")
        return json.loads(result.read_text())


def default_mkl_env() -> dict[str, str]:
    """This process's environment without `MKL_CBWR`: MKL in its default mode."""
    return {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}


def main(argv: list[str]) -> None:
    """`python -m distill.mtp_eval JOB OUT`: the child's side of `mtp_figures_in_child`."""
    from transformers import AutoModel

    import student  # noqa: F401  (registers the Auto classes)
    job_path, out_path = argv
    job = torch.load(job_path, weights_only=True)
    torch.set_num_threads(job["threads"])
    model = AutoModel.from_pretrained(job["folder"], dtype=torch.float32).eval()
    figures = speculative_figures(model, job["prompts"], job["new_tokens"], "cpu")
    Path(out_path).write_text(json.dumps(figures))


if __name__ == "__main__":
    main(sys.argv[1:])
