"""The DeepSpeed side of training: process group, engine config, checkpoints, HF export.

Checkpoints are DeepSpeed's own (`save_checkpoint`), one tag per step, with the data position
and step in the client state. A tag counts as complete only once its `complete.json` marker is
written after the save returned, so a run killed mid-save resumes from the previous tag.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from data.shards import atomic_write_json

MARKER = "complete.json"
# Set beside RANK & co. when a single process makes its own process group (DeepSpeed reads them later).
SINGLE_PROCESS_PID = "MMTP_SINGLE_PROCESS_PID"
RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", SINGLE_PROCESS_PID)


def init_distributed() -> tuple[int, int]:
    """Join (or, for one in-process run, create) the process group; returns (rank, world size)."""
    import deepspeed
    if not dist.is_initialized():
        # Ours: no launcher set RANK, or a parent's own single-process variables were inherited.
        if "RANK" not in os.environ or os.environ.get(SINGLE_PROCESS_PID, str(os.getpid())) != str(os.getpid()):
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(free_port()), **{SINGLE_PROCESS_PID: str(os.getpid())})
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def precision(train) -> str:
    """`bf16` or `fp32`: `auto` is bf16 on CUDA and fp32 on CPU."""
    value = getattr(train.precision, "value", train.precision)
    if value == "auto":
        return "bf16" if torch.cuda.is_available() else "fp32"
    return value


def deepspeed_config(train, total_steps: int) -> dict:
    """The DeepSpeed JSON config for `train` (a TrainConfig)."""
    zero = {"stage": train.zero_stage}
    if train.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if train.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": train.grad_clip,
        "zero_optimization": zero,
        # check_grad_overflow: a step with non-finite gradients is skipped, not applied (the trainer
        # relies on it to drop a step with a non-finite micro-batch).
        "bf16": {"enabled": precision(train) == "bf16", "check_grad_overflow": True},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if not _client_optimizer(train):
        config["optimizer"] = {"type": "AdamW", "params": {
            "lr": train.lr, "betas": list(BETAS), "eps": EPS, "weight_decay": train.weight_decay,
            # DeepSpeed's fused/CPU Adam are C++ JIT builds; plain torch AdamW needs none on CPU.
            "torch_adam": not torch.cuda.is_available()}}
    return config


BETAS, EPS = (0.9, 0.95), 1e-8


def _client_optimizer(train) -> bool:
    """ZeRO-0 in fp32 hands our optimizer straight to torch: it must skip non-finite steps itself."""
    return train.zero_stage == 0 and precision(train) == "fp32"


class FiniteAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite and says so in `overflow`, the
    attribute DeepSpeed reads after every step (its ZeRO and bf16 optimizers do the same check)."""

    overflow = False

    def step(self, closure=None):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        self.overflow = bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())
        if self.overflow:
            self.zero_grad(set_to_none=True)
            return None
        return super().step(closure)


def param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups as HF and torchtune build them: decay on weight matrices (linear, conv and
    embedding `weight`s) only; none on biases, norm scales, learned tokens and log-variances."""
    decay, rest = [], []
    for name, p in module.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and name.rsplit(".", 1)[-1] == "weight" else rest).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup (the first step already trains at lr/warmup), then cosine down to min_ratio."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_engine(module: torch.nn.Module, train, total_steps: int):
    import deepspeed

    def scheduler(optimizer):  # DeepSpeed checkpoints its state with the engine
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, train.warmup_steps, total_steps, train.min_lr_ratio))

    groups = param_groups(module, train.weight_decay)
    optimizer = FiniteAdamW(groups, lr=train.lr, betas=BETAS, eps=EPS) if _client_optimizer(train) else None
    engine, _, _, _ = deepspeed.initialize(model=module, model_parameters=groups, optimizer=optimizer,
                                           lr_scheduler=scheduler, config=deepspeed_config(train, total_steps))
    return engine


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def complete_tags(ckpt_dir: str | Path) -> list[str]:
    """Tags with a completion marker, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.exists():
        return []
    return sorted(p.parent.name for p in ckpt_dir.glob(f"step-*/{MARKER}"))


