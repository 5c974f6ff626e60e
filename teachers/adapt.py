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
from data.quality import GroundedSplit, grounded_positions
from data.shards import digest, load_manifest, read_shard
from data.stop import check_stop
from data.teacher_config import adapt_settings

from .prompt import rows_after_prompt, run_prompt

log = logging.getLogger(__name__)
INFO = "adapters.json"
ADAPTER_FILE = "adapter_model.safetensors"  # peft's file in each fold's folder


def fold_of(sample_id: str, folds: int) -> int:
    """The fold of a row: a hash of its id (stable, independent of the split hash)."""
    return int.from_bytes(hashlib.sha256(f"fold:{sample_id}".encode()).digest()[:8], "big") % folds


def read_rows(samples_dir: str | Path, splits: set[str]) -> dict[str, list[dict]]:
    """`id`, `caption` and `grounded` (the caption's words only the image tells) of every samples row in `splits`,
    per split, in shard order."""
    samples_dir = Path(samples_dir)
    out: dict[str, list[dict]] = {s: [] for s in splits}
    for entry in load_manifest(samples_dir)["shards"]:
        t = read_shard(samples_dir / entry["file"]).select(["id", "caption", "split", "grounded"]).to_pydict()
        for i, c, s, g in zip(t["id"], t["caption"], t["split"], t["grounded"], strict=True):
            if s in splits:
                out[s].append({"id": i, "caption": c, "grounded": g or []})
    return out


def read_captions(samples_dir: str | Path, splits: set[str]) -> dict[str, list[tuple[str, str]]]:
    """(id, caption) of every samples row in `splits`, per split."""
    return {s: [(r["id"], r["caption"]) for r in rows] for s, rows in read_rows(samples_dir, splits).items()}


def check_rows(rows: dict[str, list], samples_dir) -> str:
    """The data digest of the train and val rows (ids and captions); ValueError when either split is empty."""
    if not rows["train"] or not rows["val"]:
        raise ValueError(f"teacher correction needs train and val rows in {samples_dir}; got "
                         f"{len(rows['train'])} train and {len(rows['val'])} val")
    return digest([[(r["id"], r["caption"]) for r in rows[s]] for s in ("train", "val")])


def adapters_key(teacher, data_digest: str, adapt, extra=None) -> str:
    """The cache key of a correction: the teacher's weights, tokenizer and prompt, the data, the settings (and, for a
    graft, `extra`: the vision teacher it reads)."""
    ident = teacher.identity()
    base = {k: ident.get(k) for k in ("weights_digest", "tokenizer_digest", "prompt", "max_tokens")}
    return digest([base, data_digest, adapt_settings(adapt)] + ([extra] if extra is not None else []))[:16]


def caption_token_nll(model, teacher, rows: list[list[int]], prefix=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative log-likelihoods [B, L-1] of the rows' caption tokens and ends under `model` read in the teacher's
    format (its prompt runs once, batch 1; `prefix`: embeddings between the prompt and the caption, a graft's image
    tokens), and where they are real (not padding); differentiable."""
    input_ids, mask = teacher._batch(rows)
    cache, first = run_prompt(model, teacher.prompt_ids, teacher.device)
    logits = rows_after_prompt(model, cache, first, input_ids, mask, prefix)[:, :-1]
    valid = mask[:, 1:] == 1
    nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), input_ids[:, 1:], reduction="none")
    return nll * valid, valid


def caption_nll(model, teacher, rows: list[list[int]], prefix=None) -> tuple[torch.Tensor, int]:
    """Summed negative log-likelihood of the rows' caption tokens and ends (`caption_token_nll`), and their count."""
    nll, valid = caption_token_nll(model, teacher, rows, prefix)
    return nll.sum(), int(valid.sum())


class TextFit:
    """What one fold of the text-only correction trains: LoRA on a copy of the teacher's model. Its items are stored
    rows of token ids; a graft (teachers/graft.py) trains a projector beside it on rows with image features."""

    def __init__(self, teacher, model):
        self.teacher, self.model = teacher, model

    def modules(self) -> list[torch.nn.Module]:
        return [self.model]

    def token_nll(self, items: list) -> tuple[torch.Tensor, torch.Tensor]:
        return caption_token_nll(self.model, self.teacher, items)

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items() if "lora_" in k}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=False)

    def train(self, on: bool = True) -> None:
        for m in self.modules():
            m.train(on)


