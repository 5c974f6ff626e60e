"""Evaluation of a trained student on the held-out test split, from the samples and target shards.

Metrics (MLflow names in brackets):
- language teacher agreement, per head (main = `main`, MTP depth k = `mtp{k}`): top-1 agreement
  with the teacher's most likely token [eval/agreement/<head>] and the sparse top-k + tail
  KL(teacher‖student) at T=1, as in training [eval/kl/<head>];
- caption perplexity under the main head, per student token [eval/perplexity], and the language teacher's on
  the same tokens from its stored top-k + tail, a token outside the top-k counted at the whole tail mass: a
  lower bound of the teacher's perplexity [eval/teacher_perplexity_bound; the teacher's tokenizer only, secondary];
- the language teacher measured exactly on the test captions from its stored `token_logprob`
  (data/quality.py): perplexity [eval/teacher_perplexity, the headline teacher figure] and top-1 accuracy
  [eval/teacher_top1_acc], against n-gram references fitted on the train captions (weights on val)
  [eval/unigram_perplexity, eval/trigram_perplexity]; not for shards collected before token_logprob. A student
  below the teacher's perplexity has passed its teacher on the captions, and from there KD pulls against CE;
- a student with its own tokenizer (`student.tokenizer`) is evaluated through `CrossTokenizer`: agreement and
  KL on the positions whose next token aligns 1:1 with a teacher token, and their share of the positions with
  a teacher target [eval/aligned_fraction];
- grounded-token accuracy: teacher-forced top-1 accuracy on the caption tokens that spell a word
  only the image tells (digit word, colour, count, shape) [eval/grounded_acc], the same with a
  blank grey image [eval/grounded_acc_blank], and their gap [eval/grounding_gap];
- perplexity split at those grounded tokens and at every other caption token, the student's under its main
  head [eval/perplexity_grounded, eval/perplexity_other; token-weighted in log space they give eval/perplexity]
  and the language teacher's exact one from `token_logprob` at the same tokens [eval/teacher_perplexity_grounded,
  eval/teacher_perplexity_other; not for shards before token_logprob]: a teacher that cannot see has its grounded
  figure far above its other one. Only for captions with grounded words (data.quality.GroundedSplit). A
  student with its own tokenizer: on its own tokens (as eval/perplexity and grounded_acc), not comparable;
- vision fidelity per teacher: cosine between the adaptor outputs and the teacher's standardised
  features [eval/vision/<teacher>/summary_cos, .../patch_cos];
- linear probe: logistic regression on train-split features predicting the (source, label) class,
  accuracy on the test split, for the student's `image_features` [eval/probe/student], each
  vision teacher's summary [eval/probe/<teacher>] and raw pixels [eval/probe/pixels].
- MTP self-speculative decoding against greedy [mtp/...]: distill/eval/mtp_eval.py.

Device: `evaluate.device` (auto = CUDA when present). Batches are collated and standardised on the
CPU, then moved once; on CUDA a student exported from bf16 training runs under bf16 autocast, any
other in fp32. The speculative-decoding figures always run in fp32 (their check is exact equality
with greedy decoding, which bf16 rounding could break at near-ties).
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.dataset import DistillDataset, collate
from data.devices import model_on, resolve_device, to_device
from data.quality import GroundedSplit
from data.standardize import standardize_batch, standardizers
from data.student_tokenizer import CrossTokenizer
from data.vocab import TokenMap
from distill.eval.mtp_eval import mtp_figures_in_child, mtp_prompts, speculative_figures
from distill.losses.language import SparseTargets, language_kd_loss, shift_targets
from student.pixels import image_transform

log = logging.getLogger(__name__)


def _batches(dataset: DistillDataset, batch_size: int, pad_id: int, stds: dict, device: torch.device, cross=None):
    """(items, batch): collated and standardised on the CPU, then moved to `device` once; with `cross`, the
    items are first moved into the student tokenizer's positions."""
    for lo in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(lo, min(lo + batch_size, len(dataset)))]
        items = [cross(it) for it in items] if cross is not None else items
        yield items, to_device(standardize_batch(collate(items, pad_id), stds), device)


