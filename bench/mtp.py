"""MTP self-speculative decoding vs plain greedy decoding, in wall-clock and tokens per forward.

    python bench/mtp.py --student outputs/default/student [--samples outputs/default/samples]
        [--targets outputs/default/targets/smollm2] [--n 16] [--prompt-tokens 2] [--max-new-tokens 32 128]
        [--depths 1 2] [--top-k 1 2] [--draft-vocab captions] [--image-size 112] [--batch 1]
        [--out docs/results/mtp.json]
    python bench/mtp.py --preset small --mtp-depth 3 --accept both ...   # untrained: the mechanics only

Prompts: the test split's images with the first `--prompt-tokens` caption token ids of the language teacher
(bos + first word by default). Greedy and speculative decoding run in this process, on CPU in fp32,
interleaved batch by batch: `--batch N` (default 1) groups up to N prompts of one length, decoded together by
`model.greedy_generate` and by `speculative_generate_batch` (student/speculative_batch.py, a chain of drafts
only: with N > 1 `--top-k` defaults to, and must be, 1); N = 1 runs `speculative_generate` prompt by prompt.
For every number of new tokens and drafting depth D, with the full-vocab draft head and with the draft
vocabulary, it reports:
tokens per main-model forward with the prefill counted and without it (= tau, the mean tokens per
verification round), acceptance per depth (accepted / proposed, see student/speculative.py; a draft after an
accepted eos is not proposed), `fewest_verify_forwards` (the rounds that drafts always accepted would need for the
same outputs, ceil((new tokens - 1) / (D + 1)) per output, against `verify_forwards`), the wall-clock
speed-up (greedy seconds / speculative seconds) and how many outputs differ from greedy. Tokens per forward,
tau and acceptance are per row (a row's stats in a batch equal its own at batch 1);
`batch_tokens_per_forward` = new tokens / (rows x batched forwards) is what the batch gets, lower when its
rows need different numbers of rounds (a batch runs until its slowest row is done). Each row reports `batch`.

Draft vocabulary (`--draft-vocab`): `captions` = every token id of the train split's captions (the language
teacher's `token_ids`), `topk` = those and every id in the teacher's top-k targets of the train split,
`config` = the student's `config.draft_vocab`, `none` = full vocab only.

`--preset NAME` builds an untrained student from configs/student/NAME.yaml. `--accept forced` zeroes the
output norms, so every head's logits are 0 and every head (main and drafts) picks token 0, which is added to
the draft vocabulary: every draft is accepted, which measures the decoding mechanics at acceptance 1 (an
upper bound); with `--accept model` (default) an untrained student's drafts are almost never accepted (a
lower bound); `both` runs the two. Each result row says which (`accept`).
`--top-k 1 2` runs a chain of drafts and a tree (top-k candidates per depth, see student/speculative.py).
`costs_ms`: the parts of a step timed alone on the first prompt (median ms): the image encoding, the prefill,
the decoder and the output head over 1 and over D + 1 positions, one MTP depth with its draft head.
At batch 1 `drafting_seconds` is the time the speculative runs spent drafting and `speedup_with_free_drafts`
the speed-up with that time taken out: what any cheaper drafting could reach at the same tau.
`--ignore-eos` decodes exactly `--max-new-tokens` per prompt, past the caption's eos: long outputs from a
student taught captions only (`eos` reads -1 in the report).
`aten_ops`: the aten ops a greedy token and a speculative round (depth D, chain, the draft vocabulary) dispatch
beyond the work per prompt, counted (deterministic), and `tiny_op_us`, the time one tiny op takes here.
Writes the JSON to `--out` (atomically) and prints it.
"""

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import student  # noqa: E402
import student.speculative as speculative  # noqa: E402
from data.shards import atomic_write_json, load_manifest, read_shard  # noqa: E402
from data.targets import decode_language_row  # noqa: E402
from student import speculative_generate  # noqa: E402
from student.decoder import KVCache  # noqa: E402
from student.pixels import image_tensor  # noqa: E402
from student.speculative import greedy_tokens  # noqa: E402
from student.speculative_batch import speculative_generate_batch  # noqa: E402


