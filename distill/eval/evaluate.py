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
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from data.dataset import DistillDataset
from data.devices import model_on, resolve_device
from data.quality import GroundedSplit, grounded_positions
from data.standardize import standardizers
from data.student_tokenizer import CrossTokenizer
from data.vocab import TokenMap
from distill.eval.batches import eval_batches
from distill.eval.mtp_eval import mtp_figures_in_child, mtp_prompts, speculative_figures
from distill.losses.language import SparseTargets, language_kd_loss, shift_targets
from student.pixels import image_transform

log = logging.getLogger(__name__)


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
    sums = _Sums(model.config, cross is not None)
    feats, labels = [], []
    for items, batch in eval_batches(dataset, batch_size, pad_id, stds, device, cross):
        batch = sums.teacher_ids(batch)
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], text_logits_only=True)
        ce = sums.language(batch, out)
        blank = model(torch.zeros_like(batch["pixel_values"]), batch["input_ids"], batch["attention_mask"],
                      text_logits_only=True).logits
        sums.grounded(items, ce, {"image": out.logits, "blank": blank}, tokenizer)
        sums.vision(items, batch, out)
        feats.append(model.image_features(batch["pixel_values"]).float().cpu().numpy())
        labels += [f"{it['id'].rsplit('-', 1)[0]}:{it['label']}" for it in items]
    metrics = sums.metrics()
    if train_dataset is not None:
        from distill.eval.probes import probes
        metrics.update(probes(model, train_dataset, dataset, np.concatenate(feats), labels, stds, pad_id, batch_size,
                              device))
    return metrics


