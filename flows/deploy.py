"""Scheduled Prefect deployments, registered and served by `mmtp deploy` (docs/deployments.md).

    scheduled-collect/nightly-collect    collect-soft-targets, nightly
    scheduled-pipeline/weekly-distill    distill-pipeline (collect → train → evaluate), weekly

Both take two parameters: `config`, the resolved config given to `mmtp deploy` (a dict of plain
values), and `overrides`, a list of `key=value` strings applied on top for one run. Prefect merges
a run's parameters onto the deployment's one top-level key at a time, so changing one config key
through `config` would mean sending the whole config; `overrides` changes just that key.

The entry flows are thin wrappers: they apply the overrides and call run_collect / run_pipeline,
so the collect stage still picks the Dask task runner when `collect.runner=dask`.
"""

from __future__ import annotations

import json

from prefect import flow, serve
from prefect.schedules import Cron
from prefect.settings import PREFECT_API_URL
from prefect.types.entrypoint import EntrypointType

from distill.config import ConfigError, load_config, to_container
from flows.collect import run_collect
from flows.pipeline import run_pipeline

CRON_COLLECT = "0 2 * * *"  # every night at 02:00
CRON_DISTILL = "0 3 * * 0"  # Sundays at 03:00


def resolve(config: dict, overrides: list[str] | None = None):
    """`config` plus `key=value` overrides, validated exactly as `mmtp --config FILE key=value` is."""
    return load_config(config, list(overrides or []))


@flow(name="scheduled-collect", log_prints=True)
def scheduled_collect(config: dict, overrides: list[str] | None = None) -> dict:
    """Entry flow of `nightly-collect`: the collect-soft-targets subflow on config + overrides."""
    return run_collect(resolve(config, overrides))


@flow(name="scheduled-pipeline", log_prints=True)
def scheduled_pipeline(config: dict, overrides: list[str] | None = None) -> dict:
    """Entry flow of `weekly-distill`: the distill-pipeline subflow on config + overrides."""
    return run_pipeline(resolve(config, overrides))


def build_deployments(cfg, cron_collect: str | None = None, cron_distill: str | None = None,
                      timezone: str = "UTC") -> list:
    """The two deployments, not yet registered. None: the default cron; '': no schedule."""
    params = {"config": to_container(cfg), "overrides": []}
    try:
        json.dumps(params, allow_nan=False)  # Prefect stores parameters as JSON
    except (TypeError, ValueError) as e:
        raise ConfigError(f"the config does not serialise to JSON: {e}") from None
    cron_collect = CRON_COLLECT if cron_collect is None else cron_collect
    cron_distill = CRON_DISTILL if cron_distill is None else cron_distill
    specs = [(scheduled_collect, "nightly-collect", cron_collect, "--cron-collect",
              "Collect the teachers' soft targets into Arrow shards."),
             (scheduled_pipeline, "weekly-distill", cron_distill, "--cron-distill",
              "Collect, train and evaluate the student under one MLflow parent run.")]
    deployments = []
    for fl, name, cron, option, text in specs:
        try:
            schedules = [Cron(cron, timezone=timezone)] if cron else []
            deployments.append(fl.to_deployment(
                name, schedules=schedules, parameters=params, description=text, tags=["mmtp-distill"],
                entrypoint_type=EntrypointType.MODULE_PATH))  # importable from any working directory
        except ValueError as e:  # pydantic rejects a bad cron string or timezone
            raise ConfigError(f"{option} {cron!r} (timezone {timezone}): {str(e).splitlines()[0]}") from None
    return deployments


def describe(deployments: list) -> str:
    lines = []
    for d in deployments:
        when = ", ".join(f"cron '{s.schedule.cron}' ({s.schedule.timezone})" for s in d.schedules)
        lines.append(f"  {d.flow_name}/{d.name}: {when or 'no schedule, runs only when triggered'}")
    name = f"{deployments[-1].flow_name}/{deployments[-1].name}"
    lines += ["trigger a run now:",
              f"  prefect deployment run '{name}'",
              f"  prefect deployment run '{name}' --param 'overrides=[\"train.max_steps=300\"]'"]
    return "\n".join(lines)


def deploy(cfg, cron_collect: str | None = None, cron_distill: str | None = None, timezone: str = "UTC",
           serve_them: bool = True) -> list:
    """Register the deployments; with `serve_them`, also execute their runs here until interrupted."""
    deployments = build_deployments(cfg, cron_collect, cron_distill, timezone)
    if not PREFECT_API_URL.value():
        print("note: PREFECT_API_URL is not set, so a temporary Prefect server holds the deployments; "
              "start `prefect server start --host 127.0.0.1` and export "
              "PREFECT_API_URL=http://127.0.0.1:4200/api to trigger runs from another shell")
    if not serve_them:
        for d in deployments:
            d.apply()
        print("registered (nothing runs them until `mmtp deploy` serves them):\n" + describe(deployments))
        return deployments
    print(f"serving against {PREFECT_API_URL.value() or 'a temporary server'}, one run at a time "
          "(Ctrl-C stops and pauses the schedules):\n" + describe(deployments))
    # One run at a time: runs share output_dir (its run lock would fail the second) and the cores.
    serve(*deployments, limit=1, print_starting_message=False)
    return deployments