def grounded_positions(token_ids: list[int], words: list[str], tokenizer) -> list[int]:
    """Positions t (t ≥ 1) whose token overlaps one of `words` in the decoded caption."""
    if not words:
        return []
    ends, text = [], ""
    for t in range(len(token_ids)):
        text = tokenizer.decode(token_ids[: t + 1], skip_special_tokens=True)
        ends.append(len(text))
    spans = [m.span() for w in words for m in re.finditer(rf"\b{re.escape(w)}\b", text, re.IGNORECASE)]
    out = []
    for t in range(1, len(token_ids)):
        start, end = ends[t - 1], ends[t]
        if end > start and any(s < end and start < e for s, e in spans):
            out.append(t)
    return out


@torch.no_grad()
def evaluate_student(model, dataset: DistillDataset, train_dataset: DistillDataset | None, tokenizer, *,
                     stds: dict, pad_id: int = 0, batch_size: int = 32, device=None,
                     cross: CrossTokenizer | None = None) -> dict[str, float]:
    """All metrics of the module docstring, as a flat dict of MLflow metric names.

    `device`: where to run (default: the model's device; the model is moved there). `cross`: for a student
    with its own tokenizer, the transform into its token space; captions are then padded with `cross.pad_id`
    and the grounded tokens found with its tokenizer (`tokenizer` is not used)."""
    if cross is not None:
        tokenizer, pad_id = cross.student, cross.pad_id
    model.eval()
    device = model_on(model, device)
    depth = model.config.mtp_depth
    heads = ["main"] + [f"mtp{k}" for k in range(1, depth + 1)]
    sums = {f"{m}/{h}": 0.0 for m in ("agree", "kl", "count") for h in heads}
    nll, n_tokens, unknown, aligned, reachable, teacher_nll = 0.0, 0, [0, 0], [0, 0], 0, 0.0
    split = GroundedSplit()  # the student's perplexity at the grounded tokens and at the others
    token_map = TokenMap.from_config(model.config)  # a trimmed vocabulary: batches move to the student's ids
    grounded = {"image": [0, 0], "blank": [0, 0]}
    cos = {}
    feats, labels = [], []
    for items, batch in _batches(dataset, batch_size, pad_id, stds, device, cross):
        if cross is None:  # in the teacher's ids, before a trimmed vocabulary moves them
            teacher_nll += teacher_caption_nll(batch["lang"], batch["input_ids"])
        if token_map is not None:
            unknown = [a + b for a, b in zip(unknown, token_map.unknown_fraction(batch), strict=True)]
            batch = token_map.batch(batch)
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], text_logits_only=True)
        lang = batch["lang"]
        if cross is not None:  # exact positions (the KL and agreement below) and all with a teacher target
            aligned = [aligned[0] + int(lang["mask"].sum()), aligned[1] + int((lang["mask"] | lang["approx"]).sum())]
        # a student token can agree only where the teacher's top-1 is one (always, on the teacher's vocabulary)
        reachable += int((lang["mask"] & (lang["topk_ids"][..., 0] >= 0)).sum())
        for k, (name, logits) in enumerate(zip(heads, [out.logits, *out.mtp_logits], strict=True)):
            agree, kl, n = agreement_and_kl(logits, SparseTargets.from_mapping(lang), k)
            sums[f"agree/{name}"] += agree
            sums[f"kl/{name}"] += kl
            sums[f"count/{name}"] += n
        # next-token CE over caption tokens 1..L-1 (token 0 is BOS)
        labels_next = batch["labels"][:, 1:]
        ce = F.cross_entropy(out.logits[:, :-1].transpose(1, 2).float(), labels_next, ignore_index=-100,
                             reduction="none").cpu().double().numpy()  # [b, t - 1]: -log p(caption token t)
        nll += float(ce.sum())  # in float64, as the grounded split's sums
        n_tokens += int((labels_next != -100).sum())
        blank = model(torch.zeros_like(batch["pixel_values"]), batch["input_ids"], batch["attention_mask"],
                      text_logits_only=True).logits
        preds = {"image": out.logits.argmax(-1).cpu(), "blank": blank.argmax(-1).cpu()}  # one copy per batch
        if token_map is not None:  # compared with the caption's teacher ids
            preds = {key: token_map.teacher_ids_of(pred) for key, pred in preds.items()}
        for b, it in enumerate(items):
            ids = it["input_ids"].tolist()
            positions = grounded_positions(ids, it["grounded"], tokenizer)
            split.add(ce[b, : len(ids) - 1], positions)
            for t in positions:
                for key, pred in preds.items():
                    grounded[key][0] += int(pred[b, t - 1] == ids[t])
                    grounded[key][1] += 1
        for name, v in batch["vision"].items():
            if name not in out.teacher_outputs:  # a student trained without this teacher (baseline)
                continue
            s = out.teacher_outputs[name]
            c = cos.setdefault(name, [0.0, 0.0, 0])
            c[0] += float(F.cosine_similarity(s["summary"], v["summary"], dim=-1).sum())
            c[1] += float(F.cosine_similarity(s["features"], v["features"], dim=-1).mean(-1).sum())
            c[2] += len(items)
        feats.append(model.image_features(batch["pixel_values"]).float().cpu().numpy())
        labels += [f"{it['id'].rsplit('-', 1)[0]}:{it['label']}" for it in items]

    metrics = {}
    for h in heads:
        count = max(sums[f"count/{h}"], 1)
        metrics[f"eval/agreement/{h}"] = sums[f"agree/{h}"] / count
        metrics[f"eval/kl/{h}"] = sums[f"kl/{h}"] / count
    metrics["eval/perplexity"] = float(np.exp(nll / max(n_tokens, 1)))
    if cross is None:
        metrics["eval/teacher_perplexity_bound"] = float(np.exp(teacher_nll / max(n_tokens, 1)))
    if token_map is not None or cross is not None:
        metrics["eval/teacher_top1_in_vocab"] = reachable / max(sums["count/main"], 1)
    if token_map is not None:  # caption tokens the trimmed vocabulary lacks (they count as its unknown token)
        metrics["eval/unknown_token_rate"] = unknown[0] / max(unknown[1], 1)
    if cross is not None:
        metrics["eval/aligned_fraction"] = aligned[0] / max(aligned[1], 1)
    if grounded["image"][1]:
        metrics["eval/grounded_acc"] = grounded["image"][0] / grounded["image"][1]
        metrics["eval/grounded_acc_blank"] = grounded["blank"][0] / grounded["blank"][1]
        metrics["eval/grounding_gap"] = metrics["eval/grounded_acc"] - metrics["eval/grounded_acc_blank"]
        metrics["eval/grounded_tokens"] = grounded["image"][1]
    metrics.update(split.metrics("eval/perplexity"))
    for name, (sc, pc, n) in cos.items():
        metrics[f"eval/vision/{name}/summary_cos"] = sc / n
        metrics[f"eval/vision/{name}/patch_cos"] = pc / n
    if train_dataset is not None:
        metrics.update(probes(model, train_dataset, dataset, np.concatenate(feats), labels, stds, pad_id, batch_size,
                              device))
    return metrics