class _Sums:
    """The running sums behind `evaluate_student`'s metrics, batch by batch."""

    def __init__(self, config, cross: bool):
        self.cross = cross
        self.heads = ["main"] + [f"mtp{k}" for k in range(1, config.mtp_depth + 1)]
        self.sums = {f"{m}/{h}": 0.0 for m in ("agree", "kl", "count") for h in self.heads}
        self.nll, self.n_tokens, self.teacher_nll, self.reachable = 0.0, 0, 0.0, 0
        self.unknown, self.aligned = [0, 0], [0, 0]
        self.split = GroundedSplit()  # the student's perplexity at the grounded tokens and at the others
        self.token_map = TokenMap.from_config(config)  # a trimmed vocabulary: batches move to the student's ids
        self.hits = {"image": [0, 0], "blank": [0, 0]}
        self.cos = {}

    def teacher_ids(self, batch: dict) -> dict:
        """The teacher's bound, in the teacher's ids; then the batch in the student's ids."""
        if not self.cross:  # in the teacher's ids, before a trimmed vocabulary moves them
            self.teacher_nll += teacher_caption_nll(batch["lang"], batch["input_ids"])
        if self.token_map is None:
            return batch
        self.unknown = [a + b for a, b in zip(self.unknown, self.token_map.unknown_fraction(batch), strict=True)]
        return self.token_map.batch(batch)

    def language(self, batch: dict, out) -> np.ndarray:
        """Agreement and KL of every head, and the caption NLL; returns -log p(caption token t) [b, t - 1]."""
        lang = batch["lang"]
        if self.cross:  # exact positions (the KL and agreement below) and all with a teacher target
            self.aligned[0] += int(lang["mask"].sum())
            self.aligned[1] += int((lang["mask"] | lang["approx"]).sum())
        # a student token can agree only where the teacher's top-1 is one (always, on the teacher's vocabulary)
        self.reachable += int((lang["mask"] & (lang["topk_ids"][..., 0] >= 0)).sum())
        for k, (name, logits) in enumerate(zip(self.heads, [out.logits, *out.mtp_logits], strict=True)):
            agree, kl, n = agreement_and_kl(logits, SparseTargets.from_mapping(lang), k)
            self.sums[f"agree/{name}"] += agree
            self.sums[f"kl/{name}"] += kl
            self.sums[f"count/{name}"] += n
        labels_next = batch["labels"][:, 1:]  # next-token CE over caption tokens 1..L-1 (token 0 is BOS)
        ce = F.cross_entropy(out.logits[:, :-1].transpose(1, 2).float(), labels_next, ignore_index=-100,
                             reduction="none").cpu().double().numpy()
        self.nll += float(ce.sum())  # in float64, as the grounded split's sums
        self.n_tokens += int((labels_next != -100).sum())
        return ce

    def grounded(self, items: list[dict], ce: np.ndarray, logits: dict, tokenizer) -> None:
        """Top-1 accuracy at the grounded words with the image and with a blank one, and the split NLL."""
        preds = {key: value.argmax(-1).cpu() for key, value in logits.items()}  # one copy per batch
        if self.token_map is not None:  # compared with the caption's teacher ids
            preds = {key: self.token_map.teacher_ids_of(pred) for key, pred in preds.items()}
        for b, it in enumerate(items):
            ids = it["input_ids"].tolist()
            positions = grounded_positions(ids, it["grounded"], tokenizer)
            self.split.add(ce[b, : len(ids) - 1], positions)
            for t in positions:
                for key, pred in preds.items():
                    self.hits[key][0] += int(pred[b, t - 1] == ids[t])
                    self.hits[key][1] += 1

    def vision(self, items: list[dict], batch: dict, out) -> None:
        for name, v in batch["vision"].items():
            if name not in out.teacher_outputs:  # a student trained without this teacher (baseline)
                continue
            s = out.teacher_outputs[name]
            c = self.cos.setdefault(name, [0.0, 0.0, 0])
            c[0] += float(F.cosine_similarity(s["summary"], v["summary"], dim=-1).sum())
            c[1] += float(F.cosine_similarity(s["features"], v["features"], dim=-1).mean(-1).sum())
            c[2] += len(items)

    def metrics(self) -> dict[str, float]:
        metrics = {}
        for h in self.heads:
            count = max(self.sums[f"count/{h}"], 1)
            metrics[f"eval/agreement/{h}"] = self.sums[f"agree/{h}"] / count
            metrics[f"eval/kl/{h}"] = self.sums[f"kl/{h}"] / count
        metrics["eval/perplexity"] = float(np.exp(self.nll / max(self.n_tokens, 1)))
        if not self.cross:
            metrics["eval/teacher_perplexity_bound"] = float(np.exp(self.teacher_nll / max(self.n_tokens, 1)))
        if self.token_map is not None or self.cross:
            metrics["eval/teacher_top1_in_vocab"] = self.reachable / max(self.sums["count/main"], 1)
        if self.token_map is not None:  # caption tokens the trimmed vocabulary lacks (they count as its unknown)
            metrics["eval/unknown_token_rate"] = self.unknown[0] / max(self.unknown[1], 1)
        if self.cross:
            metrics["eval/aligned_fraction"] = self.aligned[0] / max(self.aligned[1], 1)
        (hit, n), (blank_hit, _) = self.hits["image"], self.hits["blank"]
        if n:
            metrics["eval/grounded_acc"], metrics["eval/grounded_acc_blank"] = hit / n, blank_hit / n
            metrics["eval/grounding_gap"] = metrics["eval/grounded_acc"] - metrics["eval/grounded_acc_blank"]
            metrics["eval/grounded_tokens"] = n
        metrics.update(self.split.metrics("eval/perplexity"))
        for name, (sc, pc, n) in self.cos.items():
            metrics[f"eval/vision/{name}/summary_cos"] = sc / n
            metrics[f"eval/vision/{name}/patch_cos"] = pc / n
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
    from transformers import AutoTokenizer

    from data.quality import eval_metrics
    from data.shards import atomic_write_bytes
    from distill.config.load import output_path, shards_path
    from distill.eval.report import eval_plots, report
    ev = cfg.evaluate
    test, train, stds = load_eval_data(shards_path(cfg, "samples"), target_dirs, cfg.student.image_size,
                                       ev.probe, cfg.loss.standardize)
    tokenizer = AutoTokenizer.from_pretrained(str(target_dirs[test.language] / "tokenizer"))
    producer = test.targets[test.language]["producer"]
    # the teacher's own figures: data alone, the same for the student and the baseline
    teacher = eval_metrics(shards_path(cfg, "samples"), target_dirs[test.language], producer["vocab_size"],
                           positions=lambda ids, words: grounded_positions(ids, words, tokenizer))
    try:
        device = resolve_device(ev.device)
    except ValueError as err:
        raise ValueError(f"evaluate.device: {err}") from None
    in_child = device.type == "cpu" and bool(os.environ.get("MKL_CBWR"))  # time MTP in MKL's default mode
    data = (test, train, stds, tokenizer, producer, teacher)
    folder, metrics, precision = _measure(cfg, ev.student, data, device, in_child)
    baseline_ref = ev.baseline
    if baseline_ref and "/" in baseline_ref and not Path(baseline_ref).expanduser().is_dir():
        log.warning("baseline %s does not exist yet (make baseline trains it); evaluating without", baseline_ref)
        baseline_ref = None
    baseline = _measure(cfg, baseline_ref, data, device, in_child)[1] if baseline_ref else None
    out = output_path(cfg, "eval")
    out.mkdir(parents=True, exist_ok=True)
    timing = None  # where mtp/speedup was timed
    if "mtp/speedup" in metrics:
        timing = "fresh process, MKL default mode" if in_child else "this process"
    notes = _notes(folder, test, f"device: {device}; precision: {precision}", metrics, baseline_ref, timing)
    path = out / "eval_report.md"
    atomic_write_bytes(path, report(metrics, baseline, "Evaluation report", notes).encode())
    return {"metrics": metrics, "baseline": baseline, "report": path, "plots": eval_plots(metrics, baseline, out),
            "mtp_timing": timing}


