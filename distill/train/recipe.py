"""The distillation recipe: shards in, a trained student folder out.

    recipe = DistillRecipe(cfg); recipe.setup(); summary = recipe.train()

Single process runs in-process; `train.nproc > 1` runs this module under torchrun (see
distill/train/launch.py), one process per rank, with data sharded per rank and logging on rank 0.
No teacher model is loaded here: teachers reach training only through their shards.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import signal
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from tqdm.auto import tqdm

import student as student_pkg
from data.dataset import BlockShuffleSampler, DistillDataset, check_manifests
from data.devices import to_device
from data.mix import mixed_dataset
from data.prefetch import Prefetch
from data.shards import atomic_write_json
from data.standardize import standardize_batch, standardizers
from data.stop import Stopped, stop_signals
from distill.config.load import load_config, output_path, shards_path, teacher_configs
from distill.losses.balance import distributed_mean, gradnorm_ratios
from distill.train import engine as ds
from distill.train.objective import DistillObjective, term_metric
from distill.train.stages import (
    CONTRASTIVE,
    DRAFTER,
    LANGUAGE,
    VISION,
    Stage,
    freeze_for,
    resolve_stages,
    stage_student,
)
from distill.train.student_vocab import student_vocab

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss."""


class CheckpointsExistError(RuntimeError):
    """A fresh (non-resume) run was pointed at an output_dir that holds another run's checkpoints."""


class TrainingStopped(Stopped):
    """SIGINT/SIGTERM: stopped after checkpointing the last finished step; a SystemExit, code 128 + signum."""