def teacher_caption_nll(lang: dict, input_ids) -> float:
    """The sum over the valid positions of -log p_teacher(next caption token), from the stored top-k + tail
    (teacher ids): a token outside the top-k takes the tail's whole log-mass, so the sum is a lower bound."""
    nxt = F.pad(input_ids[:, 1:], (0, 1))[..., None]
    hit = lang["topk_ids"] == nxt
    logp = torch.where(hit.any(-1), (lang["topk_logprobs"] * hit).sum(-1), lang["tail_logprob"])
    return float(-torch.where(lang["mask"], logp, 0.0).sum())


def agreement_and_kl(logits, targets: SparseTargets, depth: int = 0) -> tuple[float, float, int]:
    """Sums over valid positions of top-1 agreement with the teacher and of KL(teacher‖student),
    for a head of MTP depth `depth` (0 = main), and the number of positions."""
    t = shift_targets(targets, depth)
    agree = (logits.argmax(-1) == t.topk_ids[..., 0]) & t.mask
    kl = language_kd_loss(logits, t, "forward_kl", 1.0, reduction="none")
    return float(agree.sum()), float(kl.sum()), int(t.mask.sum())


@torch.no_grad()
def _features(model, dataset, stds, pad_id, batch_size, device=None) -> tuple[dict[str, np.ndarray], list[str]]:
    """Student pooled features, each teacher's summary and raw pixels (16×16 grey) of every row."""
    device = model_on(model, device)
    out: dict[str, list] = {}
    labels = []
    for items, batch in _batches(dataset, batch_size, pad_id, stds, device):
        px = batch["pixel_values"]
        out.setdefault("student", []).append(model.image_features(px).float().cpu().numpy())
        grey = F.adaptive_avg_pool2d(px.mean(1, keepdim=True), 16).flatten(1)
        out.setdefault("pixels", []).append(grey.float().cpu().numpy())
        for name, v in batch["vision"].items():
            out.setdefault(name, []).append(v["summary"].cpu().numpy())
        labels += [f"{it['id'].rsplit('-', 1)[0]}:{it['label']}" for it in items]
    return {k: np.concatenate(v) for k, v in out.items()}, labels


