"""Scale-out benchmark: collection on a Dask LocalCluster of 1 vs 2 workers, training on 1 vs 2 processes.

    python bench/scale.py [--config configs/tiny.yaml] [--steps 30] [key=value ...]

Prints one JSON object. Collection: the same samples shards (built once, copied into each run's
output_dir) collected by the real flow with `collect.runner=dask` on a cluster that is already up;
samples/s = samples × teachers ÷ the flow's wall time, which includes loading each teacher once on
each worker and writing the manifests. Training: `run_training` with `train.nproc` 1 and 2 on the
same shards; samples/s is the last `throughput/samples_per_s` the run logged to MLflow (samples of
all ranks since the first step, so it includes the first, slower steps).
"""

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distill.env import apply_env_defaults  # noqa: E402

apply_env_defaults()

import mlflow  # noqa: E402

from data.samples import build_samples  # noqa: E402
from distill.config import load_config, output_path, teacher_configs, to_container  # noqa: E402
from distill.train import run_training  # noqa: E402
from flows.collect import run_collect  # noqa: E402

# The tiny config's data, 4× larger, so that each worker has several shards to do.
TINY_SLICE = ["data.sources.0.limit=384", "data.sources.1.n=192"]


def collect_on_cluster(cfg_for, samples_dir: Path, workers: int, root: Path) -> dict:
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None,
                      env={"OMP_NUM_THREADS": "1"}) as cluster, Client(cluster):
        cfg = cfg_for(root / f"dask{workers}", "collect.runner=dask",
                      f"collect.dask_address={cluster.scheduler_address}")
        shutil.copytree(samples_dir, output_path(cfg, "samples"))
        start = time.perf_counter()
        summary = run_collect(cfg)
        seconds = time.perf_counter() - start
    rows = json.loads((samples_dir / "manifest.json").read_text())["rows"]
    teachers = len(summary["targets"])
    return {"workers": workers, "seconds": round(seconds, 2), "samples": rows, "teachers": teachers,
            "samples_per_s": round(rows * teachers / seconds, 1)}


def train(cfg_for, shards_root: Path, nproc: int, steps: int, root: Path) -> dict:
    out = root / f"train{nproc}"
    out.mkdir()
    for name in ("samples", "targets"):
        (out / name).symlink_to(shards_root / name, target_is_directory=True)
    cfg = cfg_for(out, f"train.nproc={nproc}", f"train.max_steps={steps}", f"train.checkpoint_every={steps}",
                  "train.progress=false", output_dir=out)
    start = time.perf_counter()
    summary = run_training(cfg)
    seconds = time.perf_counter() - start
    mlflow.set_tracking_uri(cfg.tracking.uri)
    history = mlflow.MlflowClient().get_metric_history(summary["mlflow_run_id"], "throughput/samples_per_s")
    rate = max(history, key=lambda m: m.step).value
    return {"nproc": nproc, "steps": summary["steps"], "micro_batch_size": cfg.train.micro_batch_size,
            "samples_per_s": round(rate, 1), "seconds_with_startup": round(seconds, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.yaml")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    # One Prefect server for every process: without a PREFECT_API_URL each Dask worker would start its
    # own temporary server (10-20 s each) inside the timed region.
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, temporary_settings
    server = SubprocessASGIServer()
    server.start(timeout=120)
    try:
        with temporary_settings({PREFECT_API_URL: server.api_url}):
            run(args)
    finally:
        server.stop()


def run(args) -> None:
    overrides = (TINY_SLICE if Path(args.config).name == "tiny.yaml" else []) + args.overrides
    with tempfile.TemporaryDirectory(prefix="mmtp-scale-") as tmp:
        root = Path(tmp)

        def cfg_for(out: Path, *extra, output_dir=None):
            return load_config(args.config, [*overrides, f"output_dir={output_dir or out / 'out'}",
                                             f"tracking.uri=sqlite:///{root / 'mlflow.db'}", *extra])

        # Warm-up with the local runner: builds the samples shards and tiny teachers, starts Prefect's
        # server, and gives the training runs their shards.
        base = cfg_for(root / "local")
        build_samples(to_container(base)["data"], output_path(base, "samples"), base.seed, progress=False)
        run_collect(base)
        result = {"config": args.config, "overrides": overrides,
                  "teachers": [t.name for t in teacher_configs(base)],
                  "collect": [collect_on_cluster(cfg_for, output_path(base, "samples"), w, root) for w in (1, 2)],
                  "train": [train(cfg_for, output_path(base), n, args.steps, root) for n in (1, 2)]}
        c, t = result["collect"], result["train"]
        result["collect_speedup_2_vs_1"] = round(c[1]["samples_per_s"] / c[0]["samples_per_s"], 2)
        result["train_speedup_2_vs_1"] = round(t[1]["samples_per_s"] / t[0]["samples_per_s"], 2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
