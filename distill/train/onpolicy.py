"""On-policy distillation (GKD): the student continues caption prefixes, the language teacher scores the
continuations, and training mixes them with the offline shards (flows/onpolicy.py runs the rounds).

The student's continuations are written as samples shards (`source` = "onpolicy", manifest `origin` and
`round`), so the teacher scores them with the collection code and the trainer reads them like any shards:
teacher position t of a continuation then holds the teacher's top-k + tail after the student's own tokens.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from data.dataset import DistillDataset, collate
from data.shards import ShardError, ShardWriter, digest, load_manifest, read_shard, sha256_file, write_manifest
from data.targets import SAMPLES_SCHEMA, decode_language_row
from distill.config.load import check_config, from_dict, shards_path, to_container
from distill.losses.language import language_kd_loss
from student.pixels import image_tensor, image_transform

log = logging.getLogger(__name__)
ORIGIN = "onpolicy"


def prompt_rows(samples_dir: Path, language_dir: Path, split: str, n: int, prompt_tokens: int, seed: int) -> list[dict]:
    """Up to `n` rows of `split` (a seeded choice) whose caption has tokens beyond the first `prompt_tokens`:
    the samples row plus `prompt` (the language teacher's first token ids of the caption)."""
    manifest = load_manifest(samples_dir, verify=False)
    rows = []
    for entry in manifest["shards"]:
        samples, targets = read_shard(samples_dir / entry["file"]), read_shard(language_dir / entry["file"])
        for i in np.flatnonzero(samples.column("split").to_numpy(zero_copy_only=False) == split):
            ids = decode_language_row(targets, int(i))["token_ids"]
            if len(ids) > prompt_tokens + 1:  # something left to continue besides eos
                rows.append({**samples.slice(int(i), 1).to_pylist()[0], "prompt": ids[:prompt_tokens].tolist()})
    if not rows:
        raise ShardError(f"{samples_dir}: no {split} rows with captions longer than {prompt_tokens} tokens")
    order = np.random.default_rng(seed).permutation(len(rows))[:n]
    return [rows[i] for i in sorted(order)]


@torch.no_grad()
def continue_captions(model, rows: list[dict], tokenizer, *, image_size: int, max_new_tokens: int, temperature: float,
                      eos_id: int, seed: int, batch_size: int = 32, progress: bool = True) -> list[str]:
    """The student's sampled continuation of each row's prompt, as caption text (prompt words included;
    special tokens dropped). Sampling is seeded, so the same student and rows give the same texts."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    texts = []
    for lo in tqdm(range(0, len(rows), batch_size), desc="student continuations", disable=not progress):
        batch = rows[lo:lo + batch_size]
        prompt = torch.tensor([r["prompt"] for r in batch], device=device)
        pixels = torch.stack([image_tensor(r["image"], image_size) for r in batch]).to(device)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), pixel_values=pixels, do_sample=True,
                             temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                             eos_token_id=eos_id, pad_token_id=eos_id)
        for row in out.tolist():
            new = row[prompt.shape[1]:]
            new = new[: new.index(eos_id)] if eos_id in new else new
            texts.append(" ".join(tokenizer.decode(row[:prompt.shape[1]] + new, skip_special_tokens=True).split()))
    return texts


def write_continuations(out_dir: Path, rows: list[dict], texts: list[str], *, spec: dict, round_: int,
                        shard_rows: int) -> dict:
    """Samples shards of the continuations (ids `<sample id>@r<round>`, split train); rows whose text came out
    empty are skipped and counted."""
    writer = ShardWriter(out_dir, SAMPLES_SCHEMA, shard_rows)
    empty = 0
    for row, text in zip(rows, texts, strict=True):
        if not text:
            empty += 1
            continue
        writer.add({"id": f"{row['id']}@r{round_}", "image": row["image"], "caption": text, "label": row["label"],
                    "split": "train", "source": ORIGIN, "grounded": []})
    shards = writer.close()
    if not shards:
        raise ShardError(f"{out_dir}: every continuation of round {round_} came out empty")
    return write_manifest(out_dir, kind="samples", shards=shards, producer={"kind": ORIGIN, **spec},
                          config_digest=digest(spec), config=spec, origin=ORIGIN, round=round_,
                          rows_seen=len(rows), rows_skipped={"empty_continuation": empty} if empty else {},
                          rows_fixed={}, splits={"train": len(rows) - empty})


def generations(cfg, student_dir: Path, out_dir: Path, *, split: str, n: int, round_: int, seed: int) -> dict:
    """The samples manifest of `student_dir`'s continuations of `n` `split` prompts in `out_dir`: reused when one
    made by the same student and settings is there, else generated and written."""
    from transformers import AutoModel, AutoTokenizer

    import student  # noqa: F401  (registers the Auto classes)
    op, lang = cfg.onpolicy, cfg.teachers.language.name
    spec = {"student_sha256": sha256_file(Path(student_dir) / "model.safetensors"), "split": split, "prompts": n,
            "round": round_, "seed": seed, "prompt_tokens": op.prompt_tokens, "max_new_tokens": op.max_new_tokens,
            "temperature": op.temperature, "shard_rows": cfg.data.shard_rows}
    try:
        manifest = load_manifest(out_dir)
        if manifest["config_digest"] == digest(spec):
            log.info("continuations in %s are complete; reusing them", out_dir)
            return manifest
    except ShardError:
        pass
    for stale in Path(out_dir).glob("shard-*.arrow"):
        stale.unlink()
    rows = prompt_rows(shards_path(cfg, "samples"), shards_path(cfg, "targets", lang), split, n, op.prompt_tokens, seed)
    tokenizer = AutoTokenizer.from_pretrained(str(shards_path(cfg, "targets", lang, "tokenizer")))
    model = AutoModel.from_pretrained(str(student_dir), dtype=torch.float32).eval()
    eos = load_manifest(shards_path(cfg, "targets", lang), verify=False)["producer"]["eos_id"]
    texts = continue_captions(model, rows, tokenizer, image_size=cfg.student.image_size,
                              max_new_tokens=op.max_new_tokens, temperature=op.temperature, eos_id=eos, seed=seed,
                              batch_size=cfg.evaluate.batch_size, progress=cfg.collect.progress)
    return write_continuations(Path(out_dir), rows, texts, spec=spec, round_=round_, shard_rows=cfg.data.shard_rows)


@torch.no_grad()
def onpolicy_kl(student_dir: Path, folder: Path, language: str, prompt_tokens: int, image_size: int,
                batch_size: int = 32) -> dict:
    """eval/onpolicy_kl: KL(teacher || student) at T=1 on the positions that predict the student's own tokens
    (after the prompt) of its scored continuations in `folder` (samples/ and targets/<language>/), and the top-1
    agreement there."""
    from transformers import AutoModel

    import student  # noqa: F401
    model = AutoModel.from_pretrained(str(student_dir), dtype=torch.float32).eval()
    dataset = DistillDataset(folder / "samples", {language: folder / "targets" / language}, "train",
                             transform=image_transform(image_size), verify=False)
    pad = dataset.targets[language]["producer"].get("eos_id") or 0
    kl = agree = count = 0.0
    for lo in range(0, len(dataset), batch_size):
        batch = collate([dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))], pad)
        out = model(pixel_values=batch["pixel_values"], input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"], text_logits_only=True)
        lang = dict(batch["lang"])
        lang["mask"] = lang["mask"].clone()
        lang["mask"][:, : prompt_tokens - 1] = False  # positions predicting prompt tokens are not the student's
        kl += float(language_kd_loss(out.logits, lang, "forward_kl", 1.0, reduction="none").sum())
        agree += float(((out.logits.argmax(-1) == lang["topk_ids"][..., 0]) & lang["mask"]).sum())
        count += float(lang["mask"].sum())
    return {"eval/onpolicy_kl": kl / max(count, 1), "eval/onpolicy_agreement": agree / max(count, 1),
            "eval/onpolicy_positions": count}


def round_config(cfg, round_dir: Path, init_from: Path, mix_dir: Path | None):
    """The config of one round's training and evaluation: the run's config with the round's output folder, the
    previous student as the start, one stage `onpolicy` with the language term alone (onpolicy.kd_kind on the
    continuations, onpolicy.offline_kd_kind on the offline rows, onpolicy.kd_weight, onpolicy.ce_weight) training
    onpolicy.trainable, and the continuations mixed in at onpolicy.mix. The run's drafter stages follow it, so the
    round's student drafts for speculative decoding as the run's did."""
    op = cfg.onpolicy
    stage = {"name": ORIGIN, "steps": op.steps, "losses": ["language"], "trainable": [p.value for p in op.trainable],
             "lr": op.lr or cfg.train.lr, "warmup_steps": min(cfg.train.warmup_steps, op.steps // 4)}
    drafters = [s for s in to_container(cfg)["train"]["stages"] if "drafter" in s["losses"]]
    round_cfg = OmegaConf.merge(from_dict(to_container(cfg)), {
        "output_dir": str(round_dir), "shards_dir": str(shards_path(cfg)),
        "loss": {"kd_kind": op.offline_kd_kind or op.kd_kind, "generated_kd_kind": op.kd_kind,
                 "generated_kd_weight": op.kd_weight,
                 "ce_weight": cfg.loss.ce_weight if op.ce_weight is None else op.ce_weight,
                 "vision": False, "contrastive": False},
        "train": {"stages": [stage, *drafters], "max_steps": None, "resume": True, "init_from": str(init_from),
                  "mix_shards": [str(mix_dir)] if mix_dir else [], "mix_fraction": op.mix},
        "evaluate": {"student": None, "baseline": None}})
    return check_config(round_cfg)
