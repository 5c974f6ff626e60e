"""`mmtp`: one console script, a subcommand per stage.

    mmtp adapt    --config configs/default.yaml key=value ...
    mmtp collect  --config configs/default.yaml key=value ...
    mmtp train    --config configs/default.yaml key=value ...
    mmtp pipeline --config configs/default.yaml key=value ...
    mmtp onpolicy --config configs/default.yaml key=value ...
    mmtp ui       --config configs/default.yaml
    mmtp deploy   --config configs/default.yaml key=value ... [--cron-collect CRON] [--register-only]

Config problems exit with code 2 and one line naming the key (and, for a choice, the allowed
values), before anything runs; data problems exit with 1 and one line naming the file.
`--print-config` prints the resolved config (files merged, overrides applied) and exits.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys

from distill.env import apply_env_defaults

DATA_ERRORS = ("ShardError", "BadRowsError", "VocabMismatchError", "TeacherSourceError", "ManifestMismatchError",
               "NonFiniteLossError", "UnsafeCheckpointError", "FileNotFoundError", "CheckpointsExistError",
               "TrainingStopped")


def _keys_help() -> str:
    """The top-level config keys and their meaning, from the schema (distill/configref.py)."""
    from distill.configref import top_level_keys
    keys = top_level_keys()
    width = max(len(k) for k, _ in keys)
    lines = [f"  {k:<{width}}  {meaning}" for k, meaning in keys]
    return "top-level config keys (every key: docs/config.md):\n" + "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    epilog = _keys_help()
    p = argparse.ArgumentParser(prog="mmtp", description=__doc__.splitlines()[0], epilog=epilog,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in [("adapt", "correct the language teacher before collection: LoRA on the train captions, "
                        "cross-fitted over folds (teachers.language.adapt; docs/teachers.md)"),
                       ("collect", "run the teachers over the data and write soft-target shards"),
                       ("train", "distil the student on the collected shards with DeepSpeed"),
                       ("evaluate", "evaluate a student (evaluate.student=<folder or MLflow run id>) on the test "
                        "split"),
                       ("pipeline", "run every stage: collect, train, evaluate, under one MLflow parent run"),
                       ("onpolicy", "on-policy distillation rounds (GKD) from the run's trained student: it "
                        "generates, the teacher scores, training resumes on the mix (docs/onpolicy.md)"),
                       ("ui", "open the MLflow UI on 127.0.0.1 over this project's tracking store"),
                       ("deploy", "register the scheduled Prefect deployments (the config is their default "
                        "parameter) and serve them")]:
        s = sub.add_parser(name, help=text, description=text, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        s.add_argument("--config", action="append", help="YAML config, repeatable: later files override "
                       "earlier ones (default: configs/default.yaml)")
        s.add_argument("--print-config", action="store_true",
                       help="print the resolved config as YAML and exit without running")
        s.add_argument("overrides", nargs="*", metavar="key=value", help="omegaconf overrides")
        if name == "ui":
            s.add_argument("--port", type=int, default=5000)
        if name == "deploy":
            s.add_argument("--cron-collect", help="nightly-collect schedule (default '0 2 * * *'; '' for none)")
            s.add_argument("--cron-distill", help="weekly-distill schedule (default '0 3 * * 0'; '' for none)")
            s.add_argument("--timezone", default="UTC", help="IANA timezone of both schedules")
            s.add_argument("--register-only", "--no-serve", action="store_true",
                           help="register or update the deployments and return without serving them")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.config = args.config or ["configs/default.yaml"]
    apply_env_defaults()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from distill.config import ConfigError, load_config
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"mmtp: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        from omegaconf import OmegaConf

        from distill.config import to_container
        print(OmegaConf.to_yaml(to_container(cfg)), end="")
        return 0
    try:
        return COMMANDS[args.command](cfg, args)
    except ConfigError as e:
        print(f"mmtp: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # one readable line for known data problems; a traceback for bugs
        if type(e).__name__ in DATA_ERRORS:
            print(f"mmtp: error: {e}", file=sys.stderr)
            return 1
        raise


def _adapt(cfg, args) -> int:
    from flows.adapt import run_adapt
    run_adapt(cfg)
    return 0


def _collect(cfg, args) -> int:
    from flows.collect import run_collect
    run_collect(cfg)
    return 0


def _train(cfg, args) -> int:
    from flows.train import run_train
    run_train(cfg)
    return 0


def _evaluate(cfg, args) -> int:
    from flows.evaluate import run_evaluate
    run_evaluate(cfg)
    return 0


def _pipeline(cfg, args) -> int:
    from flows.pipeline import run_pipeline
    run_pipeline(cfg)
    return 0


def _onpolicy(cfg, args) -> int:
    from flows.onpolicy import run_onpolicy
    run_onpolicy(cfg)
    return 0


def _ui(cfg, args) -> int:
    from distill.tracking import tracking_uri
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri(cfg),
           "--host", "127.0.0.1", "--port", str(args.port)]
    print(f"MLflow UI on http://127.0.0.1:{args.port}  (Ctrl-C stops it)")
    return subprocess.call(cmd)


def _deploy(cfg, args) -> int:
    from flows.deploy import deploy
    deploy(cfg, args.cron_collect, args.cron_distill, args.timezone, serve_them=not args.register_only)
    return 0


COMMANDS = {"adapt": _adapt,
            "collect": _collect, "train": _train, "evaluate": _evaluate, "pipeline": _pipeline, "onpolicy": _onpolicy,
            "ui": _ui, "deploy": _deploy}

if __name__ == "__main__":
    sys.exit(main())
