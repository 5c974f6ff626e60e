"""The adapt-teacher flow before collection: cached adapters, the MLflow run, the corrected manifest."""

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from data.shards import load_manifest
from flows.cli import main

ADAPT = "teachers.language.adapt={folds: 2, rank: 4, layers: null, lr: 0.01, batch_size: 8, max_steps: 6, " \
        "eval_every: 3, val_rows: 16}"


@pytest.mark.slow
def test_collect_with_adapt_fits_once_logs_before_and_after_and_records_the_adapters(prefect_harness, tiny_cfg):
    from flows.collect import run_collect
    cfg = tiny_cfg(ADAPT, "teachers.vision=[]")
    first = run_collect(cfg)
    manifest = load_manifest(first["targets"]["lm"])
    adapt = manifest["producer"]["adapt"]
    assert adapt["folds"] == 2 and [a["fold"] for a in adapt["adapters"]] == [0, 1]
    assert all(len(a["digest"]) == 64 for a in adapt["adapters"])
    client = MlflowClient(cfg.tracking.uri)
    runs = client.search_runs([mlflow.get_experiment_by_name(cfg.tracking.experiment).experiment_id],
                              "tags.`mmtp.stage` = 'adapt'")
    assert len(runs) == 1 and runs[0].data.tags["adapt.cached"] == "False"
    m = runs[0].data.metrics
    assert m["adapt/val_perplexity_after"] <= m["adapt/val_perplexity_before"]
    assert {"adapt/fold0/val_perplexity_before", "adapt/fold1/val_perplexity_after"} <= set(m)
    again = run_collect(cfg)  # the adapters come from the cache and every shard is reused
    assert again["shards_reused"]["lm"] == len(manifest["shards"])
    runs = client.search_runs([runs[0].info.experiment_id], "tags.`mmtp.stage` = 'adapt'")
    assert sorted(r.data.tags["adapt.cached"] for r in runs) == ["False", "True"]


def test_mmtp_adapt_names_a_bad_adapt_key_in_one_line(capsys, tmp_path):
    code = main(["adapt", "--config", "configs/tiny.yaml", f"output_dir={tmp_path}",
                 "teachers.language.adapt={fold: 2}"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fold" in err[0]
