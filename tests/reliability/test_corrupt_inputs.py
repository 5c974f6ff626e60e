"""Corrupt shard sets refused by `mmtp train` before any step, naming the file and the fix."""

import json
import shutil
from pathlib import Path

import pytest

from flows.cli import main

TINY = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"


def _truncate(out: Path) -> str:
    shard = out / "targets/lm/shard-00001.arrow"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])
    return "targets/lm/shard-00001.arrow"


def _flip_bytes(out: Path) -> str:
    shard = out / "samples/shard-00000.arrow"
    data = bytearray(shard.read_bytes())
    for i in (len(data) // 4, len(data) // 2):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    return "samples/shard-00000.arrow"


def _edit_manifest(path: Path, edit) -> None:
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


def _wrong_sha256(out: Path) -> str:
    _edit_manifest(out / "targets/clip/manifest.json", lambda m: m["shards"][2].update(sha256="0" * 64))
    return "targets/clip/shard-00002.arrow"


def _missing_shard(out: Path) -> str:
    (out / "targets/vit/shard-00001.arrow").unlink()
    return "targets/vit/shard-00001.arrow"


def _other_teacher(out: Path) -> str:
    clip = json.loads((out / "targets/clip/manifest.json").read_text())["producer"]["weights_digest"]
    _edit_manifest(out / "targets/vit/manifest.json", lambda m: m["producer"].update(weights_digest=clip))
    return "targets/vit/manifest.json"


def _no_digest(out: Path) -> str:  # e.g. a hub teacher, whose weights have no local folder to digest
    _edit_manifest(out / "targets/vit/manifest.json", lambda m: m["producer"].update(weights_digest=None))
    return "targets/vit/manifest.json"


@pytest.mark.parametrize("corrupt", [_truncate, _flip_bytes, _wrong_sha256, _missing_shard, _other_teacher,
                                     _no_digest])
def test_corrupt_shards_are_refused_before_any_step(prefect_harness, tiny_collected, tmp_path, capsys, corrupt):
    src, out = Path(tiny_collected[0].output_dir), tmp_path / "run"
    for name in ("samples", "targets"):
        shutil.copytree(src / name, out / name)
    vit = json.loads((out / "targets/vit/manifest.json").read_text())["producer"]["weights_digest"]
    assert vit
    bad = corrupt(out)
    # The config pins the vit teacher's real digest, so a manifest naming other weights is refused.
    code = main(["train", "--config", str(TINY), f"output_dir={out}", f"cache_dir={tiny_collected[0].cache_dir}",
                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "train.progress=false",
                 f"teachers.vision.0.weights_digest={vit}"])
    assert code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mmtp: error:")]
    assert len(errors) == 1
    assert str(out / bad) in errors[0] and "re-run `mmtp collect`" in errors[0]
    assert not (out / "checkpoints").exists() and not (out / "train_summary.json").exists()
    assert not (out / "student").exists() and not (out / "plots").exists()
    if (tmp_path / "mlflow.db").exists():  # no train run, hence no step metric
        from mlflow.tracking import MlflowClient
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        experiments = [e.experiment_id for e in client.search_experiments()]
        assert not [r for r in client.search_runs(experiments) if r.data.metrics]


def test_caption_of_100_times_the_limit_is_cut_at_a_word_boundary():
    from data.samples import clean_caption
    caption, reason = clean_caption("lorem ipsum " * 500, 60)  # 6000 characters
    assert reason == "truncated_caption" and 0 < len(caption) <= 60 and caption.split()[-1] in ("lorem", "ipsum")