def _measure(cfg, ref, data: tuple, device, in_child: bool) -> tuple[Path, dict, str]:
    """One student's folder, metrics (the teacher's beside them) and precision."""
    from transformers import AutoModel

    import student  # noqa: F401  (registers the Auto classes)
    from student.portable import saved_image_size
    test, train, stds, tokenizer, producer, teacher = data
    ev = cfg.evaluate
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
        metrics = evaluate_student(model, test, train, tokenizer, stds=stds, pad_id=producer.get("eos_id") or 0,
                                   batch_size=ev.batch_size, device=device, cross=cross)
    metrics.update(teacher)
    if model.config.mtp_depth > 0 and ev.mtp_prompts > 0:
        prompts = mtp_prompts(model.config, test, ev.mtp_prompts, ev.mtp_prompt_tokens, cross)
        if in_child:
            metrics.update(mtp_figures_in_child(folder, prompts, ev.mtp_new_tokens))
        else:
            metrics.update(speculative_figures(model, prompts, ev.mtp_new_tokens, device))
    return folder, metrics, "bf16 autocast" if bf16 else "fp32"


def _notes(folder: Path, test, where: str, metrics: dict, baseline_ref, timing) -> list[str]:
    """The report's notes: what was evaluated, where, and how each figure was measured."""
    from distill.eval.report import teacher_note
    notes = [f"student: {folder}", f"test rows: {len(test)}; teachers: {', '.join(test.targets)}", where,
             "agreement/KL: teacher-forced on test captions, sparse top-k + tail KL(teacher‖student) at T=1 "
             "(a student with its own tokenizer: on its 1:1-aligned positions, eval/aligned_fraction; its "
             "perplexity is per student token, not comparable across tokenizers)",
             "grounded accuracy: tokens of the words only the image tells; 'blank' = the same with a grey image; "
             "perplexity_grounded / _other: at those tokens and at the others (teacher_perplexity_*: the teacher's)",
             teacher_note(metrics)]
    if baseline_ref:
        notes.append(f"baseline: {baseline_ref}")
    if timing == "fresh process, MKL default mode":
        notes.append(f"mtp/speedup: timed in a fresh process in MKL's default mode; this one runs "
                     f"MKL_CBWR={os.environ['MKL_CBWR']} (reproducible teacher shards), which slows batch-1 "
                     "decoding and would flatter the ratio (docs/evaluation.md)")
    return notes
