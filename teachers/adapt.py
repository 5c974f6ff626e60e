"""Teacher correction: LoRA adapters fitted on the train captions before the teacher teaches (Minitron's step).

A frozen language teacher that has never seen the data's captions gives targets far worse than what the
student learns alone, and KD from it distils noise. Correction fine-tunes LoRA adapters (peft) on the
**train split only**, in the teacher's scoring format (the prompt of teachers/language.py, then the caption
and its end), with early stopping on the val split's exact perplexity.

It **cross-fits**: train rows are dealt into K folds by a hash of their id, and adapter k is fitted on
every train row outside fold k. Collection scores a row of fold k with adapter k, so no train row is
scored by an adapter that saw it (an adapter's own training rows would get targets near one-hot). Val and
test rows are dealt into folds the same way; no adapter ever trains on them. The test split is never read.

Adapters are cached under cache_dir/adapters/<key>, key = digest(teacher weights, tokenizer and prompt,
data, adapt config), written to a temporary folder and renamed when complete; `adapters.json` there lists
each fold's adapter digest, steps and val perplexity before and after.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data.identity import file_sha256
from data.shards import digest, load_manifest, read_shard
from data.stop import check_stop

from .prompt import rows_after_prompt, run_prompt

log = logging.getLogger(__name__)
INFO = "adapters.json"


def fold_of(sample_id: str, folds: int) -> int:
    """The fold of a row: a hash of its id (stable, independent of the split hash)."""
    return int.from_bytes(hashlib.sha256(f"fold:{sample_id}".encode()).digest()[:8], "big") % folds


def read_captions(samples_dir: str | Path, splits: set[str]) -> dict[str, list[tuple[str, str]]]:
    """(id, caption) of every samples row in `splits`, per split."""
    samples_dir = Path(samples_dir)
    out: dict[str, list[tuple[str, str]]] = {s: [] for s in splits}
    for entry in load_manifest(samples_dir)["shards"]:
        t = read_shard(samples_dir / entry["file"]).select(["id", "caption", "split"]).to_pydict()
        for i, c, s in zip(t["id"], t["caption"], t["split"], strict=True):
            if s in splits:
                out[s].append((i, c))
    return out


def adapters_key(teacher, data_digest: str, adapt) -> str:
    ident = teacher.identity()
    base = {k: ident.get(k) for k in ("weights_digest", "tokenizer_digest", "prompt", "max_tokens")}
    return digest([base, data_digest, dataclasses.asdict(adapt)])[:16]


def caption_nll(model, teacher, rows: list[list[int]]) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the rows' caption tokens and ends under `model` read in the teacher's
    format (its prompt runs once, batch 1), and their count; differentiable."""
    input_ids, mask = teacher._batch(rows)
    cache, first = run_prompt(model, teacher.prompt_ids, teacher.device)
    logits = rows_after_prompt(model, cache, first, input_ids, mask)[:, :-1]
    target = input_ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100, reduction="sum")
    return nll, int((target != -100).sum())


def _perplexity(model, teacher, rows, batch_size) -> float:
    total, count = 0.0, 0
    with torch.inference_mode():
        for lo in range(0, len(rows), batch_size):
            nll, n = caption_nll(model, teacher, rows[lo: lo + batch_size])
            total, count = total + float(nll), count + n
    return math.exp(total / max(count, 1))


