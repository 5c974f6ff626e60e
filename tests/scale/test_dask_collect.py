"""`collect.runner=dask`: a 2-worker LocalCluster writes the same bytes as the local runner."""

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from data.shards import load_manifest
from distill.config import load_config
from flows.collect import run_collect

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def count_teacher_builds():
    """Run on each worker: count every teacher construction from now on (load_teacher builds through teacher_class)."""
    import teachers.registry as registry
    if getattr(registry, "_build_counts", None) is None:
        registry._build_counts = Counter()
        original = registry.teacher_class

        def counted(kind):
            cls = original(kind)

            def build(tc, cache_dir):
                registry._build_counts[tc.name] += 1
                return cls(tc, cache_dir)
            return build
        registry.teacher_class = counted


def teacher_builds() -> dict:
    import teachers.registry as registry
    return dict(getattr(registry, "_build_counts", {}))


def shard_digests(folder) -> dict:
    """{file: (manifest sha256, sha256 of the bytes on disk)} of a shard folder."""
    return {s["file"]: (s["sha256"], hashlib.sha256(Path(folder, s["file"]).read_bytes()).hexdigest())
            for s in load_manifest(folder)["shards"]}


def assert_same_shards(summary, local):
    assert set(summary["targets"]) == set(local["targets"]) and summary["forwards"] == local["forwards"]
    assert shard_digests(summary["samples_dir"]) == shard_digests(local["samples_dir"])
    for name in local["targets"]:
        dask_shards, local_shards = shard_digests(summary["targets"][name]), shard_digests(local["targets"][name])
        assert len(dask_shards) == 3 and dask_shards == local_shards
        assert all(manifest == on_disk for manifest, on_disk in dask_shards.values())


@pytest.mark.slow
def test_dask_collection_matches_local_bytes_and_loads_each_teacher_once(tiny_collected, cache_dir, tmp_path):
    from distributed import Client, LocalCluster

    local_cfg, local = tiny_collected
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                      env={"OMP_NUM_THREADS": "1"}) as cluster, Client(cluster) as client:
        client.run(count_teacher_builds)
        cfg = load_config(TINY, [f"output_dir={tmp_path / 'out'}", f"cache_dir={cache_dir}",
                                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "collect.runner=dask",
                                 f"collect.dask_address={cluster.scheduler_address}"])
        summary = run_collect(cfg)
        builds = client.run(teacher_builds)

    assert_same_shards(summary, local)
    names = set(local["targets"])
    # 3 teachers × 3 shards ran on the workers: each worker built each teacher at most once,
    # and every teacher was built on some worker.
    assert len(builds) == 2
    assert all(n <= 1 for counts in builds.values() for n in counts.values()), builds
    assert set().union(*builds.values()) == names, builds


@pytest.mark.slow
def test_dask_runner_starts_its_own_local_cluster(tiny_collected, cache_dir, tmp_path):
    """`collect.runner=dask` without an address: run_collect starts a LocalCluster of `collect.dask_workers`."""
    cfg = load_config(TINY, [f"output_dir={tmp_path / 'out'}", f"cache_dir={cache_dir}",
                             f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "collect.runner=dask",
                             "collect.dask_workers=2"])
    assert_same_shards(run_collect(cfg), tiny_collected[1])
