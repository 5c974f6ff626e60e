"""`mmtp`: one console script, a subcommand per stage.

    mmtp adapt    --config configs/default.yaml key=value ...
    mmtp collect  --config configs/default.yaml key=value ...
    mmtp train    --config configs/default.yaml key=value ...
    mmtp pipeline --config configs/default.yaml key=value ...
    mmtp onpolicy --config configs/default.yaml key=value ...
    mmtp ui       --config configs/default.yaml
    mmtp deploy   --config configs/default.yaml key=value ... [--cron-collect CRON] [--register-only]

Bad input exits with code 2 and one line: a config problem names the key (and, for a choice, the allowed
values) before anything runs; a vocabulary mismatch names both sizes. Data problems (a corrupt shard) and OS
errors (a full disk, a read-only folder) exit with 1 and one line naming the file and the fix. A stop by SIGTERM
or SIGINT exits with 143 or 130 (docs/reliability.md). `--print-config` prints the resolved config (files merged,
overrides applied) and exits.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from distill.env import apply_env_defaults

# Errors of the user's input or files, reported in one line: exit code by class name (anywhere in the class's
# bases), so that this module imports none of the libraries (and not torch) before the config is checked.
BAD_INPUT = ("ConfigError", "VocabMismatchError")
DATA_ERRORS = ("ShardError", "BadRowsError", "TeacherSourceError", "ManifestMismatchError", "NonFiniteLossError",
               "UnsafeCheckpointError", "FileNotFoundError", "CheckpointsExistError")
OS_FIXES = {errno.ENOSPC: "free space on that disk or choose another output_dir, then re-run (finished shards and "
                          "checkpoints are reused)",
            errno.EDQUOT: "free some of your disk quota, then re-run (finished shards and checkpoints are reused)",
            errno.EROFS: "the file system is read-only: choose another output_dir (or cache_dir)",
            errno.EACCES: "make the folder writable for this user or choose another output_dir (or cache_dir)",
            errno.EPERM: "make the folder writable for this user or choose another output_dir (or cache_dir)"}


def exit_code(e: BaseException) -> int | None:
    """2 for bad input, 1 for a data problem or an OS error of the run's files, None for anything else (a bug:
    its traceback is kept)."""
    names = {c.__name__ for c in type(e).__mro__}
    if names & set(BAD_INPUT):
        return 2
    if names & set(DATA_ERRORS) or (isinstance(e, OSError) and e.errno in OS_FIXES):
        return 1
    return None


def one_line(e: BaseException, cfg=None) -> str:
    if isinstance(e, OSError) and e.errno in OS_FIXES:
        where = e.filename or (f"a file under {cfg.output_dir}" if cfg is not None else "a file")
        return f"{where}: {e.strerror or errno.errorcode[e.errno]}; {OS_FIXES[e.errno]}"
    return " ".join(str(e).split("\n")[0].split()) or type(e).__name__


class QuietKnownErrors(logging.Filter):
    """Prefect logs an exception that ends a task or flow run with its traceback; for the errors above the message
    line is the whole story (the CLI prints it once more, alone, as its last line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and exit_code(record.exc_info[1]) is not None:
            record.exc_info, record.exc_text = None, None
        return True


def _keys_help() -> str:
    """The top-level config keys and their meaning, from the schema (distill/config/reference.py)."""
    from distill.config import top_level_keys
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
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logging.getLogger(name).addFilter(QuietKnownErrors())
    from distill.config import check_command, load_config
    cfg = None
    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            from omegaconf import OmegaConf

            from distill.config import to_container
            print(OmegaConf.to_yaml(to_container(cfg)), end="")
            return 0
        check_command(cfg, args.command)
        return COMMANDS[args.command](cfg, args)
    except KeyboardInterrupt:
        print("mmtp: stopped by Ctrl-C", file=sys.stderr)
        return 130
    except Exception as e:  # one readable line for bad input, data and OS errors; a traceback for bugs
        code = exit_code(e)
        if code is None:
            raise
        print(f"mmtp: error: {one_line(e, cfg)}", file=sys.stderr)
        return code


# The stages that take the config alone: command -> "module:function", imported when the command runs.
STAGES = {"adapt": "flows.adapt:run_adapt", "collect": "flows.collect:run_collect", "train": "flows.train:run_train",
          "evaluate": "flows.evaluate:run_evaluate", "pipeline": "flows.pipeline:run_pipeline",
          "onpolicy": "flows.onpolicy:run_onpolicy"}


def _stage(target: str):
    def run(cfg, args) -> int:
        module, _, function = target.partition(":")
        getattr(importlib.import_module(module), function)(cfg)
        return 0
    return run


def _ui(cfg, args) -> int:
    from flows.ui import run_ui
    return run_ui(cfg, args.port)


def _deploy(cfg, args) -> int:
    from flows.deploy import deploy
    deploy(cfg, args.cron_collect, args.cron_distill, args.timezone, serve_them=not args.register_only)
    return 0


COMMANDS = {**{name: _stage(target) for name, target in STAGES.items()}, "ui": _ui, "deploy": _deploy}

if __name__ == "__main__":
    sys.exit(main())
