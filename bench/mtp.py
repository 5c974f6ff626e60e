"""MTP self-speculative decoding vs plain greedy decoding for a trained student.

    python bench/mtp.py --student outputs/default/student [--samples outputs/default/samples]
        [--targets outputs/default/targets/smollm2] [--n 32] [--prompt-tokens 2] [--max-new-tokens 32]
        [--depths 1 2] [--image-size 112]

Prompts: the test split's images with the first `--prompt-tokens` caption token ids of the language teacher
(bos + first word by default). Both decoders run in this process, on CPU in fp32, one sample at a time
(speculative decoding is batch size 1). Prints JSON: per drafting depth D, tokens per main-model forward,
mean accepted length tau, acceptance per depth (accepted / proposed, see student/speculative.py), the
wall-clock speed-up (greedy seconds / speculative seconds) and how many outputs differ from greedy.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import student  # noqa: E402,F401  (registers the model with AutoModel)
from data.dataset import image_tensor  # noqa: E402
from data.shards import load_manifest, read_shard  # noqa: E402
from data.targets import decode_language_row  # noqa: E402
from student import speculative_generate  # noqa: E402


def test_prompts(samples_dir: Path, targets_dir: Path, n: int, prompt_tokens: int, image_size: int):
    """Up to n (id, pixel_values [1, 3, S, S], prompt ids [1, prompt_tokens]) from the test split."""
    out = []
    for entry in load_manifest(samples_dir, verify=False)["shards"]:
        samples = read_shard(samples_dir / entry["file"])
        targets = read_shard(targets_dir / entry["file"])
        for row in np.flatnonzero(samples.column("split").to_numpy(zero_copy_only=False) == "test"):
            row = int(row)
            sample_id = samples.column("id")[row].as_py()
            if targets.column("id")[row].as_py() != sample_id:
                raise SystemExit(f"{targets_dir}/{entry['file']}: row {row} is not sample {sample_id!r}")
            ids = decode_language_row(targets, row)["token_ids"][:prompt_tokens].astype(np.int64)
            pixels = image_tensor(samples.column("image")[row].as_py(), image_size)[None]
            out.append((sample_id, pixels, torch.from_numpy(ids)[None]))
            if len(out) == n:
                return out
    if not out:
        raise SystemExit(f"{samples_dir}: no test rows")
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def run(model, prompts, depth, max_new_tokens, eos):
    d = depth
    totals = {"new_tokens": 0, "main_forwards": 0, "verify_forwards": 0, "proposed": [0] * d, "accepted": [0] * d}
    greedy_s = spec_s = 0.0
    mismatches = []
    for sample_id, pixels, ids in prompts:
        expected, t_greedy = timed(model.greedy_generate, pixels, ids, max_new_tokens, eos_token_id=eos)
        (tokens, stats), t_spec = timed(speculative_generate, model, pixels, ids, max_new_tokens, eos, depth=depth)
        greedy_s, spec_s = greedy_s + t_greedy, spec_s + t_spec
        if not torch.equal(tokens, expected):
            mismatches.append(sample_id)
        for key in ("new_tokens", "main_forwards", "verify_forwards"):
            totals[key] += stats[key]
        for k in range(d):
            totals["proposed"][k] += stats["proposed"][k]
            totals["accepted"][k] += stats["accepted"][k]
    return {
        "depth": depth,
        "tokens_per_forward": totals["new_tokens"] / totals["main_forwards"],
        "tau": (totals["new_tokens"] - len(prompts)) / max(totals["verify_forwards"], 1),
        "acceptance": [a / p if p else None for a, p in zip(totals["accepted"], totals["proposed"], strict=True)],
        "proposed": totals["proposed"],
        "accepted": totals["accepted"],
        "new_tokens": totals["new_tokens"],
        "main_forwards": totals["main_forwards"],
        "greedy_seconds": round(greedy_s, 3),
        "speculative_seconds": round(spec_s, 3),
        "speedup": greedy_s / spec_s,
        "mismatches_vs_greedy": mismatches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="outputs/default/student")
    parser.add_argument("--samples", default="outputs/default/samples")
    parser.add_argument("--targets", default="outputs/default/targets/smollm2")
    parser.add_argument("--n", type=int, default=32, help="test samples")
    parser.add_argument("--prompt-tokens", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--depths", type=int, nargs="*", help="drafting depths (default: 1 and the model's)")
    parser.add_argument("--image-size", type=int, default=112)
    args = parser.parse_args()

    model = AutoModel.from_pretrained(args.student).float().eval()
    eos = load_manifest(args.targets, verify=False)["producer"].get("eos_id")
    depths = args.depths or sorted({1, model.config.mtp_depth})
    prompts = test_prompts(Path(args.samples), Path(args.targets), args.n, args.prompt_tokens, args.image_size)
    with torch.no_grad():
        run(model, prompts[:2], depths[0], args.max_new_tokens, eos)  # warm-up
        results = [run(model, prompts, d, args.max_new_tokens, eos) for d in depths]
    print(json.dumps({"student": args.student, "mtp_depth": model.config.mtp_depth, "samples": len(prompts),
                      "prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens, "eos": eos,
                      "threads": torch.get_num_threads(), "results": results}, indent=1))


if __name__ == "__main__":
    main()
