"""Sizing table for a realistic setup: shard bytes and FLOPs per sample, scaled to 1M and 100M samples.

    python bench/sizing.py [--caption-tokens 64] [--samples 1000000 100000000]

Prints Markdown. Bytes per sample are measured by encoding synthetic rows with this project's
own Arrow encoders (data/targets.py), uncompressed: int32 `token_ids`, `topk_ids` as uint16 when
the vocab is <= 65,536 else int32, fp16 log-probs and tail, fp16 vision summary and features.
FLOPs use the usual estimates: forward = 2·params·tokens + 4·layers·tokens²·width (attention),
training = 3 × forward.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.targets import language_table, vision_table  # noqa: E402

# Public shapes of the models named in the brief.
LM = {"name": "7B causal LM (Qwen2.5-7B-like)", "params": 7.6e9, "layers": 28, "width": 3584, "vocab": 152_064}
SIGLIP = {"name": "SigLIP-so400m/14 @ 384 px", "params": 0.428e9, "layers": 27, "width": 1152, "image": 384,
          "patch": 14}
# A 1B student: a 0.3B CogViT tower over every patch, a 0.7B decoder over 2×2-merged patches + caption.
STUDENT = {"tower_params": 0.3e9, "tower_layers": 24, "tower_width": 1024,
           "decoder_params": 0.7e9, "decoder_layers": 16, "decoder_width": 2048}
TOP_K = 64
IMAGE_BYTES = 60_000  # an encoded 384 px photo as stored in a samples shard (assumed)
GPU_FLOPS = 989e12 * 0.4  # H100 dense bf16 at 40% utilisation (assumed)
ROWS = 64  # synthetic rows encoded to measure bytes per sample


def language_bytes(tokens: int) -> float:
    rng = np.random.default_rng(0)
    rows = [{"token_ids": rng.integers(0, LM["vocab"], tokens),
             "topk_ids": rng.integers(0, LM["vocab"], (tokens, TOP_K)),
             "topk_logprobs": -rng.random((tokens, TOP_K)) * 10,
             "tail_logprob": -rng.random(tokens)} for _ in range(ROWS)]
    table = language_table([f"s{i:09d}" for i in range(ROWS)], rows, LM["vocab"], TOP_K)
    return table.nbytes / ROWS


def vision_bytes(patches: int) -> float:
    summary = np.zeros((ROWS, SIGLIP["width"]), np.float32)
    features = np.zeros((ROWS, patches, SIGLIP["width"]), np.float32)
    return vision_table([f"s{i:09d}" for i in range(ROWS)], summary, features).nbytes / ROWS


def forward_flops(params: float, tokens: int, layers: int, width: int) -> float:
    return 2 * params * tokens + 4 * layers * tokens ** 2 * width


def human(n: float, unit: str) -> str:
    for prefix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {prefix}{unit}"
    return f"{n:,.0f} {unit}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--caption-tokens", type=int, default=64)
    p.add_argument("--samples", type=int, nargs="+", default=[1_000_000, 100_000_000])
    args = p.parse_args()
    L = args.caption_tokens
    patches = (SIGLIP["image"] // SIGLIP["patch"]) ** 2
    merged = patches // 4
    lang_b, vis_b = language_bytes(L), vision_bytes(patches)
    lm_f = forward_flops(LM["params"], L, LM["layers"], LM["width"])
    vis_f = forward_flops(SIGLIP["params"], patches, SIGLIP["layers"], SIGLIP["width"])
    s = STUDENT
    student_f = 3 * (forward_flops(s["tower_params"], patches, s["tower_layers"], s["tower_width"])
                     + forward_flops(s["decoder_params"], merged + L, s["decoder_layers"], s["decoder_width"]))
    rows = [("samples shard (image + caption)", IMAGE_BYTES + 4 * L, None),
            (f"language targets, k={TOP_K}", lang_b, lm_f),
            ("vision targets (summary + patch features)", vis_b, vis_f),
            ("student training, per sample per epoch", None, student_f)]

    print(f"Assumptions: caption {L} tokens; language teacher {LM['name']}, {LM['params'] / 1e9:.1f}B params, "
          f"vocab {LM['vocab']:,} (> 65,536, so int32 top-k ids), top-k {TOP_K}; vision teacher {SIGLIP['name']}, "
          f"{patches} patches × {SIGLIP['width']} dims; 1B student = 0.3B ViT tower over {patches} patches + 0.7B "
          f"decoder over {merged} merged image tokens + {L} text tokens; stored image {IMAGE_BYTES // 1000} kB; "
          f"shards uncompressed; GPU-hours at {GPU_FLOPS / 1e12:.0f} TFLOP/s (H100 bf16 at 40% utilisation).\n")
    print(f"Language targets: {lang_b / L:,.1f} B per caption token (int32 token id 4 + {TOP_K} int32 ids "
          f"{4 * TOP_K} + {TOP_K} fp16 log-probs {2 * TOP_K} + fp16 tail 2, plus Arrow offsets and the row id).\n")
    head = "| item | bytes / sample | FLOPs / sample |" + "".join(
        f" bytes @ {n:,} | GPU-hours @ {n:,} |" for n in args.samples)
    print(head)
    print("|" + "---|" * (3 + 2 * len(args.samples)))
    for name, b, f in rows:
        cells = [name, human(b, "B") if b else "–", human(f, "FLOP") if f else "–"]
        for n in args.samples:
            cells += [human(b * n, "B") if b else "–", f"{f * n / GPU_FLOPS / 3600:,.0f}" if f else "–"]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