def shard_pairs(samples_dir: Path, targets_dir: Path):
    for entry in load_manifest(samples_dir, verify=False)["shards"]:
        samples, targets = read_shard(samples_dir / entry["file"]), read_shard(targets_dir / entry["file"])
        if samples.column("id").to_pylist() != targets.column("id").to_pylist():
            raise SystemExit(f"{targets_dir}/{entry['file']}: rows do not match {samples_dir}/{entry['file']}")
        yield samples, targets


def test_prompts(samples_dir: Path, targets_dir: Path, n: int, prompt_tokens: int, image_size: int,
                 split: str = "test"):
    """Up to n (id, pixel_values [1, 3, S, S], prompt ids [1, prompt_tokens]) from the test split (or `split`)."""
    out = []
    for samples, targets in shard_pairs(samples_dir, targets_dir):
        for row in np.flatnonzero(samples.column("split").to_numpy(zero_copy_only=False) == split):
            row = int(row)
            ids = decode_language_row(targets, row)["token_ids"][:prompt_tokens].astype(np.int64)
            pixels = image_tensor(samples.column("image")[row].as_py(), image_size)[None]
            out.append((samples.column("id")[row].as_py(), pixels, torch.from_numpy(ids)[None]))
            if len(out) == n:
                return out
    if not out:
        raise SystemExit(f"{samples_dir}: no {split} rows")
    return out


def train_vocab(samples_dir: Path, targets_dir: Path, topk: bool) -> list[int]:
    """Sorted token ids of the train split's captions (and of the teacher's top-k targets with `topk`)."""
    ids = set()
    for samples, targets in shard_pairs(samples_dir, targets_dir):
        for row in np.flatnonzero(samples.column("split").to_numpy(zero_copy_only=False) == "train"):
            row = decode_language_row(targets, int(row))
            ids.update(row["token_ids"].tolist())
            if topk:
                ids.update(row["topk_ids"].reshape(-1).tolist())
    if not ids:
        raise SystemExit(f"{samples_dir}: no train rows to take a draft vocabulary from")
    return sorted(int(i) for i in ids)


def batches(prompts, size: int):
    """The prompts in groups of up to `size` of one prompt length, in order."""
    by_length = {}
    for prompt in prompts:
        by_length.setdefault(prompt[2].shape[1], []).append(prompt)
    return [group[i:i + size] for group in by_length.values() for i in range(0, len(group), size)]


class DraftTimer:
    """Times `student.speculative._draft` (the MTP depths and their draft heads) inside a timed batch-1 run."""

    def __enter__(self):
        self.seconds, self.draft = 0.0, speculative._draft
        speculative._draft = self._timed
        return self

    def _timed(self, *args):
        start = time.perf_counter()
        self.draft(*args)
        self.seconds += time.perf_counter() - start

    def __exit__(self, *exc):
        speculative._draft = self.draft


