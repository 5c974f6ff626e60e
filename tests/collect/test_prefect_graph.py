"""The dependency graphs Prefect records (each run's `task_inputs`, which the UI draws) show the true data flow:
samples → every teacher × shard task → that teacher's finalize, and collect → distill → evaluate."""

import pytest
from mlflow.tracking import MlflowClient


def upstream(flow_run_id: str) -> dict[str, set[str]]:
    """Each task run of the flow run -> the names of the runs its `task_inputs` point at. A subflow run shows in its
    parent as a task run (named <flow name>-<n>), and other runs point at it by its flow run id."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId

    with get_client(sync_client=True) as client:
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        subflows = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
    subflow_of = {f.parent_task_run_id: f.id for f in subflows}
    names = {t.id: t.name for t in tasks} | {subflow_of[t.id]: t.name for t in tasks if t.id in subflow_of}
    edges = {t.name: {names.get(i.id, str(i.id)) for inputs in t.task_inputs.values() for i in inputs} for t in tasks}
    assert len(edges) == len(tasks), f"task run names are not unique: {sorted(t.name for t in tasks)}"
    return edges


def flow_run_id(summary: dict, cfg) -> str:
    return MlflowClient(cfg.tracking.uri).get_run(summary["mlflow_run_id"]).data.tags["prefect.flow_run_id"]


def test_collect_graph_shows_samples_then_each_teachers_shards_then_its_finalize(prefect_harness, tiny_cfg):
    from flows.collect import run_collect

    cfg = tiny_cfg()
    edges = upstream(flow_run_id(run_collect(cfg), cfg))

    teachers = ("lm", "vit", "clip")
    shards = {t: {n for n in edges if n.startswith(f"{t}/shard-")} for t in teachers}
    assert all(len(s) > 1 for s in shards.values()), sorted(edges)
    expected = {"samples": set()}
    expected |= {n: {"samples"} for t in teachers for n in shards[t]}
    expected |= {f"{t}/finalize": {"samples", *shards[t]} for t in teachers}
    assert edges == expected


@pytest.mark.slow
def test_pipeline_graph_shows_collect_then_distill_then_evaluate(prefect_harness, tiny_cfg):
    from flows.pipeline import run_pipeline

    cfg = tiny_cfg("train.progress=false")
    edges = upstream(flow_run_id(run_pipeline(cfg), cfg))

    stage = {name.rsplit("-", 1)[0]: name for name in edges}  # subflow task runs are named <flow name>-<key>
    assert set(stage) == {"collect-soft-targets", "distill-student", "evaluate-student"}, sorted(edges)
    assert edges == {stage["collect-soft-targets"]: set(),
                     stage["distill-student"]: {stage["collect-soft-targets"]},
                     stage["evaluate-student"]: {stage["collect-soft-targets"], stage["distill-student"]}}