def probes(model, train_ds, test_ds, test_student, test_labels, stds, pad_id, batch_size,
           device=None) -> dict[str, float]:
    """Linear-probe accuracy of each feature set (logistic regression, standardised inputs)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    train, y_train = _features(model, train_ds, stds, pad_id, batch_size, device)
    test, y_test = _features(model, test_ds, stds, pad_id, batch_size, device)
    result = {}
    for name in train:
        clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf.fit(train[name], y_train)
        if any(issubclass(w.category, ConvergenceWarning) for w in caught):
            log.info("probe %s: lbfgs stopped at its 300-iteration cap (accuracy is a lower bound)", name)
        result[f"eval/probe/{name}"] = float(clf.score(test[name], y_test))
    return result


def load_eval_data(samples_dir: Path, target_dirs: dict[str, Path], image_size: int, with_train: bool,
                   standardize: str = "phis"):
    """Test split (and train split for the probes), with the standardisers used in training."""
    test = DistillDataset(samples_dir, target_dirs, "test", transform=image_transform(image_size))
    train = (DistillDataset(samples_dir, target_dirs, "train", transform=image_transform(image_size), verify=False)
             if with_train else None)
    stds = {n: standardizers(test.targets[n], target_dirs[n], standardize) for n in test.vision}
    return test, train, stds


def resolve_student(ref: str | None, cfg) -> Path:
    """A student folder from a path, or from an MLflow run id (its `student/` artifact)."""
    from distill.config.load import output_path
    if ref is None:
        return output_path(cfg, "student")
    if Path(ref).expanduser().is_dir():
        return Path(ref).expanduser()
    import mlflow

    from distill import tracking
    tracking.setup(cfg)
    dst = output_path(cfg, "downloaded", ref)
    try:
        return Path(mlflow.artifacts.download_artifacts(run_id=ref, artifact_path="student", dst_path=str(dst)))
    except Exception as e:  # noqa: BLE001 - one readable line
        raise FileNotFoundError(f"evaluate: {ref!r} is neither a student folder nor an MLflow run with a "
                                f"'student' artifact ({str(e).splitlines()[0]})") from None


def folder_cross(folder, teacher_tokenizer, teacher_vocab_size: int) -> CrossTokenizer | None:
    """The transform for a student folder whose tokenizer is not the language teacher's (`student.tokenizer`);
    None when it carries the teacher's tokenizer (a trimmed vocabulary included) or none."""
    from transformers import AutoTokenizer

    from data.identity import tokenizer_digest
    if not (Path(folder) / "tokenizer_config.json").is_file():
        return None
    own = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer_digest(own) == tokenizer_digest(teacher_tokenizer):
        return None
    return CrossTokenizer(teacher_tokenizer, own, teacher_vocab_size)


def exported_dtype(folder: str | Path) -> str | None:
    """The dtype the student had when it was saved (config.json; bf16 training saves "bfloat16")."""
    config = json.loads((Path(folder) / "config.json").read_text())
    return config.get("dtype") or config.get("torch_dtype")