def run(model, prompts, depth, max_new_tokens, eos, draft_vocab, accept="model", top_k=1, batch=1):
    totals = {"new_tokens": 0, "main_forwards": 0, "verify_forwards": 0, "proposed": [0] * depth,
              "accepted": [0] * depth, "sibling_accepted": 0, "fewest_verify_forwards": 0}
    greedy_s = spec_s = draft_s = 0.0
    differing = []
    row_forwards = 0  # batched forwards x rows in the batch
    for group in batches(prompts, batch):
        pixels, ids = torch.cat([p[1] for p in group]), torch.cat([p[2] for p in group])
        start = time.perf_counter()
        expected = model.greedy_generate(pixels, ids, max_new_tokens, eos_token_id=eos)
        mid = time.perf_counter()
        if batch == 1:
            with DraftTimer() as drafting:
                tokens, stats = speculative_generate(model, pixels, ids, max_new_tokens, eos, depth=depth,
                                                     draft_vocab=draft_vocab, top_k=top_k)
            rows, draft_s = [stats], draft_s + drafting.seconds
        else:
            tokens, stats = speculative_generate_batch(model, pixels, ids, max_new_tokens, eos, depth=depth,
                                                       draft_vocab=draft_vocab, top_k=top_k)
            rows = stats["rows"]
        greedy_s, spec_s = greedy_s + mid - start, spec_s + time.perf_counter() - mid
        differing += [p[0] for p, got, want in zip(group, tokens, expected, strict=True) if not torch.equal(got, want)]
        row_forwards += len(group) * stats["main_forwards"]
        for stats in rows:
            for key in ("new_tokens", "main_forwards", "verify_forwards", "sibling_accepted"):
                totals[key] += stats[key]
            # at full acceptance a round emits D + 1 tokens: no drafter needs fewer rounds for the same output
            totals["fewest_verify_forwards"] += -(-(stats["new_tokens"] - 1) // (depth + 1))
            for k in range(depth):
                totals["proposed"][k] += stats["proposed"][k]
                totals["accepted"][k] += stats["accepted"][k]
    return {
        "accept": accept,
        "batch": batch,
        "max_new_tokens": max_new_tokens,
        "depth": depth,
        "draft_vocab_size": model.config.vocab_size if draft_vocab is None else len(draft_vocab),
        "top_k": top_k,
        "tree": top_k > 1,
        "sibling_accepted": totals["sibling_accepted"],
        "tokens_per_forward": totals["new_tokens"] / totals["main_forwards"],
        "tokens_per_forward_without_prefill": (totals["new_tokens"] - len(prompts)) / max(totals["verify_forwards"], 1),
        "tau": (totals["new_tokens"] - len(prompts)) / max(totals["verify_forwards"], 1),
        "acceptance": [a / p if p else None for a, p in zip(totals["accepted"], totals["proposed"], strict=True)],
        "new_tokens": totals["new_tokens"],
        "main_forwards": totals["main_forwards"],
        "verify_forwards": totals["verify_forwards"],
        "fewest_verify_forwards": totals["fewest_verify_forwards"],
        "batch_tokens_per_forward": totals["new_tokens"] / row_forwards,
        "greedy_seconds": round(greedy_s, 3),
        "speculative_seconds": round(spec_s, 3),
        "speedup": greedy_s / spec_s,
        # batch 1: the seconds of the speculative run spent drafting (the MTP depths and draft heads), and the
        # speed-up if drafting cost nothing: the ceiling of cheaper drafts at this tau
        **({"drafting_seconds": round(draft_s, 3), "speedup_with_free_drafts": greedy_s / (spec_s - draft_s)}
           if batch == 1 else {}),
        # per verification round and per greedy token (the prefills included): the speed-up at another tau is
        # about tau * greedy_ms_per_token / speculative_ms_per_round, a round costing the same whatever it accepts
        # (with a batch: per row's round and per row's token)
        "speculative_ms_per_round": 1000 * spec_s / max(totals["verify_forwards"], 1),
        "greedy_ms_per_token": 1000 * greedy_s / totals["new_tokens"],
        "outputs_differing_from_greedy": len(differing),
        "differing_ids": differing,
    }


def costs_ms(model, prompt, depth: int, draft_vocab, repeats: int = 50) -> dict:
    """Median milliseconds of the parts of a decoding step for one prompt: what a greedy token costs (decoder
    forward and output head over 1 position) against what a speculative round adds (depth + 1 positions, and
    `depth` MTP forwards with their draft heads). Timed alone, so the sum leaves out the loops' own work."""
    _, pixels, ids = prompt

    def median(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return round(1000 * float(np.median(times)), 3)

    _, _, image = model.encode_image(pixels)
    prefix = torch.cat([image, model.decoder.embed_tokens(ids)], dim=1)
    cache = KVCache(len(model.decoder.layers), max_length=prefix.shape[1] + depth + 1)

    def decoder(q):
        cache.crop(0)
        model.forward_decoder(prefix, num_image_tokens=image.shape[1], cache=cache)
        return lambda: (model.forward_decoder(prefix[:, -q:], cache=cache), cache.crop(prefix.shape[1]))

    h = model.forward_decoder(prefix[:, -1:], cache=cache)[0].expand(1, depth + 1, -1).contiguous()
    head = model.lm_head.weight if draft_vocab is None else model.lm_head.weight[torch.as_tensor(draft_vocab)]
    mtp_cache = KVCache(1, max_length=prefix.shape[1] + 2)
    model.forward_mtp_depth(1, prefix[:, :-2], prefix[:, :-2], cache=mtp_cache)
    start = mtp_cache.length

    def mtp():  # one depth over two new positions (about tau's), then its draft head on the last
        out, _ = model.forward_mtp_depth(1, prefix[:, -2:], prefix[:, -2:], cache=mtp_cache)
        mtp_cache.crop(start)
        return (head @ model.mtp[0].norm(out[0, -1:]).expand(2, -1).T).argmax(0)

    return {"encode_image": median(lambda: model.encode_image(pixels)),
            "prefill": median(lambda: model.forward_decoder(prefix, num_image_tokens=image.shape[1],
                                                            cache=KVCache(len(model.decoder.layers),
                                                                          max_length=prefix.shape[1]))),
            "decoder_1": median(decoder(1)), f"decoder_{depth + 1}": median(decoder(depth + 1)),
            "head_1": median(lambda: greedy_tokens(model, h[:, :1])),
            f"head_{depth + 1}": median(lambda: greedy_tokens(model, h)),
            "mtp_depth_with_draft_head": median(mtp)}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched inside the block (each pays a fixed CPU overhead)."""

    def __enter__(self):
        self.ops = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def op_counts(model, prompts, depth: int, eos, draft_vocab) -> dict:
    """Aten ops per greedy token and per speculative round (chain drafting at `depth`), each without the work
    shared by both per prompt (image, prefill, first token: a run with max_new_tokens=1), and the measured
    microseconds a tiny op costs on this machine: the decoding loops at batch 1 are dispatch-bound here."""
    def ops(fn, *args, **kwargs):
        with OpCounter() as counter:
            out = fn(*args, **kwargs)
        return counter.ops, out

    greedy = spec = tokens = rounds = shared_greedy = shared_spec = 0
    for _, pixels, ids in prompts:
        shared_greedy += ops(model.greedy_generate, pixels, ids, 1, eos_token_id=eos)[0]
        shared_spec += ops(speculative_generate, model, pixels, ids, 1, eos, depth=depth, draft_vocab=draft_vocab)[0]
        greedy += ops(model.greedy_generate, pixels, ids, 32, eos_token_id=eos)[0]
        n, (_, stats) = ops(speculative_generate, model, pixels, ids, 32, eos, depth=depth, draft_vocab=draft_vocab)
        spec, tokens, rounds = spec + n, tokens + stats["new_tokens"], rounds + stats["verify_forwards"]
    x = torch.zeros(8)
    start = time.perf_counter()
    for _ in range(10000):
        x.add_(1.0)
    return {"depth": depth, "shared_per_prompt": round(shared_greedy / len(prompts), 1),
            "greedy_per_token": round((greedy - shared_greedy) / max(tokens - len(prompts), 1), 1),
            "speculative_per_round": round((spec - shared_spec) / max(rounds, 1), 1),
            "tiny_op_us": round(100 * (time.perf_counter() - start), 2)}


def load_model(args):
    if args.preset:
        torch.manual_seed(0)
        overrides = {} if args.mtp_depth is None else {"mtp_depth": args.mtp_depth}
        model = student.CogViTMTPForDistillation(student.load_preset(args.preset, **overrides))
    else:
        model = student.CogViTMTPForDistillation.from_pretrained(args.student)
    return model.float().eval()


def forced(model):
    """A copy whose output norms are zero: every head's logits are 0, so every head picks token 0."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.decoder.norm.weight.zero_()
        for m in model.mtp:
            m.norm.weight.zero_()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--student", default="outputs/default/student")
    parser.add_argument("--preset", help="untrained student from configs/student/<preset>.yaml instead of --student")
    parser.add_argument("--mtp-depth", type=int, help="with --preset: its MTP depth (default: the preset's)")
    parser.add_argument("--accept", choices=["model", "forced", "both"], default="model",
                        help="forced: zero the output norms, so every draft is accepted")
    parser.add_argument("--samples", default="outputs/default/samples")
    parser.add_argument("--targets", default="outputs/default/targets/smollm2")
    parser.add_argument("--n", type=int, default=16, help="test samples")
    parser.add_argument("--prompt-tokens", type=int, default=2)
    parser.add_argument("--max-new-tokens", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--depths", type=int, nargs="*", help="drafting depths (default: 1..mtp_depth)")
    parser.add_argument("--top-k", type=int, nargs="+",
                        help="candidates per depth: 1 = a chain, more = a tree (default: 1 2; 1 with --batch)")
    parser.add_argument("--batch", type=int, default=1, help="prompts decoded together (> 1: chain drafting only)")
    parser.add_argument("--draft-vocab", choices=["captions", "topk", "config", "none"], default="captions")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--ignore-eos", action="store_true",
                        help="decode exactly --max-new-tokens, past the caption's eos (long outputs)")
    parser.add_argument("--out", default="docs/results/mtp.json")
    args = parser.parse_args()
    if args.batch < 1:
        raise SystemExit("--batch must be >= 1")
    top_ks = args.top_k or ([1, 2] if args.batch == 1 else [1])
    if args.batch > 1 and top_ks != [1]:
        raise SystemExit("--batch > 1 drafts a chain only (student/speculative_batch.py): use --top-k 1")

    model = load_model(args)
    samples, targets = Path(args.samples), Path(args.targets)
    eos = None if args.preset else load_manifest(targets, verify=False)["producer"].get("eos_id")
    if args.ignore_eos:
        eos = -1  # an id no head emits: neither decoder stops before --max-new-tokens
    depths = args.depths or list(range(1, model.config.mtp_depth + 1))
    vocab = {"none": None, "config": model.config.draft_vocab}.get(args.draft_vocab)
    if args.draft_vocab in ("captions", "topk"):
        vocab = train_vocab(samples, targets, args.draft_vocab == "topk")
    if vocab is not None and args.accept != "model":
        vocab = sorted({0, *vocab})
    vocabs = [None] if vocab is None else [None, vocab]
    modes = {"model": ["model"], "forced": ["forced"], "both": ["model", "forced"]}[args.accept]
    models = {mode: forced(model) if mode == "forced" else model for mode in modes}
    prompts = test_prompts(samples, targets, args.n, args.prompt_tokens, args.image_size)
    results = []
    with torch.no_grad():
        for d in depths:  # warm-up, also of the output head's layout choice per row count (speculative.head_scores)
            for k in top_ks:
                run(model, prompts[:max(2, args.batch)], d, 8, eos, vocabs[-1], top_k=k, batch=args.batch)
        for mode in modes:
            results += [run(models[mode], prompts, d, n, eos, v, mode, k, args.batch)
                        for n in args.max_new_tokens for v in vocabs for k in top_ks for d in depths]
        costs = costs_ms(model, prompts[0], depths[-1], vocabs[-1])
        aten_ops = op_counts(model, prompts, depths[-1], eos, vocabs[-1])
    report = {"student": args.preset and f"untrained preset {args.preset}" or args.student,
              "mtp_depth": model.config.mtp_depth, "samples": len(prompts),
              "prompt_tokens": args.prompt_tokens, "batch": args.batch, "eos": eos, "draft_vocab": args.draft_vocab,
              "threads": torch.get_num_threads(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "costs_ms": costs, "aten_ops": aten_ops,
              "results": results}
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
