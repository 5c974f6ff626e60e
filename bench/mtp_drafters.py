"""Lighter MTP drafters than a transformer block per depth, measured: what the drafting cost leaves of the speed-up.

    OMP_NUM_THREADS=1 .venv/bin/python bench/mtp_drafters.py --student outputs/default/student [--steps 80]
        [--batch 32] [--n 32] [--repeats 2] [--out docs/results/mtp_drafters.json]

The student's MTP depth k projects [RMSNorm(h^{k-1}); RMSNorm(Emb(token))] and runs one transformer block. Two
lighter drafters replace every depth, in this process only:
- `mlp`: the block without its attention: x + SwiGLU(RMSNorm(x)) after the projection;
- `linear`: the projection alone.
Without attention a depth needs only the last verified position, so their drafting step runs each depth on that
one position (the loop of student/speculative.py with its `_draft` swapped). Each starts from the student's own
weights of those parts and is trained with the drafter stage's loss (distill/losses/drafters.py: the frozen student's
greedy continuations of train captions, scored over `config.draft_vocab`) for `--steps` AdamW steps of `--batch`
captions (5 warm-up steps, cosine to a tenth of `--lr`). Then the three drafters (`block` = the student's own)
are timed against greedy decoding as bench/mtp.py times them (D = the student's depth, chain, the draft
vocabulary, 32 new tokens, test prompts of 2 tokens), interleaved, `--repeats` times after one warm-up pass. The
main model is the student's in all three, so greedy decoding, and every output, is the same.
Writes the JSON to `--out` (atomically) and prints it.
"""

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mtp as bench  # noqa: E402

import student  # noqa: E402
import student.speculative as speculative  # noqa: E402
from data.shards import atomic_write_json  # noqa: E402
from distill.losses import drafter_loss, greedy_captions  # noqa: E402


class LightDepth(nn.Module):
    """An MTP depth without attention: x = proj([RMSNorm(h); RMSNorm(e)]), then x + SwiGLU(RMSNorm(x)) with `mlp`."""

    def __init__(self, depth: nn.Module, mlp: bool):
        super().__init__()
        self.hidden_norm, self.token_norm = copy.deepcopy(depth.hidden_norm), copy.deepcopy(depth.token_norm)
        self.proj, self.norm = copy.deepcopy(depth.proj), copy.deepcopy(depth.norm)
        self.mlp_norm = copy.deepcopy(depth.block.post_attention_layernorm) if mlp else None
        self.mlp = copy.deepcopy(depth.block.mlp) if mlp else None

    def forward(self, hidden, token_embeds, cos=None, sin=None, attn_mask=None, cache=None):  # MTPModule's call
        x = self.proj(torch.cat([self.hidden_norm(hidden), self.token_norm(token_embeds)], dim=-1))
        return x if self.mlp is None else x + self.mlp(self.mlp_norm(x))


def draft_last_position(model, n_draft, length, hidden, mtp_caches, tok, fed, siblings, draft_ids, draft_head,
                        mtp_inputs):
    """`speculative._draft` for attention-free depths (chain only): depth k reads h^{k-1} and the token input at
    position L-1 alone, so nothing before it is recomputed and no cache is kept."""
    i = length - 1
    for k in range(1, n_draft + 1):
        out = model.mtp[k - 1](hidden[k - 1:k, i:i + 1], tok[:, i + k:i + k + 1])
        hidden[k, i] = out[0, 0]
        draft = speculative.head_scores(draft_head, model.mtp[k - 1].norm(out[:, -1]))[0].max(0, keepdim=True).indices
        fed[:, k] = draft if draft_ids is None else draft_ids[draft]
        if k < n_draft:
            tok[:, length + k] = model.decoder.embed_tokens(fed[:, k])


