"""The distillation recipe: shards in, a trained student folder out.

    recipe = DistillRecipe(cfg); recipe.setup(); summary = recipe.train()

Single process runs in-process; `train.nproc > 1` runs this module under torchrun (see
distill/launch.py), one process per rank, with data sharded per rank and logging on rank 0.
No teacher model is loaded here: teachers reach training only through their shards.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

import student as student_pkg
from data.dataset import BlockShuffleSampler, DistillDataset, check_manifests, collate
from data.devices import to_device
from data.shards import atomic_write_json
from distill import engine as ds
from distill.balance import distributed_mean, gradnorm_ratios
from distill.config import load_config, output_path, shards_path, teacher_configs
from distill.objective import LANGUAGE, DistillObjective, standardize_batch, standardizers, term_metric

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss."""


class DistillRecipe:
    def __init__(self, cfg, parent_run_id: str | None = None, flow_run_id: str | None = None):
        self.cfg, self.parent_run_id, self.flow_run_id = cfg, parent_run_id, flow_run_id
        self.step, self.epoch, self.position, self.bad_steps, self.skipped_steps = 0, 0, 0, 0, 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------ setup
    def setup(self) -> None:
        cfg = self.cfg
        self.rank, self.world = ds.init_distributed()
        names = [t.name for t in teacher_configs(cfg)]
        target_dirs = {n: shards_path(cfg, "targets", n) for n in names}
        self.dataset = DistillDataset(shards_path(cfg, "samples"), target_dirs, "train", cfg.student.image_size)
        lang = self.dataset.language
        if lang is None:
            raise ValueError("training needs a language teacher's shards (teachers.language)")
        where = {"samples": shards_path(cfg, "samples"), **target_dirs}
        check_manifests(self.dataset.samples, self.dataset.targets, student_vocab=cfg.student.vocab_size,
                        expected_digests={t.name: t.weights_digest for t in teacher_configs(cfg)}, where=where)
        vision = self.dataset.vision if cfg.loss.vision else []
        heads = {n: {"summary_dim": len(self.dataset.targets[n]["feature_stats"]["summary_mean"]),
                     "feature_dim": self.dataset.targets[n]["shape"][1], "grid": self.dataset.targets[n]["grid"]}
                 for n in vision}
        config = student_pkg.load_preset(cfg.student.preset, vocab_size=self.dataset.targets[lang]["producer"]["vocab_size"],
                                         mtp_depth=cfg.student.mtp_depth, teachers=heads,
                                         mask_ratio=cfg.student.mask_ratio, **dict(cfg.student.overrides))
        torch.manual_seed(cfg.seed)
        model = student_pkg.build_student(config)
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        self.pad_id = self.dataset.targets[lang]["producer"].get("eos_id") or 0
        self.stds = {n: standardizers(self.dataset.targets[n], target_dirs[n], cfg.loss.standardize) for n in vision}
        self.objective = DistillObjective(model, cfg.loss, vision, use_language=cfg.loss.language)
        self.sampler = BlockShuffleSampler(self.dataset, cfg.seed, self.rank, self.world)
        self.steps_per_epoch = len(self.sampler) // (cfg.train.micro_batch_size * cfg.train.grad_accum)
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(self.sampler)} training rows per rank are fewer than one step of "
                             f"{cfg.train.micro_batch_size}×{cfg.train.grad_accum}; lower train.micro_batch_size")
        self.engine = ds.build_engine(self.objective, cfg.train, cfg.train.max_steps)
        self.device = self.engine.device
        self.ckpt_dir = output_path(cfg, "checkpoints")
        if cfg.train.resume:
            state = ds.load_latest(self.engine, self.ckpt_dir)
            if state is not None:
                self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]
                self.skipped_steps = state.get("skipped_steps", 0)
                log.info("resumed from step %d (epoch %d, micro-batch %d)", self.step, self.epoch, self.position)

    def micro_batches(self):
        """Micro-batches from the saved data position on, epoch after epoch."""
        mb = self.cfg.train.micro_batch_size
        while True:
            self.sampler.set_epoch(self.epoch)
            order = list(self.sampler)
            n_batches = len(order) // mb
            while self.position < n_batches:
                items = [self.dataset[i] for i in order[self.position * mb:(self.position + 1) * mb]]
                self.position += 1
                yield standardize_batch(collate(items, self.pad_id), self.stds)
            self.epoch, self.position = self.epoch + 1, 0

    # ------------------------------------------------------------------ train
    def train(self) -> dict:
        cfg, tr = self.cfg, self.cfg.train
        run = self._start_tracking()
        batches = self.micro_batches()
        bar = tqdm(total=tr.max_steps, initial=self.step, desc="distill", disable=self.rank != 0 or not tr.progress)
        t0, seen = time.perf_counter(), 0
        while self.step < tr.max_steps:
            # Per-step seeding makes random masking identical after a resume (and after a skipped step).
            torch.manual_seed(cfg.seed * 1_000_003 + self.step)
            figures, bad = self.train_step(batches)
            seen += tr.micro_batch_size * tr.grad_accum * self.world
            if bad is not None:
                self._bad_step(bad)
                continue
            self.bad_steps = 0
            self.step += 1
            if self.step % tr.log_every == 0 or self.step == tr.max_steps:
                rate = seen / (time.perf_counter() - t0)
                self._log(figures, rate)
                if self.history:
                    bar.set_postfix(loss=f"{self.history[-1]['loss/total']:.4f}", samples_s=f"{rate:.1f}")
            bar.update(1)
            if self.step % tr.checkpoint_every == 0 or self.step == tr.max_steps:
                self._checkpoint()
        bar.close()
        folder = ds.export_student(self.engine, output_path(cfg, "student"))
        return self._finish(run, folder)

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
        bad = (~torch.isfinite(loss.detach())).any().float().reshape(1)
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank skips together
        return bad.item() == 0

    def _bad_step(self, term: str) -> None:
        """Count a skipped step (no update); abort after too many in a row."""
        self.bad_steps += 1
        self.skipped_steps += 1
        log.warning("non-finite loss in %s at step %d: step skipped (%d in a row)", term, self.step, self.bad_steps)
        if self.bad_steps >= self.cfg.train.max_bad_steps:
            raise NonFiniteLossError(f"{self.bad_steps} consecutive non-finite losses, first in {term} at step "
                                     f"{self.step}; lower train.lr or check the data (train.max_bad_steps)")

    def _checkpoint(self) -> None:
        state = {"step": self.step, "epoch": self.epoch, "position": self.position,
                 "skipped_steps": self.skipped_steps}
        ds.save(self.engine, self.ckpt_dir, self.step, state, self.cfg.train.keep_checkpoints)

    # --------------------------------------------------------------- tracking
    def _start_tracking(self):
        if self.rank != 0:
            return None
        from distill import tracking
        self._tracking = tracking
        tags = {f"teacher.{n}.weights_digest": str(m["producer"].get("weights_digest"))
                for n, m in self.dataset.targets.items()}
        ctx = tracking.stage_run(self.cfg, "train", self.parent_run_id, tags, self.flow_run_id)
        run = ctx.__enter__()
        self._run_ctx = ctx
        tracking.log_manifest_input(self.dataset.samples_dir, self.dataset.samples, "samples", "train")
        for n, m in self.dataset.targets.items():
            tracking.log_manifest_input(self.dataset.target_dirs[n], m, f"targets/{n}", "train")
        return run

    def _log(self, figures: dict[str, float], samples_per_s: float) -> None:
        """Log the step's figures (already averaged over micro-batches and ranks) from rank 0."""
        if self.rank != 0:
            return
        import mlflow
        metrics = dict(figures)
        metrics.update({"lr": self.engine.get_lr()[0], "throughput/samples_per_s": samples_per_s,
                        "train/skipped_steps": self.skipped_steps})
        self.history.append({"step": self.step, **metrics})
        mlflow.log_metrics(metrics, step=self.step)

    def _finish(self, run, folder: Path | None) -> dict:
        summary = {"steps": self.step, "skipped_steps": self.skipped_steps, "student_dir": str(folder) if folder else None,
                   "final_loss": self.history[-1]["loss/total"] if self.history else math.nan}
        if self.rank == 0:
            import shutil

            import mlflow

            from distill.plots import training_plots
            tokenizer = self.dataset.target_dirs[self.dataset.language] / "tokenizer"
            if tokenizer.is_dir():  # the student speaks the language teacher's tokens
                shutil.copytree(tokenizer, folder, dirs_exist_ok=True)
            for path in training_plots(self.history, output_path(self.cfg, "plots")):
                mlflow.log_artifact(str(path), artifact_path="plots")
            mlflow.log_artifacts(str(folder), artifact_path="student")
            summary["mlflow_run_id"] = run.info.run_id
            self._run_ctx.__exit__(None, None, None)
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
