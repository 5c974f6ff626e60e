"""Start training: in this process for one rank, or one process per rank through a launcher.

`train.nproc > 1` runs `python -m torch.distributed.run --nproc_per_node N -m distill.train.recipe` on
this machine (gloo on CPU, nccl on GPUs); `train.hostfile` hands the same module to DeepSpeed's
launcher for several nodes. The ranks read the resolved config from `output_dir/train_config.yaml`
and rank 0 writes `output_dir/train_summary.json`, which is read back here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from omegaconf import OmegaConf

from data.shards import atomic_write_bytes
from distill.config.load import output_path
from distill.train.engine import RANK_VARS, free_port


def launcher_command(cfg, config_path, parent_run_id: str | None, flow_run_id: str | None = None) -> list[str]:
    args = ["--config", str(config_path), "--parent-run-id", parent_run_id or "", "--flow-run-id", flow_run_id or ""]
    if cfg.train.hostfile:
        return ["deepspeed", "--hostfile", cfg.train.hostfile, "--module", "distill.train.recipe", *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cfg.train.nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "distill.train.recipe", *args]


def run_training(cfg, parent_run_id: str | None = None, flow_run_id: str | None = None) -> dict:
    """Train as the config says; returns the summary (steps, final loss, student folder, MLflow run id)."""
    if cfg.train.nproc <= 1 and not cfg.train.hostfile:
        from distill.train.recipe import DistillRecipe
        recipe = DistillRecipe(cfg, parent_run_id, flow_run_id)
        recipe.setup()
        return recipe.train()
    config_path = output_path(cfg, "train_config.yaml")
    atomic_write_bytes(config_path, OmegaConf.to_yaml(cfg).encode())
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}  # the launcher sets its own
    # Split the cores between ranks rather than oversubscribing them.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // max(cfg.train.nproc, 1))))
    summary_path = output_path(cfg, "train_summary.json")
    summary_path.unlink(missing_ok=True)
    proc = subprocess.run(launcher_command(cfg, config_path, parent_run_id, flow_run_id), env=env)
    if proc.returncode != 0 or not summary_path.exists():
        raise RuntimeError(f"distributed training failed (exit code {proc.returncode}); see the ranks' output above")
    return json.loads(summary_path.read_text())