def save(engine, ckpt_dir: str | Path, step: int, client_state: dict, keep: int, scheduled: bool = True) -> str:
    """Save a checkpoint, mark it complete (rank 0), and drop all but the newest `keep` scheduled tags. The
    marker holds the step and the recipe stage, so a resume knows which stage's engine to build before loading.

    A checkpoint written off the schedule (`scheduled=False`: a stop by a signal) exists only to resume from:
    it does not count against `keep`, and the next checkpoint removes it. Otherwise a run stopped and resumed
    would keep one scheduled checkpoint fewer than one that ran through."""
    ckpt_dir, tag = Path(ckpt_dir), tag_for(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    if dist.is_initialized():
        dist.barrier()
    if engine.global_rank == 0:
        atomic_write_json(ckpt_dir / tag / MARKER,
                          {"step": step, "stage": client_state.get("stage"), "scheduled": scheduled})
        tags = complete_tags(ckpt_dir)
        on_schedule = [t for t in tags if json.loads((ckpt_dir / t / MARKER).read_text()).get("scheduled", True)]
        for old in [t for t in tags[:-1] if t not in on_schedule] + on_schedule[:-keep]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    return tag


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file holds pickled objects beyond tensors and DeepSpeed's own state."""


def _deepspeed_state_classes() -> list:
    """The only non-tensor objects DeepSpeed's checkpoints hold (ZeRO 0-3, fp32 and bf16)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, ZeroStageEnum, fragment_address]


def verify_checkpoint(tag_dir: str | Path) -> None:
    """Load every file of a checkpoint with `weights_only=True` first.

    DeepSpeed itself unpickles with `weights_only=False`; a file that only a full unpickler could
    read (arbitrary code on load) is refused here, naming the file, before DeepSpeed opens it.
    """
    for path in sorted(Path(tag_dir).glob("*.pt")):
        try:
            with torch.serialization.safe_globals(_deepspeed_state_classes()):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any refusal of the safe unpickler
            reason = str(e).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
            raise UnsafeCheckpointError(f"{path}: refused to load: it holds more than tensors and DeepSpeed "
                                        f"state ({reason}); delete this checkpoint if you did not write it") from None


def latest_marker(ckpt_dir: str | Path) -> dict | None:
    """The completion marker of the newest complete checkpoint ({"step", "stage"}), or None."""
    tags = complete_tags(ckpt_dir)
    return json.loads((Path(ckpt_dir) / tags[-1] / MARKER).read_text()) if tags else None


def load_latest(engine, ckpt_dir: str | Path) -> dict | None:
    """Load the newest complete checkpoint; returns its client state, or None when there is none."""
    tags = complete_tags(ckpt_dir)
    if not tags:
        return None
    verify_checkpoint(Path(ckpt_dir) / tags[-1])
    path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=tags[-1])
    if path is None:
        raise RuntimeError(f"{Path(ckpt_dir) / tags[-1]}: DeepSpeed could not load this checkpoint")
    return client_state


def consolidated_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """The full module state dict on rank 0 (None elsewhere), gathered across ZeRO-3 partitions."""
    if engine.zero_optimization_stage() == 3:
        state = engine._zero3_consolidated_16bit_state_dict()
    else:
        state = engine.module.state_dict()
    if engine.global_rank != 0:
        return None
    return {k: v.detach().to("cpu", torch.float32).clone() for k, v in state.items()}


def export_student(engine, folder: str | Path, prefix: str = "student.") -> Path | None:
    """Save the student as an HF folder (safetensors) that `AutoModel.from_pretrained` loads."""
    state = consolidated_state_dict(engine)
    folder = Path(folder)
    if state is not None:
        student = engine.module.student
        weights = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        student.save_pretrained(str(tmp), state_dict=weights, safe_serialization=True)
        (tmp / "export.json").write_text(json.dumps({"zero_stage": engine.zero_optimization_stage()}))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    if dist.is_initialized():
        dist.barrier()
    return folder if state is not None else None