def caption_batch(rows, eos):
    """(pixel_values [B, 3, S, S], ids [B, T] right-padded with eos, attention_mask) of full captions."""
    length = max(r[2].shape[1] for r in rows)
    ids = torch.full((len(rows), length), eos, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, (_, _, caption) in enumerate(rows):
        ids[b, :caption.shape[1]], mask[b, :caption.shape[1]] = caption[0], 1
    return torch.cat([r[1] for r in rows]), ids, mask


def train(model, rows, steps, batch, lr):
    """AdamW on the MTP depths alone with the drafter stage's loss; returns the last step's figures."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(model.mtp.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for step in range(steps):
        scale = min(1.0, (step + 1) / 5) * (0.1 + 0.45 * (1 + math.cos(math.pi * step / steps)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        pick = torch.randint(len(rows), (batch,), generator=generator).tolist()
        pixels, ids, mask = caption_batch([rows[i] for i in pick], model.config.eos_token_id)
        ids, mask = greedy_captions(model, pixels, ids, mask, 3)
        states = model(pixels, input_ids=ids, attention_mask=mask, text_logits_only=True, head_states=True).head_states
        figures = drafter_loss(states, model.lm_head.weight, mask, model.config.draft_vocab)
        opt.zero_grad()
        figures["loss"].backward()
        opt.step()
    model.requires_grad_(False)
    return {k: round(float(v.detach()), 4) for k, v in figures.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="outputs/default/student")
    parser.add_argument("--samples", default="outputs/default/samples")
    parser.add_argument("--targets", default="outputs/default/targets/smollm2")
    parser.add_argument("--steps", type=int, default=80,
                        help="training steps per light drafter (twice the drafter stage: they start from a part)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--n", type=int, default=32, help="test prompts timed")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--out", default="docs/results/mtp_drafters.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    block = student.CogViTMTPForDistillation.from_pretrained(args.student).float().eval()
    if block.config.draft_vocab is None or block.config.mtp_depth == 0:
        raise SystemExit(f"{args.student}: needs MTP depths and a draft vocabulary (config.draft_vocab)")
    samples, targets = Path(args.samples), Path(args.targets)
    everything = 10**6  # more rows and caption tokens than any split has: every train row, whole captions
    rows = bench.test_prompts(samples, targets, everything, everything, args.image_size, split="train")
    models, training = {"block": block}, {}
    for name in ("mlp", "linear"):
        light = copy.deepcopy(block)
        light.mtp = nn.ModuleList(LightDepth(depth, name == "mlp") for depth in block.mtp)
        start = time.perf_counter()
        training[name] = {**train(light, rows, args.steps, args.batch, args.lr),
                          "seconds": round(time.perf_counter() - start, 1)}
        models[name] = light.eval()
        print(name, training[name], flush=True)

    prompts = bench.test_prompts(samples, targets, args.n, 2, args.image_size)
    depth, eos, vocab = block.config.mtp_depth, block.config.eos_token_id, block.config.draft_vocab
    keys = ("acceptance", "tau", "tokens_per_forward", "verify_forwards", "fewest_verify_forwards",
            "greedy_ms_per_token", "speculative_ms_per_round", "speedup", "drafting_seconds",
            "outputs_differing_from_greedy")
    draft, results = speculative._draft, []
    try:
        with torch.no_grad():
            for repeat in range(args.repeats + 1):  # the first pass warms up
                for name, model in models.items():
                    speculative._draft = draft if name == "block" else draft_last_position
                    row = bench.run(model, prompts, depth, 32, eos, vocab)
                    if repeat:
                        results.append({"drafter": name, "repeat": repeat, **{k: row[k] for k in keys}})
    finally:
        speculative._draft = draft
    report = {"student": args.student, "mtp_depth": depth, "samples": len(prompts), "draft_vocab": len(vocab),
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "steps": args.steps, "batch": args.batch, "lr": args.lr,
              "parameters": {name: sum(p.numel() for p in m.mtp.parameters()) for name, m in models.items()},
              "training": training,
              "speedup": {name: [round(r["speedup"], 3) for r in results if r["drafter"] == name] for name in models},
              "results": results}
    atomic_write_json(args.out, report)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