def evaluate_run(cfg, target_dirs: dict[str, Path]) -> dict:
    """Evaluate `evaluate.student` (and `evaluate.baseline`); write eval_report.md and plots."""
    from transformers import AutoModel, AutoTokenizer

    import student  # noqa: F401  (registers the Auto classes)
    from data.quality import eval_metrics
    from data.shards import atomic_write_bytes
    from distill.config.load import output_path, shards_path
    from distill.eval.report import eval_plots, report, teacher_note
    from student.portable import saved_image_size
    ev = cfg.evaluate
    test, train, stds = load_eval_data(shards_path(cfg, "samples"), target_dirs, cfg.student.image_size,
                                       ev.probe, cfg.loss.standardize)
    tokenizer = AutoTokenizer.from_pretrained(str(target_dirs[test.language] / "tokenizer"))
    producer = test.targets[test.language]["producer"]
    pad_id = producer.get("eos_id") or 0
    # the teacher's own figures: data alone, the same for the student and the baseline
    teacher = eval_metrics(shards_path(cfg, "samples"), target_dirs[test.language], producer["vocab_size"],
                           positions=lambda ids, words: grounded_positions(ids, words, tokenizer))

    try:
        device = resolve_device(ev.device)
    except ValueError as err:
        raise ValueError(f"evaluate.device: {err}") from None

    in_child = device.type == "cpu" and bool(os.environ.get("MKL_CBWR"))  # time MTP in MKL's default mode

    def measure(ref):
        folder = resolve_student(ref, cfg)
        size = saved_image_size(folder)  # the student's own preprocessing must be the one evaluated
        if size is not None and size != cfg.student.image_size:
            raise ValueError(f"{folder}: its image processor resizes to {size} px but student.image_size="
                             f"{cfg.student.image_size}; evaluate it at the size it was trained at")
        # fp32 weights on disk; without dtype= transformers would load them as the config's dtype
        model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
        bf16 = device.type == "cuda" and exported_dtype(folder) == "bfloat16"
        cross = folder_cross(folder, tokenizer, producer["vocab_size"])  # a student with its own tokenizer
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            metrics = evaluate_student(model, test, train, tokenizer, stds=stds, pad_id=pad_id,
                                       batch_size=ev.batch_size, device=device, cross=cross)
        metrics.update(teacher)
        if model.config.mtp_depth > 0 and ev.mtp_prompts > 0:
            prompts = mtp_prompts(model.config, test, ev.mtp_prompts, ev.mtp_prompt_tokens, cross)
            if in_child:
                metrics.update(mtp_figures_in_child(folder, prompts, ev.mtp_new_tokens))
            else:
                metrics.update(speculative_figures(model, prompts, ev.mtp_new_tokens, device))
        return folder, metrics, "bf16 autocast" if bf16 else "fp32"

    folder, metrics, precision = measure(ev.student)
    baseline_ref = ev.baseline
    if baseline_ref and "/" in baseline_ref and not Path(baseline_ref).expanduser().is_dir():
        log.warning("baseline %s does not exist yet (make baseline trains it); evaluating without", baseline_ref)
        baseline_ref = None
    baseline = measure(baseline_ref)[1] if baseline_ref else None
    out = output_path(cfg, "eval")
    out.mkdir(parents=True, exist_ok=True)
    notes = [f"student: {folder}", f"test rows: {len(test)}; teachers: {', '.join(test.targets)}",
             f"device: {device}; precision: {precision}",
             "agreement/KL: teacher-forced on test captions, sparse top-k + tail KL(teacher‖student) at T=1 "
             "(a student with its own tokenizer: on its 1:1-aligned positions, eval/aligned_fraction; its "
             "perplexity is per student token, not comparable across tokenizers)",
             "grounded accuracy: tokens of the words only the image tells; 'blank' = the same with a grey image; "
             "perplexity_grounded / _other: at those tokens and at the others (teacher_perplexity_*: the teacher's)",
             teacher_note(metrics)]
    if baseline:
        notes.append(f"baseline: {baseline_ref}")
    timing = None  # where mtp/speedup was timed
    if "mtp/speedup" in metrics:
        timing = "fresh process, MKL default mode" if in_child else "this process"
    if timing and in_child:
        notes.append(f"mtp/speedup: timed in a fresh process in MKL's default mode; this one runs "
                     f"MKL_CBWR={os.environ['MKL_CBWR']} (reproducible teacher shards), which slows batch-1 "
                     "decoding and would flatter the ratio (docs/evaluation.md)")
    path = out / "eval_report.md"
    atomic_write_bytes(path, report(metrics, baseline, "Evaluation report", notes).encode())
    return {"metrics": metrics, "baseline": baseline, "report": path, "plots": eval_plots(metrics, baseline, out),
            "mtp_timing": timing}