def fit_fold(teacher, train: list[list[int]], val: list[list[int]], adapt, fold: int, progress: bool = True):
    """LoRA on a copy of the teacher's model over `train`, early-stopped on `val`; (peft model, figures)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(adapt.seed + fold)
    base = copy.deepcopy(teacher.model).train()
    layers = base.config.get_text_config().num_hidden_layers
    lora = LoraConfig(r=adapt.rank, lora_alpha=adapt.alpha, lora_dropout=adapt.dropout,
                      target_modules=list(adapt.target_modules),
                      layers_to_transform=list(range(max(layers - adapt.layers, 0), layers)) if adapt.layers else None)
    model = get_peft_model(base, lora)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=adapt.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(adapt.seed + fold)
    model.eval()
    before = best = _perplexity(model, teacher, val, adapt.batch_size)
    best_state, best_step, bad, step = {k: v.clone() for k, v in _lora_state(model).items()}, 0, 0, 0
    bar = tqdm(total=adapt.max_steps, desc=f"adapt fold {fold}", disable=not progress, leave=False)
    try:
        while step < adapt.max_steps and bad < adapt.patience:
            model.train()
            for _ in range(adapt.eval_every):
                check_stop()  # a SIGTERM ends the fit between steps (the cache is written after every fold)
                pick = torch.randint(len(train), (adapt.batch_size,), generator=g).tolist()
                nll, n = caption_nll(model, teacher, [train[i] for i in pick])
                loss = nll / n
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"adapt fold {fold}: non-finite loss at step {step}; lower adapt.lr")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                if step >= adapt.max_steps:
                    break
            model.eval()
            ppl = _perplexity(model, teacher, val, adapt.batch_size)
            bar.set_postfix(val_ppl=f"{ppl:.2f}")
            if ppl < best:
                best, best_step, bad = ppl, step, 0
                best_state = {k: v.clone() for k, v in _lora_state(model).items()}
            else:
                bad += 1
    finally:
        bar.close()
    model.load_state_dict(best_state, strict=False)
    figures = {"fold": fold, "train_rows": len(train), "steps": step, "best_step": best_step,
               "val_perplexity_before": before, "val_perplexity_after": best}
    log.info("adapt fold %d: val perplexity %.2f -> %.2f (best at step %d of %d)", fold, before, best, best_step, step)
    return model, figures


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "lora_" in k}


def adapt_teacher(teacher, samples_dir: str | Path, adapt, cache_dir: str | Path, progress: bool = True) -> dict:
    """Fit (or find in the cache) the K cross-fitted adapters of `teacher` on the samples' train split.

    Returns adapters.json's content plus `folder`, and `cached` (True when nothing was fitted)."""
    captions = read_captions(samples_dir, {"train", "val"})
    if not captions["train"] or not captions["val"]:
        raise ValueError(f"teacher correction needs train and val rows in {samples_dir}; got "
                         f"{len(captions['train'])} train and {len(captions['val'])} val")
    data_digest = digest([captions["train"], captions["val"]])
    folder = Path(cache_dir).expanduser() / "adapters" / adapters_key(teacher, data_digest, adapt)
    if (folder / INFO).is_file():
        return {**json.loads((folder / INFO).read_text()), "folder": str(folder), "cached": True}
    val = teacher.encode([c for _, c in captions["val"][: adapt.val_rows]])[0]
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        folds = []
        for k in range(adapt.folds):
            rows = [c for i, c in captions["train"] if fold_of(i, adapt.folds) != k]
            model, figures = fit_fold(teacher, teacher.encode(rows)[0], val, adapt, k, progress)
            model.save_pretrained(tmp / f"fold-{k}")  # safetensors: adapter_model.safetensors + adapter_config.json
            figures.update(path=f"fold-{k}", digest=file_sha256(tmp / f"fold-{k}" / "adapter_model.safetensors"))
            folds.append(figures)
            del model
        info = {"folds": adapt.folds, "adapters": folds, "adapt": dataclasses.asdict(adapt), "data_digest": data_digest,
                "train_rows": len(captions["train"]), "val_rows": len(captions["val"]),
                "teacher": {k: teacher.identity().get(k) for k in ("name", "source", "weights_digest", "prompt")}}
        (tmp / INFO).write_text(json.dumps(info, indent=1))
        os.chmod(tmp, 0o755)
        try:
            os.rename(tmp, folder)
        except OSError:
            if not (folder / INFO).is_file():  # lost a race with a concurrent fit: use theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**info, "folder": str(folder), "cached": False}


def attach_adapters(model, folder: str | Path):
    """The teacher's model with every fold's adapter of `folder` loaded (named fold-<k>), and adapters.json."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / INFO).is_file():
        raise FileNotFoundError(f"{folder}: no {INFO}; not a folder of fitted teacher adapters (mmtp adapt)")
    info = json.loads((folder / INFO).read_text())
    for a in info["adapters"]:
        got = file_sha256(folder / a["path"] / "adapter_model.safetensors")
        if got != a["digest"]:
            raise ValueError(f"{folder / a['path']}: adapter digest {got[:12]} does not match {INFO} "
                             f"({a['digest'][:12]}); delete the folder to fit it again")
    first, *rest = info["adapters"]
    model = PeftModel.from_pretrained(model, str(folder / first["path"]), adapter_name=f"fold-{first['fold']}")
    for a in rest:
        model.load_adapter(str(folder / a["path"]), adapter_name=f"fold-{a['fold']}")
    return model.eval(), info