def measure(fit, items: list, batch_size: int, positions=None) -> dict[str, float]:
    """Exact perplexity of `fit` on `items`; with `positions` (each row's grounded positions,
    data.quality.grounded_positions) also at the grounded tokens and at the others (`perplexity_grounded`,
    `perplexity_other`, where the rows have grounded words)."""
    total, count, split = 0.0, 0, GroundedSplit()
    with torch.inference_mode():
        for lo in range(0, len(items), batch_size):
            nll, valid = fit.token_nll(items[lo: lo + batch_size])
            total, count = total + float(nll.sum()), count + int(valid.sum())
            if positions is not None:
                for i, (row, ok) in enumerate(zip(nll.double().cpu().numpy(), valid.cpu().numpy(), strict=True)):
                    split.add(row[ok], positions[lo + i])
    return {"perplexity": math.exp(total / max(count, 1)), **split.metrics("perplexity")}


def lora_model(teacher, adapt, fold: int):
    """A peft LoRA model on a copy of the teacher's model (fold k's initialisation seeded by seed + k)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(adapt.seed + fold)
    base = copy.deepcopy(teacher.model).train()
    layers = base.config.get_text_config().num_hidden_layers
    lora = LoraConfig(r=adapt.rank, lora_alpha=adapt.alpha, lora_dropout=adapt.dropout,
                      target_modules=list(adapt.target_modules),
                      layers_to_transform=list(range(max(layers - adapt.layers, 0), layers)) if adapt.layers else None)
    return get_peft_model(base, lora)


def fit_fold(teacher, train: list[list[int]], val: list[list[int]], adapt, fold: int, progress: bool = True,
             positions=None):
    """LoRA on a copy of the teacher's model over `train`, early-stopped on `val`; (peft model, figures)."""
    model = lora_model(teacher, adapt, fold)
    return model, train_fold(TextFit(teacher, model), train, val, adapt, fold, progress, positions)


def train_fold(fit, train: list, val: list, adapt, fold: int, progress: bool = True, positions=None) -> dict:
    """Train `fit` on `train` (batches drawn with seed + fold), early-stopped on the val perplexity every
    `eval_every` steps; `fit` ends with its best state. Figures: steps, best_step and the val figures (`measure`)
    before and after."""
    params = [p for m in fit.modules() for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=adapt.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(adapt.seed + fold)
    fit.train(False)
    before = measure(fit, val, adapt.batch_size, positions)
    best, best_state, best_step, bad, step = before["perplexity"], fit.state(), 0, 0, 0
    bar = tqdm(total=adapt.max_steps, desc=f"adapt fold {fold}", disable=not progress, leave=False)
    try:
        while step < adapt.max_steps and bad < adapt.patience:
            fit.train()
            for _ in range(min(adapt.eval_every, adapt.max_steps - step)):
                check_stop()  # a SIGTERM ends the fit between steps (the cache is written after every fold)
                pick = torch.randint(len(train), (adapt.batch_size,), generator=g).tolist()
                nll, valid = fit.token_nll([train[i] for i in pick])
                loss = nll.sum() / valid.sum()
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"adapt fold {fold}: non-finite loss at step {step}; lower adapt.lr")
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
            fit.train(False)
            ppl = measure(fit, val, adapt.batch_size)["perplexity"]
            bar.set_postfix(val_ppl=f"{ppl:.2f}")
            if ppl < best:
                best, best_step, bad, best_state = ppl, step, 0, fit.state()
            else:
                bad += 1
    finally:
        bar.close()
    fit.load(best_state)
    after = measure(fit, val, adapt.batch_size, positions) if positions is not None else {"perplexity": best}
    log.info("adapt fold %d: val perplexity %.2f -> %.2f (best at step %d of %d)", fold, before["perplexity"],
             after["perplexity"], best_step, step)
    return {"fold": fold, "train_rows": len(train), "steps": step, "best_step": best_step,
            **{f"val_{k}_before": v for k, v in before.items()}, **{f"val_{k}_after": v for k, v in after.items()}}