class DistillRecipe:
    def __init__(self, cfg, parent_run_id: str | None = None, flow_run_id: str | None = None):
        self.cfg, self.parent_run_id, self.flow_run_id = cfg, parent_run_id, flow_run_id
        self.step, self.epoch, self.position, self.bad_steps, self.skipped_steps = 0, 0, 0, 0, 0
        self.history: list[dict] = []
        self.run_ids: dict[str, str] = {}  # MLflow run ids: "train" and one per stage name

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        """Read and check the shards, resolve the stages, and build the engine of the stage to run first
        (the first, or on `train.resume` the one of the newest complete checkpoint)."""
        cfg = self.cfg
        self.rank, self.world = ds.init_distributed()
        # mixed-in shards carry language targets only, so the vision teachers' are not read with them
        teachers = [cfg.teachers.language] if cfg.train.mix_shards else teacher_configs(cfg)
        target_dirs = {t.name: shards_path(cfg, "targets", t.name) for t in teachers}
        self.dataset = DistillDataset(shards_path(cfg, "samples"), target_dirs, "train",
                                      transform=student_pkg.image_transform(cfg.student.image_size))
        if self.dataset.language is None:
            raise ValueError("training needs a language teacher's shards (teachers.language)")
        expected = {t.name: t.weights_digest for t in teachers}
        check_manifests(self.dataset.samples, self.dataset.targets, student_vocab=cfg.student.vocab_size,
                        expected_digests=expected, where={"samples": shards_path(cfg, "samples"), **target_dirs})
        if cfg.train.mix_shards:
            self.dataset = mixed_dataset(self.dataset, cfg.train.mix_shards, cfg.train.mix_fraction,
                                         cfg.student.vocab_size, expected)
        self.vision = self.dataset.vision if cfg.loss.vision else []
        self.stages = resolve_stages(cfg, bool(self.vision))
        heads = {n: {"summary_dim": len(self.dataset.targets[n]["feature_stats"]["summary_mean"]),
                     "feature_dim": self.dataset.targets[n]["shape"][1], "grid": self.dataset.targets[n]["grid"]}
                 for n in self.vision}
        contrastive = any(CONTRASTIVE in s.terms for s in self.stages)
        # the teacher's vocabulary, a trimmed one or the student's own tokenizer (its ids, specials, batches)
        self.vocab = student_vocab(cfg, self.dataset, save=self.rank == 0)
        self.pad_id, self.token_map = self.vocab.pad_id, self.vocab.token_map
        self.student_config = student_pkg.load_preset(
            cfg.student.preset, vocab_size=self.vocab.vocab_size, mtp_depth=cfg.student.mtp_depth, teachers=heads,
            mask_ratio=cfg.student.mask_ratio, contrastive_dim=cfg.student.contrastive_dim if contrastive else 0,
            **self.vocab.config, **dict(cfg.student.overrides))
        self.stds = {n: standardizers(self.dataset.targets[n], target_dirs[n], cfg.loss.standardize)
                     for n in self.vision}
        self.ckpt_dir = output_path(cfg, "checkpoints")
        marker = ds.latest_marker(self.ckpt_dir)
        if marker is not None and not cfg.train.resume:
            raise CheckpointsExistError(
                f"{self.ckpt_dir} holds the checkpoints of an earlier run (up to step {marker['step']}, stage "
                f"{marker.get('stage')}); pass train.resume=true to continue it, or choose a new output_dir")
        first = self.stages[0]
        if marker is not None:
            by_name = {s.name: s for s in self.stages}
            if marker.get("stage", "joint") not in by_name:
                raise ValueError(f"{self.ckpt_dir}: the newest checkpoint is of stage {marker.get('stage')!r}, "
                                 f"which this recipe does not have ({list(by_name)}); resume with the config that "
                                 "wrote it, or start in a new output_dir")
            first = by_name[marker.get("stage", "joint")]
        self._build_stage(first, resume=marker is not None)

    def _build_stage(self, stage: Stage, resume: bool = False) -> None:
        """The stage's student (fresh for the first stage, else the previous stage's export), objective,
        sampler and engine; on `resume`, the newest checkpoint loaded into it."""
        cfg = self.cfg
        self.stage = stage
        torch.manual_seed(cfg.seed)
        previous = self.stage_dir(self.stages[stage.index - 1]) if stage.index else cfg.train.init_from
        model = stage_student(self.student_config, previous)
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.trainable = freeze_for(model, stage)
        self.objective = DistillObjective(model, cfg.loss, self.vision if VISION in stage.terms else [],
                                          use_language=LANGUAGE in stage.terms,
                                          use_contrastive=CONTRASTIVE in stage.terms,
                                          use_drafter=DRAFTER in stage.terms)
        # gradient norms are read on the vision tower: with the tower frozen no term reaches it (nothing to balance)
        self.objective.measure = "vision" in self.trainable
        self.sampler = BlockShuffleSampler(self.dataset, cfg.seed + stage.index, self.rank, self.world)
        self.micro_batch_size = stage.micro_batch_size
        if len(self.sampler) // (self.micro_batch_size * cfg.train.grad_accum) == 0:
            raise ValueError(f"{len(self.sampler)} training rows per rank are fewer than one step of "
                             f"{self.micro_batch_size}×{cfg.train.grad_accum}; lower the micro-batch size")
        train = OmegaConf.merge(cfg.train, {"lr": stage.lr, "micro_batch_size": stage.micro_batch_size,
                                            "warmup_steps": stage.warmup_steps})
        self.engine = ds.build_engine(self.objective, train, stage.steps)
        self.device = self.engine.device
        self.step, self.epoch, self.position = stage.start, 0, 0
        state = ds.load_latest(self.engine, self.ckpt_dir) if resume else None
        if state is not None:
            self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
            self.skipped_steps = state.get("skipped_steps", 0)
            self.run_ids = dict(state.get("mlflow_run_ids", {}))
            log.info("resumed stage %s at step %d (epoch %d, micro-batch %d)", stage.name, self.step, self.epoch,
                     self.position)

    def stage_dir(self, stage: Stage) -> Path:
        """Where a stage's student is exported (the last stage's is the run's `student/`)."""
        if stage.index == len(self.stages) - 1:
            return output_path(self.cfg, "student")
        return output_path(self.cfg, "stages", stage.name)

    def micro_batches(self):
        """Micro-batches from the saved data position on, epoch after epoch, read ahead in a thread;
        `self.epoch` and `self.position` follow the batches handed out (what a checkpoint records)."""
        source = Prefetch(self._batches(self.epoch, self.position), depth=2)
        try:
            while True:
                self.epoch, self.position, batch = next(source)
                yield batch
        finally:
            source.close()

    def _batches(self, epoch: int, position: int):
        """(epoch, position after the batch, batch) from (epoch, position) on."""
        mb = self.micro_batch_size
        while True:
            self.sampler.set_epoch(epoch)
            order = list(self.sampler)
            while position < len(order) // mb:
                items = [self.dataset[i] for i in order[position * mb:(position + 1) * mb]]
                position += 1
                yield epoch, position, standardize_batch(self.vocab.collate(items), self.stds)
            epoch, position = epoch + 1, 0

    # ------------------------------------------------------------------ train
    def train(self) -> dict:
        """Run every stage from where setup() left off; returns the summary. The MLflow runs (training and
        the current stage's) end FAILED when an exception escapes, KILLED on a TrainingStopped, else FINISHED."""
        with self._tracking("train", self.parent_run_id), stop_signals() as stop:
            self._log_inputs()
            while True:
                self._run_stage(stop)
                if self.stage.index == len(self.stages) - 1:
                    break
                self._build_stage(self.stages[self.stage.index + 1])
            return self._finish()

    def _run_stage(self, stop: threading.Event | None = None) -> None:
        cfg, tr, stage = self.cfg, self.cfg.train, self.stage
        with self._tracking(f"stage/{stage.name}", self.run_ids.get("train"), stage):
            batches = self.micro_batches()
            bar = tqdm(total=stage.steps, initial=self.step - stage.start, desc=f"distill {stage.name}",
                       disable=self.rank != 0 or not tr.progress)
            t0, seen = time.perf_counter(), 0
            while self.step < stage.end:
                # Per-step seeding makes random masking identical after a resume (and after a skipped step).
                torch.manual_seed(cfg.seed * 1_000_003 + self.step)
                figures, bad = self.train_step(batches)
                seen += self.micro_batch_size * tr.grad_accum * self.world
                if bad is not None:
                    self._bad_step(bad)
                    continue
                self.bad_steps = 0
                self.step += 1
                if self.step % tr.log_every == 0 or self.step == stage.end:
                    rate = seen / (time.perf_counter() - t0)
                    self._log(figures, rate)
                    if self.history:
                        bar.set_postfix(loss=f"{self.history[-1]['loss/total']:.4f}", samples_s=f"{rate:.1f}")
                bar.update(1)
                stopping = self._any_rank(stop is not None and stop.is_set())
                scheduled = (self.step - stage.start) % tr.checkpoint_every == 0 or self.step == stage.end
                if scheduled or stopping:
                    self._checkpoint(scheduled)
                if stopping:
                    raise TrainingStopped(getattr(stop, "signum", signal.SIGTERM), f"stopped by a signal after step "
                                          f"{self.step}, checkpoint in {self.ckpt_dir}; resume with train.resume=true")
            bar.close()
            ds.export_student(self.engine, self.stage_dir(stage))

    def train_step(self, batches) -> tuple[dict[str, float], str | None]:
        """One optimizer step over `train.grad_accum` micro-batches.

        Returns the step's figures (each the mean over its micro-batches and over ranks, with the
        terms' gradient norms on the vision tower) and None, or ({}, the first non-finite term)
        when the step was skipped. A non-finite micro-batch still runs a backward, poisoned with
        NaN, so that every micro-batch keeps DeepSpeed's accumulation and its collectives in phase;
        the optimizer then finds non-finite gradients and applies nothing, and the balancer is not
        updated: the next step starts where this one started.
        """
        objective, grad_accum = self.objective, self.cfg.train.grad_accum
        sums, norms, bad = {}, None, None
        for _ in range(grad_accum):
            loss, logs = self.engine(to_device(next(batches), self.device))
            if bad is None and not self._all_finite(loss):
                bad = objective.first_bad_term(logs) or "loss/total"
            self.engine.backward(loss if bad is None else loss * math.nan)
            step_norms = objective.trunk_norms(scale=1.0 / grad_accum)  # engine.backward scales by 1/grad_accum
            self.engine.step()
            if bad is None:
                for k, v in logs.items():
                    sums[k] = sums.get(k, 0.0) + v.detach().float()
                norms = step_norms if norms is None else norms + step_norms
        applied = self.engine.was_step_applied()
        if bad is not None or not applied:
            if applied:
                raise RuntimeError("a step with a non-finite loss was applied by the optimizer")
            return {}, bad or "gradients (non-finite after a finite loss)"
        keys = sorted(sums)
        values = distributed_mean(torch.stack([sums[k].to(self.device) for k in keys] + list(norms.to(self.device)))
                                  / grad_accum)
        figures = dict(zip(keys, values[: len(keys)].tolist(), strict=True))
        grad = values[len(keys):]
        objective.balancer.update(torch.stack([values[keys.index(term_metric(t))] for t in objective.terms]), grad)
        norm = dict(zip(objective.terms, grad.tolist(), strict=True))
        figures.update({f"gradnorm/{t}": v for t, v in norm.items()})
        if LANGUAGE in norm and len(norm) > 1:
            figures.update({f"gradnorm_ratio/{t}": r for t, r in gradnorm_ratios(norm, LANGUAGE).items()
                            if t != LANGUAGE})
        return figures, None

    def _all_finite(self, loss: torch.Tensor) -> bool:
        return not self._any_rank(not bool(torch.isfinite(loss.detach()).all()))  # every rank skips together

    def _any_rank(self, flag: bool) -> bool:
        """`flag` or'ed over the ranks (on the engine's device), so that every rank takes the same branch."""
        if not (dist.is_initialized() and self.world > 1):
            return flag
        x = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
        return bool(x.item())

    def _bad_step(self, term: str) -> None:
        """Count a skipped step (no update); abort after too many in a row."""
        self.bad_steps += 1
        self.skipped_steps += 1
        log.warning("non-finite loss in %s at step %d: step skipped (%d in a row)", term, self.step, self.bad_steps)
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise NonFiniteLossError(f"{self.bad_steps} consecutive non-finite losses, first in {term} at step "
                                     f"{self.step}; lower train.lr or check the data (train.max_bad_steps)")

    def _checkpoint(self, scheduled: bool = True) -> None:
        state = {"step": self.step, "epoch": self.epoch, "position": self.position, "stage": self.stage.name,
                 "skipped_steps": self.skipped_steps, "mlflow_run_ids": self.run_ids}
        ds.save(self.engine, self.ckpt_dir, self.step, state, self.cfg.train.keep_checkpoints, scheduled)

    # --------------------------------------------------------------- tracking
    @contextlib.contextmanager
    def _tracking(self, name: str, parent: str | None, stage: Stage | None = None):
        """The MLflow run `name` (rank 0 only): the one a checkpoint recorded when resuming, else a new
        child of `parent`. It ends FAILED if an exception leaves the block, KILLED on a stop by a signal."""
        if self.rank != 0:
            yield None
            return
        import mlflow

        from distill import tracking
        key = stage.name if stage else "train"
        tags = {f"teacher.{n}.weights_digest": str(m["producer"].get("weights_digest"))
                for n, m in self.dataset.targets.items()}
        if stage:
            tags.update({"mmtp.train_stage": stage.name})
        with tracking.stage_run(self.cfg, name, parent, tags, self.flow_run_id, run_id=self.run_ids.get(key)) as run:
            if stage and key not in self.run_ids:
                mlflow.log_params({"stage.steps": stage.steps, "stage.terms": ",".join(stage.terms),
                                   "stage.parts": ",".join(stage.parts), "stage.lr": stage.lr,
                                   "stage.micro_batch_size": stage.micro_batch_size,
                                   **{f"stage.trainable_params.{p}": n for p, n in self.trainable.items()}})
            self.run_ids[key] = run.info.run_id
            try:
                yield run
            except Stopped as e:  # the run ends KILLED (tracking.stage_run)
                if stage:  # the innermost run: one line on where training stopped and how to resume
                    log.warning("%s", e)
                raise

    def _log_inputs(self) -> None:
        if self.rank != 0:
            return
        from distill import tracking
        tracking.log_manifest_input(self.dataset.samples_dir, self.dataset.samples, "samples", "train")
        for n, m in self.dataset.targets.items():
            tracking.log_manifest_input(self.dataset.target_dirs[n], m, f"targets/{n}", "train")

    def _log(self, figures: dict[str, float], samples_per_s: float) -> None:
        """Log the step's figures (already averaged over micro-batches and ranks) from rank 0, to the stage's
        run and to the training run (whose curves then span every stage)."""
        if self.rank != 0:
            return
        import mlflow
        from mlflow.entities import Metric
        metrics = dict(figures)
        metrics.update({"lr": self.engine.get_lr()[0], "throughput/samples_per_s": samples_per_s,
                        "train/skipped_steps": self.skipped_steps})
        self.history.append({"step": self.step, "stage": self.stage.name, **metrics})
        mlflow.log_metrics(metrics, step=self.step)
        now = int(time.time() * 1000)
        mlflow.MlflowClient().log_batch(self.run_ids["train"], [Metric(k, float(v), now, self.step)
                                                                for k, v in metrics.items()])

    def _finish(self) -> dict:
        folder = self.stage_dir(self.stage)
        summary = {"steps": self.step, "skipped_steps": self.skipped_steps, "student_dir": str(folder),
                   "stages": [s.name for s in self.stages],
                   "final_loss": self.history[-1]["loss/total"] if self.history else math.nan}
        if self.rank == 0:
            import mlflow

            from distill.export.card import finish_student
            from distill.train.plots import training_plots
            for stage in self.stages:  # tokenizer, processor, LoRA adapter, model card
                finish_student(self.cfg, self.stage_dir(stage))
            for path in training_plots(self.history, output_path(self.cfg, "plots")):
                mlflow.log_artifact(str(path), artifact_path="plots")
            mlflow.log_artifacts(str(folder), artifact_path="student")
            summary["mlflow_run_id"] = self.run_ids["train"]
            atomic_write_json(output_path(self.cfg, "train_summary.json"), summary)
        return summary


def main() -> None:
    """Entry point of each rank under torchrun / the deepspeed launcher."""
    from distill.env import apply_env_defaults
    apply_env_defaults()
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--parent-run-id", default=None)
    p.add_argument("--flow-run-id", default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO)
    recipe = DistillRecipe(load_config(args.config), args.parent_run_id or None, args.flow_run_id or None)
    recipe.setup()
    summary = recipe.train()
    if recipe.rank == 0:
        print(json.dumps(summary))


if __name__ == "__main__":
    main()