def cached_fit(folder: Path, fit) -> dict:
    """adapters.json of `folder` when it is complete (nothing is fitted); else `fit(tmp)` writes the folds into a
    temporary folder and returns adapters.json's content, and the folder is renamed into place when complete.
    Either way with `folder` and `cached`."""
    if (folder / INFO).is_file():
        return {**json.loads((folder / INFO).read_text()), "folder": str(folder), "cached": True}
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        info = fit(tmp)
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


def val_rows(teacher, rows: list[dict], adapt) -> tuple[list[dict], list[list[int]], list[list[int]]]:
    """The early-stopping rows (the first `val_rows`), their token rows and their grounded positions."""
    picked = rows[: adapt.val_rows]
    tokens = teacher.encode([r["caption"] for r in picked])[0]
    positions = [grounded_positions(t, r["grounded"], teacher.tokenizer) for t, r in zip(tokens, picked, strict=True)]
    return picked, tokens, positions


def record(teacher, adapt, data_digest: str, rows: dict, folds: list[dict]) -> dict:
    """adapters.json's content: the folds' figures and files, the settings, the data and the teacher."""
    return {"folds": adapt.folds, "adapters": folds, "adapt": adapt_settings(adapt), "data_digest": data_digest,
            "train_rows": len(rows["train"]), "val_rows": len(rows["val"]),
            "teacher": {k: teacher.identity().get(k) for k in ("name", "source", "weights_digest", "prompt")}}


def adapt_teacher(teacher, samples_dir: str | Path, adapt, cache_dir: str | Path, progress: bool = True) -> dict:
    """Fit (or find in the cache) the K cross-fitted adapters of `teacher` on the samples' train split.

    Returns adapters.json's content plus `folder`, and `cached` (True when nothing was fitted)."""
    rows = read_rows(samples_dir, {"train", "val"})
    data_digest = check_rows(rows, samples_dir)
    folder = Path(cache_dir).expanduser() / "adapters" / adapters_key(teacher, data_digest, adapt)

    def fit(tmp: Path) -> dict:
        _, val, positions = val_rows(teacher, rows["val"], adapt)
        folds = []
        for k in range(adapt.folds):
            train = teacher.encode([r["caption"] for r in rows["train"] if fold_of(r["id"], adapt.folds) != k])[0]
            model, figures = fit_fold(teacher, train, val, adapt, k, progress, positions)
            model.save_pretrained(tmp / f"fold-{k}")  # safetensors: adapter_model.safetensors + adapter_config.json
            figures.update(path=f"fold-{k}", digest=file_sha256(tmp / f"fold-{k}" / ADAPTER_FILE))
            folds.append(figures)
            del model
        return record(teacher, adapt, data_digest, rows, folds)

    return cached_fit(folder, fit)


def check_digest(path: Path, want: str, what: str) -> None:
    """ValueError when the file's sha256 is not the one adapters.json records."""
    got = file_sha256(path)
    if got != want:
        raise ValueError(f"{path}: {what} digest {got[:12]} does not match {INFO} ({want[:12]}); delete the folder "
                         "to fit it again")


def attach_adapters(model, folder: str | Path):
    """The teacher's model with every fold's adapter of `folder` loaded (named fold-<k>), and adapters.json."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / INFO).is_file():
        raise FileNotFoundError(f"{folder}: no {INFO}; not a folder of fitted teacher adapters (mmtp adapt)")
    info = json.loads((folder / INFO).read_text())
    for a in info["adapters"]:
        check_digest(folder / a["path"] / ADAPTER_FILE, a["digest"], "adapter")
    first, *rest = info["adapters"]
    model = PeftModel.from_pretrained(model, str(folder / first["path"]), adapter_name=f"fold-{first['fold']}")
    for a in rest:
        model.load_adapter(str(folder / a["path"]), adapter_name=f"fold-{a['fold']}")
    return model.eval(), info
